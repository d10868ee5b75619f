// The `llmtune sft` stage: supervised fine-tuning of a causal LM on target tokens only, as one
// function that reads like a torchtune recipe. Under `llmtune launch` / torchrun / srun each rank
// trains its shard (train::Parallel) and rank 0 alone writes. QLoRA (load_in_4bit) / load_in_8bit
// load the frozen base through llmtune::quant. Caveat: the memory plan is an estimate.
#include <algorithm>
#include <atomic>
#include <csignal>
#include <cmath>
#include <cstdio>

#include "config/config.h"
#include "core/core.h"
#include "data/data.h"
#include "eval/eval.h"
#include "io/io.h"
#include "model/model.h"
#include "peft/peft.h"
#include "quant/quant.h"
#include "tokenizer/tokenizer.h"
#include "train/train.h"

namespace llmtune::train {
namespace {

// SIGINT: the first one asks the loop to stop after the current step (with a checkpoint); the
// second falls through to the default handler so a stuck run can still be killed.
std::atomic<bool> g_stop{false};
extern "C" void on_sigint(int) {
  g_stop.store(true);
  std::signal(SIGINT, SIG_DFL);
}

// The causal-LM objective: final hidden states (packing-aware via position/segment ids), then the
// chunked shifted cross-entropy summed over target tokens and divided by the group normaliser.
class CausalLmObjective : public Objective {
 public:
  CausalLmObjective(model::TransformerImpl& m, torch::Device device, bool checkpointing, int64_t loss_chunk)
      : m_(m), device_(device), ckpt_(checkpointing), loss_chunk_(loss_chunk) {}

  StepOutput compute(const Batch& b, double normaliser) override {
    auto ls = loss_sum(b);
    return {ls.sum / normaliser, {}};
  }
  EvalOutput evaluate(const Batch& b) override {
    auto ls = loss_sum(b);
    return {ls.sum.item<double>(), static_cast<double>(ls.n_tokens), {}};
  }

 private:
  model::LossSum loss_sum(const Batch& b) {
    auto dev = [&](const torch::Tensor& t) { return t.defined() ? t.to(device_) : t; };
    model::ForwardOptions fo;
    if (b.position_ids.defined()) fo.position_ids = dev(b.position_ids);
    if (b.attention_mask.defined()) fo.attention_mask = dev(b.attention_mask);
    if (b.segment_ids.defined()) fo.segment_ids = dev(b.segment_ids);
    fo.gradient_checkpointing = ckpt_ && torch::GradMode::is_enabled();
    auto hidden = m_.hidden_states(dev(b.input_ids), fo);
    return model::causal_lm_loss_sum(m_, hidden, dev(b.labels), loss_chunk_);
  }
  model::TransformerImpl& m_;
  torch::Device device_;
  bool ckpt_;
  int64_t loss_chunk_;
};

// Peak memory of one training step, roughly: weights + grads + fp32 masters + optimizer slots +
// activations (per layer ~ (10 C + 3 I) values per token kept for backward, or only each layer's
// input with gradient checkpointing, plus one layer's attention scores and one loss chunk).
nlohmann::json memory_plan(torch::nn::Module& m, const model::ModelConfig& c, torch::ScalarType dtype,
                           const config::Recipe& r) {
  double weights = 0, grads = 0, masters = 0, trainable = 0;
  for (const auto& p : m.parameters()) {
    const double bytes = static_cast<double>(p.numel()) * static_cast<double>(p.element_size());
    weights += bytes;
    if (!p.requires_grad()) continue;
    trainable += static_cast<double>(p.numel());
    grads += bytes;
    if (p.scalar_type() != torch::kFloat) masters += 4.0 * static_cast<double>(p.numel()) * 2;  // master + its grad
  }
  const double slots = r.optimizer == "sgd" ? 1.0 : 2.0;
  const double optim = 4.0 * slots * trainable;
  const double act_b = dtype == torch::kFloat ? 4.0 : 2.0;
  const double B = static_cast<double>(r.micro_batch_size), T = static_cast<double>(r.sequence_len);
  const double C = static_cast<double>(c.hidden_size), I = static_cast<double>(c.intermediate_size);
  const double L = static_cast<double>(c.num_hidden_layers), H = static_cast<double>(c.num_attention_heads);
  const double per_layer = B * T * (10 * C + 3 * I) * act_b;
  const double scores = B * H * T * T * 4.0;
  const double loss_chunk = std::min(static_cast<double>(r.loss_chunk_tokens), B * T) * static_cast<double>(c.vocab_size) * 4.0 * 3;
  const double acts = (r.gradient_checkpointing ? L * B * T * C * act_b + per_layer : L * per_layer) + scores + loss_chunk;
  const double total = weights + grads + masters + optim + acts;
  return {{"weights_bytes", weights}, {"grads_bytes", grads}, {"masters_bytes", masters},
          {"optimizer_bytes", optim}, {"activations_bytes", acts}, {"total_bytes", total}};
}

void copy_tokenizer_files(const fs::path& from, const fs::path& to) {
  for (const char* f : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                        "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt"}) {
    std::error_code ec;
    if (fs::is_regular_file(from / f)) fs::copy_file(from / f, to / f, fs::copy_options::overwrite_existing, ec);
    if (ec) fail("cannot copy {} to {}: {}", (from / f).string(), to.string(), ec.message());
  }
}

}  // namespace

int run_sft(const config::Recipe& recipe, const StageOptions& so) {
  config::validate_for_stage(recipe, "sft");
  const std::string adapter = recipe.adapter.value_or("");

  // ---- processes: one, or a rank of a launched group (lib/dist through train::Parallel) ----------
  std::unique_ptr<Parallel> par = so.dry_run ? nullptr : init_parallel(recipe);
  const int rank = par ? par->rank() : 0, world_size = par ? par->world_size() : 1;

  // ---- model and tokenizer ------------------------------------------------------------------
  const fs::path model_dir = io::resolve_model_path(*recipe.base_model);
  const fs::path tok_dir = recipe.tokenizer_config ? io::resolve_model_path(*recipe.tokenizer_config) : model_dir;
  auto tokenizer = tok::Tokenizer::load(tok_dir);
  for (const auto& w : tokenizer->warnings()) log::warn(w);
  const torch::Device device = par ? par->device()
                                   : (torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU));
  // bf16: true → bf16 frozen weights (the loop keeps fp32 masters of trainable ones); auto → bf16
  // only where it is fast (CUDA with bf16); fp16 → fp16 + loss scaling; else fp32.
  Precision precision = Precision::fp32;
  if (recipe.fp16) precision = Precision::fp16;
  else if (recipe.bf16 == config::Tristate::on) precision = Precision::bf16;
  else if (recipe.bf16 == config::Tristate::automatic && device.is_cuda() && torch::cuda::is_available())
    precision = Precision::bf16;
  const torch::ScalarType dtype =
      precision == Precision::bf16 ? torch::kBFloat16 : (precision == Precision::fp16 ? torch::kHalf : torch::kFloat);
  log::info(fmt::format("sft: base model {} on {} in {}{}", model_dir.string(), device.str(), to_string(precision),
                        precision == Precision::fp32 ? "" : " (trainable weights get fp32 master copies)"));
  if (recipe.gptq) {  // Axolotl's `gptq: true`: the recipe says the base is a GPTQ checkpoint; hold it to that
    auto gq = quant::checkpoint_group_quant(model_dir);
    if (!gq || gq->method != "gptq")
      fail("{}: `gptq: true` needs base_model to be a GPTQ checkpoint, but {} is {}. {}",
           recipe.source.name.empty() ? std::string("recipe") : recipe.source.name, model_dir.string(),
           gq ? std::string("an AWQ checkpoint") :
           quant::checkpoint_quantization(model_dir) ? std::string("a bitsandbytes 4-bit checkpoint")
                                                     : std::string("not quantized (its config.json has no gptq quantization_config)"),
           gq ? "Drop `gptq: true`: an AWQ base is recognised from its config.json and trains the same way"
              : fmt::format("Quantize it first (llmtune quantize --model {} --format gptq --calib FILE --out DIR) and use "
                            "DIR as base_model, or drop `gptq: true`", model_dir.string()));
    log::info(fmt::format("sft: `gptq: true`: base {} is {}; LoRA over its frozen quantized weights", model_dir.string(),
                          gq->describe()));
  }
  model::Transformer net{nullptr};
  if (recipe.load_in_4bit || recipe.load_in_8bit || quant::checkpoint_quantization(model_dir) ||
      quant::checkpoint_group_quant(model_dir)) {  // GPTQ/AWQ bases load as stored (load_quantized)
    // QLoRA: frozen 4-bit (or 8-bit) base, quantized one tensor at a time at load (or read as bnb saved it).
    quant::QuantOptions qo;
    qo.bits = recipe.load_in_8bit ? quant::QuantOptions::Bits::eight : quant::QuantOptions::Bits::four;
    qo.type = quant::quant_type_from_string(recipe.bnb_4bit_quant_type, "recipe key bnb_4bit_quant_type");
    qo.double_quant = recipe.bnb_4bit_use_double_quant;
    qo.compute_dtype = recipe.bnb_4bit_compute_dtype == "float32"   ? torch::kFloat
                       : recipe.bnb_4bit_compute_dtype == "float16" ? torch::kHalf
                                                                    : torch::kBFloat16;
    net = quant::load_quantized(model_dir, qo, dtype, device);
  } else {
    model::LoadOptions lo;
    lo.device = device;
    net = model::load_pretrained(model_dir, dtype, lo);
  }

  // ---- adapter / trainable parameters ---------------------------------------------------------
  // lora → fresh LoRA (or lora_model_dir continued); none → full fine-tune (or unfrozen_parameters).
  peft::TrainingSetup setup = peft::prepare_for_training(*net, recipe, static_cast<uint64_t>(recipe.seed));
  log::info(fmt::format("sft: {} ({})", setup.lora ? "LoRA adapter" : (setup.adapter ? "adapter" : "full fine-tuning"),
                        setup.adapter ? setup.adapter->summary() :
                        setup.lora ? fmt::format("{}r={}, {} modules", setup.lora->use_dora ? "DoRA, " : "", setup.lora->r, setup.wrapped.size())
                                   : (setup.unfrozen.empty() ? std::string("all parameters")
                                                             : fmt::format("{} unfrozen tensors", setup.unfrozen.size()))));

  // ---- data -------------------------------------------------------------------------------------
  data::DataOptions dopt = data::options_from_recipe(recipe);
  dopt.skip_invalid = recipe.skip_invalid;
  dopt.min_sample_len = recipe.min_sample_len;
  const bool separate_eval = !recipe.test_datasets.empty();
  if (separate_eval) dopt.val_set_size = 0;  // test_datasets replace the split
  data::PreparedData prepared = data::prepare(dopt, *tokenizer);
  log::info("sft: data\n" + prepared.summary.to_string());
  std::shared_ptr<const data::TokenizedDataset> val_set = prepared.val;
  if (separate_eval) {
    config::Recipe eval_recipe = recipe;
    eval_recipe.datasets = recipe.test_datasets;
    data::DataOptions eopt = data::options_from_recipe(eval_recipe);
    eopt.val_set_size = 0;
    eopt.skip_invalid = recipe.skip_invalid;
    eopt.min_sample_len = recipe.min_sample_len;
    data::PreparedData ev = data::prepare(eopt, *tokenizer);
    val_set = ev.train;
    log::info("sft: test_datasets\n" + ev.summary.to_string());
  }
  if (prepared.train->size() == 0) fail("sft: no training examples left after filtering (see the table above)");

  data::BatchOptions bo;
  bo.batch_size = recipe.micro_batch_size;
  bo.sequence_len = recipe.sequence_len;
  bo.sample_packing = recipe.sample_packing;
  bo.group_by_length = recipe.group_by_length;
  bo.pad_to_multiple_of = recipe.pad_to_sequence_len ? recipe.sequence_len : 1;
  bo.pad_id = tokenizer->pad_id().value_or(tokenizer->eos_id().value_or(0));
  bo.seed = static_cast<uint64_t>(recipe.seed);
  bo.rank = rank;  // rank r takes batches r, r + world, ... of the same seeded order (eval too)
  bo.world_size = world_size;
  data::BatchSource train_src(prepared.train, bo);
  BatchSourceRef<data::BatchSource> train_ref(train_src);
  std::unique_ptr<data::BatchSource> val_src;
  std::unique_ptr<BatchSourceRef<data::BatchSource>> val_ref;
  const bool want_eval = val_set && val_set->size() > 0 && recipe.eval_strategy.value_or("steps") != "no";
  if (want_eval) {
    data::BatchOptions vo = bo;
    vo.batch_size = recipe.eval_batch_size.value_or(recipe.micro_batch_size);
    vo.sample_packing = recipe.eval_sample_packing.value_or(recipe.sample_packing);
    vo.shuffle = false;
    vo.group_by_length = false;
    val_src = std::make_unique<data::BatchSource>(val_set, vo);
    val_ref = std::make_unique<BatchSourceRef<data::BatchSource>>(*val_src);
  }

  // ---- loop options -----------------------------------------------------------------------------
  TrainOptions topt = train_options_from_recipe(recipe, train_src.batches_per_epoch(), rank, world_size);
  topt.precision = precision;
  topt.progress = so.progress && !so.dry_run;
  if (!so.resume.empty()) topt.resume = so.resume;
  const int64_t accum = std::max<int64_t>(1, topt.gradient_accumulation_steps);
  const int64_t steps_per_epoch = (train_src.batches_per_epoch() + accum - 1) / accum;
  const int64_t total_steps = topt.max_steps > 0 ? topt.max_steps : topt.num_epochs * steps_per_epoch;

  // Eval tasks at each evaluation and TensorBoard files (lib/eval); task files are checked here.
  auto monitor = eval::monitor_from_recipe(recipe, rank, /*with_tensorboard=*/!so.dry_run);

  // ---- dry run: the plan, then stop ------------------------------------------------------------
  const auto stats = peft::parameter_stats(*net);
  if (so.dry_run) {
    auto mem = memory_plan(*net, net->config(), dtype, recipe);
    nlohmann::json plan = {
        {"train_examples", prepared.summary.train_examples}, {"val_examples", val_set ? int64_t(val_set->size()) : 0},
        {"train_tokens", prepared.summary.train_tokens}, {"train_target_tokens", prepared.summary.train_trained_tokens},
        {"batches_per_epoch", train_src.batches_per_epoch()}, {"steps_per_epoch", steps_per_epoch},
        {"total_steps", total_steps}, {"trainable_params", stats.trainable}, {"total_params", stats.total},
        {"precision", to_string(precision)}, {"adapter", setup.lora ? "lora" : (setup.adapter ? setup.adapter->method : "full")}, {"memory", mem}};
    std::string text = fmt::format(
        "plan (dry run, nothing trained):\n"
        "  examples     {} train, {} eval\n  tokens       {} ({} targets)\n"
        "  steps        {} ({} per epoch, micro batch {} x accumulation {})\n  trainable    {}\n"
        "  peak memory  ~{} (weights {}, grads {}, fp32 masters {}, optimizer {}, activations {})",
        plan["train_examples"].get<int64_t>(), plan["val_examples"].get<int64_t>(), prepared.summary.train_tokens,
        prepared.summary.train_trained_tokens, total_steps, steps_per_epoch, recipe.micro_batch_size, accum,
        stats.to_string(), human_bytes(mem["total_bytes"]), human_bytes(mem["weights_bytes"]),
        human_bytes(mem["grads_bytes"]), human_bytes(mem["masters_bytes"]), human_bytes(mem["optimizer_bytes"]),
        human_bytes(mem["activations_bytes"]));
    std::printf("%s\n%s\n", text.c_str(), plan.dump().c_str());
    std::fflush(stdout);
    return 0;
  }

  // ---- train ------------------------------------------------------------------------------------
  const fs::path out = recipe.output_dir;
  fs::create_directories(out);
  if (rank == 0) config::save_resolved(recipe, out);  // early, so a crashed run still documents itself
  CausalLmObjective objective(*net, device, recipe.gradient_checkpointing, recipe.loss_chunk_tokens);
  TrainHooks hooks;
  // The loop checkpoints trainable tensors + optimizer itself (and restores them on resume); the
  // adapter / model files make each checkpoint usable on its own (e.g. by peft or generate).
  hooks.save_extra = [&](const fs::path& dir) { peft::save_trained(*net, setup, dir); };
  hooks.should_stop = [](int64_t) { return g_stop.load(); };
  if (monitor) {
    hooks.on_log = [&](const nlohmann::json& line) { monitor->log(line); };
    if (!recipe.eval_tasks.empty())
      hooks.evaluate_extra = [&](int64_t step) { return monitor->evaluate(*net, *tokenizer, step); };
  }
  if (par) par->attach(*net, hooks);  // DDP/ZeRO hooks; should_stop becomes a vote of all ranks
  g_stop.store(false);
  auto previous = std::signal(SIGINT, on_sigint);
  TrainResult result;
  try {
    result = run_training(*net, objective, train_ref, val_ref.get(), topt, hooks);
  } catch (...) {
    std::signal(SIGINT, previous);
    throw;
  }
  std::signal(SIGINT, previous);

  // ---- outputs ------------------------------------------------------------------------------------
  if (par) par->unshard_model();  // ZeRO-3: rank 0 gets the whole model to save
  if (par) par->barrier();  // every rank finished training before rank 0 writes and anyone exits
  if (rank != 0) return 0;
  peft::save_trained(*net, setup, out);
  copy_tokenizer_files(tok_dir, out);
  log::notice(fmt::format("sft: {} after {} steps{} (last loss {:.4f}{}); {} written to {}",
                          result.stopped_early ? "stopped" : "done", result.steps,
                          result.resumed_from_step ? fmt::format(", resumed at {}", result.resumed_from_step) : "",
                          result.last_loss,
                          result.last_eval_loss >= 0 ? fmt::format(", eval loss {:.4f}", result.last_eval_loss) : "",
                          setup.lora || setup.adapter ? "adapter_config.json + adapter_model.safetensors"
                                     : "config.json + model.safetensors",
                          out.string()));
  return 0;
}

}  // namespace llmtune::train
