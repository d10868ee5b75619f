// The `llmtune sft` stage: supervised fine-tuning of a causal LM on target tokens only, as one
// function that reads like a torchtune recipe. Caveats: single process (no DDP wiring here yet),
// adapter: qlora is refused until 4-bit base weights exist; the memory plan is an estimate.
#include <atomic>
#include <csignal>
#include <cmath>
#include <cstdio>

#include "config/config.h"
#include "core/core.h"
#include "data/data.h"
#include "io/io.h"
#include "model/model.h"
#include "peft/peft.h"
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
  CausalLmObjective(model::TransformerImpl& m, torch::Device device, bool checkpointing)
      : m_(m), device_(device), ckpt_(checkpointing) {}

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
    return model::causal_lm_loss_sum(m_, hidden, dev(b.labels));
  }
  model::TransformerImpl& m_;
  torch::Device device_;
  bool ckpt_;
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
  const double loss_chunk = 1024.0 * static_cast<double>(c.vocab_size) * 4.0 * 3;
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

int run_sft(const config::Recipe& recipe, const SftOptions& so) {
  config::validate_for_stage(recipe, "sft");
  const std::string adapter = recipe.adapter.value_or("");
  if (adapter == "qlora" || recipe.load_in_4bit)
    fail("adapter: qlora / load_in_4bit (NF4 4-bit base weights) is not implemented yet in llmtune (open item "
         "\"QLoRA NF4\" in DESIGN.md); use adapter: lora with bf16: true for now");

  // ---- model and tokenizer ------------------------------------------------------------------
  const fs::path model_dir = io::resolve_model_path(*recipe.base_model);
  const fs::path tok_dir = recipe.tokenizer_config ? io::resolve_model_path(*recipe.tokenizer_config) : model_dir;
  auto tokenizer = tok::Tokenizer::load(tok_dir);
  for (const auto& w : tokenizer->warnings()) log::warn(w);
  const torch::Device device = torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
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
  model::LoadOptions lo;
  lo.device = device;
  model::Transformer net = model::load_pretrained(model_dir, dtype, lo);

  // ---- adapter / trainable parameters ---------------------------------------------------------
  // lora → fresh LoRA (or lora_model_dir continued); none → full fine-tune (or unfrozen_parameters).
  peft::TrainingSetup setup = peft::prepare_for_training(*net, recipe, static_cast<uint64_t>(recipe.seed));
  log::info(fmt::format("sft: {} ({})", setup.lora ? "LoRA adapter" : "full fine-tuning",
                        setup.lora ? fmt::format("r={}, {} modules", setup.lora->r, setup.wrapped.size())
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
  TrainOptions topt = train_options_from_recipe(recipe, train_src.batches_per_epoch());
  topt.precision = precision;
  topt.progress = so.progress && !so.dry_run;
  if (!so.resume.empty()) topt.resume = so.resume;
  const int64_t accum = std::max<int64_t>(1, topt.gradient_accumulation_steps);
  const int64_t steps_per_epoch = (train_src.batches_per_epoch() + accum - 1) / accum;
  const int64_t total_steps = topt.max_steps > 0 ? topt.max_steps : topt.num_epochs * steps_per_epoch;

  // ---- dry run: the plan, then stop ------------------------------------------------------------
  const auto stats = peft::parameter_stats(*net);
  if (so.dry_run) {
    auto mem = memory_plan(*net, net->config(), dtype, recipe);
    nlohmann::json plan = {
        {"train_examples", prepared.summary.train_examples}, {"val_examples", val_set ? int64_t(val_set->size()) : 0},
        {"train_tokens", prepared.summary.train_tokens}, {"train_target_tokens", prepared.summary.train_trained_tokens},
        {"batches_per_epoch", train_src.batches_per_epoch()}, {"steps_per_epoch", steps_per_epoch},
        {"total_steps", total_steps}, {"trainable_params", stats.trainable}, {"total_params", stats.total},
        {"precision", to_string(precision)}, {"adapter", setup.lora ? "lora" : "full"}, {"memory", mem}};
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
  config::save_resolved(recipe, out);  // early, so a crashed run still documents itself
  CausalLmObjective objective(*net, device, recipe.gradient_checkpointing);
  TrainHooks hooks;
  // The loop checkpoints trainable tensors + optimizer itself (and restores them on resume); the
  // adapter / model files make each checkpoint usable on its own (e.g. by peft or generate).
  hooks.save_extra = [&](const fs::path& dir) { peft::save_trained(*net, setup, dir); };
  hooks.should_stop = [](int64_t) { return g_stop.load(); };
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
  peft::save_trained(*net, setup, out);
  copy_tokenizer_files(tok_dir, out);
  log::notice(fmt::format("sft: {} after {} steps{} (last loss {:.4f}{}); {} written to {}",
                          result.stopped_early ? "stopped" : "done", result.steps,
                          result.resumed_from_step ? fmt::format(", resumed at {}", result.resumed_from_step) : "",
                          result.last_loss,
                          result.last_eval_loss >= 0 ? fmt::format(", eval loss {:.4f}", result.last_eval_loss) : "",
                          setup.lora ? "adapter_config.json + adapter_model.safetensors"
                                     : "config.json + model.safetensors",
                          out.string()));
  return 0;
}

}  // namespace llmtune::train
