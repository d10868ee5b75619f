// The preference losses of formats.md §9 as elementwise tensor functions, written from TRL's
// formulas (dpo_trainer, experimental cpo/orpo, kto_trainer; trl 1.16). Inputs are summed sequence
// log-probs; per-token averages are formed here where a loss needs them (IPO, SimPO, ORPO).
// cDPO = `sigmoid` with label_smoothing > 0 (TRL <= 0.2x; TRL 1.x ignores ε for sigmoid).
#include <cmath>

#include "align/align.h"
#include "config/config.h"
#include "core/core.h"

namespace llmtune::align {


std::string to_string(LossType t) {
  switch (t) {
    case LossType::sigmoid: return "sigmoid";
    case LossType::robust: return "robust";
    case LossType::hinge: return "hinge";
    case LossType::ipo: return "ipo";
    case LossType::simpo: return "simpo";
    case LossType::orpo: return "orpo";
    case LossType::kto: return "kto";
  }
  return "?";
}

LossType loss_type_from_recipe(const config::Recipe& r) {
  const std::string rl = r.rl.value_or("dpo");
  if (rl == "simpo") return LossType::simpo;
  if (rl == "orpo") return LossType::orpo;
  if (rl == "kto") return LossType::kto;
  if (rl == "ipo") return LossType::ipo;
  if (rl != "dpo") fail("`rl: {}` is not a preference loss; llmtune dpo runs rl: dpo, ipo, simpo, orpo or kto", rl);
  const std::string t = r.dpo_loss_type.value_or("sigmoid");
  if (t == "sigmoid") return LossType::sigmoid;
  if (t == "robust") return LossType::robust;
  if (t == "hinge") return LossType::hinge;
  if (t == "ipo") return LossType::ipo;
  fail("dpo_loss_type `{}` is not implemented; use sigmoid, hinge, ipo or robust", t);
}

LossConfig loss_config_from_recipe(const config::Recipe& r) {
  LossConfig c;
  c.type = loss_type_from_recipe(r);
  c.beta = r.rl_beta;
  // ORPO's λ: orpo_alpha when given (Axolotl), else rl_beta (TRL ORPOConfig.beta, default 0.1).
  if (c.type == LossType::orpo && r.orpo_alpha) c.beta = *r.orpo_alpha;
  c.label_smoothing = r.dpo_label_smoothing;
  c.simpo_gamma = r.simpo_gamma;
  c.cpo_alpha = r.cpo_alpha;
  c.rpo_alpha = r.rpo_alpha.value_or(0.0);
  c.kto_desirable_weight = r.kto_desirable_weight;
  c.kto_undesirable_weight = r.kto_undesirable_weight;
  if (c.type == LossType::robust && !(c.label_smoothing >= 0 && c.label_smoothing < 0.5))
    fail("dpo_label_smoothing {} must lie in [0, 0.5) for the robust loss", c.label_smoothing);
  return c;
}

namespace {

// log(1 - exp(x)) for x < 0, stable on both sides of -ln 2.
torch::Tensor log1mexp(const torch::Tensor& x) {
  const double t = -0.6931471805599453;
  return torch::where(x < t, torch::log1p(-torch::exp(x)), torch::log(-torch::expm1(x)));
}

void need(const torch::Tensor& t, const char* what, LossType type) {
  if (!t.defined()) fail("{} loss needs {} (internal: missing input)", to_string(type), what);
}

}  // namespace

LossOutput pair_loss(const PairInputs& in, const LossConfig& c) {
  need(in.chosen, "policy log-probs", c.type);
  need(in.rejected, "policy log-probs", c.type);
  const double beta = c.beta, eps = c.label_smoothing;
  LossOutput out;
  auto chosen = in.chosen.to(torch::kFloat), rejected = in.rejected.to(torch::kFloat);
  if (c.type == LossType::simpo || c.type == LossType::orpo) {
    need(in.chosen_len, "completion lengths", c.type);
    need(in.rejected_len, "completion lengths", c.type);
    auto aw = chosen / in.chosen_len.to(torch::kFloat).clamp_min(1.0);
    auto al = rejected / in.rejected_len.to(torch::kFloat).clamp_min(1.0);
    out.chosen_rewards = (beta * aw).detach();
    out.rejected_rewards = (beta * al).detach();
    if (c.type == LossType::simpo) {
      auto logits = (aw - al) - c.simpo_gamma / beta;
      out.losses = -torch::log_sigmoid(beta * logits) * (1 - eps) - torch::log_sigmoid(-beta * logits) * eps;
    } else {
      auto log_odds = (aw - al) - (log1mexp(aw) - log1mexp(al));
      auto ratio = torch::log_sigmoid(log_odds);
      out.losses = -beta * ratio;
      out.extra["log_odds_ratio"] = ratio.mean().item<double>();
      out.extra["log_odds_chosen"] = log_odds.mean().item<double>();
    }
    return out;
  }
  need(in.ref_chosen, "reference log-probs", c.type);
  need(in.ref_rejected, "reference log-probs", c.type);
  auto rho_w = chosen - in.ref_chosen.to(torch::kFloat);
  auto rho_l = rejected - in.ref_rejected.to(torch::kFloat);
  auto delta = rho_w - rho_l;
  switch (c.type) {
    case LossType::sigmoid:
      out.losses = -(1 - eps) * torch::log_sigmoid(beta * delta) - eps * torch::log_sigmoid(-beta * delta);
      break;
    case LossType::robust:
      out.losses = (-(1 - eps) * torch::log_sigmoid(beta * delta) + eps * torch::log_sigmoid(-beta * delta)) / (1 - 2 * eps);
      break;
    case LossType::hinge:
      out.losses = torch::relu(1 - beta * delta);
      break;
    case LossType::ipo: {
      need(in.chosen_len, "completion lengths", c.type);
      need(in.rejected_len, "completion lengths", c.type);
      auto d = rho_w / in.chosen_len.to(torch::kFloat).clamp_min(1.0) - rho_l / in.rejected_len.to(torch::kFloat).clamp_min(1.0);
      out.losses = (d - 1 / (2 * beta)).pow(2);
      break;
    }
    default:
      fail("pair_loss: {} is not a paired loss", to_string(c.type));
  }
  out.chosen_rewards = (beta * rho_w).detach();
  out.rejected_rewards = (beta * rho_l).detach();
  return out;
}

KtoOutput kto_loss(const KtoInputs& in, const LossConfig& c) {
  KtoOutput out;
  auto kl = (in.kl_logps.to(torch::kFloat) - in.ref_kl_logps.to(torch::kFloat)).mean().detach().clamp_min(0.0);
  out.kl = kl.item<double>();
  auto rho = in.logps.to(torch::kFloat) - in.ref_logps.to(torch::kFloat);
  auto des = in.desirable.to(torch::kFloat);
  auto l_des = c.kto_desirable_weight * (1 - torch::sigmoid(c.beta * (rho - kl)));
  auto l_und = c.kto_undesirable_weight * (1 - torch::sigmoid(c.beta * (kl - rho)));
  out.losses = des * l_des + (1 - des) * l_und;
  out.rewards = (c.beta * rho).detach();
  return out;
}

std::map<std::string, double> reward_metrics(const torch::Tensor& cr, const torch::Tensor& rr) {
  std::map<std::string, double> m;
  m["rewards/chosen"] = cr.mean().item<double>();
  m["rewards/rejected"] = rr.mean().item<double>();
  m["rewards/accuracies"] = (cr > rr).to(torch::kFloat).mean().item<double>();
  m["rewards/margins"] = (cr - rr).mean().item<double>();
  return m;
}

torch::Tensor bradley_terry_loss(const torch::Tensor& chosen, const torch::Tensor& rejected, const torch::Tensor& margin,
                                 double center) {
  auto d = chosen.to(torch::kFloat) - rejected.to(torch::kFloat);
  if (margin.defined()) d = d - margin.to(d.device()).to(torch::kFloat);
  auto l = -torch::log_sigmoid(d);
  if (center > 0) l = l + center * (chosen.to(torch::kFloat) + rejected.to(torch::kFloat)).pow(2);
  return l;
}

}  // namespace llmtune::align
