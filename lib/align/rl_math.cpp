// The arithmetic of PPO and GRPO on per-token tensors, written from the formulas (formats.md §9,
// InstructGPT, TRL's PPOTrainer/GRPOTrainer docs): masked statistics, GAE, KL-shaped rewards, the
// clipped policy and value losses, group-normalised advantages and the k3 KL, plus the built-in
// verifiable rewards. Shapes: N rows, L response tokens; mask [N, L] 1 on real tokens.
#include <algorithm>
#include <cmath>
#include <regex>

#include "align/align.h"
#include "core/core.h"

namespace llmtune::align {

torch::Tensor masked_mean(const torch::Tensor& x, const torch::Tensor& mask) {
  auto m = mask.to(x.scalar_type());
  return (x * m).sum() / m.sum().clamp_min(1.0);
}

torch::Tensor masked_var(const torch::Tensor& x, const torch::Tensor& mask) {
  auto m = mask.to(x.scalar_type());
  auto n = m.sum();
  auto mean = (x * m).sum() / n.clamp_min(1.0);
  auto var = ((x - mean).pow(2) * m).sum() / n.clamp_min(1.0);
  return var * n / (n - 1).clamp_min(1.0);  // Bessel's correction
}

torch::Tensor masked_whiten(const torch::Tensor& x, const torch::Tensor& mask, bool shift_mean) {
  auto mean = masked_mean(x, mask);
  auto w = (x - mean) * torch::rsqrt(masked_var(x, mask) + 1e-8);
  return shift_mean ? w : w + mean;
}

GaeResult gae(const torch::Tensor& rewards, const torch::Tensor& values, const torch::Tensor& mask, double gamma,
              double lam) {
  auto m = mask.to(torch::kFloat);
  auto r = rewards.to(torch::kFloat) * m, v = values.to(torch::kFloat) * m;
  const int64_t L = r.size(1);
  auto adv = torch::zeros_like(r);
  auto last = torch::zeros({r.size(0)}, r.options());
  for (int64_t t = L - 1; t >= 0; --t) {
    auto next_v = t + 1 < L ? v.select(1, t + 1) : torch::zeros_like(last);
    auto delta = r.select(1, t) + gamma * next_v - v.select(1, t);
    last = delta + gamma * lam * last;
    adv.select(1, t).copy_(last);
  }
  adv = adv * m;
  return {adv, (adv + v) * m};
}

torch::Tensor ppo_token_rewards(const torch::Tensor& logp, const torch::Tensor& ref_logp, const torch::Tensor& mask,
                                const torch::Tensor& scores, double kl_coef) {
  auto m = mask.to(torch::kFloat);
  auto r = -kl_coef * (logp - ref_logp).to(torch::kFloat) * m;
  // Last real response token of each row (rows are right-padded and have at least one token).
  auto last = (m.sum(1).to(torch::kLong) - 1).clamp_min(0);
  auto rows = torch::arange(r.size(0), torch::TensorOptions().dtype(torch::kLong).device(r.device()));
  r.index_put_({rows, last}, r.index({rows, last}) + scores.to(torch::kFloat).to(r.device()));
  return r;
}

PolicyLoss ppo_policy_loss(const torch::Tensor& logp, const torch::Tensor& old_logp, const torch::Tensor& advantages,
                           double cliprange) {
  auto log_ratio = logp - old_logp;
  auto ratio = torch::exp(log_ratio);
  auto l1 = -advantages * ratio;
  auto l2 = -advantages * torch::clamp(ratio, 1.0 - cliprange, 1.0 + cliprange);
  PolicyLoss out;
  out.per_token = torch::max(l1, l2);
  out.clipped = (l2 > l1).detach();
  out.approx_kl = 0.5 * log_ratio.detach().pow(2);
  return out;
}

ValueLoss ppo_value_loss(const torch::Tensor& values, const torch::Tensor& old_values, const torch::Tensor& returns,
                         double cliprange_value) {
  auto vclip = old_values + torch::clamp(values - old_values, -cliprange_value, cliprange_value);
  auto l1 = (values - returns).pow(2), l2 = (vclip - returns).pow(2);
  return {0.5 * torch::max(l1, l2), (l2 > l1).detach()};
}

torch::Tensor group_advantages(const torch::Tensor& rewards, int64_t group_size) {
  if (group_size < 1 || rewards.numel() % group_size != 0)
    fail("group_advantages: {} rewards do not split into groups of {}", rewards.numel(), group_size);
  auto g = rewards.to(torch::kFloat).reshape({-1, group_size});
  auto mean = g.mean(1, true);
  auto std = group_size > 1 ? g.std(1, /*unbiased=*/true, true) : torch::zeros_like(mean);
  return ((g - mean) / (std + 1e-4)).reshape({-1});
}

torch::Tensor kl_k3(const torch::Tensor& logp, const torch::Tensor& ref_logp) {
  auto d = ref_logp - logp;
  return torch::exp(d) - d - 1.0;
}

torch::Tensor grpo_token_loss(const torch::Tensor& logp, const torch::Tensor& old_logp, const torch::Tensor& ref_logp,
                              const torch::Tensor& advantages, double cliprange, double beta) {
  auto ratio = torch::exp(logp - old_logp);
  auto a = advantages.dim() == 1 ? advantages.unsqueeze(1) : advantages;
  auto surrogate = torch::min(ratio * a, torch::clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * a);
  auto loss = -surrogate;
  if (beta != 0.0) loss = loss + beta * kl_k3(logp, ref_logp);
  return loss;
}

void AdaptiveKl::update(double current_kl, int64_t n_steps) {
  const double err = std::clamp(current_kl / target - 1.0, -0.2, 0.2);
  value *= 1.0 + err * static_cast<double>(n_steps) / horizon;
}

namespace {
std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}
std::string regex_escape(const std::string& s) {
  static const std::string special = R"(\^$.|?*+()[]{}-/)";
  std::string out;
  for (char c : s) {
    if (special.find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}
}  // namespace

double VerifiableReward::score(const std::string& completion, const std::string& answer) const {
  if (type == "exact_match") return trim(completion) == trim(answer) ? 1.0 : 0.0;
  if (type == "regex") {
    std::string p = pattern;
    for (size_t at = p.find("{answer}"); at != std::string::npos; at = p.find("{answer}", at)) {
      const std::string esc = regex_escape(trim(answer));
      p.replace(at, 8, esc);
      at += esc.size();
    }
    try {
      return std::regex_search(completion, std::regex(p)) ? 1.0 : 0.0;
    } catch (const std::regex_error& e) {
      fail("reward regex `{}` is invalid: {}", pattern, e.what());
    }
  }
  fail("unknown verifiable reward `{}`; use exact_match or regex", type);
}

}  // namespace llmtune::align
