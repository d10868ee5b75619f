// `llmtune ppo`: PPO (InstructGPT/TRL) and GRPO on the one training loop. The data side is a
// RolloutSource: when its queue is empty it samples completions for a batch of prompts with the
// KV-cache generator (eval mode, no grad), scores them (verifiable reward or reward model), computes
// old log-probs, reference log-probs and values, the advantages (GAE + whitening for PPO, group
// normalisation for GRPO), and queues ppo_epochs x num_mini_batches mini-batches; the objective is
// the clipped PPO/GRPO loss on one mini-batch, so one loop step = one optimizer update.
// Several processes (`llmtune launch`): each rollout takes micro_batch_size prompts per rank (rank r
// samples with its own seed), lib/dist averages the gradients, rank 0 writes.
// Resume is exact: sampling seeds derive from the rollout counter; a checkpoint taken half-way
// through a rollout's mini-batches stores the rest of them (rollout_queue.safetensors), and
// periodic checkpoints fall on rollout boundaries, where nothing is pending, so several ranks
// (whose queues rank 0 cannot see) resume exactly too.
#include <deque>
#include <fstream>
#include <set>

#include <fmt/ranges.h>

#include "align/align.h"
#include "config/config.h"
#include "core/core.h"
#include "io/io.h"
#include "peft/peft.h"
#include "tokenizer/tokenizer.h"
#include "train/stage_impl.h"

namespace llmtune::align {

using torch::indexing::Slice;

namespace {

struct RlSettings {
  bool grpo = false;
  int64_t prompts = 8, group = 1, mini_batches = 1, epochs = 4, max_new_tokens = 53;
  double temperature = 0.7, top_p = 1.0, kl_coef = 0.05, cliprange = 0.2, cliprange_value = 0.2, vf_coef = 0.1;
  double gamma = 1.0, lam = 0.95;
  bool whiten_rewards = false;
  std::optional<double> missing_eos_penalty;
  std::optional<AdaptiveKl> adaptive;
  int64_t chunk_tokens = 1024;
  uint64_t seed = 42;
};

RlSettings settings_from_recipe(const config::Recipe& r) {
  const auto& t = r.trl;
  RlSettings s;
  s.grpo = r.rl.value_or("ppo") == "grpo";
  s.prompts = r.micro_batch_size;
  s.group = s.grpo ? t.num_generations.value_or(8) : 1;
  s.mini_batches = t.num_mini_batches;
  s.epochs = t.num_ppo_epochs;
  s.max_new_tokens = t.max_completion_length.value_or(t.response_length);
  s.temperature = t.temperature.value_or(s.grpo ? 1.0 : 0.7);
  s.top_p = t.top_p;
  s.kl_coef = s.grpo ? t.beta.value_or(0.04) : t.kl_coef;
  s.cliprange = t.cliprange;
  s.cliprange_value = t.cliprange_value;
  s.vf_coef = t.vf_coef;
  s.gamma = t.gamma;
  s.lam = t.lam;
  s.whiten_rewards = t.whiten_rewards;
  s.missing_eos_penalty = t.missing_eos_penalty;
  if (t.adaptive_kl && !s.grpo) s.adaptive = AdaptiveKl{s.kl_coef, t.target_kl, t.kl_horizon};
  s.chunk_tokens = r.loss_chunk_tokens;
  s.seed = static_cast<uint64_t>(r.seed);
  if ((s.prompts * s.group) % s.mini_batches != 0)
    fail("ppo: {} rollout rows (micro_batch_size {} x num_generations {}) do not split into trl.num_mini_batches {}",
         s.prompts * s.group, s.prompts, s.group, s.mini_batches);
  return s;
}

// The policy (a Transformer, possibly with LoRA) plus, for PPO, a scalar value head on its final
// hidden states. One module so the loop trains and checkpoints both.
struct PolicyValueImpl : torch::nn::Module {
  model::Transformer net{nullptr};
  std::shared_ptr<model::DenseLinearImpl> v_head;
  PolicyValueImpl(model::Transformer n, bool value_head, uint64_t seed) : net(std::move(n)) {
    register_module("policy", net);
    if (!value_head) return;
    const auto dev = net->decoder->embed_tokens->weight.device();
    const int64_t C = net->config().hidden_size;
    v_head = std::make_shared<model::DenseLinearImpl>(C, 1, false, torch::TensorOptions().dtype(torch::kFloat).device(dev));
    torch::NoGradGuard ng;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + 17);
    v_head->weight.copy_(torch::empty({1, C}).normal_(0.0, net->config().initializer_range, gen));
    register_module("v_head", v_head);
  }
};

// Response-side forward: log-probs at the sampling temperature, values and (optionally) entropy of
// the response tokens. ids [N, P+L]; response tokens are columns [P, P+L); targets -100 on padding.
struct ResponseOut {
  torch::Tensor logp, values, entropy;  // [N, L]
};
ResponseOut response_forward(model::TransformerImpl& net, model::DenseLinearImpl* v_head, const torch::Tensor& ids,
                             const torch::Tensor& mask, const torch::Tensor& targets, int64_t P, double temperature,
                             int64_t chunk, bool with_entropy) {
  model::ForwardOptions fo;
  fo.attention_mask = mask;
  auto hidden = net.hidden_states(ids, fo);                         // [N, P+L, C]
  const int64_t L = targets.size(1);
  auto h = hidden.index({Slice(), Slice(P - 1, P - 1 + L)});         // state before each response token
  ResponseOut o;
  o.logp = model::token_log_probs(net, h / temperature, targets, chunk);
  if (v_head) o.values = v_head->forward(h.to(torch::kFloat)).squeeze(-1);
  if (with_entropy) {
    torch::NoGradGuard ng;
    auto logits = net.lm_head_logits(h).to(torch::kFloat) / temperature;  // rollout only: small N x L
    auto lsm = logits.log_softmax(-1);
    o.entropy = -(lsm.exp() * lsm).sum(-1);
  }
  return o;
}

class RolloutSource : public train::BatchSource {
 public:
  RolloutSource(PolicyValueImpl& pv, ReferenceModel& ref, std::optional<RewardModel>& rm,
                std::optional<VerifiableReward> vr, const std::vector<PreferenceExample>& ex,
                const tok::Tokenizer& tok, RlSettings& s, int32_t pad, std::vector<int64_t> eos, int rank = 0,
                int world_size = 1)
      : pv_(pv), ref_(ref), rm_(rm), vr_(std::move(vr)), ex_(ex), tok_(tok), s_(s), pad_(pad), eos_(std::move(eos)),
        rank_(rank), world_size_(world_size) {}

  void set_epoch(int64_t epoch) override {
    epoch_ = epoch;
    pos_ = 0;
    queue_.clear();
    order_.resize(ex_.size());
    for (size_t i = 0; i < ex_.size(); ++i) order_[i] = static_cast<int64_t>(i);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(s_.seed + 1000 * static_cast<uint64_t>(epoch));
    auto perm = torch::randperm(static_cast<int64_t>(ex_.size()), gen, torch::kLong);
    for (size_t i = 0; i < ex_.size(); ++i) order_[i] = perm[static_cast<int64_t>(i)].item<int64_t>();
  }
  // One process: every prompt, the last rollout possibly short. Several: whole rounds only, so
  // every rank takes the same number of steps.
  int64_t rollouts_per_epoch() const {
    const int64_t n = static_cast<int64_t>(ex_.size()), round = s_.prompts * world_size_;
    return world_size_ == 1 ? (n + s_.prompts - 1) / s_.prompts : n / round;
  }
  int64_t updates_per_rollout() const { return s_.epochs * s_.mini_batches; }
  int64_t batches_per_epoch() const override { return rollouts_per_epoch() * updates_per_rollout(); }
  nlohmann::json state() const override {
    nlohmann::json j = {{"epoch", epoch_}, {"pos", pos_}, {"rollouts", rollouts_}, {"queued", queue_.size()},
                        {"world_size", world_size_}};
    if (s_.adaptive) j["kl_coef"] = s_.adaptive->value;  // the adaptive controller's state
    return j;
  }
  void load_state(const nlohmann::json& j) override {
    if (j.value("world_size", 1) != world_size_)
      fail("ppo: cannot resume a {}-process run on {} processes (each rank's rollout seeds and prompts depend on the "
           "number of ranks)", j.value("world_size", 1), world_size_);
    set_epoch(j.at("epoch"));
    pos_ = j.at("pos");
    rollouts_ = j.at("rollouts");
    pending_ = j.value("queued", int64_t{0});
    if (s_.adaptive && j.contains("kl_coef")) s_.adaptive->value = j.at("kl_coef").get<double>();
  }
  std::optional<train::Batch> next() override {
    if (pending_ > 0) {
      // The checkpoint was taken half-way through a rollout and rollout_queue.safetensors was not
      // there (several ranks): sample the next rollout instead of the lost rest.
      log::warn(fmt::format("ppo: {} mini-batches of the interrupted rollout were not in the checkpoint; continuing "
                            "with the next rollout (not bitwise exact)", pending_));
      pending_ = 0;
    }
    if (queue_.empty()) {
      if (pos_ / (s_.prompts * world_size_) >= rollouts_per_epoch()) return std::nullopt;
      std::vector<int64_t> idx;
      const int64_t begin = pos_ + rank_ * s_.prompts;
      for (int64_t i = begin; i < std::min<int64_t>(begin + s_.prompts, ex_.size()); ++i) idx.push_back(order_[i]);
      pos_ += s_.prompts * world_size_;
      rollout(idx);
    }
    auto b = std::move(queue_.front());
    queue_.pop_front();
    return b;
  }

  // The mini-batches still queued, written into a checkpoint (one process) and read back on resume.
  static constexpr const char* kQueueFile = "rollout_queue.safetensors";
  void save_queue(const fs::path& dir) const {
    if (queue_.empty() || world_size_ > 1) return;  // rank 0 alone writes: other ranks' queues are not here
    std::vector<std::pair<std::string, torch::Tensor>> t;
    for (size_t k = 0; k < queue_.size(); ++k) {
      const auto& b = queue_[k];
      const std::string p = fmt::format("q{}.", k);
      t.emplace_back(p + "input_ids", b.input_ids.cpu());
      t.emplace_back(p + "attention_mask", b.attention_mask.cpu());
      for (const auto& [name, v] : b.extra) t.emplace_back(p + "extra." + name, v.cpu().contiguous());
    }
    io::safetensors_save(dir / kQueueFile, t);
  }
  void load_queue(const fs::path& dir) {
    if (!fs::exists(dir / kQueueFile)) return;
    auto f = io::SafetensorsFile::open(dir / kQueueFile);  // shared_ptr
    const auto dev = pv_.net->decoder->embed_tokens->weight.device();
    std::map<int64_t, train::Batch> by_index;
    for (const auto& name : f->names()) {
      const auto dot = name.find('.');
      const int64_t k = std::stoll(name.substr(1, dot - 1));
      const std::string field = name.substr(dot + 1);
      auto v = f->load(name).clone().to(dev);
      auto& b = by_index[k];
      if (field == "input_ids") b.input_ids = v;
      else if (field == "attention_mask") b.attention_mask = v;
      else if (field.rfind("extra.", 0) == 0) b.extra[field.substr(6)] = v;
      else fail("{}: unexpected tensor {}", (dir / kQueueFile).string(), name);
    }
    if (static_cast<int64_t>(by_index.size()) != pending_)
      fail("{}: holds {} mini-batches but the checkpoint's data state says {}", (dir / kQueueFile).string(),
           by_index.size(), pending_);
    queue_.clear();
    for (auto& [k, b] : by_index) {
      b.labels = b.input_ids;
      b.num_target_tokens = static_cast<int64_t>(b.extra.at("response_mask").sum().item<double>());
      b.num_tokens = b.attention_mask.sum().item<int64_t>();
      queue_.push_back(std::move(b));
    }
    pending_ = 0;
  }

 private:
  void rollout(const std::vector<int64_t>& idx) {
    torch::NoGradGuard ng;
    auto& net = *pv_.net;
    const bool was_training = net.is_training();
    pv_.eval();
    const auto dev = net.decoder->embed_tokens->weight.device();
    // ---- sample ---------------------------------------------------------------------------------
    std::vector<std::vector<int64_t>> prompts;
    std::vector<const PreferenceExample*> rows;
    for (int64_t i : idx)
      for (int64_t g = 0; g < s_.group; ++g) {
        prompts.emplace_back(ex_[i].prompt.begin(), ex_[i].prompt.end());
        rows.push_back(&ex_[i]);
      }
    model::GenerationConfig gc;
    gc.do_sample = true;
    gc.temperature = s_.temperature;
    gc.top_p = s_.top_p;
    gc.top_k = 0;
    gc.max_new_tokens = s_.max_new_tokens;
    gc.eos_token_ids = eos_;
    gc.pad_token_id = pad_;
    gc.seed = s_.seed * 7919 + static_cast<uint64_t>(rollouts_) + static_cast<uint64_t>(rank_) * 0x9E3779B97F4A7C15ULL;
    auto out = model::generate_batch(net, prompts, gc);
    ++rollouts_;
    const int64_t N = static_cast<int64_t>(prompts.size());
    int64_t P = 0, L = 1;
    for (int64_t r = 0; r < N; ++r) {
      P = std::max<int64_t>(P, prompts[r].size());
      L = std::max<int64_t>(L, out[r].size());
    }
    auto ids = torch::full({N, P + L}, static_cast<int64_t>(pad_), torch::kLong);
    auto mask = torch::zeros({N, P + L}, torch::kLong);
    auto targets = torch::full({N, L}, -100, torch::kLong);
    auto rmask = torch::zeros({N, L}, torch::kFloat);
    auto scores = torch::zeros({N}, torch::kFloat);
    std::set<int64_t> eos(eos_.begin(), eos_.end());
    for (int64_t r = 0; r < N; ++r) {
      const int64_t n = prompts[r].size(), m = out[r].size();
      ids[r].narrow(0, P - n, n).copy_(torch::tensor(prompts[r], torch::kLong));
      mask[r].narrow(0, P - n, n).fill_(1);
      if (m > 0) {
        auto resp = torch::tensor(out[r], torch::kLong);
        ids[r].narrow(0, P, m).copy_(resp);
        mask[r].narrow(0, P, m).fill_(1);
        targets[r].narrow(0, 0, m).copy_(resp);
        rmask[r].narrow(0, 0, m).fill_(1);
      }
      const bool ended = m > 0 && eos.count(out[r].back());
      if (vr_) {
        std::vector<int32_t> text_ids;
        for (int64_t k = 0; k < m - (ended ? 1 : 0); ++k) text_ids.push_back(static_cast<int32_t>(out[r][k]));
        scores[r] = vr_->score(tok_.decode(text_ids, true), rows[r]->answer);
      }
      if (!ended && s_.missing_eos_penalty) scores[r] = scores[r].item<float>() - *s_.missing_eos_penalty;
    }
    ids = ids.to(dev), mask = mask.to(dev), targets = targets.to(dev), rmask = rmask.to(dev);
    if (rm_) {
      auto rs = reward_scores(*rm_, ids, mask).to(torch::kFloat);
      scores = scores.to(dev) + rs;
    }
    scores = scores.to(dev);
    // ---- old log-probs, values, reference -------------------------------------------------------
    auto cur = response_forward(net, pv_.v_head.get(), ids, mask, targets, P, s_.temperature, s_.chunk_tokens, true);
    torch::Tensor ref_logp;
    {
      std::optional<peft::DisabledAdapters> off;
      if (ref_.shares_policy_weights()) off.emplace(net);
      ref_logp = response_forward(ref_.model(), nullptr, ids, mask, targets, P, s_.temperature, s_.chunk_tokens, false).logp;
    }
    auto kl_tok = (cur.logp - ref_logp) * rmask;
    auto kl_seq = kl_tok.sum(1);
    auto ent_row = (cur.entropy * rmask).sum(1) / rmask.sum(1).clamp_min(1.0);
    torch::Tensor adv, returns;
    const double kl_coef_used = s_.adaptive ? s_.adaptive->value : s_.kl_coef;
    if (s_.grpo) {
      adv = group_advantages(scores, s_.group).unsqueeze(1).expand({N, L}).contiguous() * rmask;
    } else {
      auto rew = ppo_token_rewards(cur.logp, ref_logp, rmask, scores, kl_coef_used);
      if (s_.whiten_rewards) rew = masked_whiten(rew, rmask, false) * rmask;
      auto g = gae(rew, cur.values, rmask, s_.gamma, s_.lam);
      adv = masked_whiten(g.advantages, rmask) * rmask;
      returns = g.returns;
    }
    if (s_.adaptive) s_.adaptive->update(kl_seq.mean().item<double>(), N);
    // ---- queue mini-batches -------------------------------------------------------------------------
    const int64_t mb = N / s_.mini_batches;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(gc.seed + 1);
    for (int64_t e = 0; e < s_.epochs; ++e) {
      auto perm = torch::randperm(N, gen, torch::kLong);
      for (int64_t k = 0; k < s_.mini_batches; ++k) {
        auto sel = perm.narrow(0, k * mb, mb).to(dev);
        train::Batch b;
        b.input_ids = ids.index_select(0, sel);
        b.attention_mask = mask.index_select(0, sel);
        b.labels = b.input_ids;  // unused by the objective; kept so generic tools see a causal-LM batch
        auto rm_sel = rmask.index_select(0, sel);
        b.num_target_tokens = static_cast<int64_t>(rm_sel.sum().item<double>());
        b.num_tokens = b.attention_mask.sum().item<int64_t>();
        b.extra["targets"] = targets.index_select(0, sel);
        b.extra["response_mask"] = rm_sel;
        b.extra["old_logp"] = cur.logp.index_select(0, sel);
        b.extra["ref_logp"] = ref_logp.index_select(0, sel);
        b.extra["advantages"] = adv.index_select(0, sel);
        if (!s_.grpo) {
          b.extra["old_values"] = cur.values.index_select(0, sel);
          b.extra["returns"] = returns.index_select(0, sel);
        }
        b.extra["score"] = scores.index_select(0, sel);
        b.extra["kl_seq"] = kl_seq.index_select(0, sel);
        b.extra["entropy"] = ent_row.index_select(0, sel);
        b.extra["prompt_len"] = torch::tensor(P, torch::kLong);
        b.extra["kl_coef"] = torch::tensor(kl_coef_used, torch::kDouble);
        b.extra["rollout_reward"] = torch::tensor(scores.mean().item<double>(), torch::kDouble);
        queue_.push_back(std::move(b));
      }
    }
    if (was_training) pv_.train();
  }

  PolicyValueImpl& pv_;
  ReferenceModel& ref_;
  std::optional<RewardModel>& rm_;
  std::optional<VerifiableReward> vr_;
  const std::vector<PreferenceExample>& ex_;
  const tok::Tokenizer& tok_;
  RlSettings& s_;
  int32_t pad_;
  std::vector<int64_t> eos_;
  int rank_, world_size_;
  int64_t epoch_ = 0, pos_ = 0, rollouts_ = 0, pending_ = 0;
  std::vector<int64_t> order_;
  std::deque<train::Batch> queue_;
};

class RlObjective : public train::Objective {
 public:
  RlObjective(PolicyValueImpl& pv, const RlSettings& s) : pv_(pv), s_(s) {}
  double target_count(const train::Batch& b) override { return static_cast<double>(b.num_target_tokens); }
  train::StepOutput compute(const train::Batch& b, double normaliser) override {
    const int64_t P = b.extra.at("prompt_len").item<int64_t>();
    const auto& m = b.extra.at("response_mask");
    auto o = response_forward(*pv_.net, pv_.v_head.get(), b.input_ids, b.attention_mask, b.extra.at("targets"), P,
                              s_.temperature, s_.chunk_tokens, false);
    const auto& old = b.extra.at("old_logp");
    std::map<std::string, double> mt;
    torch::Tensor per_token;
    if (s_.grpo) {
      per_token = grpo_token_loss(o.logp, old, b.extra.at("ref_logp"), b.extra.at("advantages"), s_.cliprange, s_.kl_coef);
      auto ratio = torch::exp(o.logp.detach() - old);
      auto clipped = ((ratio < 1 - s_.cliprange) | (ratio > 1 + s_.cliprange));
      mt["clipfrac"] = masked_mean(clipped.to(torch::kFloat), m).item<double>();
      mt["approx_kl"] = masked_mean(0.5 * (o.logp.detach() - old).pow(2), m).item<double>();
      mt["kl_k3"] = masked_mean(kl_k3(o.logp.detach(), b.extra.at("ref_logp")), m).item<double>();
      mt["policy_loss"] = masked_mean(per_token.detach(), m).item<double>();
    } else {
      auto pl = ppo_policy_loss(o.logp, old, b.extra.at("advantages"), s_.cliprange);
      auto vl = ppo_value_loss(o.values, b.extra.at("old_values"), b.extra.at("returns"), s_.cliprange_value);
      per_token = pl.per_token + s_.vf_coef * vl.per_token;
      mt["policy_loss"] = masked_mean(pl.per_token.detach(), m).item<double>();
      mt["value_loss"] = masked_mean(vl.per_token.detach(), m).item<double>();
      mt["clipfrac"] = masked_mean(pl.clipped.to(torch::kFloat), m).item<double>();
      mt["vf_clipfrac"] = masked_mean(vl.clipped.to(torch::kFloat), m).item<double>();
      mt["approx_kl"] = masked_mean(pl.approx_kl, m).item<double>();
      mt["kl_coef"] = b.extra.at("kl_coef").item<double>();
    }
    mt["reward"] = b.extra.at("score").mean().item<double>();
    mt["kl"] = b.extra.at("kl_seq").mean().item<double>();
    mt["entropy"] = b.extra.at("entropy").mean().item<double>();
    mt["response_length"] = m.sum(1).mean().item<double>();
    return {(per_token * m).sum() / normaliser, mt};
  }

 private:
  PolicyValueImpl& pv_;
  const RlSettings& s_;
};

// Mean reward of greedy completions of held-out prompts (verifiable reward or reward model).
double held_out_reward(model::TransformerImpl& net, const std::vector<PreferenceExample>& ex, const tok::Tokenizer& tok,
                       const std::optional<VerifiableReward>& vr, std::optional<RewardModel>& rm, int64_t max_new,
                       int32_t pad, const std::vector<int64_t>& eos) {
  if (ex.empty()) return 0;
  torch::NoGradGuard ng;
  const bool was_training = net.is_training();
  net.eval();
  double sum = 0;
  const int64_t bs = 32;
  std::set<int64_t> eset(eos.begin(), eos.end());
  for (size_t s = 0; s < ex.size(); s += bs) {
    std::vector<std::vector<int64_t>> prompts;
    for (size_t i = s; i < std::min(ex.size(), s + bs); ++i) prompts.emplace_back(ex[i].prompt.begin(), ex[i].prompt.end());
    model::GenerationConfig gc;
    gc.do_sample = false;
    gc.max_new_tokens = max_new;
    gc.eos_token_ids = eos;
    gc.pad_token_id = pad;
    auto out = model::generate_batch(net, prompts, gc);
    for (size_t k = 0; k < out.size(); ++k) {
      std::vector<int32_t> ids;
      for (int64_t t : out[k])
        if (!eset.count(t)) ids.push_back(static_cast<int32_t>(t));
      if (vr) {
        sum += vr->score(tok.decode(ids, true), ex[s + k].answer);
      } else if (rm) {
        std::vector<int64_t> full(prompts[k]);
        full.insert(full.end(), out[k].begin(), out[k].end());
        auto t = torch::tensor(full, torch::kLong).unsqueeze(0).to(net.decoder->embed_tokens->weight.device());
        sum += reward_scores(*rm, t, torch::ones_like(t)).item<double>();
      }
    }
  }
  if (was_training) net.train();
  return sum / static_cast<double>(ex.size());
}

}  // namespace

// =============================================================================================
int run_ppo(const config::Recipe& recipe, const StageOptions& so) {
  config::validate_for_stage(recipe, "ppo");
  RlSettings s = settings_from_recipe(recipe);
  const char* name = s.grpo ? "grpo" : "ppo";
  // Rollouts end at each rank's own EOS, so ranks run different numbers of forward passes; fully
  // sharded layers need every rank in every layer's gather.
  if (recipe.zero_stage.value_or(0) == 3 || !recipe.fsdp.empty())
    fail("{}: zero_stage 3 / fsdp is not supported for rollouts (ranks generate different lengths, and every layer's "
         "parameter gather needs all ranks); use zero_stage 2 or 1, which shard gradients and optimizer states",
         name);
  std::unique_ptr<train::Parallel> par = so.dry_run ? nullptr : train::init_parallel(recipe);
  const int rank = par ? par->rank() : 0, world_size = par ? par->world_size() : 1;
  const fs::path model_dir = io::resolve_model_path(*recipe.base_model);
  const fs::path tok_dir = recipe.tokenizer_config ? io::resolve_model_path(*recipe.tokenizer_config) : model_dir;
  auto tokenizer = tok::Tokenizer::load(tok_dir);
  const auto device = par ? par->device() : train::stage_device();
  const auto precision = train::stage_precision(recipe, device);
  const auto dtype = train::precision_dtype(precision);
  model::LoadOptions lo;
  lo.device = device;
  model::Transformer net = model::load_pretrained(model_dir, dtype, lo);
  log::info(fmt::format("{}: base model {} on {} in {}", name, model_dir.string(), device.str(), train::to_string(precision)));

  // ---- reward ------------------------------------------------------------------------------------
  std::optional<VerifiableReward> vr;
  std::optional<RewardModel> rm;
  if (!recipe.trl.reward_funcs.empty()) {
    const std::string& f = recipe.trl.reward_funcs[0];
    if (f == "exact_match" || f == "regex") {
      vr = VerifiableReward{f, recipe.trl.reward_pattern.value_or("")};
    } else if (fs::is_directory(f)) {
      rm = load_reward_model(f, torch::kFloat, device);
    } else {
      fail("{}: trl.reward_funcs entry `{}` is neither exact_match, regex nor a reward model directory", name, f);
    }
  } else {
    rm = load_reward_model(io::resolve_model_path(*recipe.trl.reward_model_path), torch::kFloat, device);
  }

  // ---- policy, value head, reference -------------------------------------------------------------
  peft::TrainingSetup setup = peft::prepare_for_training(*net, recipe, s.seed);
  if (setup.adapter) fail("{}: adapter {} has no off switch for the reference model; use lora or full fine-tuning", name, setup.adapter->method);
  auto pv = std::make_shared<PolicyValueImpl>(net, !s.grpo, s.seed);
  std::optional<ReferenceModel> ref;
  if (setup.lora) {
    ref = ReferenceModel::adapter_disabled(*net);
  } else {
    log::info(fmt::format("{}: full fine-tuning: loading a frozen copy of the base as the reference", name));
    ref = ReferenceModel::frozen(model::load_pretrained(model_dir, dtype, lo));
  }
  log::info(fmt::format("{}: {}{}; reward: {}", name,
                        setup.lora ? "LoRA adapter (reference = adapter off)" : "full fine-tuning (reference = frozen copy)",
                        s.grpo ? "" : "; value head = Linear(hidden, 1) on the policy's final hidden states",
                        vr ? vr->type : "reward model"));

  // ---- data --------------------------------------------------------------------------------------
  auto popt = preference_options_from_recipe(recipe, DataKind::prompts);
  PreferenceData data = load_preference_data(recipe.datasets, recipe.test_datasets, popt, *tokenizer);
  log::info(fmt::format("{}: data\n{}", name, data.summary()));
  if (data.train.empty()) fail("{}: no prompts left after filtering (see the table above)", name);
  const int32_t pad = tokenizer->pad_id().value_or(tokenizer->eos_id().value_or(0));
  std::vector<int64_t> eos = net->config().eos_token_ids;
  if (eos.empty() && tokenizer->eos_id()) eos.push_back(*tokenizer->eos_id());
  // Chat models end a turn with their template's end token; stop there too.
  for (const char* t : {"<|im_end|>", "<|eot_id|>", "<|end|>"})
    if (auto id = tokenizer->token_to_id(t)) eos.push_back(*id);
  RolloutSource src(*pv, *ref, rm, vr, data.train, *tokenizer, s, pad, eos, rank, world_size);
  if (src.rollouts_per_epoch() == 0)
    fail("{}: {} prompts are fewer than one rollout of micro_batch_size {} x {} processes", name, data.train.size(),
         s.prompts, world_size);
  train::TrainOptions topt = train::train_options_from_recipe(recipe, src.batches_per_epoch(), rank, world_size);
  // Periodic checkpoints on rollout boundaries: nothing is pending there, so resume is exact on any
  // number of ranks (rank 0 cannot save the other ranks' queued mini-batches).
  if (const int64_t u = src.updates_per_rollout(); topt.save_steps > 0 && topt.save_steps % u != 0) {
    const int64_t aligned = (topt.save_steps + u - 1) / u * u;
    log::info(fmt::format("{}: save_steps {} -> {} (a multiple of the {} updates per rollout)", name, topt.save_steps,
                          aligned, u));
    topt.save_steps = aligned;
  }
  topt.precision = precision;
  topt.progress = so.progress && !so.dry_run;
  topt.gradient_accumulation_steps = 1;  // one mini-batch = one update (TRL's PPO step)
  if (!so.resume.empty()) topt.resume = so.resume;
  if (so.dry_run) {
    std::printf("plan (dry run, nothing trained):\n  %s: %zu prompts, %zu held out; %lld rollouts/epoch of %lld rows; "
                "%lld updates/epoch\n%s\n",
                name, data.train.size(), data.val.size(), static_cast<long long>(src.rollouts_per_epoch()),
                static_cast<long long>(s.prompts * s.group), static_cast<long long>(src.batches_per_epoch()),
                peft::parameter_stats(*pv->net).to_string().c_str());
    return 0;
  }

  // ---- train -------------------------------------------------------------------------------------
  const fs::path out = recipe.output_dir;
  fs::create_directories(out);
  if (rank == 0) config::save_resolved(recipe, out);
  // Held-out reward: every rank computes it (same weights, same greedy completions), so no rank
  // waits for another.
  const double before = held_out_reward(*net, data.val, *tokenizer, vr, rm, s.max_new_tokens, pad, eos);
  if (!data.val.empty()) log::info(fmt::format("{}: held-out mean reward before training {:.4f} ({} prompts, greedy)", name, before, data.val.size()));
  RlObjective objective(*pv, s);
  train::TrainHooks hooks;
  hooks.save_extra = [&](const fs::path& dir) {
    peft::save_trained(*net, setup, dir);
    src.save_queue(dir);
  };
  hooks.load_extra = [&](const fs::path& dir) { src.load_queue(dir); };
  if (!data.val.empty())
    hooks.evaluate_extra = [&](int64_t) -> std::map<std::string, double> {
      return {{"reward", held_out_reward(*net, data.val, *tokenizer, vr, rm, s.max_new_tokens, pad, eos)}};
    };
  train::SigintStop sigint;
  hooks.should_stop = [](int64_t) { return train::SigintStop::requested(); };
  if (par) par->attach(*pv, hooks);  // DDP/ZeRO; should_stop becomes a vote of all ranks
  auto result = train::run_training(*pv, objective, src, nullptr, topt, hooks);

  // ---- outputs -----------------------------------------------------------------------------------
  const double after = held_out_reward(*net, data.val, *tokenizer, vr, rm, s.max_new_tokens, pad, eos);
  if (par) par->unshard_model();  // ZeRO-3: rank 0 gets the whole model to save
  if (par) par->barrier();  // every rank finished before rank 0 writes
  if (rank != 0) return 0;
  peft::save_trained(*net, setup, out);
  if (pv->v_head) io::safetensors_save(out / "value_head.safetensors", {{"v_head.weight", pv->v_head->weight.detach().cpu()}});
  train::stage_copy_tokenizer_files(tok_dir, out);
  nlohmann::json summary = {{"rl", name}, {"held_out_prompts", data.val.size()}, {"held_out_reward_before", before},
                            {"held_out_reward_after", after}, {"steps", result.steps}};
  std::ofstream(out / "rl_summary.json") << summary.dump(2) << "\n";
  log::notice(fmt::format("{}: {} after {} steps; held-out mean reward {:.4f} -> {:.4f}; {} written to {}", name,
                          result.stopped_early ? "stopped" : "done", result.steps, before, after,
                          setup.lora ? "adapter" : "model", out.string()));
  return 0;
}

}  // namespace llmtune::align
