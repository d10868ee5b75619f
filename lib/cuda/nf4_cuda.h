// llmtune::cuda — launchers of the NF4/FP4 CUDA kernels (lib/cuda/nf4_kernels.cu), built only when
// nvcc and a CUDA-enabled LibTorch are found (cmake/cuda.cmake); llmtune::quant calls them for
// states on a CUDA device (compile definition LLMTUNE_WITH_CUDA). Plain pointers, no torch types,
// so the .cu files compile quickly. The per-element arithmetic is quant/nf4_element.h (shared with
// the CPU kernels and unit-tested there).
#pragma once
#include <cstdint>

namespace llmtune::cuda {

struct Nf4View {
  const uint8_t* packed;  // [ceil(rows*cols/2)] device
  const float* absmax;    // recovered per-block scales [n_blocks] device
  int64_t rows, cols, blocksize;
  int type;               // 0 nf4, 1 fp4
};

// dtype codes for activations/outputs: 0 fp32, 1 bf16, 2 fp16.
// out[rows, cols] = dequantized weight.
void nf4_dequantize(const Nf4View& v, void* out, int dtype, void* stream);
// y[N, rows] = x[N, cols] · Wᵀ, fused dequantize-and-dot (one warp per output row); for small N.
void nf4_gemv(const Nf4View& v, const void* x, void* y, int64_t N, int dtype, void* stream);

}  // namespace llmtune::cuda
