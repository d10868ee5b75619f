// llmtune stand-in for a Gloo header (see ../README.md): forward declarations only.
#pragma once
#include <chrono>
#include <string>
#include <vector>
namespace gloo {
class Context;
namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport
}  // namespace gloo
