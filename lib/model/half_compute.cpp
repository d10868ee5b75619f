// Half-precision products on CPUs without native bf16 arithmetic: see half_compute.h for why.
#include "model/half_compute.h"

#include <cstdlib>
#include <fstream>
#include <string>

#include "core/core.h"
#include "model/causal_attention.h"

namespace llmtune::model::detail {

namespace {

// AVX512_BF16 (vdpbf16ps) or AMX-BF16 tiles: what oneDNN's fast bf16 GEMMs need.
bool cpu_has_native_bf16() {
  static const bool has = [] {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line))
      if (line.rfind("flags", 0) == 0)
        return line.find(" avx512_bf16") != std::string::npos || line.find(" amx_bf16") != std::string::npos;
    return false;
  }();
  return has;
}

enum class Mode { automatic, native, fp32 };

Mode mode_from_env() {
  static const Mode m = [] {
    const char* v = std::getenv("LLMTUNE_HALF_MATMUL");
    const std::string s = v ? v : "";
    if (s.empty() || s == "auto") return Mode::automatic;
    if (s == "native") return Mode::native;
    if (s == "fp32") return Mode::fp32;
    fail("LLMTUNE_HALF_MATMUL must be auto, native or fp32, got `{}`", s);
  }();
  return m;
}

// y = x Wᵀ + b computed in fp32 from half-precision operands. Saves the half-precision tensors
// (not fp32 copies) for backward, so memory is what a native half-precision linear keeps.
class Fp32Linear : public torch::autograd::Function<Fp32Linear> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               const torch::Tensor& b) {
    // `b` is an empty tensor when there is no bias, and x is saved only when the weight trains
    // (an empty stand-in otherwise): undefined tensors do not pass through Function::apply.
    const bool need_w = w.requires_grad(), has_bias = b.numel() > 0;
    ctx->save_for_backward({need_w ? x : torch::empty({0}, x.options()), w});
    ctx->saved_data["bias_grad"] = has_bias && b.requires_grad();
    auto y = torch::linear(x.to(torch::kFloat), w.to(torch::kFloat),
                           has_bias ? b.to(torch::kFloat) : torch::Tensor());
    return y.to(x.scalar_type());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    auto g = grads[0].to(torch::kFloat);
    torch::Tensor gx, gw, gb;
    if (ctx->needs_input_grad(0)) gx = torch::matmul(g, w.to(torch::kFloat)).to(grads[0].scalar_type());
    if (ctx->needs_input_grad(1)) {
      auto g2 = g.reshape({-1, g.size(-1)});
      gw = g2.t().mm(x.reshape({-1, x.size(-1)}).to(torch::kFloat)).to(w.scalar_type());
    }
    if (ctx->saved_data["bias_grad"].toBool() && ctx->needs_input_grad(2))
      gb = g.reshape({-1, g.size(-1)}).sum(0).to(w.scalar_type());
    else if (ctx->needs_input_grad(2))
      gb = torch::zeros({0}, w.options());  // the empty stand-in for "no bias" gets an empty gradient
    return {gx, gw, gb};
  }
};

enum class AttentionMode { automatic, sdpa, blocked };

AttentionMode attention_mode_from_env() {
  static const AttentionMode m = [] {
    const char* v = std::getenv("LLMTUNE_ATTENTION");
    const std::string s = v ? v : "";
    if (s.empty() || s == "auto") return AttentionMode::automatic;
    if (s == "sdpa") return AttentionMode::sdpa;
    if (s == "blocked") return AttentionMode::blocked;
    fail("LLMTUNE_ATTENTION must be auto, sdpa or blocked, got `{}`", s);
  }();
  return m;
}

// Probabilities kept per layer beyond which long sequences stay on flash attention (which keeps
// one log-sum-exp per row): 64 MiB is a 2k-token sequence of a 9-head model.
constexpr int64_t kBlockedAttentionMaxSavedBytes = int64_t{64} << 20;

// Whether blocked_causal_attention computes this call (see causal_attention.h for why).
bool use_blocked_attention(const torch::Tensor& q, const torch::Tensor& k, const std::optional<torch::Tensor>& mask,
                           bool causal) {
  // It implements causal self-attention without cached or prefix keys: SDPA's causal flag, or the
  // transformer's bool masks, which without a cache lie within the causal triangle (padding,
  // packed sequences, sliding windows) and let every query see at least itself.
  if (q.size(2) != k.size(2)) return false;
  if (mask ? mask->scalar_type() != torch::kBool : !causal) return false;
  switch (attention_mode_from_env()) {
    case AttentionMode::sdpa: return false;
    case AttentionMode::blocked: return true;
    case AttentionMode::automatic: break;
  }
  // Measured faster than flash attention for bf16 on CPUs with native bf16 GEMMs (README, "sft
  // benchmark"); elsewhere SDPA (or its fp32 route below) stays.
  if (q.scalar_type() != torch::kBFloat16 || !q.device().is_cpu() || half_products_in_fp32(q.scalar_type(), q.device()))
    return false;
  return blocked_attention_saved_bytes(q.size(0), q.size(1), q.size(2), q.element_size()) <=
         kBlockedAttentionMaxSavedBytes;
}

}  // namespace

bool half_products_in_fp32(torch::ScalarType dtype, const torch::Device& device) {
  if (dtype != torch::kBFloat16 && dtype != torch::kHalf) return false;
  if (!device.is_cpu()) return false;
  switch (mode_from_env()) {
    case Mode::native: return false;
    case Mode::fp32: return true;
    case Mode::automatic: break;
  }
  // fp16 has no fast CPU GEMM here either (AVX512_FP16 is rarer still).
  return dtype == torch::kHalf || !cpu_has_native_bf16();
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  if (!half_products_in_fp32(weight.scalar_type(), weight.device()) || x.scalar_type() != weight.scalar_type())
    return torch::linear(x, weight, bias);
  return linear_in_fp32(x, weight, bias);
}

torch::Tensor linear_in_fp32(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  return Fp32Linear::apply(x, weight, bias.defined() ? bias : torch::empty({0}, weight.options()));
}

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const std::optional<torch::Tensor>& mask, bool causal, bool gqa) {
  if (use_blocked_attention(q, k, mask, causal)) return blocked_causal_attention(q, k, v, mask);
  if (!half_products_in_fp32(q.scalar_type(), q.device()))
    return at::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, std::nullopt, gqa);
  // Attention's own products are small next to the projections; autograd keeps fp32 q/k/v here
  // (a few MB per layer at 512 tokens), which is simpler than recomputing them.
  std::optional<torch::Tensor> m = mask;
  if (m && m->is_floating_point()) m = m->to(torch::kFloat);
  return at::scaled_dot_product_attention(q.to(torch::kFloat), k.to(torch::kFloat), v.to(torch::kFloat), m, 0.0,
                                          causal, std::nullopt, gqa)
      .to(q.scalar_type());
}

}  // namespace llmtune::model::detail
