// LR schedules (transformers' formulas, so curves match HF Trainer runs step for step), the
// fp16 loss scaler (torch GradScaler rules) and global-norm gradient clipping (clip_grad_norm_).
// Caveat: "constant" applies warmup when given one (HF's plain "constant" ignores it).
#include <cmath>
#include <limits>

#include "core/core.h"
#include "train/train.h"

namespace llmtune::train {

const std::vector<std::pair<std::string, std::string>>& schedule_names() {
  static const std::vector<std::pair<std::string, std::string>> table = {
      {"constant", "linear warmup (if any), then the base lr"},
      {"constant_with_warmup", "same as constant (HF name)"},
      {"linear", "linear warmup, then linear decay to 0 at the last step"},
      {"cosine", "linear warmup, then half-cosine decay to min_lr_ratio * lr (or min_lr)"},
      {"cosine_with_min_lr", "same as cosine (HF name); set min_lr_ratio or min_lr"},
  };
  return table;
}

LrSchedule::LrSchedule(const ScheduleOptions& o, double base_lr, int64_t total_steps)
    : type_(o.type), base_lr_(base_lr), min_rate_(o.min_lr_ratio), total_(total_steps) {
  std::vector<std::string> names;
  for (const auto& [n, d] : schedule_names()) names.push_back(n);
  if (std::find(names.begin(), names.end(), type_) == names.end()) {
    auto hint = closest_match(type_, names);
    fail("unknown lr_scheduler '{}'{}; available: constant, linear, cosine, cosine_with_min_lr", type_,
         hint ? fmt::format(" (did you mean '{}'?)", *hint) : "");
  }
  if (o.warmup_steps < 0) fail("warmup_steps must be >= 0 (got {})", o.warmup_steps);
  if (o.warmup_ratio < 0 || o.warmup_ratio >= 1) fail("warmup_ratio must be in [0, 1) (got {})", o.warmup_ratio);
  warmup_ = o.warmup_steps > 0 ? o.warmup_steps
                               : static_cast<int64_t>(std::ceil(static_cast<double>(total_steps) * o.warmup_ratio));
  if (o.min_lr >= 0) {
    if (base_lr <= 0) fail("min_lr needs a positive learning rate (got lr {})", base_lr);
    min_rate_ = o.min_lr / base_lr;
  }
  if (min_rate_ < 0 || min_rate_ > 1) fail("the cosine floor must be between 0 and the lr (min_lr_ratio {})", min_rate_);
}

double LrSchedule::factor(int64_t step) const {
  const double s = static_cast<double>(step), w = static_cast<double>(warmup_), t = static_cast<double>(total_);
  if (step < warmup_) return s / std::max(1.0, w);
  if (type_ == "constant" || type_ == "constant_with_warmup") return 1.0;
  if (type_ == "linear") return std::max(0.0, (t - s) / std::max(1.0, t - w));
  // cosine, num_cycles = 0.5
  const double progress = (s - w) / std::max(1.0, t - w);
  double f = 0.5 * (1.0 + std::cos(M_PI * 0.5 * 2.0 * progress));
  f = f * (1 - min_rate_) + min_rate_;
  return std::max(0.0, f);
}

// ---- precision -------------------------------------------------------------------------------

Precision precision_from_string(const std::string& s) {
  if (s == "fp32" || s == "no" || s == "float32") return Precision::fp32;
  if (s == "bf16" || s == "bfloat16") return Precision::bf16;
  if (s == "fp16" || s == "float16") return Precision::fp16;
  fail("unknown precision '{}'; use fp32, bf16 or fp16", s);
}

std::string to_string(Precision p) {
  switch (p) {
    case Precision::fp32: return "fp32";
    case Precision::bf16: return "bf16";
    case Precision::fp16: return "fp16";
  }
  return "?";
}

LossScaler::LossScaler(bool enabled, double init_scale, double growth_factor, double backoff_factor,
                       int64_t growth_interval)
    : enabled_(enabled), scale_(init_scale), growth_(growth_factor), backoff_(backoff_factor),
      interval_(growth_interval) {}

void LossScaler::update(bool found_inf) {
  if (!enabled_) return;
  if (found_inf) {
    scale_ *= backoff_;
    growth_tracker_ = 0;
  } else if (++growth_tracker_ == interval_) {
    scale_ *= growth_;
    growth_tracker_ = 0;
  }
}

nlohmann::json LossScaler::state() const {
  return {{"enabled", enabled_}, {"scale", scale_}, {"growth_tracker", growth_tracker_}};
}

void LossScaler::load_state(const nlohmann::json& s) {
  if (s.value("enabled", false) != enabled_)
    log::warn(fmt::format("checkpoint loss scaler was {}; this run {} it", s.value("enabled", false) ? "on" : "off",
                          enabled_ ? "enables" : "disables"));
  if (!enabled_ || !s.value("enabled", false)) return;
  scale_ = s.at("scale").get<double>();
  growth_tracker_ = s.at("growth_tracker").get<int64_t>();
}

double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  if (grads.empty()) return 0.0;
  // Sum of squares in float64 so the norm does not depend on summation order within fp32.
  torch::Tensor total = torch::zeros({}, torch::kFloat64);
  for (const auto& g : grads) total += g.to(torch::kFloat64).pow(2).sum();
  const double norm = std::sqrt(total.item<double>());
  if (max_norm > 0 && std::isfinite(norm)) {
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0)
      for (auto& g : grads) g.mul_(coef);
  }
  return norm;
}

}  // namespace llmtune::train
