// Internal to lib/model (and LoRA's training path in lib/peft, which follows the same policy): how
// matrix products of bf16/fp16 tensors are computed on the CPU.
//
// Why: on a CPU without native bf16 dot products (no AVX512_BF16 / AMX), LibTorch's bf16 GEMMs
// fall back to slow paths: measured here (AMD EPYC, AVX2 only, 2 threads) the backward product
// grad_out @ W ran 16x slower in bf16 than the same product after converting both operands to
// fp32, and the forward x @ Wᵀ 2.4x slower. So on such CPUs half-precision weights stay stored in
// half precision (memory is what bf16 is for), and each product converts its operands to fp32 for
// the duration of one GEMM (a transient copy of one weight), rounding the result back. Saved
// tensors for backward are the half-precision ones, so activation memory is unchanged.
// LLMTUNE_HALF_MATMUL=native|fp32 overrides the choice (benchmarks, tests).
#pragma once
#include <torch/torch.h>

#include <optional>

namespace llmtune::model::detail {

// True when products of `dtype` tensors on `device` should run in fp32 (see above).
bool half_products_in_fp32(torch::ScalarType dtype, const torch::Device& device);

// torch::linear(x, weight, bias) with that policy: x [..., in], weight [out, in], bias [out].
// Gradients flow to every input that requires them.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias = {});

// The fp32 route itself, whatever the policy (tests compare it with plain torch::linear).
torch::Tensor linear_in_fp32(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias = {});

// at::scaled_dot_product_attention with that policy (q/k/v converted; the output keeps q's dtype),
// or, for plain causal bf16 self-attention on CPUs with native bf16 GEMMs, the blocked attention
// of causal_attention.h. LLMTUNE_ATTENTION=auto|sdpa|blocked overrides that choice (benchmarks,
// tests; `blocked` applies wherever the case is plain causal self-attention, any dtype).
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const std::optional<torch::Tensor>& mask, bool causal, bool gqa);

}  // namespace llmtune::model::detail
