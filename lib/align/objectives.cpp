// The loop-facing objectives of the preference stages: DPO family / SimPO / ORPO / KTO on preference
// batches, and Bradley–Terry on reward-model scores. Each returns sum over examples / normaliser
// (the loop's contract), so accumulation matches a larger micro-batch. Caveat: the NLL terms (ORPO,
// SimPO's cpo_alpha, rpo_alpha) are token means per micro-batch, as TRL computes them per batch.
#include "align/align.h"
#include "core/core.h"

namespace llmtune::align {

using torch::indexing::Slice;

namespace {

torch::Tensor on(const torch::Tensor& t, torch::Device d) { return t.defined() ? t.to(d) : t; }

}  // namespace

PreferenceObjective::PreferenceObjective(model::TransformerImpl& policy, ReferenceModel* ref, LossConfig cfg,
                                         torch::Device device, LogProbOptions lp)
    : policy_(policy), ref_(ref), cfg_(cfg), device_(device), lp_(lp) {}

train::StepOutput PreferenceObjective::compute(const train::Batch& b, double normaliser) {
  auto ids = on(b.input_ids, device_), mask = on(b.attention_mask, device_), labels = on(b.labels, device_);
  const int64_t R = ids.size(0), B = R / 2;
  if (R != 2 * B || B != b.num_target_tokens)
    fail("preference objective: a batch needs 2 rows per example (got {} rows for {} examples)", R, b.num_target_tokens);
  auto lp = sequence_log_probs(policy_, ids, mask, labels, lp_);
  torch::Tensor ref_sum;
  if (cfg_.needs_reference()) {
    auto it = b.extra.find("ref_logps");
    if (it != b.extra.end()) ref_sum = it->second.to(device_);
    else if (ref_) ref_sum = ref_->log_probs(ids, mask, labels, lp_).sum;
    else fail("{} needs reference log-probs: none precomputed and no reference model", to_string(cfg_.type));
  }
  std::map<std::string, double> metrics;
  torch::Tensor per_example;
  torch::Tensor nll;  // batch token-mean NLL of the chosen / desirable completions
  double nll_weight = 0;
  if (cfg_.type == LossType::kto) {
    KtoInputs ki;
    ki.logps = lp.sum.index({Slice(0, B)});
    ki.ref_logps = ref_sum.index({Slice(0, B)});
    ki.kl_logps = lp.sum.index({Slice(B, R)}).detach();
    ki.ref_kl_logps = ref_sum.index({Slice(B, R)});
    ki.desirable = b.extra.at("label").to(device_);
    auto ko = kto_loss(ki, cfg_);
    per_example = ko.losses;
    auto des = ki.desirable > 0.5;
    const int64_t nd = des.sum().item<int64_t>(), nu = B - nd;
    metrics["kl"] = ko.kl;
    if (nd > 0) {
      metrics["rewards/chosen"] = ko.rewards.masked_select(des).mean().item<double>();
      metrics["logps/chosen"] = ki.logps.detach().masked_select(des).mean().item<double>();
    }
    if (nu > 0) {
      metrics["rewards/rejected"] = ko.rewards.masked_select(des.logical_not()).mean().item<double>();
      metrics["logps/rejected"] = ki.logps.detach().masked_select(des.logical_not()).mean().item<double>();
    }
    if (nd > 0 && nu > 0) metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"];
  } else {
    PairInputs pi;
    pi.chosen = lp.sum.index({Slice(0, B)});
    pi.rejected = lp.sum.index({Slice(B, R)});
    pi.chosen_len = lp.count.index({Slice(0, B)});
    pi.rejected_len = lp.count.index({Slice(B, R)});
    if (ref_sum.defined()) {
      pi.ref_chosen = ref_sum.index({Slice(0, B)});
      pi.ref_rejected = ref_sum.index({Slice(B, R)});
    }
    auto po = pair_loss(pi, cfg_);
    per_example = po.losses;
    metrics = reward_metrics(po.chosen_rewards, po.rejected_rewards);
    for (const auto& [k, v] : po.extra) metrics[k] = v;
    metrics["logps/chosen"] = pi.chosen.detach().mean().item<double>();
    metrics["logps/rejected"] = pi.rejected.detach().mean().item<double>();
    nll_weight = cfg_.type == LossType::orpo ? 1.0 : (cfg_.type == LossType::simpo ? cfg_.cpo_alpha : cfg_.rpo_alpha);
    if (nll_weight > 0) {
      nll = -pi.chosen.sum() / pi.chosen_len.sum().clamp_min(1.0);
      metrics["nll_loss"] = nll.item<double>();
    }
  }
  auto total = per_example.sum();
  if (nll_weight > 0) total = total + nll_weight * nll * static_cast<double>(B);
  return {total / normaliser, metrics};
}

// ---------------------------------------------------------------------------------------------

RewardObjective::RewardObjective(RewardModel& rm, torch::Device device, bool ckpt, double center)
    : rm_(rm), device_(device), ckpt_(ckpt), center_(center) {}

train::StepOutput RewardObjective::compute(const train::Batch& b, double normaliser) {
  auto ids = on(b.input_ids, device_), mask = on(b.attention_mask, device_);
  const int64_t R = ids.size(0), B = R / 2;
  if (R != 2 * B || B != b.num_target_tokens)
    fail("reward objective: a batch needs a chosen and a rejected row per pair (got {} rows for {} pairs)", R,
         b.num_target_tokens);
  auto s = reward_scores(rm_, ids, mask, ckpt_);
  auto rw = s.index({Slice(0, B)}), rl = s.index({Slice(B, R)});
  torch::Tensor margin;
  if (auto it = b.extra.find("margin"); it != b.extra.end()) margin = it->second.to(device_);
  auto losses = bradley_terry_loss(rw, rl, margin, center_);
  std::map<std::string, double> m;
  auto d = (rw - rl).detach();
  m["accuracy"] = (d > 0).to(torch::kFloat).mean().item<double>();
  m["margin"] = d.mean().item<double>();
  m["rewards/chosen"] = rw.detach().mean().item<double>();
  m["rewards/rejected"] = rl.detach().mean().item<double>();
  return {losses.sum() / normaliser, m};
}

}  // namespace llmtune::align
