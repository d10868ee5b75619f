// BitFit: only bias terms train. Llama linears have no bias, so the targeted ones get zero biases
// (announced at start). No PEFT type exists: llmtune's layout is adapter_config.json with
// peft_type "BITFIT" + target_modules, and `base_model.model.<module>.bias` tensors. Merging sets
// attention_bias / mlp_bias (zero biases for the group's other linears) so transformers loads it.
#include <fmt/ranges.h>

#include "config/config.h"
#include "core/core.h"
#include "peft/methods_impl.h"
#include "peft/peft.h"

namespace llmtune::peft {

BitFitConfig BitFitConfig::from_recipe(const config::Recipe& rc) {
  BitFitConfig c;
  c.target_modules = rc.lora_target_modules;  // empty = every linear except lm_head
  if (rc.base_model) c.base_model_name_or_path = *rc.base_model;
  return c;
}

nlohmann::json BitFitConfig::to_adapter_json() const {
  return {{"peft_type", "BITFIT"},
          {"task_type", "CAUSAL_LM"},
          {"format", "llmtune-bitfit-v1"},
          {"base_model_name_or_path", base_model_name_or_path.empty() ? nlohmann::json(nullptr) : nlohmann::json(base_model_name_or_path)},
          {"target_modules", target_modules}};
}

BitFitConfig BitFitConfig::from_adapter_json(const nlohmann::json& j, const std::string& source) {
  BitFitConfig c;
  if (j.contains("target_modules") && j["target_modules"].is_array())
    for (const auto& e : j["target_modules"]) c.target_modules.push_back(e.get<std::string>());
  if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string())
    c.base_model_name_or_path = j["base_model_name_or_path"];
  (void)source;
  return c;
}

namespace {
std::shared_ptr<model::DenseLinearImpl> dense(model::TransformerImpl& m, const std::string& name) {
  auto d = std::dynamic_pointer_cast<model::DenseLinearImpl>(m.get_linear(name));
  if (!d) fail("BitFit: {} is not a plain dense linear (adapter or quantized layer); BitFit needs dense layers", name);
  return d;
}
}  // namespace

bool detail::ensure_bias(model::DenseLinearImpl& d) {
  if (d.bias.defined()) return false;
  d.bias = d.register_parameter("bias", torch::zeros({d.out_features()}, d.weight.options()), false);
  return true;
}

std::vector<std::string> detail::bitfit_targets(const model::TransformerImpl& model, const BitFitConfig& cfg) {
  std::vector<std::string> targets;
  if (cfg.target_modules.empty()) {
    for (const auto& n : model.linear_names())
      if (n != "lm_head") targets.push_back(n);
    return targets;
  }
  LoraConfig sel;
  sel.target_modules = cfg.target_modules;
  return select_targets(model, sel);
}

std::vector<std::string> apply_bitfit(model::TransformerImpl& model, const BitFitConfig& cfg) {
  auto targets = detail::bitfit_targets(model, cfg);
  int64_t added = 0;
  std::vector<std::string> biases;
  for (const auto& n : targets) {
    auto d = dense(model, n);
    added += detail::ensure_bias(*d);
    biases.push_back(n + ".bias");
  }
  if (added)
    log::notice(fmt::format("BitFit: this model has no bias on {} of the {} targeted linear layers; added zero-initialised "
                            "biases there (a merged checkpoint sets attention_bias/mlp_bias)", added, targets.size()));
  return biases;
}

void bitfit_normalize_biases(model::TransformerImpl& model) {
  auto& mc = model.mutable_config();
  // Layers that are not plain dense (e.g. still quantized) are left alone: they keep their own bias.
  auto has = [&](const std::string& n) {
    auto d = std::dynamic_pointer_cast<model::DenseLinearImpl>(model.get_linear(n));
    return d && d->bias.defined();
  };
  auto add = [&](const std::string& n) {
    if (auto d = std::dynamic_pointer_cast<model::DenseLinearImpl>(model.get_linear(n))) detail::ensure_bias(*d);
  };
  const std::vector<std::string> attn = {"q_proj", "k_proj", "v_proj", "o_proj"}, mlp = {"gate_proj", "up_proj", "down_proj"};
  bool any_attn = false, any_mlp = false, any_o = false, any_qkv = false;
  for (int64_t i = 0; i < mc.num_hidden_layers; ++i) {
    for (const auto& s : attn) {
      bool b = has(fmt::format("model.layers.{}.self_attn.{}", i, s));
      any_attn |= b;
      (s == "o_proj" ? any_o : any_qkv) |= b;
    }
    for (const auto& s : mlp) any_mlp |= has(fmt::format("model.layers.{}.mlp.{}", i, s));
  }
  if (!model.config().tie_word_embeddings && has("lm_head"))
    fail("BitFit merge: lm_head has a bias, which no Llama-family checkpoint can hold; leave lm_head out of the targets");
  if (mc.model_type != "llama") {
    // qwen2 holds q/k/v biases only, mistral none: anything else has no config flag.
    bool ok = !any_mlp && !any_o && (!any_qkv || mc.qkv_bias);
    if (!ok)
      fail("BitFit merge: {} checkpoints cannot express the trained biases ({}{}); transformers would drop them. Use a "
           "llama model_type or keep the adapter unmerged",
           mc.model_type, any_mlp ? "MLP " : "", any_o || (any_qkv && !mc.qkv_bias) ? "attention" : "");
  }
  if (any_attn) mc.attention_bias = mc.qkv_bias = mc.o_bias = true;
  if (any_mlp) mc.mlp_bias = true;
  for (int64_t i = 0; i < mc.num_hidden_layers; ++i) {
    if (mc.model_type == "llama" && any_attn)
      for (const auto& s : attn) add(fmt::format("model.layers.{}.self_attn.{}", i, s));
    if (any_mlp)
      for (const auto& s : mlp) add(fmt::format("model.layers.{}.mlp.{}", i, s));
  }
  if (mc.raw.is_object()) {  // to_json() starts from raw: keep the flags in step
    if (mc.model_type == "llama") {
      mc.raw["attention_bias"] = mc.attention_bias;
      mc.raw["mlp_bias"] = mc.mlp_bias;
    }
  }
}

}  // namespace llmtune::peft
