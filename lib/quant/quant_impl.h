// Internals of llmtune::quant shared between its .cpp files: helpers of the code books and the
// per-ISA kernel entry points (scalar reference, AVX2, AVX-512) the dispatcher picks from.
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include <nlohmann/json.hpp>

#include "quant/quant.h"

namespace llmtune::quant::detail {

std::vector<float> midpoints(const float* sorted_code, int n);
void check_blocksize(int64_t blocksize, const char* what);
// Sorted order of the 4-bit table as torch.argsort gives it (bitsandbytes remaps FP4 through it).
const std::array<int, 16>& sorted_order(QuantType t);

// A 2-D state's raw pointers (CPU) for the kernels.
struct View4 {
  const uint8_t* packed;
  const float* absmax;  // recovered fp32 scales
  const float* code;    // 16 entries
  int64_t rows, cols, blocksize;
};

// Dequantize flat elements [i0, i1) into out[0, i1-i0); out is fp32 or bf16 bits (one is null).
using DequantFn = void (*)(const View4& v, int64_t i0, int64_t i1, float* out_f32, uint16_t* out_bf16);
// y[n, r] for r in [r0, r1) = sum_k x[n, k] * W[r, k], x fp32 [N, cols], y fp32 [N, rows].
using GemvFn = void (*)(const View4& v, const float* x, int64_t N, float* y, int64_t r0, int64_t r1);

void dequant_scalar(const View4& v, int64_t i0, int64_t i1, float* f32, uint16_t* bf16);
void gemv_scalar(const View4& v, const float* x, int64_t N, float* y, int64_t r0, int64_t r1);
void dequant_avx2(const View4& v, int64_t i0, int64_t i1, float* f32, uint16_t* bf16);
void gemv_avx2(const View4& v, const float* x, int64_t N, float* y, int64_t r0, int64_t r1);
void dequant_avx512(const View4& v, int64_t i0, int64_t i1, float* f32, uint16_t* bf16);
void gemv_avx512(const View4& v, const float* x, int64_t N, float* y, int64_t r0, int64_t r1);

// The `quantization_config` object of DIR/config.json; nullopt when the file is missing, unreadable or has
// none (then the checkpoint is not quantized). Shared by the bitsandbytes and the GPTQ/AWQ readers.
std::optional<nlohmann::json> stored_quantization_config(const fs::path& dir);

}  // namespace llmtune::quant::detail
