// RoPE inverse frequencies for every supported rope_type, computed with the same fp32 tensor ops
// (and in the same order) as transformers' modeling_rope_utils so cos/sin agree to the last bit
// where possible. dynamic and longrope depend on the current sequence length (max position + 1).
#include <cmath>

#include <fmt/ranges.h>

#include "core/core.h"
#include "model/model.h"

namespace llmtune::model {

namespace {

// arange(0, d, 2) as int64 then float / d: the exponent vector used by every variant.
torch::Tensor exponents(int64_t dim) {
  return torch::arange(0, dim, 2, torch::kLong).to(torch::kFloat) / static_cast<double>(dim);
}

torch::Tensor default_inv_freq(double base, int64_t dim) {
  return 1.0 / torch::pow(torch::Scalar(base), exponents(dim));
}

}  // namespace

std::pair<torch::Tensor, double> rope_inv_freq(const ModelConfig& c, int64_t seq_len) {
  const RopeConfig& r = c.rope;
  const int64_t dim = c.head_dim;
  const double base = r.theta;
  if (r.type == "default") return {default_inv_freq(base, dim), 1.0};

  if (r.type == "linear") return {default_inv_freq(base, dim) / *r.factor, 1.0};

  if (r.type == "dynamic") {
    // NTK-aware: only grows the base once seq_len exceeds max_position_embeddings.
    const int64_t M = c.max_position_embeddings;
    int64_t L = std::max<int64_t>(seq_len, M);
    const double f = *r.factor;
    auto sl = torch::tensor(L, torch::kLong);
    auto b = base * torch::pow(f * sl / static_cast<double>(M) - (f - 1.0), static_cast<double>(dim) / (dim - 2));
    return {1.0 / torch::pow(b, exponents(dim)), 1.0};
  }

  if (r.type == "llama3") {
    auto inv = default_inv_freq(base, dim);
    const double f = *r.factor, lo = r.low_freq_factor, hi = r.high_freq_factor;
    const double old_len = static_cast<double>(*r.original_max_position_embeddings);
    const double low_wavelen = old_len / lo, high_wavelen = old_len / hi;
    auto wavelen = 2 * M_PI / inv;
    auto inv_l = torch::where(wavelen > low_wavelen, inv / f, inv);
    auto smooth = (old_len / wavelen - lo) / (hi - lo);
    auto smoothed = (1 - smooth) * inv_l / f + smooth * inv_l;
    auto medium = (wavelen < high_wavelen).logical_not() & (wavelen > low_wavelen).logical_not();
    return {torch::where(medium, smoothed, inv_l), 1.0};
  }

  if (r.type == "yarn") {
    const double orig = static_cast<double>(*r.original_max_position_embeddings);
    const double f = r.factor ? *r.factor : c.max_position_embeddings / orig;
    auto get_mscale = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
    double attn = 0;
    if (r.attention_factor)
      attn = *r.attention_factor;
    else if (r.mscale && r.mscale_all_dim && *r.mscale != 0 && *r.mscale_all_dim != 0)
      attn = get_mscale(f, *r.mscale) / get_mscale(f, *r.mscale_all_dim);
    else
      attn = get_mscale(f, 1.0);
    const double beta_fast = r.beta_fast && *r.beta_fast != 0 ? *r.beta_fast : 32.0;
    const double beta_slow = r.beta_slow && *r.beta_slow != 0 ? *r.beta_slow : 1.0;
    auto corr_dim = [&](double rot) { return dim * std::log(orig / (rot * 2 * M_PI)) / (2 * std::log(base)); };
    double low = corr_dim(beta_fast), high = corr_dim(beta_slow);
    if (r.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(dim - 1));
    if (low == high) high += 0.001;
    auto pos_freqs = torch::pow(torch::Scalar(base), torch::arange(0, dim, 2).to(torch::kFloat) / static_cast<double>(dim));
    auto extrap = 1.0 / pos_freqs;
    auto interp = 1.0 / (f * pos_freqs);
    auto ramp = torch::clamp((torch::arange(dim / 2, torch::kFloat) - low) / (high - low), 0, 1);
    auto extrap_factor = 1 - ramp;
    return {interp * (1 - extrap_factor) + extrap * extrap_factor, attn};
  }

  if (r.type == "longrope") {
    const double orig = static_cast<double>(*r.original_max_position_embeddings);
    const double f = r.factor ? *r.factor : c.max_position_embeddings / orig;
    double attn = r.attention_factor ? *r.attention_factor
                                     : (f <= 1.0 ? 1.0 : std::sqrt(1 + std::log(f) / std::log(orig)));
    const auto& ext = (seq_len > 0 && seq_len > orig) ? r.long_factor : r.short_factor;
    auto ext_t = torch::tensor(std::vector<float>(ext.begin(), ext.end()), torch::kFloat);
    return {1.0 / (ext_t * torch::pow(torch::Scalar(base), exponents(dim))), attn};
  }
  fail("rope type \"{}\" is not supported", r.type);
}

}  // namespace llmtune::model
