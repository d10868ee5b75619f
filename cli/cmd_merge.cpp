// `llmtune merge`: folds one or more PEFT LoRA adapters into the base weights (fp32 math, cast to
// the output dtype) and writes a plain checkpoint transformers loads, with the tokenizer files
// copied. Reports the max |logit| difference between merged and base+adapter on probe inputs.
#include <iostream>

#include "cli/commands.h"
#include "cli/model_loading.h"
#include "core/core.h"
#include "io/io.h"
#include "peft/peft.h"

namespace llmtune::cli {
namespace {

namespace fs = std::filesystem;

struct MergeOpts {
  std::string base, out, dtype = "auto";
  std::vector<std::string> adapters;
  int threads = 0;
};

// Deterministic probe inputs: a few short token sequences spread over the vocabulary.
std::vector<torch::Tensor> probes(int64_t vocab) {
  std::vector<torch::Tensor> out;
  for (int64_t k = 0; k < 3; ++k) {
    std::vector<int64_t> ids;
    for (int64_t t = 0; t < 12; ++t) ids.push_back((1 + 7919 * (k * 12 + t) + 31 * k) % vocab);
    out.push_back(torch::tensor(ids).unsqueeze(0));
  }
  return out;
}

int run_merge(const MergeOpts& o) {
  set_threads(o.threads);
  if (o.adapters.empty()) fail("give at least one --adapter DIR");
  auto dir = io::resolve_model_path(o.base);
  auto config = model::ModelConfig::from_file(dir / "config.json");
  auto dtype = parse_dtype(o.dtype, &config);
  auto m = model::load_pretrained(dir, dtype);
  m->eval();
  for (const auto& a : o.adapters) {
    auto cfg = peft::load_adapter(*m, a, false);
    log::info(fmt::format("adapter {}: r={} alpha={} scaling={:.6g}", a, cfg.r, cfg.alpha, cfg.scaling()));
  }
  torch::NoGradGuard ng;
  auto inputs = probes(config.vocab_size);
  std::vector<torch::Tensor> before;
  for (const auto& x : inputs) before.push_back(m->forward(x).to(torch::kFloat));
  peft::merge_all(*m);
  double diff = 0;
  for (size_t i = 0; i < inputs.size(); ++i)
    diff = std::max(diff, (m->forward(inputs[i]).to(torch::kFloat) - before[i]).abs().max().item<double>());
  model::save_pretrained(*m, o.out, dtype);
  for (const char* f : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                        "chat_template.jinja", "added_tokens.json"}) {
    if (fs::exists(dir / f)) fs::copy_file(dir / f, fs::path(o.out) / f, fs::copy_options::overwrite_existing);
  }
  std::cout << fmt::format("merged {} adapter(s) into {} ({}); max abs logit diff merged vs base+adapter on {} probes: {:.3g}\n",
                           o.adapters.size(), o.out, c10::toString(dtype), inputs.size(), diff);
  return 0;
}

}  // namespace

RunFn setup_merge(CLI::App& app) {
  auto o = std::make_shared<MergeOpts>();
  app.add_option("--base", o->base, "Base model directory or hub id")->required();
  app.add_option("--adapter", o->adapters, "PEFT LoRA adapter directory (repeatable; folded in order)")->required();
  app.add_option("--out", o->out, "Output directory for the merged checkpoint")->required();
  app.add_option("--dtype", o->dtype, "Output dtype: bf16 | fp16 | fp32 | auto (the base's)")->capture_default_str();
  app.add_option("--threads", o->threads, "CPU threads (default: all cores)");
  return [o]() { return run_merge(*o); };
}

static const CommandRegistration register_merge{{60, "merge", "Fold LoRA adapters into the base weights and save a plain checkpoint", setup_merge}};

}  // namespace llmtune::cli
