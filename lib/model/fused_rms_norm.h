// Internal to lib/model: RMSNorm forward and backward in one vectorised pass per row on the CPU.
//
// Why: written as LibTorch ops (to fp32, pow, mean, add, rsqrt, mul, cast, mul) a norm is eight
// kernels forward and about ten backward over a [tokens, hidden] tensor; on the SmolLM-135M LoRA
// bench (61 norms per step) they came to ~45 ms of a ~1.4 s step, mostly dispatch and passes over
// memory. The result is transformers' LlamaRMSNorm exactly in form: h = x · rsqrt(mean(x²) + eps)
// in fp32, rounded to x's dtype, then weight · h rounded again (as `weight * h.to(dtype)` does).
// The backward treats the rounding of h as the identity, as autograd's cast does, and works in
// fp32: gx = rstd · (g·w − x̂ · mean(g·w · x̂)) with x̂ = x · rstd.
#pragma once
#include <torch/torch.h>

#include <string>

namespace llmtune::model::detail {

// Whether fused_rms_norm computes this case: CPU, x and weight both fp32 or both bf16.
bool fused_rms_norm_applies(const torch::Tensor& x, const torch::Tensor& weight);

// RMSNorm over the last dimension of x [..., C] with weight [C]; gradients flow to x and weight.
// `isa` picks the vector code ("auto", "avx512", "avx2", "generic"; tests compare them).
torch::Tensor fused_rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                             const std::string& isa = "auto");

}  // namespace llmtune::model::detail
