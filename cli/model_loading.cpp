// Model + tokenizer loading for CLI commands (see model_loading.h).
#include "cli/model_loading.h"

#include "core/core.h"
#include "io/io.h"
#include "peft/peft.h"
#include "quant/quant.h"

namespace llmtune::cli {

torch::ScalarType parse_dtype(const std::string& name, const model::ModelConfig* config) {
  if (name == "fp32" || name == "float32") return torch::kFloat;
  if (name == "bf16" || name == "bfloat16") return torch::kBFloat16;
  if (name == "fp16" || name == "float16") return torch::kHalf;
  if (name == "auto") return config ? config->torch_dtype() : torch::kFloat;
  fail("unknown dtype `{}`: use fp32, bf16, fp16 or auto", name);
}

LoadedModel load_model_and_tokenizer(const std::string& model_name, const std::string& tokenizer_dir,
                                     const std::string& dtype, const std::vector<std::string>& adapters) {
  LoadedModel out;
  out.dir = io::resolve_model_path(model_name);
  auto config = model::ModelConfig::from_file(out.dir / "config.json");
  double t0 = now_seconds();
  if (auto gq = quant::checkpoint_group_quant(out.dir))  // GPTQ/AWQ: frozen quantized linears
    out.model = quant::load_group_quantized(out.dir, *gq, parse_dtype(dtype, &config));
  else
    out.model = model::load_pretrained(out.dir, parse_dtype(dtype, &config));
  for (const auto& a : adapters) peft::load_any_adapter(*out.model, io::resolve_model_path(a, {.files = {"adapter_config.json", "adapter_model.safetensors"}}));
  out.model->eval();
  log::debug(fmt::format("loaded {} in {:.2f}s", out.dir.string(), now_seconds() - t0));
  out.tokenizer = tok::Tokenizer::load(tokenizer_dir.empty() ? out.dir : std::filesystem::path(tokenizer_dir));
  for (const auto& w : out.tokenizer->warnings()) log::warn(w);
  return out;
}

void set_threads(int threads) {
  if (threads > 0) torch::set_num_threads(threads);
}

}  // namespace llmtune::cli
