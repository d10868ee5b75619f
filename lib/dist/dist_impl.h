// Internal to lib/dist: helpers shared by its files (not part of the public API).
#pragma once
#include <chrono>
#include <string>

#include <c10/util/intrusive_ptr.h>

namespace c10d {
class Backend;
class Store;
}  // namespace c10d

namespace llmtune::dist::detail {

// ProcessGroupNCCL on `store` (nccl_group.cpp); Error when this build has no NCCL headers.
c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                            std::chrono::milliseconds timeout);

}  // namespace llmtune::dist::detail

namespace llmtune::dist {
// c10d errors carry C++ stack traces after the first line; users need the first line.
inline std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }
}  // namespace llmtune::dist
