// Internal to lib/dist: helpers shared by its files (not part of the public API).
#pragma once
#include <torch/torch.h>

#include <chrono>
#include <string>
#include <vector>

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
class ProcessGroup;

// Sums gradients onto their owners: for each rank r, one reduce of the flat fp32 gradients r owns
// (parallel.cpp). `owners[i]` is the owner of grads[i], or -1 for a gradient that is already where
// it belongs. The owner's tensors receive the sums (in their own dtype); the others are emptied.
void reduce_to_owners(ProcessGroup& pg, std::vector<torch::Tensor>& grads, const std::vector<int>& owners);

// c10d errors carry C++ stack traces after the first line; users need the first line.
inline std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }
}  // namespace llmtune::dist
