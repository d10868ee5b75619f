// run_training: the one loop. Per optimizer step: gather an accumulation group, compute the
// group normaliser, forward/backward each micro-batch, move grads to fp32 masters, reduce
// (DDP hook), unscale (fp16), clip, guard against non-finite values, step, log, eval, save.
// Exactness: everything that influences later steps (weights, masters, optimizer slots, RNG,
// data position, scaler, log window) is in the checkpoint; eval restores the RNG it used.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/profiler_legacy.h>

#include <cmath>
#include <fstream>

#include "core/core.h"
#include "train/train_impl.h"

namespace llmtune::train {
using detail::shape_str;

namespace {

struct Trainable {
  std::string name;
  torch::Tensor param;   // the model's parameter (any float dtype)
  torch::Tensor master;  // fp32 tensor the optimizer updates; the param itself when it is fp32
  bool has_master = false;
};

// Sums since the last metrics line; checkpointed so a resumed run logs the same numbers.
struct LogWindow {
  double loss_sum = 0, step_time = 0, metric_weight = 0;
  int64_t loss_steps = 0, steps = 0, tokens = 0;
  std::map<std::string, double> metric_sum;
  nlohmann::json to_json() const {
    return {{"loss_sum", loss_sum}, {"step_time", step_time}, {"metric_weight", metric_weight},
            {"loss_steps", loss_steps}, {"steps", steps}, {"tokens", tokens}, {"metric_sum", metric_sum}};
  }
  void from_json(const nlohmann::json& j) {
    loss_sum = j.at("loss_sum"); step_time = j.at("step_time"); metric_weight = j.at("metric_weight");
    loss_steps = j.at("loss_steps"); steps = j.at("steps"); tokens = j.at("tokens");
    metric_sum = j.at("metric_sum").get<std::map<std::string, double>>();
  }
};

class MetricsFile {
 public:
  MetricsFile(fs::path path, bool enabled) : path_(std::move(path)), enabled_(enabled) {}
  const fs::path& path() const { return path_; }
  void append(const nlohmann::json& line) const {
    if (!enabled_) return;
    std::ofstream f(path_, std::ios::app);
    f << line.dump() << '\n';
    if (!f) fail("cannot append to {}; check free space and permissions of output_dir", path_.string());
  }
  // A fresh run starts an empty file; a resumed run drops lines logged after the checkpoint
  // (by the interrupted run) so the history reads as one run.
  void reset(int64_t keep_up_to_step) const {
    if (!enabled_) return;
    std::vector<std::string> kept;
    if (keep_up_to_step > 0) {
      std::ifstream in(path_);
      std::string line;
      while (std::getline(in, line)) {
        auto j = nlohmann::json::parse(line, nullptr, false);
        if (!j.is_discarded() && j.is_object() && j.value("step", INT64_MAX) <= keep_up_to_step) kept.push_back(line);
      }
    }
    std::ofstream out(path_, std::ios::trunc);
    for (const auto& l : kept) out << l << '\n';
    if (!out) fail("cannot write {}; check that output_dir is writable", path_.string());
  }

 private:
  fs::path path_;
  bool enabled_;
};

torch::Tensor rng_get() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}
void rng_set(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

void validate(const TrainOptions& o) {
  if (o.gradient_accumulation_steps < 1)
    fail("gradient_accumulation_steps must be >= 1 (got {})", o.gradient_accumulation_steps);
  if (o.logging_steps < 1) fail("logging_steps must be >= 1 (got {})", o.logging_steps);
  if (o.eval_steps < 0 || o.save_steps < 0 || o.save_total_limit < 0)
    fail("eval_steps, save_steps and save_total_limit must be >= 0");
  if (o.max_bad_steps < 1) fail("max_bad_steps must be >= 1 (got {})", o.max_bad_steps);
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size)
    fail("rank {} is out of range for world_size {}", o.rank, o.world_size);
  if (o.optimizer.lr < 0) fail("learning_rate must be >= 0 (got {})", o.optimizer.lr);
  if (o.max_steps <= 0 && o.num_epochs < 1) fail("set max_steps > 0 or num_epochs >= 1");
  if ((o.save_steps > 0 || !o.resume.empty()) && o.output_dir.empty())
    fail("checkpoints and resume need an output_dir");
}

}  // namespace

TrainResult run_training(torch::nn::Module& model, Objective& objective, BatchSource& train_data,
                         BatchSource* eval_data, const TrainOptions& opt, const TrainHooks& hooks) {
  validate(opt);
  const bool main_rank = opt.rank == 0;
  const bool writes = main_rank && !opt.output_dir.empty();
  auto reduce = [&](double v) { return hooks.reduce_sum ? hooks.reduce_sum(v) : v; };

  if (writes) {
    std::error_code ec;
    fs::create_directories(opt.output_dir, ec);
    if (ec || !fs::is_directory(opt.output_dir))
      fail("cannot create output_dir '{}': {}; choose a writable path", opt.output_dir.string(),
           ec ? ec.message() : "a file is in the way");
    detail::remove_stale_temp_dirs(opt.output_dir);
  }
  MetricsFile metrics(opt.output_dir / "metrics.jsonl", writes);

  // ---- trainable parameters, fp32 masters, optimizer --------------------------------------
  std::vector<Trainable> trainables;
  for (const auto& item : model.named_parameters(/*recurse=*/true)) {
    if (!item.value().requires_grad()) continue;
    if (hooks.is_local && !hooks.is_local(item.key())) continue;  // ZeRO-3: another rank keeps it
    Trainable t{item.key(), item.value(), item.value(), false};
    if (!t.param.is_floating_point()) fail("trainable parameter '{}' is not floating point", t.name);
    if (t.param.scalar_type() != torch::kFloat32) {
      t.master = t.param.detach().to(torch::kFloat32).clone();
      t.has_master = true;
    }
    trainables.push_back(std::move(t));
  }
  if (trainables.empty() && !hooks.is_local)
    fail("the model has no trainable parameters (all requires_grad=false); check the adapter / trainable settings");
  NamedTensors named_masters;
  std::vector<torch::Tensor> masters;
  for (const auto& t : trainables) {
    named_masters.emplace_back(t.name, t.master);
    masters.push_back(t.master);
  }
  auto groups = make_param_groups(named_masters, opt.optimizer.weight_decay, opt.optimizer.loraplus_lr_ratio);
  auto optimizer = hooks.make_optimizer ? hooks.make_optimizer(opt.optimizer, std::move(groups))  // ZeRO
                                        : make_optimizer(opt.optimizer, std::move(groups));
  LossScaler scaler(opt.precision == Precision::fp16);

  // ---- schedule length ----------------------------------------------------------------------
  const int64_t accum = opt.gradient_accumulation_steps;
  const int64_t per_epoch = train_data.batches_per_epoch();
  int64_t total = opt.max_steps;
  if (total <= 0) {
    if (per_epoch <= 0)
      fail("the training data's length is unknown (streaming); set max_steps instead of num_epochs");
    total = opt.num_epochs * ((per_epoch + accum - 1) / accum);
  }
  if (total <= 0) fail("nothing to train: the data has no batches");
  LrSchedule schedule(opt.schedule, opt.optimizer.lr, total);

  // ---- state, fresh or resumed ------------------------------------------------------------------
  int64_t step = 0, epoch = 0, micro_in_epoch = 0, tokens_seen = 0, bad_in_row = 0, skipped = 0;
  double last_eval_loss = -1;
  LogWindow window;
  TrainResult result;
  auto ckpt = opt.resume.empty() ? std::nullopt : resolve_resume(opt.output_dir, opt.resume);
  if (!opt.resume.empty() && !ckpt) log::warn(fmt::format("resume: no checkpoint in {}; starting fresh", opt.output_dir.string()));
  if (ckpt) {
    auto data = detail::read_checkpoint(*ckpt);
    const auto& s = data.state;
    std::map<std::string, torch::Tensor> trainable_map(data.trainable.begin(), data.trainable.end());
    std::map<std::string, torch::Tensor> opt_map(data.optimizer.begin(), data.optimizer.end());
    torch::NoGradGuard no_grad;
    for (auto& t : trainables) {
      auto it = trainable_map.find(t.name);
      if (it == trainable_map.end())
        fail("checkpoint {} has no tensor '{}' for trainable parameter '{}'; it was written for a different model or "
             "trainable set", ckpt->string(), t.name, t.name);
      if (it->second.sizes() != t.param.sizes())
        fail("checkpoint {}: tensor '{}' has shape {} but the model expects {}", ckpt->string(), t.name,
             shape_str(it->second.sizes()), shape_str(t.param.sizes()));
      if (t.has_master) {
        auto m = opt_map.find("master." + t.name);
        t.master.copy_(m != opt_map.end() ? m->second : it->second.to(torch::kFloat32));
        t.param.copy_(t.master);
      } else {
        t.param.copy_(it->second);
      }
    }
    optimizer->load_state(opt_map, s.at("optimizer"));
    scaler.load_state(s.at("scaler"));
    step = s.at("global_step");
    epoch = s.at("epoch");
    micro_in_epoch = s.at("micro_in_epoch");
    tokens_seen = s.at("tokens_seen");
    bad_in_row = s.at("bad_steps_in_row");
    skipped = s.at("skipped_steps");
    last_eval_loss = s.value("last_eval_loss", -1.0);
    window.from_json(s.at("log_window"));
    if (s.value("total_steps", total) != total)
      log::warn(fmt::format("resume: the checkpoint was written by a run of {} steps, this one has {}; the lr schedule "
                            "changes from here", s.value("total_steps", total), total));
    if (s.value("gradient_accumulation_steps", accum) != accum || s.value("world_size", opt.world_size) != opt.world_size)
      log::warn("resume: gradient_accumulation_steps or world_size changed; data order will not match the first run");
    train_data.load_state(s.at("data"));
    rng_set(data.rng_state);
    if (hooks.load_extra) hooks.load_extra(*ckpt);
    result.resumed_from_step = step;
    metrics.reset(step);
    if (main_rank) log::notice(fmt::format("resumed from {} (step {} of {})", ckpt->string(), step, total));
  } else {
    torch::manual_seed(opt.seed);
    train_data.set_epoch(0);
    metrics.reset(0);
    if (writes && !list_checkpoints(opt.output_dir).empty())
      log::warn(fmt::format("{} holds checkpoints of an earlier run; this fresh run will overwrite and rotate them "
                            "(use resume: auto to continue it instead)", opt.output_dir.string()));
  }

  auto epoch_value = [&]() {
    return per_epoch > 0 ? static_cast<double>(epoch) + static_cast<double>(micro_in_epoch) / per_epoch
                         : static_cast<double>(epoch);
  };

  // ---- eval ------------------------------------------------------------------------------------
  auto evaluate = [&]() {
    torch::Tensor rng = rng_get();  // eval must not shift the training RNG stream
    model.eval();
    double sum = 0, count = 0;
    std::map<std::string, double> msum, extra;
    {
      torch::NoGradGuard no_grad;
      if (eval_data) {
        eval_data->set_epoch(0);
        while (auto b = eval_data->next()) {
          EvalOutput e = objective.evaluate(*b);
          sum += e.loss_sum;
          count += e.count;
          for (const auto& [k, v] : e.metrics) msum[k] += v * e.count;
        }
      }
      if (hooks.evaluate_extra) extra = hooks.evaluate_extra(step);  // eval tasks (lib/eval)
    }
    model.train();
    rng_set(rng);
    sum = reduce(sum);
    count = reduce(count);
    nlohmann::json line = {{"step", step}, {"epoch", epoch_value()}};
    const double loss = count > 0 ? sum / count : std::nan("");
    if (eval_data) {
      line["eval_loss"] = loss;
      line["eval_perplexity"] = std::exp(loss);
      line["eval_targets"] = count;
    }
    for (const auto& [k, v] : msum) line["eval_" + k] = count > 0 ? reduce(v) / count : std::nan("");
    for (const auto& [k, v] : extra) line["eval_" + k] = v;
    metrics.append(line);
    if (main_rank && hooks.on_log) hooks.on_log(line);
    if (!eval_data) return;
    last_eval_loss = loss;
    if (main_rank) log::info(fmt::format("eval at step {}: loss {:.4f}, perplexity {:.3f}", step, loss, std::exp(loss)));
  };

  // ---- checkpoint --------------------------------------------------------------------------------
  auto save = [&]() {
    // Every rank asks for the optimizer state: a sharded (ZeRO) optimizer gathers it collectively.
    NamedTensors opt_state = optimizer->state_tensors();
    nlohmann::json opt_scalars = optimizer->state_scalars();
    NamedTensors params, param_masters;
    for (const auto& t : trainables) {
      params.emplace_back(t.name, t.param);
      if (t.has_master) param_masters.emplace_back("master." + t.name, t.master);
    }
    if (hooks.gather_to_main) {  // ZeRO-3: each rank holds some of them; rank 0 collects the rest
      params = hooks.gather_to_main(params);
      param_masters = hooks.gather_to_main(param_masters);
    }
    const bool unshard = hooks.unshard && hooks.save_extra;  // save_extra writes from the model itself
    if (unshard) hooks.unshard(true);
    if (!writes) {
      if (unshard) hooks.unshard(false);
      return;
    }
    detail::CheckpointData d;
    d.trainable = std::move(params);
    d.optimizer = std::move(opt_state);
    d.optimizer.insert(d.optimizer.end(), param_masters.begin(), param_masters.end());
    d.rng_state = rng_get();
    nlohmann::json trainable_names = nlohmann::json::array();
    for (const auto& [name, tensor] : d.trainable) trainable_names.push_back(name);
    d.state = {{"format", "llmtune-trainer-state"}, {"version", 1}, {"global_step", step}, {"epoch", epoch},
               {"micro_in_epoch", micro_in_epoch}, {"total_steps", total}, {"tokens_seen", tokens_seen},
               {"bad_steps_in_row", bad_in_row}, {"skipped_steps", skipped}, {"last_eval_loss", last_eval_loss},
               {"gradient_accumulation_steps", accum}, {"world_size", opt.world_size},
               {"precision", to_string(opt.precision)}, {"scaler", scaler.state()},
               {"optimizer", opt_scalars}, {"data", train_data.state()},
               {"log_window", window.to_json()}, {"trainable", trainable_names}};
    try {
      result.last_checkpoint = detail::write_checkpoint(opt.output_dir, step, d, hooks.save_extra);
    } catch (...) {
      if (unshard) hooks.unshard(false);
      throw;
    }
    if (unshard) hooks.unshard(false);
    detail::rotate_checkpoints(opt.output_dir, opt.save_total_limit);
  };

  // ---- the loop ------------------------------------------------------------------------------------
  std::unique_ptr<ProgressBar> bar;
  if (main_rank && opt.progress)
    bar = std::make_unique<ProgressBar>(step > 0 ? fmt::format("train (from step {})", step) : "train", total - step,
                                        "step");
  model.train();
  double last_loss = std::nan("");
  // LLMTUNE_PROFILE=FILE: a Chrome trace (chrome://tracing, Perfetto) of every LibTorch op of one
  // step: the third of this run (the first two warm up allocators and kernels), or the 1-based step
  // LLMTUNE_PROFILE_STEP; for benchmarking.
  const char* profile_path = std::getenv("LLMTUNE_PROFILE");
  const char* profile_at = std::getenv("LLMTUNE_PROFILE_STEP");
  const int64_t profile_step = profile_at && *profile_at ? std::atoll(profile_at) - 1 : step + 2;
  while (step < total) {
    std::unique_ptr<torch::autograd::profiler::RecordProfile> profile;
    if (profile_path && *profile_path && step == profile_step && main_rank) {
      profile = std::make_unique<torch::autograd::profiler::RecordProfile>(std::string(profile_path));
      log::info(fmt::format("profiling step {} into {}", step + 1, profile_path));
    }
    const double t0 = now_seconds();
    // Gather one accumulation group; a group never spans an epoch boundary (HF behaviour).
    std::vector<Batch> group;
    while (static_cast<int64_t>(group.size()) < accum) {
      std::optional<Batch> b = train_data.next();
      if (!b) {
        if (!group.empty()) break;
        ++epoch;
        micro_in_epoch = 0;
        train_data.set_epoch(epoch);
        b = train_data.next();
        if (!b) fail("the training data yielded no batches in epoch {}", epoch);
      }
      ++micro_in_epoch;
      group.push_back(std::move(*b));
    }

    std::vector<double> counts;
    double local_norm = 0;
    for (const auto& b : group) {
      counts.push_back(objective.target_count(b));
      local_norm += counts.back();
    }
    const double normaliser = reduce(local_norm);

    for (auto& t : trainables) {
      t.param.mutable_grad() = torch::Tensor();
      if (t.has_master) t.master.mutable_grad() = torch::Tensor();
    }
    double loss_local = 0, tokens_local = 0, mweight = 0;
    std::map<std::string, double> msum;
    const double scale = scaler.scale();
    for (size_t i = 0; i < group.size() && normaliser > 0; ++i) {
      StepOutput out = objective.compute(group[i], normaliser);
      if (!out.loss.defined() || out.loss.numel() != 1)
        fail("the objective returned a loss that is not a scalar (shape {})",
             out.loss.defined() ? shape_str(out.loss.sizes()) : std::string("undefined"));
      loss_local += out.loss.item<double>();
      for (const auto& [k, v] : out.metrics) msum[k] += v * counts[i];
      mweight += counts[i];
      if (hooks.before_backward) hooks.before_backward(i + 1 == group.size());  // DDP: reduce on the last only
      (scale != 1.0 ? out.loss * scale : out.loss).backward();
    }
    for (const auto& b : group) tokens_local += static_cast<double>(count_tokens(b));
    const double loss = reduce(loss_local);
    const auto step_tokens = static_cast<int64_t>(reduce(tokens_local));

    // Gradients → fp32 masters → reduce → unscale → norm/clip.
    double grad_norm = std::nan("");
    if (std::isfinite(loss) && normaliser > 0) {
      torch::NoGradGuard no_grad;
      std::vector<torch::Tensor> grads;
      for (auto& t : trainables) {
        if (t.has_master) {
          if (t.param.grad().defined()) t.master.mutable_grad() = t.param.grad().to(torch::kFloat32);
          t.param.mutable_grad() = torch::Tensor();
        }
        if (t.master.grad().defined()) grads.push_back(t.master.grad());
      }
      if (hooks.reduce_gradients) hooks.reduce_gradients(grads);
      if (scale != 1.0)
        for (auto& g : grads) g.mul_(1.0 / scale);
      grad_norm = hooks.clip_gradients ? hooks.clip_gradients(masters, opt.max_grad_norm)
                                       : clip_grad_norm(masters, opt.max_grad_norm);
    }

    StepReport rep;
    rep.lr = schedule.lr(step);
    if (normaliser <= 0) {
      rep.skip_reason = "no target tokens in the accumulation group";
    } else if (!std::isfinite(loss)) {
      rep.skip_reason = "non-finite loss";
    } else if (!std::isfinite(grad_norm)) {
      rep.skip_reason = scaler.enabled() ? "fp16 overflow" : "non-finite grad norm";
    }
    rep.skipped = !rep.skip_reason.empty();
    if (rep.skipped) {
      ++skipped;
      if (rep.skip_reason == "fp16 overflow") scaler.update(true);
      else if (normaliser > 0) ++bad_in_row;
      if (main_rank)
        log::warn(fmt::format("step {}: {} (loss {}, grad norm {}); update skipped", step + 1, rep.skip_reason, loss,
                              grad_norm));
    } else {
      optimizer->step(rep.lr);
      torch::NoGradGuard no_grad;
      for (auto& t : trainables)
        if (t.has_master) t.param.copy_(t.master);
      scaler.update(false);
      bad_in_row = 0;
    }
    for (auto& t : trainables) {  // free gradient memory before logging/eval/saving
      t.param.mutable_grad() = torch::Tensor();
      if (t.has_master) t.master.mutable_grad() = torch::Tensor();
    }
    if (bad_in_row >= opt.max_bad_steps)
      fail("training stopped at step {}: {} steps in a row had a non-finite loss or gradient norm (last: {}). Lower "
           "the learning rate, keep max_grad_norm on, prefer bf16 over fp16, or look for broken examples in the data.{}",
           step + 1, bad_in_row, rep.skip_reason,
           result.last_checkpoint.empty() ? "" : fmt::format(" Last checkpoint: {}", result.last_checkpoint.string()));

    ++step;
    tokens_seen += step_tokens;
    const double step_time = now_seconds() - t0;
    rep.step = step;
    rep.epoch = epoch_value();
    rep.loss = loss;
    rep.grad_norm = grad_norm;
    rep.tokens = step_tokens;
    for (const auto& [k, v] : msum) rep.metrics[k] = mweight > 0 ? v / mweight : 0;
    if (std::isfinite(loss)) {
      window.loss_sum += loss;
      ++window.loss_steps;
      last_loss = loss;
    }
    ++window.steps;
    window.step_time += step_time;
    window.tokens += step_tokens;
    for (const auto& [k, v] : rep.metrics) window.metric_sum[k] += v;
    if (hooks.on_step) hooks.on_step(rep);

    if (step % opt.logging_steps == 0 || step == total) {
      nlohmann::json line = {
          {"step", step}, {"epoch", rep.epoch},
          {"loss", window.loss_steps > 0 ? window.loss_sum / window.loss_steps : std::nan("")},
          {"lr", rep.lr}, {"grad_norm", grad_norm}, {"tokens", tokens_seen},
          {"tokens_per_s", window.step_time > 0 ? window.tokens / window.step_time : 0.0},
          {"step_time_s", window.steps > 0 ? window.step_time / window.steps : 0.0},
          {"peak_rss_mib", static_cast<double>(peak_rss_bytes()) / (1024.0 * 1024.0)},
          {"skipped_steps", skipped}};
      if (scaler.enabled()) line["loss_scale"] = scaler.scale();
      for (const auto& [k, v] : window.metric_sum)
        if (!line.contains(k)) line[k] = v / std::max<int64_t>(1, window.steps);
      metrics.append(line);
      if (main_rank && hooks.on_log) hooks.on_log(line);
      window = LogWindow{};
    }
    if (bar) {
      const double rate = step_time > 0 ? step_tokens / step_time : 0;
      bar->update(1, fmt::format("loss {:.4f} lr {:.2e} {:.0f} tok/s", loss, rep.lr, rate));
    }
    if ((eval_data || hooks.evaluate_extra) && opt.eval_steps > 0 && step % opt.eval_steps == 0) evaluate();
    bool saved = false;
    if (opt.save_steps > 0 && step % opt.save_steps == 0) {
      save();
      saved = true;
    }
    if (hooks.should_stop && step < total && hooks.should_stop(step)) {
      if (opt.save_on_stop && !saved) save();
      result.stopped_early = true;
      if (main_rank) log::notice(fmt::format("stopping at step {} of {} as requested", step, total));
      break;
    }
  }
  if (bar) bar->finish();
  if (!result.stopped_early && (eval_data || hooks.evaluate_extra) && (opt.eval_steps == 0 || step % opt.eval_steps != 0)) evaluate();
  if (writes && opt.plot) {
    try {
      write_loss_plot(metrics.path(), opt.output_dir / "loss.svg");
    } catch (const std::exception& e) {
      log::warn(fmt::format("could not write the loss plot: {}", e.what()));
    }
  }
  result.steps = step;
  result.skipped_steps = skipped;
  result.last_loss = last_loss;
  result.last_eval_loss = last_eval_loss;
  return result;
}

}  // namespace llmtune::train
