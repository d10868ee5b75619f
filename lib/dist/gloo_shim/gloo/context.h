// llmtune stand-in for a Gloo header (see ../README.md): forward declarations only.
#pragma once
#include <chrono>
#include <string>
#include <vector>
namespace gloo {
// c10d's inline ProcessGroupGloo::setTimeout calls this; only libtorch's own Gloo defines it.
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport
}  // namespace gloo
