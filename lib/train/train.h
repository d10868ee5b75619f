// llmtune::train — the one training loop every stage (pretrain, sft, dpo, reward, ppo) runs,
// with its parts: our own AdamW/SGD (state we can checkpoint exactly), HF-compatible LR
// schedules, fp32 master weights and fp16 loss scaling, clipping, a NaN guard, metrics.jsonl,
// atomic checkpoints with bitwise-exact resume, and an SVG loss plot. A stage supplies the
// model, an Objective and a BatchSource; everything else lives here.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "train/batch.h"

namespace llmtune::config {
struct Recipe;
}

namespace llmtune::train {

namespace fs = std::filesystem;
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// ---------------------------------------------------------------------------------------------
// Objective: turns a micro-batch into a loss. The loop owns accumulation, so an objective never
// averages by itself: it returns sum-over-targets / normaliser, where normaliser is the target
// count of the whole accumulation group (all micro-batches, all ranks). Then micro 1 x accum 4
// and micro 4 x accum 1 give the same gradient up to float rounding.
struct StepOutput {
  torch::Tensor loss;                      // scalar, differentiable: sum over targets / normaliser
  std::map<std::string, double> metrics;   // per-micro-batch values (e.g. "accuracy"); the loop
                                           // averages them weighted by each micro's target count
};

struct EvalOutput {
  double loss_sum = 0;   // sum of per-target losses over the batch
  double count = 0;      // number of targets it covers
  std::map<std::string, double> metrics;  // averaged over batches weighted by count
};

class Objective {
 public:
  virtual ~Objective() = default;
  // Called in train mode with autograd on. See the normaliser contract above.
  virtual StepOutput compute(const Batch& micro, double normaliser) = 0;
  // What a normaliser counts for this micro-batch: target tokens for LM objectives (the default:
  // num_target_tokens, or counted from labels), pairs for DPO/reward, and so on.
  virtual double target_count(const Batch& micro) { return static_cast<double>(count_target_tokens(micro)); }
  // Eval hook, called under NoGradGuard in eval mode. Default: compute(micro, 1) as a sum.
  virtual EvalOutput evaluate(const Batch& micro);
};

// ---------------------------------------------------------------------------------------------
// BatchSource: the data side of the loop. Deterministic given its seed and state, so a resumed
// run sees exactly the batches the uninterrupted one would. In DDP each rank has its own shard.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  // Start epoch `epoch` from its beginning (re-shuffle deterministically from seed + epoch).
  virtual void set_epoch(int64_t epoch) = 0;
  // The next micro-batch of the current epoch, or nullopt at its end.
  virtual std::optional<Batch> next() = 0;
  // Micro-batches per epoch on this rank; -1 if unknown (then max_steps is required).
  virtual int64_t batches_per_epoch() const { return -1; }
  // Position inside the epoch, epoch, seed...: whatever load_state needs to continue exactly.
  virtual nlohmann::json state() const = 0;
  virtual void load_state(const nlohmann::json& state) = 0;
};

// Wraps any type with BatchSource's methods (for example data::BatchSource, which mirrors this
// interface without depending on lib/train) so the loop can drive it. Holds a reference.
template <class Source>
class BatchSourceRef : public BatchSource {
 public:
  explicit BatchSourceRef(Source& source) : s_(source) {}
  void set_epoch(int64_t epoch) override { s_.set_epoch(epoch); }
  std::optional<Batch> next() override { return s_.next(); }
  int64_t batches_per_epoch() const override { return s_.batches_per_epoch(); }
  nlohmann::json state() const override { return s_.state(); }
  void load_state(const nlohmann::json& state) override { s_.load_state(state); }

 private:
  Source& s_;
};

// A fixed list of batches (tests, small evaluation sets), optionally shuffled per epoch with
// its own generator (seed + epoch) so it never touches the global RNG.
class VectorBatchSource : public BatchSource {
 public:
  explicit VectorBatchSource(std::vector<Batch> batches, bool shuffle = false, uint64_t seed = 0);
  void set_epoch(int64_t epoch) override;
  std::optional<Batch> next() override;
  int64_t batches_per_epoch() const override { return static_cast<int64_t>(batches_.size()); }
  nlohmann::json state() const override;
  void load_state(const nlohmann::json& state) override;

 private:
  std::vector<Batch> batches_;
  std::vector<int64_t> order_;
  bool shuffle_;
  uint64_t seed_;
  int64_t epoch_ = 0, pos_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Optimizers. Implemented on plain tensors (not torch::optim) so the state is ours to save
// bitwise and to keep in fp32 next to bf16 weights. Parameters are updated in place.
struct ParamGroup {
  std::string name;                  // "decay", "no_decay", "lora_B"...
  std::vector<std::string> names;    // parameter names (unique across groups; state keys)
  std::vector<torch::Tensor> params; // fp32 tensors the optimizer updates (model params or masters)
  double weight_decay = 0;
  double lr_scale = 1;               // group lr = schedule lr * lr_scale (LoRA+)
};

struct OptimizerOptions {
  std::string name = "adamw";  // "adamw" | "adamw_8bit" | "sgd"
  double lr = 2e-4;
  double weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;       // AdamW
  double momentum = 0.0, dampening = 0.0;               // SGD
  bool nesterov = false;                                // SGD
  double loraplus_lr_ratio = 0.0;  // > 0: lora_B parameters train at lr * ratio (LoRA+)
};

// Norms, biases and every 1-D parameter get no weight decay (names containing "norm", ending
// in ".bias", or dim() < 2). lora_B parameters get their own group when loraplus_lr_ratio > 0.
bool is_no_decay_param(const std::string& name, const torch::Tensor& param);
std::vector<ParamGroup> make_param_groups(const NamedTensors& named, double weight_decay, double loraplus_lr_ratio);

class Optimizer {
 public:
  explicit Optimizer(std::vector<ParamGroup> groups);
  virtual ~Optimizer() = default;
  // One update from each param's .grad() (params without a grad are left alone) at base `lr`.
  virtual void step(double lr) = 0;
  // State for checkpoints: tensors keyed "<param>.<slot>", scalars (per-param step counts).
  virtual NamedTensors state_tensors() const = 0;
  virtual nlohmann::json state_scalars() const = 0;
  // Restores state; every tensor is checked against the parameter's shape (Error names it).
  virtual void load_state(const std::map<std::string, torch::Tensor>& tensors, const nlohmann::json& scalars) = 0;
  const std::vector<ParamGroup>& groups() const { return groups_; }

 protected:
  std::vector<ParamGroup> groups_;
};

// torch.optim.AdamW semantics: decoupled decay p *= 1 - lr*wd, bias-corrected moments.
class AdamW : public Optimizer {
 public:
  AdamW(std::vector<ParamGroup> groups, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8);
  void step(double lr) override;
  NamedTensors state_tensors() const override;
  nlohmann::json state_scalars() const override;
  void load_state(const std::map<std::string, torch::Tensor>& tensors, const nlohmann::json& scalars) override;
  int64_t step_count(const std::string& param) const;

 private:
  struct State { torch::Tensor exp_avg, exp_avg_sq; int64_t step = 0; };
  double beta1_, beta2_, eps_;
  std::map<std::string, State> state_;
};

// torch.optim.SGD semantics: coupled weight decay (g += wd*p), momentum buffer initialised to
// the first gradient, dampening, Nesterov.
class SGD : public Optimizer {
 public:
  SGD(std::vector<ParamGroup> groups, double momentum = 0, double dampening = 0, bool nesterov = false);
  void step(double lr) override;
  NamedTensors state_tensors() const override;
  nlohmann::json state_scalars() const override;
  void load_state(const std::map<std::string, torch::Tensor>& tensors, const nlohmann::json& scalars) override;

 private:
  double momentum_, dampening_;
  bool nesterov_;
  std::map<std::string, torch::Tensor> momentum_buffer_;
};

std::unique_ptr<Optimizer> make_optimizer(const OptimizerOptions& options, std::vector<ParamGroup> groups);

// ---------------------------------------------------------------------------------------------
// Learning-rate schedules, with transformers' formulas (get_*_schedule_with_warmup): the lr
// used by optimizer step s (0-based) is base_lr * factor(s). Warmup is linear from 0.
struct ScheduleOptions {
  std::string type = "linear";  // see schedule_names()
  int64_t warmup_steps = 0;     // takes precedence over warmup_ratio when > 0
  double warmup_ratio = 0.0;    // warmup = ceil(ratio * total_steps) (HF TrainingArguments)
  double min_lr_ratio = 0.0;    // cosine floor as a fraction of base lr (HF min_lr_rate)
  double min_lr = -1.0;         // cosine floor as an absolute lr (>= 0 overrides min_lr_ratio)
};

// The registry: {name, one-line description}.
const std::vector<std::pair<std::string, std::string>>& schedule_names();

class LrSchedule {
 public:
  LrSchedule(const ScheduleOptions& options, double base_lr, int64_t total_steps);
  double factor(int64_t step) const;
  double lr(int64_t step) const { return base_lr_ * factor(step); }
  int64_t warmup_steps() const { return warmup_; }
  int64_t total_steps() const { return total_; }

 private:
  std::string type_;
  double base_lr_, min_rate_;
  int64_t warmup_, total_;
};

// ---------------------------------------------------------------------------------------------
// Mixed precision and gradient hygiene.
enum class Precision { fp32, bf16, fp16 };
Precision precision_from_string(const std::string& s);  // "fp32"/"no", "bf16", "fp16"; Error otherwise
std::string to_string(Precision p);

// Dynamic loss scaling with torch.amp.GradScaler semantics: start at 2^16; a step with
// non-finite gradients is skipped and halves the scale; 2000 clean steps in a row double it.
class LossScaler {
 public:
  explicit LossScaler(bool enabled, double init_scale = 65536.0, double growth_factor = 2.0,
                      double backoff_factor = 0.5, int64_t growth_interval = 2000);
  bool enabled() const { return enabled_; }
  double scale() const { return enabled_ ? scale_ : 1.0; }
  void update(bool found_inf);
  int64_t growth_tracker() const { return growth_tracker_; }
  nlohmann::json state() const;
  void load_state(const nlohmann::json& state);

 private:
  bool enabled_;
  double scale_, growth_, backoff_;
  int64_t interval_, growth_tracker_ = 0;
};

// Global L2 norm of the gradients of `params` (float64 accumulation); when max_norm > 0 and the
// norm is finite, scales them by min(1, max_norm / (norm + 1e-6)) like clip_grad_norm_.
// Returns the norm before clipping (inf/nan if any gradient is non-finite).
double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm);

// ---------------------------------------------------------------------------------------------
// The loop.
struct TrainOptions {
  fs::path output_dir;                  // metrics.jsonl, checkpoint-N/, loss.svg
  int64_t max_steps = -1;               // > 0 wins over num_epochs
  int64_t num_epochs = 1;
  int64_t gradient_accumulation_steps = 1;
  OptimizerOptions optimizer;
  ScheduleOptions schedule;
  double max_grad_norm = 1.0;           // <= 0: no clipping (norm still logged)
  Precision precision = Precision::fp32;
  int64_t logging_steps = 10;
  int64_t eval_steps = 0;               // 0: eval only at the end (if an eval source is given)
  int64_t save_steps = 0;               // 0: no periodic checkpoints
  int64_t save_total_limit = 0;         // keep this many newest checkpoint-N; 0 = keep all
  bool save_on_stop = true;             // checkpoint when hooks.should_stop ends the run early
  std::string resume;                   // "" fresh, "auto" newest checkpoint in output_dir, or a dir
  int64_t max_bad_steps = 5;            // consecutive non-finite steps before giving up
  uint64_t seed = 42;                   // seeds torch's default generator on a fresh run
  bool progress = true;                 // progress bar on rank 0
  bool plot = true;                     // loss.svg at the end on rank 0
  int rank = 0, world_size = 1;
};

struct StepReport {
  int64_t step = 0;          // 1-based, after the update
  double epoch = 0;          // fractional when batches_per_epoch is known
  double loss = 0;           // group loss (sum over micro-batches of objective losses)
  double grad_norm = 0;      // before clipping
  double lr = 0;             // lr used by this step
  bool skipped = false;
  std::string skip_reason;   // "non-finite loss", "non-finite grad norm", "fp16 overflow"
  int64_t tokens = 0;        // tokens in this step
  std::map<std::string, double> metrics;
};

struct TrainHooks {
  // Called on the fp32 gradients (masters' grads) before unscaling/clipping; DDP averages here.
  std::function<void(std::vector<torch::Tensor>& grads)> reduce_gradients;
  // Sums a scalar across ranks (normaliser, logged loss, token counts). Identity by default.
  std::function<double(double)> reduce_sum;
  // Write/read stage-specific files inside a checkpoint dir (e.g. PEFT adapter files). save_extra
  // gets the temporary dir before it is renamed into place.
  std::function<void(const fs::path& dir)> save_extra;
  std::function<void(const fs::path& dir)> load_extra;
  std::function<void(const StepReport&)> on_step;
  // Monitoring (llmtune::eval::TrainingMonitor): extra metrics computed at each evaluation (eval mode,
  // no grad, training RNG restored afterwards; joined to the eval line as "eval_<key>"; evaluation
  // happens even without eval data when set), and every line appended to metrics.jsonl (rank 0).
  std::function<std::map<std::string, double>(int64_t step)> evaluate_extra;
  std::function<void(const nlohmann::json& line)> on_log;
  // Asked after each step; true stops the run (with a checkpoint if save_on_stop), e.g. on SIGINT.
  std::function<bool(int64_t step)> should_stop;
  // Data parallelism (lib/dist fills these through Parallel::attach; unset = single process):
  // before each micro-batch's backward, `last` = final micro-batch of the accumulation group (DDP
  // reduces only then); an optimizer factory (ZeRO shards states); a clip that sees sharded grads.
  std::function<void(bool last)> before_backward;
  std::function<std::unique_ptr<Optimizer>(const OptimizerOptions&, std::vector<ParamGroup>)> make_optimizer;
  std::function<double(const std::vector<torch::Tensor>& params, double max_norm)> clip_gradients;
  // Fully sharded parameters (ZeRO-3): a trainable parameter that `is_local` to this rank keeps its
  // values, fp32 master, gradient and optimizer state here; the others are empty outside their
  // layer's forward and backward, and the loop skips them. `gather_to_main` is a collective: each
  // rank passes its local named tensors, rank 0 gets the union back (checkpoint contents).
  // `unshard(true)` (a collective) makes every parameter whole on rank 0, the rank that writes
  // (around save_extra, which writes files from the model); `unshard(false)` frees the non-local
  // ones there again.
  std::function<bool(const std::string& name)> is_local;
  std::function<NamedTensors(const NamedTensors& local)> gather_to_main;
  std::function<void(bool whole)> unshard;
};

// The data-parallel seam: lib/dist implements it on c10d, the llmtune binary installs the factory,
// and stages call init_parallel (before loading the model: it picks the device) and attach (after
// the adapter is applied: it fills the hooks above and makes should_stop agree across ranks).
class Parallel {
 public:
  virtual ~Parallel() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual int local_rank() const = 0;
  virtual torch::Device device() const = 0;  // cuda:<local_rank> on NCCL, else CPU
  virtual void attach(torch::nn::Module& model, TrainHooks& hooks) = 0;
  virtual void barrier() = 0;
  // Fully sharded runs: after training, make every parameter whole on rank 0 so the stage can
  // save the model (a collective; every rank calls it). No-op for DDP and ZeRO-1/2.
  virtual void unshard_model() {}
};
using ParallelFactory = std::function<std::unique_ptr<Parallel>(const config::Recipe&)>;
void set_parallel_factory(ParallelFactory factory);
// nullptr for a single-process run (no factory installed, or no launcher/torchrun/Slurm environment).
std::unique_ptr<Parallel> init_parallel(const config::Recipe& recipe);

struct TrainResult {
  int64_t steps = 0;            // global step reached
  int64_t skipped_steps = 0;
  double last_loss = 0;
  double last_eval_loss = -1;   // -1 when never evaluated
  bool stopped_early = false;
  fs::path last_checkpoint;     // empty if none written
  int64_t resumed_from_step = 0;
};

// Trains the requires_grad parameters of `model` with `objective` on `train_data`.
// The model's trainable params may be fp32, bf16 or fp16; non-fp32 ones get fp32 masters.
// Throws llmtune::Error on bad options, unreadable checkpoints, write failures (previous
// checkpoints intact), or max_bad_steps non-finite steps in a row.
TrainResult run_training(torch::nn::Module& model, Objective& objective, BatchSource& train_data,
                         BatchSource* eval_data, const TrainOptions& options, const TrainHooks& hooks = {});

// The loop's options from a validated recipe. `batches_per_epoch` (this rank's micro-batches, -1 if
// unknown) resolves fractional num_epochs, eval/save "epoch" strategies, *_per_epoch and fractional
// eval_steps/save_steps. eval_steps 0 = evaluate only at the end: with eval_strategy "no", pass no
// eval source. save_steps defaults to once per epoch. Precision follows fp16 / bf16 (auto → bf16).
TrainOptions train_options_from_recipe(const config::Recipe& recipe, int64_t batches_per_epoch, int rank = 0,
                                       int world_size = 1);

// ---------------------------------------------------------------------------------------------
// Checkpoint helpers (exposed for stages and tests).
// Complete checkpoint-N dirs in output_dir, oldest first (temp dirs and partial ones excluded).
std::vector<fs::path> list_checkpoints(const fs::path& output_dir);
// "auto" → newest checkpoint or nullopt; a path → that dir (Error if it is not a checkpoint).
std::optional<fs::path> resolve_resume(const fs::path& output_dir, const std::string& resume);

// Plot of metrics.jsonl: training loss, eval loss, and lr on a second axis, as SVG.
void write_loss_plot(const fs::path& metrics_jsonl, const fs::path& svg_out);

}  // namespace llmtune::train

// Stage entry points (run_sft, ...).
#include "train/stages.h"
