// `llmtune merge`: folds one or more PEFT LoRA adapters into the base weights (fp32 math, cast to
// the output dtype) and writes a plain checkpoint transformers loads, with the tokenizer files
// copied. QLoRA adapters merge into their 4-bit base dequantized (warning on another base); a GPTQ/AWQ
// checkpoint base merges into its dequantized weights (it has no others). Reports
// the max |logit| difference between merged and base+adapter on probe inputs.
#include <iostream>

#include "cli/commands.h"
#include "cli/model_loading.h"
#include "core/core.h"
#include "io/io.h"
#include "peft/peft.h"
#include "quant/quant.h"

namespace llmtune::cli {
namespace {

namespace fs = std::filesystem;

struct MergeOpts {
  std::string base, out, dtype = "auto", merge_into = "quantized";
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
  // QLoRA: an adapter trained on a quantized base records it (llmtune_qlora.json); a base saved 4-bit
  // by bitsandbytes says so in config.json. Either way merge into that base *dequantized*, which is
  // what the adapter was trained against, unless --merge-into original asks for the 16-bit weights.
  std::optional<quant::BaseRecord> rec;
  for (const auto& a : o.adapters)
    if (auto r = quant::read_base_record(io::resolve_model_path(a))) rec = r;
  auto stored_q = quant::checkpoint_quantization(dir);   // bitsandbytes 4-bit checkpoint
  auto stored_g = quant::checkpoint_group_quant(dir);    // GPTQ/AWQ checkpoint
  if (o.merge_into != "quantized" && o.merge_into != "original")
    fail("--merge-into {}: use quantized (default) or original", o.merge_into);
  const std::string trained_on =
      rec ? fmt::format("{} quantized as {}", rec->base_model.empty() ? "(unrecorded base)" : rec->base_model, rec->describe())
          : std::string();
  model::Transformer m{nullptr};
  if (stored_g) {
    // A GPTQ/AWQ checkpoint has no 16-bit weights: the merge goes into its dequantized weights.
    if (o.merge_into == "original")
      log::warn(fmt::format("--merge-into original: {} is stored {}; it has no original 16-bit weights, so the adapter "
                            "merges into the dequantized checkpoint", dir.string(), stored_g->describe()));
    if (rec && !rec->group_quant)
      log::warn(fmt::format("the adapter was trained against {}, but --base {} is a {} checkpoint: the merged model "
                            "will not reproduce the trained adapter", trained_on, o.base, stored_g->describe()));
    m = quant::load_group_quantized(dir, *stored_g, dtype);
    if (rec) {
      log::notice(fmt::format("adapter trained against {}; merging into that checkpoint dequantized to {} (the weights "
                              "the adapter was trained with, up to the compute dtype)", trained_on, c10::toString(dtype)));
      if (rec->group_quant && quant::quantized_fingerprint(*m) != rec->fingerprint)
        log::warn(fmt::format("--base {} is not the {} checkpoint this adapter was trained against (recorded: {}; "
                              "fingerprint mismatch): the merged model will not reproduce the trained adapter. "
                              "Merge into the same base directory the recipe used.", o.base, rec->describe(), rec->base_model));
    } else {
      log::notice(fmt::format("base {} is stored {}; merging into its dequantized weights", dir.string(), stored_g->describe()));
    }
    m->mutable_config().raw.erase("quantization_config");  // the output is a plain 16/32-bit checkpoint
  } else if (rec && rec->group_quant && o.merge_into == "quantized") {
    fail("adapter trained against {}; --base {} is not a GPTQ/AWQ checkpoint ({}/config.json has no gptq/awq "
         "quantization_config). Give that checkpoint directory as --base, or --merge-into original to merge into "
         "these 16-bit weights (the result then differs from the model you trained)",
         trained_on, o.base, dir.string());
  } else if ((rec || stored_q) && (o.merge_into == "quantized" || stored_q)) {
    quant::QuantOptions qo = stored_q ? *stored_q : rec->options;
    if (rec && !stored_q) qo = rec->options;
    m = quant::load_quantized(dir, qo, dtype);
    const std::string desc = fmt::format("{}{}{}", qo.bits == quant::QuantOptions::Bits::eight ? "int8" : quant::to_string(qo.type),
                                         qo.bits == quant::QuantOptions::Bits::four && qo.double_quant ? " + double quant" : "",
                                         fmt::format(", compute {}", c10::toString(qo.compute_dtype)));
    if (rec) {
      log::notice(fmt::format("QLoRA adapter: trained against {}; merging into that base dequantized "
                              "to {} (the weights the adapter was trained with)",
                              trained_on, c10::toString(qo.compute_dtype)));
      if (quant::quantized_fingerprint(*m) != rec->fingerprint)
        log::warn(fmt::format("--base {} does not quantize to the base this adapter was trained against (recorded: "
                              "{}; fingerprint mismatch): the merged model will not reproduce the trained adapter. "
                              "Merge into the same base model the recipe used.", o.base, rec->base_model));
    } else {
      log::notice(fmt::format("base {} is stored 4-bit ({}); merging into its dequantized weights", dir.string(), desc));
    }
    m->mutable_config().raw.erase("quantization_config");  // the output is a plain 16-bit checkpoint
  } else {
    if (rec)
      log::warn(fmt::format("the adapter was trained against {}, but --merge-into original merges it into the 16-bit "
                            "weights: the result differs from the model you trained (the usual cause of degraded "
                            "QLoRA merges). Omit --merge-into to merge into the dequantized base.", trained_on));
    m = model::load_pretrained(dir, dtype);
  }
  m->eval();
  for (const auto& a : o.adapters) {
    auto cfg = peft::load_any_adapter(*m, a, false);
    log::info(fmt::format("adapter {}: {}", a, cfg.summary()));
    if (!cfg.mergeable())
      fail("adapter {} ({}) cannot be merged into weights; use it unmerged with `llmtune generate/eval --adapter {}`", a,
           cfg.summary(), a);
  }
  torch::NoGradGuard ng;
  auto inputs = probes(config.vocab_size);
  std::vector<torch::Tensor> before;
  for (const auto& x : inputs) before.push_back(m->forward(x).to(torch::kFloat));
  // A quantized base dequantizes to its compute dtype (the values the adapter was trained against).
  // Widening to an fp32 output is exact, so it happens before merging; a 16-bit output is cast after
  // the merge (done in fp32), so the adapter weights are not rounded first. Either way the merged
  // model runs in one dtype.
  if (peft::dequantize_bases(*m) > 0 && dtype == torch::kFloat) m->to(dtype);
  peft::merge_all(*m);
  m->to(dtype);
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
  app.add_option("--merge-into", o->merge_into,
                 "QLoRA adapters: quantized (default: the dequantized 4-bit base they were trained on) | original "
                 "(the 16-bit weights; warns)")->capture_default_str();
  return [o]() { return run_merge(*o); };
}

static const CommandRegistration register_merge{{60, "merge", "Fold LoRA adapters into the base weights and save a plain checkpoint", setup_merge}};

}  // namespace llmtune::cli
