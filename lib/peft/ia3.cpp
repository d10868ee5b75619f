// IA3 (formats.md §5.4): learned vectors scaling a linear's output (k_proj, v_proj: ia3_l [out, 1])
// or its input (feed-forward down_proj: ia3_l [1, in]), PEFT's names and Llama defaults; vectors
// are fp32 and start at 1 (the adapter starts as a no-op). Merge scales W's rows or columns.
#include <algorithm>

#include <fmt/ranges.h>

#include "config/config.h"
#include "core/core.h"
#include "peft/peft.h"

namespace llmtune::peft {

namespace {
const std::vector<std::string> kDefaultTargets = {"k_proj", "v_proj", "down_proj"};
const std::vector<std::string> kDefaultFeedforward = {"down_proj"};

std::vector<std::string> string_list(const nlohmann::json& j, const char* key, const std::string& source) {
  std::vector<std::string> out;
  if (!j.contains(key) || j[key].is_null()) return out;
  if (j[key].is_string()) return {j[key].get<std::string>()};
  if (!j[key].is_array()) fail("{}: key \"{}\" must be a list of module names (got {})", source, key, j[key].dump());
  for (const auto& e : j[key]) out.push_back(e.get<std::string>());
  return out;
}
}  // namespace

Ia3Config Ia3Config::from_recipe(const config::Recipe& rc) {
  Ia3Config c;
  c.target_modules = rc.lora_target_modules.empty() ? kDefaultTargets : rc.lora_target_modules;
  if (!rc.ia3_feedforward_modules.empty()) {
    c.feedforward_modules = rc.ia3_feedforward_modules;
  } else {
    for (const auto& t : c.target_modules)
      if (t == "down_proj") c.feedforward_modules.push_back(t);
  }
  for (const auto& f : c.feedforward_modules)
    if (std::find(c.target_modules.begin(), c.target_modules.end(), f) == c.target_modules.end())
      fail("ia3_feedforward_modules entry \"{}\" is not among the IA3 targets ({}); feed-forward modules must be "
           "targeted too", f, fmt::join(c.target_modules, ", "));
  if (rc.lora_target_linear) fail("adapter: ia3 takes its targets from lora_target_modules (default k_proj, v_proj, down_proj), not lora_target_linear");
  if (rc.base_model) c.base_model_name_or_path = *rc.base_model;
  return c;
}

nlohmann::json Ia3Config::to_adapter_json() const {
  nlohmann::json j;
  j["peft_type"] = "IA3";
  j["task_type"] = "CAUSAL_LM";
  j["auto_mapping"] = nullptr;
  j["base_model_name_or_path"] = base_model_name_or_path.empty() ? nlohmann::json(nullptr) : nlohmann::json(base_model_name_or_path);
  j["revision"] = nullptr;
  j["inference_mode"] = inference_mode;
  j["target_modules"] = target_modules;
  j["exclude_modules"] = nullptr;
  j["feedforward_modules"] = feedforward_modules;
  j["fan_in_fan_out"] = false;
  j["modules_to_save"] = nullptr;
  j["init_ia3_weights"] = true;
  return j;
}

Ia3Config Ia3Config::from_adapter_json(const nlohmann::json& j, const std::string& source) {
  Ia3Config c;
  c.target_modules = string_list(j, "target_modules", source);
  c.feedforward_modules = string_list(j, "feedforward_modules", source);
  if (c.target_modules.empty()) fail("{}: IA3 adapter has no target_modules", source);
  if (j.contains("fan_in_fan_out") && j["fan_in_fan_out"].is_boolean() && j["fan_in_fan_out"].get<bool>())
    fail("{}: fan_in_fan_out: true (GPT-2 Conv1D layout) is not supported for Llama-family models", source);
  if (j.contains("modules_to_save") && j["modules_to_save"].is_array() && !j["modules_to_save"].empty())
    fail("{}: IA3 modules_to_save is not supported yet", source);
  if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string())
    c.base_model_name_or_path = j["base_model_name_or_path"];
  return c;
}

Ia3LinearImpl::Ia3LinearImpl(model::LinearPtr base, bool ff) : base_layer(std::move(base)), feedforward(ff) {
  if (!base_layer) fail("IA3: base layer is null");
  register_module("base_layer", base_layer);
  torch::Device dev = torch::kCPU;
  for (const auto& p : base_layer->parameters()) {
    dev = p.device();
    break;
  }
  auto shape = ff ? std::vector<int64_t>{1, in_features()} : std::vector<int64_t>{out_features(), 1};
  ia3_l = register_parameter("ia3_l", torch::ones(shape, torch::TensorOptions().dtype(torch::kFloat).device(dev)));
}

torch::Tensor Ia3LinearImpl::forward(const torch::Tensor& x) {
  auto l = ia3_l.flatten();
  if (feedforward) return base_layer->forward((x.to(l.scalar_type()) * l).to(x.scalar_type()));
  auto y = base_layer->forward(x);
  return (y * l).to(y.scalar_type());
}

model::LinearPtr Ia3LinearImpl::merge() const {
  torch::NoGradGuard ng;
  auto base = std::dynamic_pointer_cast<model::DenseLinearImpl>(base_layer);
  if (!base) fail("IA3 merge: the base of this layer is not a plain dense linear (merge other adapters first)");
  auto opts = base->weight.options();
  auto out = std::make_shared<model::DenseLinearImpl>(in_features(), out_features(), base->bias.defined(), opts);
  auto l = ia3_l.detach().to(torch::kFloat).to(opts.device());  // [out,1] scales rows, [1,in] columns
  out->weight.copy_((base->weight.detach().to(torch::kFloat) * l).to(opts.dtype()));
  if (base->bias.defined())
    out->bias.copy_(feedforward ? base->bias.detach() : (base->bias.detach().to(torch::kFloat) * l.flatten()).to(opts.dtype()));
  out->weight.set_requires_grad(false);
  if (out->bias.defined()) out->bias.set_requires_grad(false);
  return out;
}

std::vector<std::string> ia3_modules(const model::TransformerImpl& model) {
  std::vector<std::string> out;
  for (const auto& n : model.linear_names())
    if (std::dynamic_pointer_cast<Ia3LinearImpl>(model.get_linear(n))) out.push_back(n);
  return out;
}

std::vector<std::string> apply_ia3(model::TransformerImpl& model, const Ia3Config& cfg) {
  LoraConfig sel;  // reuse LoRA's target selection and its did-you-mean errors
  sel.target_modules = cfg.target_modules;
  auto targets = select_targets(model, sel);
  for (const auto& n : targets) {
    auto l = std::make_shared<Ia3LinearImpl>(model.get_linear(n), matches_target(n, cfg.feedforward_modules));
    l->train(model.is_training());
    model.replace_linear(n, l);
  }
  return targets;
}

}  // namespace llmtune::peft
