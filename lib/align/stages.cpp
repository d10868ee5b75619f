// The `llmtune reward` and `llmtune dpo` stages, each one function that reads top to bottom:
// model → adapter → data → reference → objective → the shared loop → outputs. Under `llmtune launch`
// each rank takes every world_size-th batch and lib/dist (DDP / ZeRO-1/2) keeps the weights in step;
// rank 0 alone writes. Caveats: with `lora_model_dir` the reference is the base without any adapter
// (TRL keeps a copy of the loaded adapter instead); reference log-probs are precomputed per run (on
// every rank, for all examples), not saved.
#include <cstdio>
#include <fstream>

#include <fmt/ranges.h>

#include "align/align.h"
#include "config/config.h"
#include "core/core.h"
#include "io/io.h"
#include "peft/peft.h"
#include "tokenizer/tokenizer.h"
#include "train/stage_impl.h"

namespace llmtune::align {

namespace {

struct Loaded {
  fs::path model_dir, tok_dir;
  std::unique_ptr<tok::Tokenizer> tokenizer;
  torch::Device device = torch::kCPU;
  train::Precision precision = train::Precision::fp32;
  torch::ScalarType dtype = torch::kFloat;
  model::Transformer net{nullptr};
};

Loaded load_base(const config::Recipe& r, const char* stage, const train::Parallel* par) {
  Loaded l;
  l.model_dir = io::resolve_model_path(*r.base_model);
  l.tok_dir = r.tokenizer_config ? io::resolve_model_path(*r.tokenizer_config) : l.model_dir;
  l.tokenizer = tok::Tokenizer::load(l.tok_dir);
  for (const auto& w : l.tokenizer->warnings()) log::warn(w);
  l.device = par ? par->device() : train::stage_device();
  l.precision = train::stage_precision(r, l.device);
  l.dtype = train::precision_dtype(l.precision);
  log::info(fmt::format("{}: base model {} on {} in {}", stage, l.model_dir.string(), l.device.str(),
                        train::to_string(l.precision)));
  model::LoadOptions lo;
  lo.device = l.device;
  l.net = model::load_pretrained(l.model_dir, l.dtype, lo);
  return l;
}

int32_t pad_id_of(const tok::Tokenizer& t) { return t.pad_id().value_or(t.eos_id().value_or(0)); }

// Fingerprint of the frozen (non-trainable) weights: FNV-1a over their bytes, in name order.
std::string frozen_fingerprint(torch::nn::Module& m) {
  uint64_t h = 1469598103934665603ULL;
  for (const auto& item : m.named_parameters()) {
    if (item.value().requires_grad()) continue;
    auto t = item.value().detach().to(torch::kCPU).contiguous();
    for (char c : item.key()) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ULL;
    const auto* p = static_cast<const unsigned char*>(t.data_ptr());
    const size_t n = static_cast<size_t>(t.numel()) * t.element_size();
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  }
  return fmt::format("{:016x}", h);
}

void print_plan(const char* stage, const PreferenceData& data, int64_t steps, const peft::ParamStats& stats,
                const nlohmann::json& extra) {
  nlohmann::json plan = {{"stage", stage}, {"train_examples", data.train.size()}, {"val_examples", data.val.size()},
                         {"total_steps", steps}, {"trainable_params", stats.trainable}, {"total_params", stats.total}};
  for (auto it = extra.begin(); it != extra.end(); ++it) plan[it.key()] = it.value();
  std::printf("plan (dry run, nothing trained):\n  examples     %zu train, %zu eval\n  steps        %lld\n  trainable    %s\n%s\n",
              data.train.size(), data.val.size(), static_cast<long long>(steps), stats.to_string().c_str(),
              plan.dump().c_str());
  std::fflush(stdout);
}

int64_t total_steps(const train::TrainOptions& t, int64_t batches_per_epoch) {
  const int64_t accum = std::max<int64_t>(1, t.gradient_accumulation_steps);
  return t.max_steps > 0 ? t.max_steps : t.num_epochs * ((batches_per_epoch + accum - 1) / accum);
}

}  // namespace

// =============================================================================================
int run_reward(const config::Recipe& recipe, const StageOptions& so) {
  config::validate_for_stage(recipe, "reward");
  std::unique_ptr<train::Parallel> par = so.dry_run ? nullptr : train::init_parallel(recipe);
  const int rank = par ? par->rank() : 0, world_size = par ? par->world_size() : 1;
  Loaded base = load_base(recipe, "reward", par.get());

  // ---- adapter, then the head (after freezing, so the head stays trainable) --------------------
  peft::TrainingSetup setup = peft::prepare_for_training(*base.net, recipe, static_cast<uint64_t>(recipe.seed));
  if (!base.net->config().tie_word_embeddings)
    for (auto& p : base.net->get_linear("lm_head")->parameters()) p.set_requires_grad(false);  // unused by a classifier
  RewardModel rm = make_reward_model(base.net, recipe.num_labels.value_or(1), static_cast<uint64_t>(recipe.seed));
  rm.score->weight.set_requires_grad(true);
  log::info(fmt::format("reward: {} + score head [{} x {}]", setup.lora ? "LoRA adapter" : "full fine-tuning",
                        rm.score->weight.size(0), rm.score->weight.size(1)));

  // ---- data -------------------------------------------------------------------------------------
  auto popt = preference_options_from_recipe(recipe, DataKind::paired);
  PreferenceData data = load_preference_data(recipe.datasets, recipe.test_datasets, popt, *base.tokenizer);
  log::info("reward: data\n" + data.summary());
  if (data.train.empty()) fail("reward: no training pairs left after filtering (see the table above)");
  const int32_t pad = pad_id_of(*base.tokenizer);
  PreferenceBatchSource train_src(data.train, DataKind::paired, recipe.micro_batch_size, pad, true,
                                  static_cast<uint64_t>(recipe.seed), rank, world_size);
  std::unique_ptr<PreferenceBatchSource> val_src;
  if (!data.val.empty() && recipe.eval_strategy.value_or("steps") != "no")
    val_src = std::make_unique<PreferenceBatchSource>(data.val, DataKind::paired,
                                                      recipe.eval_batch_size.value_or(recipe.micro_batch_size), pad,
                                                      false, 0, rank, world_size);

  train::TrainOptions topt = train::train_options_from_recipe(recipe, train_src.batches_per_epoch(), rank, world_size);
  topt.precision = base.precision;
  topt.progress = so.progress && !so.dry_run;
  if (!so.resume.empty()) topt.resume = so.resume;
  const auto stats = peft::parameter_stats(*base.net);
  if (so.dry_run) {
    print_plan("reward", data, total_steps(topt, train_src.batches_per_epoch()), stats, {{"margin", data.has_margin}});
    return 0;
  }

  // ---- train ------------------------------------------------------------------------------------
  const fs::path out = recipe.output_dir;
  fs::create_directories(out);
  if (rank == 0) config::save_resolved(recipe, out);
  RewardObjective objective(rm, base.device, recipe.gradient_checkpointing,
                            recipe.center_rewards_coefficient.value_or(0.0));
  train::TrainHooks hooks;
  train::SigintStop sigint;
  hooks.should_stop = [](int64_t) { return train::SigintStop::requested(); };
  if (par) par->attach(*base.net, hooks);  // DDP/ZeRO; should_stop becomes a vote of all ranks
  auto result = train::run_training(*base.net, objective, train_src, val_src.get(), topt, hooks);
  if (par) par->unshard_model();  // ZeRO-3: rank 0 gets the whole model to save
  if (par) par->barrier();  // every rank finished before rank 0 writes
  if (rank != 0) return 0;

  // ---- outputs: a *ForSequenceClassification checkpoint (LoRA merged), plus the adapter --------
  if (setup.lora) {
    peft::save_adapter(*base.net, *setup.lora, out / "adapter");
    io::safetensors_save(out / "adapter" / "score.safetensors", {{"score.weight", rm.score->weight.detach().cpu()}});
    peft::merge_all(*base.net);
  }
  save_reward_model(rm, out, pad, std::nullopt);
  train::stage_copy_tokenizer_files(base.tok_dir, out);
  log::notice(fmt::format("reward: {} after {} steps (last loss {:.4f}{}); reward model written to {}",
                          result.stopped_early ? "stopped" : "done", result.steps, result.last_loss,
                          result.last_eval_loss >= 0 ? fmt::format(", eval loss {:.4f}", result.last_eval_loss) : "",
                          out.string()));
  return 0;
}

// =============================================================================================
int run_dpo(const config::Recipe& recipe, const StageOptions& so) {
  config::validate_for_stage(recipe, "dpo");
  const LossConfig loss = loss_config_from_recipe(recipe);
  std::unique_ptr<train::Parallel> par = so.dry_run ? nullptr : train::init_parallel(recipe);
  const int rank = par ? par->rank() : 0, world_size = par ? par->world_size() : 1;
  Loaded base = load_base(recipe, "dpo", par.get());
  model::TransformerImpl& policy = *base.net;

  // ---- adapter ----------------------------------------------------------------------------------
  peft::TrainingSetup setup = peft::prepare_for_training(policy, recipe, static_cast<uint64_t>(recipe.seed));
  if (setup.adapter) fail("dpo: adapter {} has no off switch for the reference model; use lora or qlora, or full fine-tuning", setup.adapter->method);
  if (setup.lora && !setup.lora->modules_to_save.empty() && loss.needs_reference())
    fail("dpo: lora_modules_to_save trains full copies of {}, which disabling the adapter does not undo, so the "
         "reference would move; drop lora_modules_to_save or set precompute_ref_log_probs: true",
         fmt::join(setup.lora->modules_to_save, ", "));
  log::info(fmt::format("dpo: loss {} (beta {}), {}", to_string(loss.type), loss.beta,
                        setup.lora ? "LoRA adapter; reference = the same weights with the adapter off"
                                   : "full fine-tuning"));

  // ---- data -------------------------------------------------------------------------------------
  const DataKind kind = loss.type == LossType::kto ? DataKind::unpaired : DataKind::paired;
  auto popt = preference_options_from_recipe(recipe, kind);
  PreferenceData data = load_preference_data(recipe.datasets, recipe.test_datasets, popt, *base.tokenizer);
  log::info("dpo: data\n" + data.summary());
  if (data.train.empty()) fail("dpo: no training examples left after filtering (see the table above)");
  const int32_t pad = pad_id_of(*base.tokenizer);
  PreferenceBatchSource train_src(data.train, kind, recipe.micro_batch_size, pad, true,
                                  static_cast<uint64_t>(recipe.seed), rank, world_size);
  std::unique_ptr<PreferenceBatchSource> val_src;
  if (!data.val.empty() && recipe.eval_strategy.value_or("steps") != "no")
    val_src = std::make_unique<PreferenceBatchSource>(data.val, kind,
                                                      recipe.eval_batch_size.value_or(recipe.micro_batch_size), pad,
                                                      false, 0, rank, world_size);
  train::TrainOptions topt = train::train_options_from_recipe(recipe, train_src.batches_per_epoch(), rank, world_size);
  topt.precision = base.precision;
  topt.progress = so.progress && !so.dry_run;
  if (!so.resume.empty()) topt.resume = so.resume;
  const auto stats = peft::parameter_stats(policy);
  if (so.dry_run) {
    print_plan("dpo", data, total_steps(topt, train_src.batches_per_epoch()), stats,
               {{"loss", to_string(loss.type)}, {"beta", loss.beta}, {"adapter", setup.lora ? "lora" : "full"}});
    return 0;
  }

  // ---- reference --------------------------------------------------------------------------------
  LogProbOptions lp;
  lp.chunk_tokens = recipe.loss_chunk_tokens;
  lp.gradient_checkpointing = recipe.gradient_checkpointing;
  std::optional<ReferenceModel> ref;
  if (loss.needs_reference()) {
    // Before training the policy IS the reference, so precomputing needs no copy even for full
    // fine-tuning (run_training restores a resumed checkpoint only after this).
    if (setup.lora || recipe.precompute_ref_log_probs) {
      ref = ReferenceModel::adapter_disabled(policy);
    } else {
      log::info("dpo: full fine-tuning: loading a frozen copy of the base as the reference "
                "(precompute_ref_log_probs: true avoids it)");
      model::LoadOptions lo;
      lo.device = base.device;
      ref = ReferenceModel::frozen(model::load_pretrained(base.model_dir, base.dtype, lo));
    }
    if (recipe.precompute_ref_log_probs) {
      const double t0 = now_seconds();
      const int64_t bs = recipe.eval_batch_size.value_or(recipe.micro_batch_size);
      train_src.set_reference_log_probs(
          precompute_reference_log_probs(*ref, data.train, kind, bs, pad, lp, so.progress));
      if (val_src)
        val_src->set_reference_log_probs(precompute_reference_log_probs(*ref, data.val, kind, bs, pad, lp, so.progress));
      log::info(fmt::format("dpo: reference log-probs of {} examples precomputed in {:.1f}s",
                            data.train.size() + data.val.size(), now_seconds() - t0));
    }
  }
  ReferenceModel* live_ref = (ref && !recipe.precompute_ref_log_probs) ? &*ref : nullptr;
  const std::string before = frozen_fingerprint(policy);

  // ---- train ------------------------------------------------------------------------------------
  const fs::path out = recipe.output_dir;
  fs::create_directories(out);
  if (rank == 0) config::save_resolved(recipe, out);
  PreferenceObjective objective(policy, live_ref, loss, base.device, lp);
  train::TrainHooks hooks;
  hooks.save_extra = [&](const fs::path& dir) { peft::save_trained(policy, setup, dir); };
  train::SigintStop sigint;
  hooks.should_stop = [](int64_t) { return train::SigintStop::requested(); };
  if (par) par->attach(policy, hooks);  // DDP/ZeRO; should_stop becomes a vote of all ranks
  auto result = train::run_training(policy, objective, train_src, val_src.get(), topt, hooks);
  if (par) par->unshard_model();  // ZeRO-3: rank 0 gets the whole model to save
  if (par) par->barrier();  // every rank finished before rank 0 writes

  // ---- outputs ----------------------------------------------------------------------------------
  // Rank 0 checks: it holds every weight now (under ZeRO-3 the other ranks keep only their shard).
  if (rank != 0) return 0;
  const std::string after = frozen_fingerprint(policy);
  if (setup.lora) {
    nlohmann::json check = {{"frozen_weights_before", before}, {"frozen_weights_after", after},
                            {"unchanged", before == after}};
    std::ofstream(out / "reference_check.json") << check.dump(2) << "\n";
    if (before != after) fail("dpo: the frozen base (the reference) changed during training; this is a bug");
    log::info(fmt::format("dpo: reference weights unchanged (fingerprint {})", after));
  }
  peft::save_trained(policy, setup, out);
  train::stage_copy_tokenizer_files(base.tok_dir, out);
  log::notice(fmt::format("dpo: {} after {} steps (last loss {:.4f}{}); {} written to {}",
                          result.stopped_early ? "stopped" : "done", result.steps, result.last_loss,
                          result.last_eval_loss >= 0 ? fmt::format(", eval loss {:.4f}", result.last_eval_loss) : "",
                          setup.lora ? "adapter_config.json + adapter_model.safetensors" : "config.json + model.safetensors",
                          out.string()));
  return 0;
}

}  // namespace llmtune::align
