// Recipe → TrainOptions: the one place that turns the Axolotl-style keys (fractional epochs,
// eval/save "steps|epoch|no", *_per_epoch, fractional eval/save steps) into the loop's numbers.
// Stages call it after building their data, because several values depend on the epoch length.
#include <cmath>

#include "config/config.h"
#include "core/core.h"
#include "train/train.h"

namespace llmtune::train {

TrainOptions train_options_from_recipe(const config::Recipe& r, int64_t batches_per_epoch, int rank, int world_size) {
  TrainOptions o;
  o.output_dir = r.output_dir;
  o.rank = rank;
  o.world_size = world_size;
  o.seed = static_cast<uint64_t>(r.seed);
  o.gradient_accumulation_steps = r.gradient_accumulation_steps;
  const int64_t accum = std::max<int64_t>(1, r.gradient_accumulation_steps);
  const int64_t spe = batches_per_epoch > 0 ? (batches_per_epoch + accum - 1) / accum : -1;  // steps per epoch

  if (r.max_steps && *r.max_steps > 0) {
    o.max_steps = *r.max_steps;
  } else if (r.num_epochs == std::floor(r.num_epochs) && r.num_epochs >= 1) {
    o.num_epochs = static_cast<int64_t>(r.num_epochs);
  } else {
    if (spe <= 0) fail("num_epochs {} is fractional but the data's length is unknown; set max_steps", r.num_epochs);
    o.max_steps = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(r.num_epochs * static_cast<double>(spe))));
  }
  const int64_t total = o.max_steps > 0 ? o.max_steps : (spe > 0 ? o.num_epochs * spe : -1);
  auto steps_of = [&](double v, const char* key) -> int64_t {  // N, or a fraction of the total if < 1
    if (v >= 1) return static_cast<int64_t>(v);
    if (v <= 0) return 0;
    if (total <= 0) fail("{} {} is a fraction of the total steps, which is unknown here; give a step count", key, v);
    return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(v * static_cast<double>(total))));
  };
  auto per_epoch = [&](int64_t n, const char* key) -> int64_t {
    if (spe <= 0) fail("{} needs the epoch length, which is unknown for this data; use a step count", key);
    return std::max<int64_t>(1, spe / std::max<int64_t>(1, n));
  };

  // Evaluation: eval_steps == 0 means "only at the end"; a stage with eval_strategy "no" passes no eval data.
  const std::string eval_strategy = r.eval_strategy.value_or("steps");
  if (eval_strategy == "epoch") o.eval_steps = per_epoch(1, "eval_strategy: epoch");
  else if (r.evals_per_epoch && *r.evals_per_epoch > 0) o.eval_steps = per_epoch(*r.evals_per_epoch, "evals_per_epoch");
  else if (r.eval_steps) o.eval_steps = steps_of(*r.eval_steps, "eval_steps");

  // Checkpoints: default once per epoch when its length is known, so a crash loses at most an epoch.
  const std::string save_strategy = r.save_strategy.value_or("steps");
  if (save_strategy == "no") o.save_steps = 0;
  else if (save_strategy == "epoch") o.save_steps = per_epoch(1, "save_strategy: epoch");
  else if (r.saves_per_epoch && *r.saves_per_epoch > 0) o.save_steps = per_epoch(*r.saves_per_epoch, "saves_per_epoch");
  else if (r.save_steps) o.save_steps = steps_of(*r.save_steps, "save_steps");
  else o.save_steps = spe > 0 ? spe : 0;
  o.save_total_limit = r.save_total_limit.value_or(0);

  o.logging_steps = r.logging_steps.value_or(
      total > 0 ? std::max<int64_t>(1, std::min<int64_t>(10, static_cast<int64_t>(std::llround(0.005 * total)))) : 10);
  if (r.resume_from_checkpoint) o.resume = *r.resume_from_checkpoint;
  else if (r.auto_resume_from_checkpoints) o.resume = "auto";

  o.optimizer.name = r.optimizer == "sgd" ? "sgd" : r.optimizer == "adamw_8bit" ? "adamw_8bit" : "adamw";
  o.optimizer.lr = r.learning_rate;
  o.optimizer.weight_decay = r.weight_decay;
  o.optimizer.beta1 = r.adam_beta1;
  o.optimizer.beta2 = r.adam_beta2;
  o.optimizer.eps = r.adam_epsilon;
  o.optimizer.loraplus_lr_ratio = r.loraplus_lr_ratio.value_or(0.0);
  o.max_grad_norm = r.max_grad_norm;

  o.schedule.type = r.lr_scheduler;
  o.schedule.warmup_steps = r.warmup_steps.value_or(0);
  o.schedule.warmup_ratio = r.warmup_ratio.value_or(0.0);
  o.schedule.min_lr_ratio = r.cosine_min_lr_ratio.value_or(0.0);
  o.schedule.min_lr = r.min_lr.value_or(-1.0);

  o.precision = r.fp16 ? Precision::fp16 : (r.bf16 == config::Tristate::off ? Precision::fp32 : Precision::bf16);
  return o;
}

}  // namespace llmtune::train
