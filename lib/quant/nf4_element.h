// Per-element logic of the bitsandbytes 4-bit format, compiled for both host and device: the
// CPU reference kernels (quant/*.cpp) and the CUDA kernels (cuda/*.cu) include this one file, so
// the unit tests that run these functions on the CPU also cover the arithmetic the GPU executes.
// Internal header (no torch, no STL beyond <cstdint>): formats.md §6.1–6.3.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LLMTUNE_HD __host__ __device__ __forceinline__
#else
#define LLMTUNE_HD inline
#endif

namespace llmtune::quant::elem {

// bitsandbytes' NF4 code book, index -> value (exact fp32 literals; formats.md §6.1).
#define LLMTUNE_NF4_TABLE                                                                                   \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,       \
   -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,         \
   0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,                  \
   0.7229568362236023f, 1.0f}
// FP4 (1 sign, 2 exponent, 1 mantissa bit): {0, .0625, 8, 12, 4, 6, 2, 3} and negatives, divided by
// 12 in fp32. Index 8 is +0 (bitsandbytes builds the table from the Python int -0 == 0).
#define LLMTUNE_FP4_TABLE                                                                                   \
  {0.0f / 12.0f, 0.0625f / 12.0f, 8.0f / 12.0f, 12.0f / 12.0f, 4.0f / 12.0f, 6.0f / 12.0f, 2.0f / 12.0f,  \
   3.0f / 12.0f, 0.0f / 12.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f, -4.0f / 12.0f,            \
   -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f}

// Element i of a packed buffer: element 2k is the HIGH nibble of byte k, 2k+1 the low one.
LLMTUNE_HD uint8_t nibble(const uint8_t* packed, int64_t i) {
  const uint8_t b = packed[i >> 1];
  return (i & 1) ? static_cast<uint8_t>(b & 0x0F) : static_cast<uint8_t>(b >> 4);
}

// Double quantization: the per-64-block scale from its 8-bit code, the per-256 fp32 scale and the
// mean offset. Two roundings (multiply, then add) exactly as bitsandbytes does them in two torch
// ops; the explicit intrinsics stop nvcc from contracting them into one FMA (the host build has no
// FMA in this translation unit's target, and quant's C++ flags keep contraction off).
LLMTUNE_HD float nested_absmax(const uint8_t* codes, const float* nested_absmax_, const float* nested_code,
                               float offset, int64_t block, int64_t nested_blocksize) {
  const float m = nested_code[codes[block]];
  const float s = nested_absmax_[block / nested_blocksize];
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(m, s), offset);
#else
  volatile float prod = m * s;  // volatile: forbid contraction whatever the host flags
  return prod + offset;
#endif
}

// One dequantized element: code[nibble] * absmax[block] in fp32 (a single rounding).
LLMTUNE_HD float dequant(const float* code, const uint8_t* packed, int64_t i, float absmax) {
  return code[nibble(packed, i)] * absmax;
}

// Nearest code by bucketizing against sorted midpoints (torch.bucketize, right=False): the
// smallest k with x <= bounds[k], i.e. a value exactly on a midpoint goes to the lower code.
// `bounds` has n-1 sorted entries; returns an index into the sorted code.
LLMTUNE_HD int bucketize(const float* bounds, int n_bounds, float x) {
  int lo = 0, hi = n_bounds;  // answer in [0, n_bounds]
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (x <= bounds[mid]) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// x scaled into [-1, 1] as bitsandbytes' default path does: full blocks multiply by the fp32
// reciprocal of absmax (clamped to 1e-38), the final partial block divides by its (clamped) absmax.
LLMTUNE_HD float scale_to_unit(float x, float absmax, bool partial_block) {
  const float a = absmax < 1e-38f ? 1e-38f : absmax;
  float s = partial_block ? x / a : x * (1.0f / a);
  return s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
}

// float -> bfloat16 bits, round to nearest even (torch's c10::BFloat16 rule; NaN -> 0x7FC0).
LLMTUNE_HD uint16_t bf16_bits(float f) {
  union { float f; uint32_t u; } v{f};
  if ((v.u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  const uint32_t rounding_bias = 0x7FFFu + ((v.u >> 16) & 1u);
  return static_cast<uint16_t>((v.u + rounding_bias) >> 16);
}

}  // namespace llmtune::quant::elem
