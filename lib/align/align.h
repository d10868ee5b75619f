// llmtune::align — preference and RL objectives on the one training loop (lib/train): reward models
// (Bradley–Terry, a scalar `score` head saved as *ForSequenceClassification), the DPO family
// (sigmoid/cDPO, robust, hinge, IPO, SimPO, ORPO, KTO; formulas of formats.md §9 = TRL), and the
// pieces PPO/GRPO reuse: sequence log-probs, the reference model as "same weights, adapters off",
// preference/prompt data with recipe filters. Shapes: B pairs/examples, R rows, T time, C hidden.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model.h"
#include "train/train.h"

namespace llmtune::config {
struct Recipe;
struct DatasetConfig;
}  // namespace llmtune::config
namespace llmtune::tok {
class Tokenizer;
}

namespace llmtune::align {

namespace fs = std::filesystem;

// =============================================================================================
// Data
// =============================================================================================

// A record filter from the recipe (`filters:` of a dataset entry): `field op value` with op one of
// == != >= <= > <; value a number, a "quoted" or 'quoted' string, true, false or null; field a
// dotted path into the record. A missing field is null; null never satisfies an ordering op.
class RecordFilter {
 public:
  static RecordFilter parse(const std::string& expr);  // Error naming the expression on bad syntax
  bool matches(const nlohmann::json& record) const;
  const std::string& text() const { return text_; }

 private:
  std::string text_, op_;
  std::vector<std::string> path_;
  nlohmann::json value_;
};

// One tokenized preference example. Paired: prompt + chosen / prompt + rejected. Unpaired (KTO):
// `chosen` holds the completion, `rejected` is empty and `label` says desirable (1) or not (0).
struct PreferenceExample {
  std::vector<int32_t> prompt, chosen, rejected;
  int label = -1;          // -1 paired, 1 desirable, 0 undesirable
  double margin = 0.0;     // reward data: Bradley-Terry margin (0 when the dataset has none)
  std::string answer;      // prompt data (PPO/GRPO): reference answer for verifiable rewards
};

// What happened to one dataset entry while loading (printed before training).
struct PreferenceCounts {
  std::string path;
  int64_t records = 0, invalid_skipped = 0, kept = 0;
  std::vector<std::pair<std::string, int64_t>> filtered;  // per filter expression: records it removed
  int64_t prompt_truncated = 0, completion_truncated = 0, dropped_empty = 0;
};

struct PreferenceData {
  std::vector<PreferenceExample> train, val;
  std::vector<PreferenceCounts> counts;
  bool has_margin = false;
  std::string summary() const;  // the table printed before training
};

enum class DataKind { paired, unpaired, prompts };

struct PreferenceDataOptions {
  DataKind kind = DataKind::paired;  // unpaired: paired records become a desirable + an undesirable example
  int64_t sequence_len = 512;        // prompt + completion; completions are cut to fit (counted)
  int64_t max_prompt_len = 0;        // > 0: keep the prompt's last max_prompt_len tokens (counted)
  std::string chat_template;         // as the recipe's `chat_template` ("" = tokenizer's own, else chatml)
  std::string chat_template_jinja;
  double val_set_size = 0;           // < 1 fraction, >= 1 count (seeded split)
  uint64_t seed = 42;
  bool skip_invalid = false;
};
PreferenceDataOptions preference_options_from_recipe(const config::Recipe& recipe, DataKind kind);

// Reads every dataset entry (jsonl/json/csv), applies its filters, renders prompt/chosen/rejected:
// - strings are used as they are (TRL's "standard" format; the tokenizer's EOS is appended to each
//   completion), unless the entry's type starts with `chat_template`, which wraps a string prompt as
//   a user message and string completions as assistant messages;
// - message lists (or {role, content} objects) go through the chat template: prompt = the prompt
//   messages with the generation prompt, completion = the rest of the rendered conversation.
// Axolotl's `chat_template.default` layout (field_messages conversation + chosen/rejected messages)
// works too. Field names come from the entry (field_prompt, field_chosen, ...). Errors name the file,
// line and field. `test` entries (recipe test_datasets) fill `val` instead of the split.
PreferenceData load_preference_data(const std::vector<config::DatasetConfig>& datasets,
                                    const std::vector<config::DatasetConfig>& test_datasets,
                                    const PreferenceDataOptions& options, const tok::Tokenizer& tokenizer);

// Batches of examples for the loop. Row layout (all right-padded, labels unshifted, -100 outside the
// completion):
//   paired:   rows [0, B) prompt+chosen, rows [B, 2B) prompt+rejected;
//   unpaired: rows [0, B) prompt_i+completion_i, rows [B, 2B) prompt_i + the completion of example
//             i-2 (mod N, dataset order): KTO's mismatched pairs for the KL estimate, independent of shuffling;
//   prompts:  rows [0, B) prompts only, LEFT-padded (ready for generation), labels undefined.
// extra: "index" [B] example indices; "margin" [B] fp32 (paired); "label" [B] fp32 (unpaired);
// "ref_logps" [R] fp32 when reference log-probs were attached. num_target_tokens = B (objectives
// normalise per example), num_tokens = real tokens.
train::Batch make_preference_batch(const std::vector<PreferenceExample>& examples, const std::vector<int64_t>& indices,
                                   DataKind kind, int32_t pad_id, const torch::Tensor& ref_logps = {});

// A seeded, resumable stream of preference batches (shuffled per epoch unless shuffle is false).
class PreferenceBatchSource : public train::BatchSource {
 public:
  // Several processes: batch k of an epoch goes to rank k % world_size, and the tail that does not
  // divide evenly is dropped, so every rank takes the same number of steps (DDP runs in lockstep).
  PreferenceBatchSource(const std::vector<PreferenceExample>& examples, DataKind kind, int64_t batch_size,
                        int32_t pad_id, bool shuffle, uint64_t seed, int rank = 0, int world_size = 1);
  // Reference log-probs per example (from precompute_reference_log_probs): [N, rows per example].
  void set_reference_log_probs(torch::Tensor ref) { ref_ = std::move(ref); }
  void set_epoch(int64_t epoch) override;
  std::optional<train::Batch> next() override;
  int64_t batches_per_epoch() const override;
  nlohmann::json state() const override;
  void load_state(const nlohmann::json& state) override;

 private:
  const std::vector<PreferenceExample>& ex_;
  DataKind kind_;
  int64_t batch_size_;
  int32_t pad_id_;
  bool shuffle_;
  uint64_t seed_;
  int rank_, world_size_;
  int64_t epoch_ = 0, index_ = 0;  // index_: this rank's next batch of the epoch
  std::vector<int64_t> order_;
  torch::Tensor ref_;
};

// =============================================================================================
// Log-probabilities and the reference model
// =============================================================================================

struct LogProbOptions {
  int64_t chunk_tokens = 1024;          // rows of logits alive at once
  bool gradient_checkpointing = false;  // only when grad mode is on
  double temperature = 1.0;             // log softmax(logits / temperature) (PPO samples at T)
};

// Completion log-probabilities of each row: position t's logits score labels[t+1] (labels unshifted,
// -100 ignored). Differentiable when grad mode is on.
struct SequenceLogProbs {
  torch::Tensor sum;        // [R] fp32: Σ log π(y_t | y_<t, x) over completion tokens
  torch::Tensor count;      // [R] fp32: completion tokens
  torch::Tensor per_token;  // [R, T-1] fp32, 0 outside the completion (position t scores labels[t+1])
  torch::Tensor mean() const { return sum / count.clamp_min(1.0); }
};
SequenceLogProbs sequence_log_probs(model::TransformerImpl& model, const torch::Tensor& input_ids,
                                    const torch::Tensor& attention_mask, const torch::Tensor& labels,
                                    const LogProbOptions& options = {});

// The frozen reference policy. adapter_disabled: the policy's own weights with every LoRA wrapper
// switched off for the forward (peft::DisabledAdapters; no second copy); frozen: a separate model
// (full fine-tuning), kept in eval mode with requires_grad off. log_probs runs under NoGradGuard.
class ReferenceModel {
 public:
  static ReferenceModel adapter_disabled(model::TransformerImpl& policy);
  static ReferenceModel frozen(model::Transformer reference);
  SequenceLogProbs log_probs(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                             const torch::Tensor& labels, const LogProbOptions& options = {});
  model::TransformerImpl& model() { return *model_; }
  bool shares_policy_weights() const { return !owned_; }

 private:
  model::TransformerImpl* model_ = nullptr;
  model::Transformer owned_{nullptr};
};

// Reference log-probs of every row of every example, once, in batches: [N, 2] fp32 (paired: chosen,
// rejected; unpaired: completion, mismatched KL row).
torch::Tensor precompute_reference_log_probs(ReferenceModel& ref, const std::vector<PreferenceExample>& examples,
                                             DataKind kind, int64_t batch_size, int32_t pad_id,
                                             const LogProbOptions& options = {}, bool progress = false);

// =============================================================================================
// Losses (formats.md §9) on sequence log-probs; every function is elementwise over B pairs.
// =============================================================================================

enum class LossType { sigmoid, robust, hinge, ipo, simpo, orpo, kto };
LossType loss_type_from_recipe(const config::Recipe& recipe);  // rl + dpo_loss_type
std::string to_string(LossType t);

struct LossConfig {
  LossType type = LossType::sigmoid;
  double beta = 0.1;             // rl_beta; ORPO: the odds-ratio weight λ (orpo_alpha)
  double label_smoothing = 0.0;  // cDPO (sigmoid), robust, SimPO
  double simpo_gamma = 0.5;
  double cpo_alpha = 1.0;        // SimPO: weight of the chosen NLL (0 = pure SimPO)
  double rpo_alpha = 0.0;        // DPO-family: + rpo_alpha * NLL(chosen)
  double kto_desirable_weight = 1.0, kto_undesirable_weight = 1.0;
  bool needs_reference() const { return type != LossType::simpo && type != LossType::orpo; }
};
LossConfig loss_config_from_recipe(const config::Recipe& recipe);

struct PairInputs {
  torch::Tensor chosen, rejected;              // [B] Σ log π (policy)
  torch::Tensor ref_chosen, ref_rejected;      // [B] Σ log π_ref (reference losses only)
  torch::Tensor chosen_len, rejected_len;      // [B] completion tokens (IPO, SimPO, ORPO)
};
struct LossOutput {
  torch::Tensor losses;            // [B] per-pair loss (no NLL term; objectives add it)
  torch::Tensor chosen_rewards;    // [B] detached (DPO: β·ρ_w; SimPO/ORPO: β·ā_w)
  torch::Tensor rejected_rewards;  // [B] detached
  std::map<std::string, double> extra;  // ORPO: log_odds_ratio, log_odds_chosen
};
// sigmoid (cDPO when label_smoothing > 0), robust, hinge, ipo, simpo, orpo.
LossOutput pair_loss(const PairInputs& in, const LossConfig& cfg);

struct KtoInputs {
  torch::Tensor logps, ref_logps;        // [B] Σ log π / π_ref of each example's completion
  torch::Tensor desirable;               // [B] bool/float: 1 desirable
  torch::Tensor kl_logps, ref_kl_logps;  // [B] mismatched rows (no grad)
};
struct KtoOutput {
  torch::Tensor losses;  // [B] weighted per-example losses (desirable first in TRL; here example order)
  torch::Tensor rewards;  // [B] β·ρ, detached
  double kl = 0;         // the clamped KL estimate z
};
KtoOutput kto_loss(const KtoInputs& in, const LossConfig& cfg);

// Standard logging metrics from rewards: rewards/chosen, rewards/rejected, rewards/accuracies,
// rewards/margins (means over the batch).
std::map<std::string, double> reward_metrics(const torch::Tensor& chosen_rewards, const torch::Tensor& rejected_rewards);

// =============================================================================================
// Objectives (train::Objective) for the loop
// =============================================================================================

// DPO family on paired batches. With `ref` null the batch must carry "ref_logps" (precomputed) unless
// the loss is reference-free. Metrics: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}
// (+ nll_loss with an NLL term). loss per pair, normalised per pair (target_count = B).
class PreferenceObjective : public train::Objective {
 public:
  PreferenceObjective(model::TransformerImpl& policy, ReferenceModel* ref, LossConfig cfg, torch::Device device,
                      LogProbOptions lp = {});
  train::StepOutput compute(const train::Batch& b, double normaliser) override;
  double target_count(const train::Batch& b) override { return static_cast<double>(b.num_target_tokens); }

 private:
  model::TransformerImpl& policy_;
  ReferenceModel* ref_;
  LossConfig cfg_;
  torch::Device device_;
  LogProbOptions lp_;
};

// =============================================================================================
// Reward models
// =============================================================================================

// The scalar head lives inside the Transformer module as child `score` (Linear C -> num_labels, no
// bias, fp32), so parameter names are the HF ones (`model.*`, `score.weight`) and the loop trains it.
struct RewardModel {
  model::Transformer net{nullptr};
  std::shared_ptr<model::DenseLinearImpl> score;
};
// Adds a fresh head to a causal-LM model: normal(0, initializer_range), seeded (HF's init).
RewardModel make_reward_model(model::Transformer net, int64_t num_labels, uint64_t seed);
// Scores [B] fp32 (label 0) read at the last non-padding token of each row (left or right padding).
torch::Tensor reward_scores(RewardModel& rm, const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                            bool gradient_checkpointing = false);
// Bradley–Terry: −log σ(r_w − r_l − margin) per pair (+ center · (r_w + r_l)² when center > 0).
torch::Tensor bradley_terry_loss(const torch::Tensor& chosen, const torch::Tensor& rejected,
                                 const torch::Tensor& margin = {}, double center_coefficient = 0.0);
// Writes a checkpoint transformers loads as <Family>ForSequenceClassification (config.json with
// architectures, num_labels/id2label, pad_token_id; model.safetensors with model.* and score.weight).
// Adapters must be merged first (peft::merge_all).
void save_reward_model(RewardModel& rm, const fs::path& dir, std::optional<int64_t> pad_token_id,
                       std::optional<torch::ScalarType> dtype = std::nullopt);
// Loads what save_reward_model (or transformers) wrote; frozen, eval mode.
RewardModel load_reward_model(const fs::path& dir, torch::ScalarType dtype = torch::kFloat,
                              torch::Device device = torch::kCPU);

// Bradley–Terry objective on paired batches; metrics accuracy (r_w > r_l) and margin (r_w − r_l).
class RewardObjective : public train::Objective {
 public:
  RewardObjective(RewardModel& rm, torch::Device device, bool gradient_checkpointing, double center_coefficient);
  train::StepOutput compute(const train::Batch& b, double normaliser) override;
  double target_count(const train::Batch& b) override { return static_cast<double>(b.num_target_tokens); }

 private:
  RewardModel& rm_;
  torch::Device device_;
  bool ckpt_;
  double center_;
};

// =============================================================================================
// Stages (the `llmtune reward` and `llmtune dpo` subcommands)
// =============================================================================================

using train::StageOptions;  // resume, dry_run (load data, print counts and the plan), progress
int run_reward(const config::Recipe& recipe, const StageOptions& options = {});
int run_dpo(const config::Recipe& recipe, const StageOptions& options = {});


// =============================================================================================
// PPO and GRPO (formats.md §9 PPO; TRL's PPOTrainer / GRPOTrainer formulas). Shapes: N rollout rows,
// L response tokens (right-padded), mask [N, L] 1 on real response tokens.
// =============================================================================================

torch::Tensor masked_mean(const torch::Tensor& x, const torch::Tensor& mask);
// Unbiased masked variance (TRL's masked_var with Bessel's correction).
torch::Tensor masked_var(const torch::Tensor& x, const torch::Tensor& mask);
// (x - mean) / sqrt(var + 1e-8) over the masked entries (mean added back when !shift_mean).
torch::Tensor masked_whiten(const torch::Tensor& x, const torch::Tensor& mask, bool shift_mean = true);

// GAE backwards over the response: delta_t = r_t + gamma V_{t+1} - V_t (V beyond the end = 0),
// A_t = delta_t + gamma lam A_{t+1}; returns R = A + V. Outside the mask everything is 0.
struct GaeResult {
  torch::Tensor advantages, returns;  // [N, L] fp32
};
GaeResult gae(const torch::Tensor& rewards, const torch::Tensor& values, const torch::Tensor& mask, double gamma,
              double lam);

// Per-token rewards: -kl_coef (logp - ref_logp) on every response token, plus score on the last one.
torch::Tensor ppo_token_rewards(const torch::Tensor& logp, const torch::Tensor& ref_logp, const torch::Tensor& mask,
                                const torch::Tensor& scores, double kl_coef);

// Clipped surrogate: per token max(-A ratio, -A clip(ratio, 1-eps, 1+eps)), ratio = exp(logp - old).
struct PolicyLoss {
  torch::Tensor per_token;  // [N, L] (differentiable)
  torch::Tensor clipped;    // [N, L] bool: the clipped branch was taken (clip fraction)
  torch::Tensor approx_kl;  // [N, L] 0.5 (logp - old)^2, detached
};
PolicyLoss ppo_policy_loss(const torch::Tensor& logp, const torch::Tensor& old_logp, const torch::Tensor& advantages,
                           double cliprange);
// 0.5 max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2) per token; clipped = second larger.
struct ValueLoss {
  torch::Tensor per_token, clipped;
};
ValueLoss ppo_value_loss(const torch::Tensor& values, const torch::Tensor& old_values, const torch::Tensor& returns,
                         double cliprange_value);

// GRPO: rewards [N] in groups of G consecutive rows; A_i = (r_i - mean_g) / (std_g + 1e-4), std unbiased.
torch::Tensor group_advantages(const torch::Tensor& rewards, int64_t group_size);
// k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1.
torch::Tensor kl_k3(const torch::Tensor& logp, const torch::Tensor& ref_logp);
// GRPO per-token loss: -min(ratio A, clip(ratio) A) + beta k3 (A broadcast over the row's tokens).
torch::Tensor grpo_token_loss(const torch::Tensor& logp, const torch::Tensor& old_logp, const torch::Tensor& ref_logp,
                              const torch::Tensor& advantages, double cliprange, double beta);

// Adaptive KL controller (Ziegler et al. 2019): kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon.
struct AdaptiveKl {
  double value, target, horizon;
  void update(double current_kl, int64_t n_steps);
};

// Built-in verifiable rewards: exact_match (completion text, trimmed, equals the reference answer,
// trimmed) or regex (ECMAScript search of `pattern` in the completion; `{answer}` in the pattern is
// replaced by the regex-escaped reference answer). 1.0 or 0.0.
struct VerifiableReward {
  std::string type = "exact_match";  // exact_match | regex
  std::string pattern;
  double score(const std::string& completion, const std::string& answer) const;
};

int run_ppo(const config::Recipe& recipe, const StageOptions& options = {});

}  // namespace llmtune::align
