// CUDA kernels for bitsandbytes-format 4-bit weights: dequantization to fp32/bf16/fp16 and a fused
// dequantize-GEMV (one warp per output row, fp32 accumulation) for small batches; large batches
// dequantize into a temporary and use cuBLAS through torch (quant/matmul.cpp). Element arithmetic
// comes from quant/nf4_element.h so it is the code the CPU tests exercise. No torch headers here.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/nf4_cuda.h"
#include "quant/nf4_element.h"

namespace llmtune::cuda {
namespace {

__constant__ float kCodes[2][16] = {LLMTUNE_NF4_TABLE, LLMTUNE_FP4_TABLE};

struct Bf16 {
  uint16_t bits;
};

template <class T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<Bf16>(Bf16 v) { return __uint_as_float(uint32_t(v.bits) << 16); }

template <class T> __device__ __forceinline__ T from_f(float f);
template <> __device__ __forceinline__ float from_f<float>(float f) { return f; }
template <> __device__ __forceinline__ __half from_f<__half>(float f) { return __float2half_rn(f); }
template <> __device__ __forceinline__ Bf16 from_f<Bf16>(float f) { return Bf16{quant::elem::bf16_bits(f)}; }

template <class T>
__global__ void dequant_kernel(Nf4View v, T* out) {
  const int64_t n = v.rows * v.cols;
  const float* code = kCodes[v.type];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f<T>(quant::elem::dequant(code, v.packed, i, v.absmax[i / v.blocksize]));
}

constexpr int kWarps = 4, kMaxN = 8;

template <class T>
__global__ void gemv_kernel(Nf4View v, const T* x, T* y, int64_t N) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= v.rows) return;
  const float* code = kCodes[v.type];
  for (int64_t n0 = 0; n0 < N; n0 += kMaxN) {
    const int nn = int(N - n0 < kMaxN ? N - n0 : kMaxN);
    float acc[kMaxN] = {0};
    for (int64_t c = lane; c < v.cols; c += 32) {
      const int64_t i = r * v.cols + c;
      const float w = quant::elem::dequant(code, v.packed, i, v.absmax[i / v.blocksize]);
#pragma unroll
      for (int k = 0; k < kMaxN; ++k)
        if (k < nn) acc[k] += w * to_f<T>(x[(n0 + k) * v.cols + c]);
    }
#pragma unroll
    for (int k = 0; k < kMaxN; ++k) {
      float s = acc[k];
      for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
      if (lane == 0 && k < nn) y[(n0 + k) * v.rows + r] = from_f<T>(s);
    }
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("llmtune cuda: ") + what + ": " + cudaGetErrorString(e));
}

}  // namespace

void nf4_dequantize(const Nf4View& v, void* out, int dtype, void* stream) {
  const int64_t n = v.rows * v.cols;
  const int threads = 256;
  const int blocks = int((n + threads - 1) / threads < 65535 ? (n + threads - 1) / threads : 65535);
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 0) dequant_kernel<float><<<blocks, threads, 0, s>>>(v, static_cast<float*>(out));
  else if (dtype == 1) dequant_kernel<Bf16><<<blocks, threads, 0, s>>>(v, static_cast<Bf16*>(out));
  else dequant_kernel<__half><<<blocks, threads, 0, s>>>(v, static_cast<__half*>(out));
  check(cudaGetLastError(), "nf4_dequantize launch");
}

void nf4_gemv(const Nf4View& v, const void* x, void* y, int64_t N, int dtype, void* stream) {
  const int blocks = int((v.rows + kWarps - 1) / kWarps);
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    gemv_kernel<float><<<blocks, 32 * kWarps, 0, s>>>(v, static_cast<const float*>(x), static_cast<float*>(y), N);
  else if (dtype == 1)
    gemv_kernel<Bf16><<<blocks, 32 * kWarps, 0, s>>>(v, static_cast<const Bf16*>(x), static_cast<Bf16*>(y), N);
  else
    gemv_kernel<__half><<<blocks, 32 * kWarps, 0, s>>>(v, static_cast<const __half*>(x), static_cast<__half*>(y), N);
  check(cudaGetLastError(), "nf4_gemv launch");
}

}  // namespace llmtune::cuda
