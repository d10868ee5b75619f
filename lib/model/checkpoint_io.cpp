// load_pretrained / save_pretrained: HF checkpoint directories <-> Transformer, through io::.
// Loading is strict (every expected tensor present with the config's shape, every stored tensor
// used) and every error names the tensor, the file and the config fields behind the shape.
#include <fstream>
#include <set>

#include <fmt/ranges.h>

#include "core/core.h"
#include "io/io.h"
#include "model/model.h"

namespace llmtune::model {

namespace {

std::string shape_str(c10::IntArrayRef s) { return fmt::format("[{}]", fmt::join(s, ", ")); }
std::string shape_str(const std::vector<int64_t>& s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void check_dtype(torch::ScalarType dtype) {
  if (dtype != torch::kFloat && dtype != torch::kBFloat16 && dtype != torch::kHalf)
    fail("unsupported model dtype {}; use float32, bfloat16 or float16", c10::toString(dtype));
}

std::string dtype_name(torch::ScalarType t) {
  return t == torch::kBFloat16 ? "bfloat16" : t == torch::kHalf ? "float16" : "float32";
}

}  // namespace

Transformer load_pretrained(const fs::path& dir, torch::ScalarType dtype, const LoadOptions& options) {
  check_dtype(dtype);
  if (!fs::is_directory(dir)) fail("model directory {} does not exist", dir.string());
  fs::path cfg_path = dir / "config.json";
  if (!fs::exists(cfg_path)) fail("{} has no config.json; is it a Hugging Face model directory?", dir.string());
  ModelConfig cfg = ModelConfig::from_file(cfg_path);
  io::CheckpointReader reader(dir);

  Transformer model(cfg, torch::TensorOptions().dtype(dtype).device(options.device), options.factory);
  auto stored = reader.names();
  std::set<std::string> used;
  torch::NoGradGuard ng;
  for (auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    torch::Tensor& p = item.value();
    if (!reader.contains(name)) {
      auto hint = closest_match(name, stored);
      std::string tie_note = name == "lm_head.weight" ? " (set \"tie_word_embeddings\": true if the model ties it)" : "";
      fail("{} is missing from checkpoint {} ({} tensors stored){}{}; config.json implies shape {} ({})", name,
           dir.string(), stored.size(), hint ? fmt::format(", closest stored name: {}", *hint) : "", tie_note,
           shape_str(p.sizes()), model->shape_explanation(name));
    }
    const auto& info = reader.info(name);
    if (info.shape != p.sizes().vec())
      fail("{} in {} has shape {} but config.json implies {} ({})", name, reader.file_of(name).filename().string(),
           shape_str(info.shape), shape_str(p.sizes()), model->shape_explanation(name));
    auto t = reader.load(name);
    if (!t.is_floating_point())
      fail("{} in {} has dtype {}; expected a floating-point tensor", name, reader.file_of(name).filename().string(),
           info.dtype);
    p.copy_(t);  // converts dtype/device; never aliases the memory map
    used.insert(name);
  }
  std::vector<std::string> unexpected;
  for (const auto& n : stored) {
    if (used.count(n) || ends_with(n, "rotary_emb.inv_freq")) continue;
    if (n == "lm_head.weight" && cfg.tie_word_embeddings) continue;  // some writers store the tied copy
    unexpected.push_back(n);
  }
  if (!unexpected.empty()) {
    std::vector<std::string> shown;
    for (size_t i = 0; i < unexpected.size() && i < 5; ++i)
      shown.push_back(fmt::format("{} (in {})", unexpected[i], reader.file_of(unexpected[i]).filename().string()));
    fail("checkpoint {} has {} tensor(s) that config.json does not account for: {}{}. Is config.json from another "
         "model? (model_type={}, num_hidden_layers={}, attention_bias={}, mlp_bias={}, tie_word_embeddings={})",
         dir.string(), unexpected.size(), fmt::join(shown, ", "), unexpected.size() > 5 ? ", ..." : "",
         cfg.model_type, cfg.num_hidden_layers, cfg.attention_bias, cfg.mlp_bias, cfg.tie_word_embeddings);
  }
  model->eval();
  return model;
}

std::vector<std::pair<std::string, torch::Tensor>> hf_state_dict(TransformerImpl& model,
                                                                 std::optional<torch::ScalarType> dtype) {
  if (dtype) check_dtype(*dtype);
  for (const auto& name : model.linear_names()) {
    auto lin = model.get_linear(name);
    if (!std::dynamic_pointer_cast<DenseLinearImpl>(lin))
      fail("{} is a {} (adapter or quantized layer), not a plain linear; merge or dequantize it before saving a "
           "full checkpoint",
           name, lin->name());
  }
  std::vector<std::pair<std::string, torch::Tensor>> out;
  torch::NoGradGuard ng;
  for (const auto& item : model.named_parameters()) {
    auto t = item.value().detach();
    if (dtype) t = t.to(*dtype);
    out.emplace_back(item.key(), t.to(torch::kCPU).contiguous());
  }
  return out;
}

void save_pretrained(TransformerImpl& model, const fs::path& dir, std::optional<torch::ScalarType> dtype,
                     int64_t max_shard_bytes) {
  auto tensors = hf_state_dict(model, dtype);
  torch::ScalarType st = dtype ? *dtype : model.decoder->embed_tokens->weight.scalar_type();
  fs::create_directories(dir);
  io::checkpoint_save(dir, tensors, max_shard_bytes);
  ModelConfig cfg = model.config();
  cfg.dtype = dtype_name(st);
  auto write = [&](const fs::path& p, const nlohmann::json& j) {
    fs::path tmp = p;
    tmp += ".tmp";
    {
      std::ofstream f(tmp);
      if (!f) fail("cannot write {}", tmp.string());
      f << j.dump(2) << "\n";
      if (!f) fail("error writing {}", tmp.string());
    }
    fs::rename(tmp, p);
  };
  write(dir / "config.json", cfg.to_json());
  nlohmann::json gen = {{"_from_model_config", true}};
  if (cfg.bos_token_id) gen["bos_token_id"] = *cfg.bos_token_id;
  if (cfg.pad_token_id) gen["pad_token_id"] = *cfg.pad_token_id;
  if (cfg.eos_token_ids.size() == 1) gen["eos_token_id"] = cfg.eos_token_ids[0];
  if (cfg.eos_token_ids.size() > 1) gen["eos_token_id"] = cfg.eos_token_ids;
  write(dir / "generation_config.json", gen);
}

}  // namespace llmtune::model
