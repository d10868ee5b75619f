// The CUDA backend: c10d's ProcessGroupNCCL from libtorch_cuda. Compiled when the NCCL and CUDA
// headers are on the include path (the wheel's nvidia/nccl/include and the CUDA toolkit); never run
// in CI (no GPU there). Without them the factory reports that this build lacks NCCL.
#include "core/core.h"
#include "dist/dist_impl.h"

#if __has_include(<nccl.h>) && __has_include(<cuda_runtime_api.h>) && !defined(LLMTUNE_NO_NCCL)
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL 1
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

namespace llmtune::dist::detail {
c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                            std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
}
}  // namespace llmtune::dist::detail

#else
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace llmtune::dist::detail {
c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>&, int, int,
                                            std::chrono::milliseconds) {
  fail("ddp_backend: nccl is not available in this llmtune build (it was compiled without the NCCL headers); "
       "rebuild with CUDA + NCCL, or use ddp_backend: gloo");
}
}  // namespace llmtune::dist::detail
#endif
