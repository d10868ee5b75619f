// The `llmtune pretrain` stage: causal-LM training on every token of a filtered, tokenized,
// memory-mapped corpus, from random init or a checkpoint, through the one loop (train::run_training).
// Reads top to bottom: processes → tokenizer → model → cache → windows → loop → outputs.
// Caveats: full training only (no adapters); the held-out split is the tail of the token stream.
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <fstream>

#include "config/config.h"
#include "core/core.h"
#include "data/data.h"
#include "io/io.h"
#include "model/model.h"
#include "pretrain/pretrain.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::pretrain {
namespace {

std::atomic<bool> g_stop{false};
extern "C" void on_sigint_pretrain(int) {
  g_stop.store(true);
  std::signal(SIGINT, SIG_DFL);
}

// Causal-LM loss summed over every target token (labels from the window; -100 only at document starts
// with the document mask), divided by the accumulation group's normaliser.
class LmObjective : public train::Objective {
 public:
  LmObjective(model::TransformerImpl& m, torch::Device d, bool ckpt, int64_t chunk)
      : m_(m), device_(d), ckpt_(ckpt), chunk_(chunk) {}
  train::StepOutput compute(const train::Batch& b, double normaliser) override { return {loss(b).sum / normaliser, {}}; }
  train::EvalOutput evaluate(const train::Batch& b) override {
    auto ls = loss(b);
    return {ls.sum.item<double>(), static_cast<double>(ls.n_tokens), {}};
  }

 private:
  model::LossSum loss(const train::Batch& b) {
    model::ForwardOptions fo;
    if (b.position_ids.defined()) fo.position_ids = b.position_ids.to(device_);
    if (b.segment_ids.defined()) fo.segment_ids = b.segment_ids.to(device_);
    fo.gradient_checkpointing = ckpt_ && torch::GradMode::is_enabled();
    auto hidden = m_.hidden_states(b.input_ids.to(device_), fo);
    return model::causal_lm_loss_sum(m_, hidden, b.labels.to(device_), chunk_);
  }
  model::TransformerImpl& m_;
  torch::Device device_;
  bool ckpt_;
  int64_t chunk_;
};

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  if (!in) fail("cannot read {}", p.string());
  try {
    return nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    fail("{} is not valid JSON: {}", p.string(), e.what());
  }
}

// config.json for a fresh model: base_model_config / base_model's config.json (if any), then the recipe's
// model_config on top; vocab size and special ids default to the tokenizer's.
model::ModelConfig fresh_config(const config::Recipe& r, const tok::Tokenizer& t) {
  nlohmann::json j = nlohmann::json::object();
  std::string src = "model_config";
  for (const auto& dir : {r.base_model_config, r.base_model}) {
    if (!dir) continue;
    const fs::path p = fs::path(*dir) / "config.json";
    if (fs::is_regular_file(p)) {
      j = read_json(p);
      src = p.string() + " + model_config";
      break;
    }
  }
  if (r.model_config) {
    if (!r.model_config->is_object()) fail("{}: model_config must be a map of config.json keys", r.source.name);
    j.merge_patch(*r.model_config);
  }
  if (j.empty())
    fail("{}: random_init_weights needs a model shape: base_model_config (a dir with config.json) or model_config "
         "{{hidden_size: ..., intermediate_size: ..., num_hidden_layers: ..., num_attention_heads: ...}}",
         r.source.name);
  if (!j.contains("model_type")) j["model_type"] = "llama";
  if (!j.contains("architectures")) j["architectures"] = {"LlamaForCausalLM"};
  if (!j.contains("vocab_size")) j["vocab_size"] = t.vocab_size();
  if (!j.contains("bos_token_id") && t.bos_id()) j["bos_token_id"] = *t.bos_id();
  if (!j.contains("eos_token_id") && t.eos_id()) j["eos_token_id"] = *t.eos_id();
  if (!j.contains("max_position_embeddings")) j["max_position_embeddings"] = std::max<int64_t>(r.sequence_len, 2048);
  auto c = model::ModelConfig::from_json(j, src);
  if (c.vocab_size < t.vocab_size())
    fail("{}: vocab_size {} is smaller than the tokenizer's {} tokens", src, c.vocab_size, t.vocab_size());
  return c;
}

void copy_tokenizer_files(const fs::path& from, const fs::path& to) {
  for (const char* f : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                        "chat_template.jinja", "added_tokens.json"}) {
    std::error_code ec;
    if (fs::is_regular_file(from / f)) fs::copy_file(from / f, to / f, fs::copy_options::overwrite_existing, ec);
    if (ec) fail("cannot copy {} to {}: {}", (from / f).string(), to.string(), ec.message());
  }
}

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream f(p);
  f << s;
  if (!f) fail("cannot write {}", p.string());
}

}  // namespace

std::vector<CorpusSource> corpus_sources(const config::Recipe& r, bool test_sets) {
  const auto& list = test_sets ? r.test_datasets : (r.pretraining_dataset.empty() ? r.datasets : r.pretraining_dataset);
  const char* key = test_sets ? "test_datasets" : (r.pretraining_dataset.empty() ? "datasets" : "pretraining_dataset");
  std::vector<CorpusSource> out;
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& d = list[i];
    if (!d.path || d.path->empty()) fail("{}[{}]: `path` is required (a .txt/.jsonl/.json file or a directory)", key, i);
    if (d.type && *d.type != "completion" && *d.type != "pretrain" && *d.type != "text")
      fail("{}[{}]: type `{}` is not raw text; pretraining reads `type: completion` (or no type) entries", key, i, *d.type);
    CorpusSource s;
    s.path = *d.path;
    if (!d.data_files.empty()) s.path = (fs::path(*d.path) / d.data_files.at(0)).string();
    if (d.ds_type) s.format = *d.ds_type == "json" && fs::path(s.path).extension() == ".jsonl" ? "jsonl" : *d.ds_type;
    // DatasetConfig defaults text_split to "line"; for pretraining the recipe value is used as given.
    s.text_split = d.text_split;
    s.field = d.text_column.value_or(d.field);
    out.push_back(std::move(s));
  }
  return out;
}

int run_pretrain(const config::Recipe& recipe, const PretrainOptions& po) {
  const std::string& src = recipe.source.name.empty() ? std::string("recipe") : recipe.source.name;
  if (recipe.datasets.empty() && recipe.pretraining_dataset.empty())
    fail("{}: `llmtune pretrain` needs `pretraining_dataset` (or `datasets`) entries with raw text", src);
  if (recipe.rl) fail("{}: `rl: {}` does not belong to `llmtune pretrain`; run `llmtune dpo` / `llmtune ppo`", src, *recipe.rl);
  if (recipe.reward_model) fail("{}: `reward_model: true` belongs to `llmtune reward`", src);
  if (recipe.adapter) fail("{}: `llmtune pretrain` trains every weight; remove `adapter: {}` (LoRA continued pretraining: "
                           "`llmtune sft` with a `type: completion` dataset)", src, *recipe.adapter);
  if (!recipe.random_init_weights && !recipe.base_model)
    fail("{}: set `base_model` (continued pretraining) or `random_init_weights: true` with a model shape", src);

  // ---- processes ----
  std::unique_ptr<train::Parallel> par = po.dry_run ? nullptr : train::init_parallel(recipe);
  const int rank = par ? par->rank() : 0, world = par ? par->world_size() : 1;
  const torch::Device device = par ? par->device()
                                   : (torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU));

  // ---- tokenizer ----
  std::optional<std::string> tok_src = recipe.tokenizer_config ? recipe.tokenizer_config : recipe.base_model;
  if (!tok_src) fail("{}: set `tokenizer_config` (a directory with tokenizer files) for a fresh model", src);
  const fs::path tok_dir = io::resolve_model_path(*tok_src);
  auto tokenizer = tok::Tokenizer::load(tok_dir);

  // ---- precision and model ----
  train::Precision precision = train::Precision::fp32;
  if (recipe.fp16) precision = train::Precision::fp16;
  else if (recipe.bf16 == config::Tristate::on) precision = train::Precision::bf16;
  else if (recipe.bf16 == config::Tristate::automatic && device.is_cuda()) precision = train::Precision::bf16;
  const torch::ScalarType dtype = precision == train::Precision::bf16 ? torch::kBFloat16
                                  : precision == train::Precision::fp16 ? torch::kHalf : torch::kFloat;
  model::Transformer net{nullptr};
  if (recipe.random_init_weights) {
    auto cfg = fresh_config(recipe, *tokenizer);
    cfg.dtype = dtype == torch::kFloat ? "float32" : dtype == torch::kBFloat16 ? "bfloat16" : "float16";
    net = model::Transformer(cfg, torch::TensorOptions().dtype(torch::kFloat));
    net->init_weights(static_cast<uint64_t>(recipe.seed));
    net->to(device, dtype);
    log::info(fmt::format("pretrain: fresh {} model, {} layers x {} hidden, vocab {}, seed {}", cfg.model_type,
                          cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, recipe.seed));
  } else {
    model::LoadOptions lo;
    lo.device = device;
    net = model::load_pretrained(io::resolve_model_path(*recipe.base_model), dtype, lo);
    log::info(fmt::format("pretrain: continuing from {}", *recipe.base_model));
  }
  for (auto& p : net->parameters()) p.set_requires_grad(true);
  if (net->config().vocab_size < tokenizer->vocab_size())
    fail("the model's vocab_size {} is smaller than the tokenizer's {}", net->config().vocab_size, tokenizer->vocab_size());

  // ---- corpus → token cache (rank 0 builds, the others reuse it) ----
  CacheOptions co;
  co.sources = corpus_sources(recipe);
  co.filters = FilterConfig::from_json(recipe.filters.value_or(nlohmann::json()), "filters");
  co.cache_root = recipe.dataset_prepared_path ? fs::path(*recipe.dataset_prepared_path) : data::default_cache_dir();
  if (rank != 0 && par) par->barrier();
  CacheBuild built = build_cache(co, *tokenizer);
  if (rank == 0 && par) par->barrier();
  auto cache = std::make_shared<const TokenCache>(TokenCache::open(built.dir));
  log::info(fmt::format("pretrain: corpus {} ({}, {:.1f}s): {} documents, {} tokens\n{}", built.dir.string(),
                        built.hit ? "cache hit" : "built", built.seconds, cache->num_documents(), cache->num_tokens(),
                        built.report.to_string()));

  WindowOptions wo;
  wo.sequence_len = recipe.sequence_len;
  wo.batch_size = recipe.micro_batch_size;
  wo.document_mask = recipe.pretraining_document_mask;
  wo.seed = static_cast<uint64_t>(recipe.seed);
  wo.rank = rank;
  wo.world_size = world;
  const int64_t total_windows = windows_in(cache->num_tokens(), recipe.sequence_len);
  std::shared_ptr<const TokenCache> eval_cache;
  int64_t val_windows = 0;
  if (!recipe.test_datasets.empty()) {
    CacheOptions eo = co;
    eo.sources = corpus_sources(recipe, true);
    eo.filters.perplexity.enabled = false;
    eval_cache = std::make_shared<const TokenCache>(TokenCache::open(build_cache(eo, *tokenizer).dir));
  } else if (recipe.val_set_size > 0) {
    val_windows = recipe.val_set_size < 1 ? static_cast<int64_t>(std::ceil(recipe.val_set_size * double(total_windows)))
                                          : static_cast<int64_t>(recipe.val_set_size);
    if (val_windows >= total_windows)
      fail("{}: val_set_size {} leaves no training windows ({} windows of {} tokens)", src, recipe.val_set_size,
           total_windows, recipe.sequence_len);
  }
  wo.num_windows = total_windows - val_windows;
  WindowSource train_src(cache, wo);
  if (train_src.batches_per_epoch() < 1)
    fail("pretrain: the corpus has {} tokens: not one batch of {} x {} tokens{}; add text or lower sequence_len / "
         "micro_batch_size", cache->num_tokens(), recipe.micro_batch_size, recipe.sequence_len,
         world > 1 ? fmt::format(" per process ({} processes)", world) : "");
  std::unique_ptr<WindowSource> eval_src;
  if (recipe.eval_strategy.value_or("steps") != "no" && (eval_cache || val_windows > 0)) {
    WindowOptions ev = wo;
    ev.shuffle = false;
    ev.batch_size = recipe.eval_batch_size.value_or(recipe.micro_batch_size);
    ev.first_window = eval_cache ? 0 : total_windows - val_windows;
    ev.num_windows = eval_cache ? -1 : val_windows;
    eval_src = std::make_unique<WindowSource>(eval_cache ? eval_cache : cache, ev);
    if (eval_src->batches_per_epoch() < 1) eval_src.reset();
  }

  // ---- loop options ----
  train::TrainOptions topt = train::train_options_from_recipe(recipe, train_src.batches_per_epoch(), rank, world);
  topt.precision = precision;
  topt.progress = po.progress && !po.dry_run;
  if (!po.resume.empty()) topt.resume = po.resume;
  const int64_t accum = std::max<int64_t>(1, topt.gradient_accumulation_steps);
  const int64_t steps_per_epoch = (train_src.batches_per_epoch() + accum - 1) / accum;
  const int64_t total_steps = topt.max_steps > 0 ? topt.max_steps : topt.num_epochs * steps_per_epoch;
  int64_t n_params = 0;
  for (const auto& p : net->parameters()) n_params += p.numel();
  const int64_t tokens_per_step = recipe.micro_batch_size * recipe.sequence_len * accum * world;

  if (po.dry_run) {
    nlohmann::json plan = {{"documents", cache->num_documents()}, {"tokens", cache->num_tokens()},
                           {"train_windows", train_src.num_windows()}, {"val_windows", eval_src ? eval_src->num_windows() : 0},
                           {"batches_per_epoch", train_src.batches_per_epoch()}, {"steps_per_epoch", steps_per_epoch},
                           {"total_steps", total_steps}, {"tokens_per_step", tokens_per_step}, {"parameters", n_params},
                           {"cache", built.dir.string()}, {"cache_hit", built.hit}, {"filter_report", built.report.to_json()},
                           {"precision", train::to_string(precision)}};
    std::printf("plan (dry run, nothing trained):\n  corpus       %lld documents, %lld tokens\n  windows      %lld train "
                "x %lld tokens, %lld held out\n  steps        %lld (%lld tokens each)\n  parameters   %lld\n%s\n",
                (long long)cache->num_documents(), (long long)cache->num_tokens(), (long long)train_src.num_windows(),
                (long long)recipe.sequence_len, (long long)(eval_src ? eval_src->num_windows() : 0),
                (long long)total_steps, (long long)tokens_per_step, (long long)n_params, plan.dump().c_str());
    std::fflush(stdout);
    return 0;
  }

  // ---- train ----
  const fs::path out = recipe.output_dir;
  fs::create_directories(out);
  if (rank == 0) {
    config::save_resolved(recipe, out);
    write_text(out / "filter_report.json", built.report.to_json().dump(2) + "\n");
  }
  LmObjective objective(*net, device, recipe.gradient_checkpointing, recipe.loss_chunk_tokens);
  train::TrainHooks hooks;
  hooks.save_extra = [&](const fs::path& dir) {
    model::save_pretrained(*net, dir);
    copy_tokenizer_files(tok_dir, dir);
  };
  hooks.should_stop = [](int64_t) { return g_stop.load(); };
  if (par) par->attach(*net, hooks);
  log::info(fmt::format("pretrain: {} parameters, {} steps of {} tokens ({} per epoch), {}{}", n_params, total_steps,
                        tokens_per_step, steps_per_epoch, train::to_string(precision),
                        recipe.pretraining_document_mask ? ", per-document attention" : ""));
  g_stop.store(false);
  auto previous = std::signal(SIGINT, on_sigint_pretrain);
  train::TrainResult result;
  try {
    result = train::run_training(*net, objective, train_src, eval_src.get(), topt, hooks);
  } catch (...) {
    std::signal(SIGINT, previous);
    throw;
  }
  std::signal(SIGINT, previous);

  // ---- outputs ----
  if (par) par->unshard_model();  // ZeRO-3: rank 0 gets the whole model to save
  if (par) par->barrier();
  if (rank != 0) return 0;
  model::save_pretrained(*net, out);
  copy_tokenizer_files(tok_dir, out);
  log::notice(fmt::format("pretrain: {} after {} steps{} (last loss {:.4f}{}); config.json + model.safetensors written to {}",
                          result.stopped_early ? "stopped" : "done", result.steps,
                          result.resumed_from_step ? fmt::format(", resumed at {}", result.resumed_from_step) : "",
                          result.last_loss,
                          result.last_eval_loss >= 0 ? fmt::format(", eval loss {:.4f} (perplexity {:.2f})",
                                                                   result.last_eval_loss, std::exp(result.last_eval_loss))
                                                     : "",
                          out.string()));
  return 0;
}

}  // namespace llmtune::pretrain
