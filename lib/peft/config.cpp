// LoraConfig <-> recipe keys and adapter_config.json (formats.md §5.1), plus the registry of PEFT
// methods (one table: add DoRA/IA3/... here when implemented). Unknown adapter_config keys are
// ignored as PEFT does; keys that change the math and are not supported are refused.
#include <cmath>
#include <regex>
#include <set>

#include "config/config.h"
#include <fmt/ranges.h>

#include "core/core.h"
#include "peft/peft.h"

namespace llmtune::peft {

// ---------------------------------------------------------------------------------------------
// Registry

const std::vector<MethodInfo>& methods() {
  static const std::vector<MethodInfo> table = {
      {"LORA", "lora", "low-rank adapters on linear layers (rsLoRA via use_rslora)", true},
      {"LORA", "qlora", "LoRA over a frozen 4-bit NF4/FP4 base (load_in_4bit; bitsandbytes format)", true},
      {"DORA", "", "weight-decomposed LoRA (adapter: lora + peft_use_dora: true; adapter_config use_dora: true)", true},
      {"IA3", "ia3", "learned per-channel scaling vectors", true},
      {"PROMPT_TUNING", "prompt_tuning", "virtual token embeddings prepended to the input", true},
      {"PREFIX_TUNING", "prefix_tuning", "learned key/value prefixes per layer", true},
      {"BITFIT", "bitfit", "only bias terms train (llmtune layout; zero biases added where absent)", true},
      {"BOTTLENECK", "bottleneck", "Houlsby bottleneck adapters after attention and MLP (llmtune layout)", true},
      {"P_TUNING", "", "prompt encoder producing virtual tokens", false},
  };
  return table;
}

const MethodInfo& require_method(const std::string& peft_type, const std::string& source) {
  std::vector<std::string> ok;
  for (const auto& m : methods())
    if (m.implemented) ok.push_back(m.peft_type);
  for (const auto& m : methods()) {
    if (m.peft_type != peft_type) continue;
    if (m.implemented) return m;
  }
  for (const auto& m : methods())
    if (m.peft_type == peft_type)
      fail("{}: peft_type \"{}\" ({}) is not supported by llmtune yet; supported: {}", source, peft_type, m.summary,
           fmt::join(ok, ", "));
  fail("{}: unknown peft_type \"{}\"; supported: {}", source, peft_type, fmt::join(ok, ", "));
}

// ---------------------------------------------------------------------------------------------
// LoraConfig

double LoraConfig::scaling() const {
  if (r <= 0) fail("LoRA rank r must be positive (got {})", r);
  return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

LoraConfig LoraConfig::from_recipe(const config::Recipe& rc) {
  LoraConfig c;
  c.r = rc.lora_r;
  c.alpha = static_cast<double>(rc.lora_alpha);
  c.dropout = rc.lora_dropout;
  c.target_modules = rc.lora_target_modules;
  c.target_linear = rc.lora_target_linear;
  c.modules_to_save = rc.lora_modules_to_save;
  c.use_rslora = rc.peft_use_rslora;
  c.use_dora = rc.peft_use_dora;
  if (rc.base_model) c.base_model_name_or_path = *rc.base_model;
  if (rc.lora_fan_in_fan_out) fail("lora_fan_in_fan_out: true is for GPT-2 Conv1D weights; Llama-family linears need false");
  return c;
}

namespace {
bool plain_name(const std::string& s) {
  static const std::regex re("[A-Za-z0-9_.\\-]+");
  return std::regex_match(s, re);
}
std::string last_component(const std::string& name) {
  auto p = name.rfind('.');
  return p == std::string::npos ? name : name.substr(p + 1);
}
}  // namespace

nlohmann::json LoraConfig::to_adapter_json(const std::vector<std::string>& targets) const {
  // `targets` comes from save_adapter, already reduced to suffixes when that is exact.
  nlohmann::json j;
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["auto_mapping"] = nullptr;
  j["base_model_name_or_path"] = base_model_name_or_path.empty() ? nlohmann::json(nullptr)
                                                                  : nlohmann::json(base_model_name_or_path);
  j["revision"] = nullptr;
  j["inference_mode"] = inference_mode;
  j["r"] = r;
  // PEFT stores lora_alpha as an int in the usual case; keep ints integral.
  if (alpha == std::floor(alpha)) j["lora_alpha"] = static_cast<int64_t>(alpha);
  else j["lora_alpha"] = alpha;
  j["lora_dropout"] = dropout;
  j["target_modules"] = targets;
  j["exclude_modules"] = nullptr;
  j["bias"] = bias;
  j["fan_in_fan_out"] = false;
  j["use_rslora"] = use_rslora;
  j["use_dora"] = use_dora;
  j["init_lora_weights"] = true;
  j["modules_to_save"] = modules_to_save.empty() ? nlohmann::json(nullptr) : nlohmann::json(modules_to_save);
  j["layers_to_transform"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["rank_pattern"] = nlohmann::json::object();
  j["alpha_pattern"] = nlohmann::json::object();
  j["megatron_config"] = nullptr;
  j["megatron_core"] = "megatron.core";
  j["loftq_config"] = nlohmann::json::object();
  j["layer_replication"] = nullptr;
  j["lora_bias"] = false;
  j["use_qalora"] = false;
  j["trainable_token_indices"] = nullptr;
  return j;
}

LoraConfig LoraConfig::from_adapter_json(const nlohmann::json& j, const std::string& source) {
  if (!j.is_object()) fail("{}: expected a JSON object", source);
  if (!j.contains("peft_type") || !j["peft_type"].is_string())
    fail("{}: missing string key \"peft_type\" (a PEFT adapter_config.json has e.g. \"peft_type\": \"LORA\")", source);
  std::string type = j["peft_type"];
  require_method(type, source);
  if (type != "LORA") fail("{}: peft_type \"{}\" is not a LoRA adapter (load it with load_any_adapter)", source, type);
  LoraConfig c;
  auto num = [&](const char* key, double def) -> double {
    if (!j.contains(key) || j[key].is_null()) return def;
    if (!j[key].is_number()) fail("{}: key \"{}\" must be a number (got {})", source, key, j[key].dump());
    return j[key].get<double>();
  };
  auto flag = [&](const char* key) -> bool {
    if (!j.contains(key) || j[key].is_null()) return false;
    if (!j[key].is_boolean()) fail("{}: key \"{}\" must be true or false (got {})", source, key, j[key].dump());
    return j[key].get<bool>();
  };
  c.r = static_cast<int64_t>(num("r", 8));
  c.alpha = num("lora_alpha", 8);
  c.dropout = num("lora_dropout", 0);
  c.use_rslora = flag("use_rslora");
  c.use_dora = flag("use_dora");
  c.inference_mode = flag("inference_mode");
  if (flag("fan_in_fan_out")) fail("{}: fan_in_fan_out: true (GPT-2 Conv1D layout) is not supported for Llama-family models", source);
  if (flag("lora_bias")) fail("{}: lora_bias: true (a bias on lora_B) is not supported yet", source);
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    if (j.contains(k) && j[k].is_object() && !j[k].empty())
      fail("{}: per-module {} {} is not supported yet; all targeted modules must share r and lora_alpha", source, k,
           j[k].dump());
  if (j.contains("layer_replication") && !j["layer_replication"].is_null())
    fail("{}: layer_replication is not supported", source);
  if (j.contains("bias") && j["bias"].is_string()) c.bias = j["bias"];
  if (c.bias != "none" && c.bias != "all" && c.bias != "lora_only")
    fail("{}: bias must be \"none\", \"all\" or \"lora_only\" (got \"{}\")", source, c.bias);
  if (j.contains("target_modules")) {
    const auto& t = j["target_modules"];
    if (t.is_string()) {
      if (t.get<std::string>() == "all-linear") c.target_linear = true;
      else c.target_modules = {t.get<std::string>()};
    } else if (t.is_array()) {
      for (const auto& e : t) c.target_modules.push_back(e.get<std::string>());
    }
  }
  if (j.contains("modules_to_save") && j["modules_to_save"].is_array())
    for (const auto& e : j["modules_to_save"]) c.modules_to_save.push_back(e.get<std::string>());
  if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string())
    c.base_model_name_or_path = j["base_model_name_or_path"];
  if (c.r <= 0) fail("{}: r must be positive (got {})", source, c.r);
  return c;
}

// ---------------------------------------------------------------------------------------------
// Target matching (PEFT's check_target_module_exists rules)

bool matches_target(const std::string& name, const std::vector<std::string>& targets) {
  if (targets.size() == 1 && !plain_name(targets[0])) {
    try {
      return std::regex_match(name, std::regex(targets[0]));
    } catch (const std::regex_error& e) {
      fail("target_modules regex \"{}\" is invalid: {}", targets[0], e.what());
    }
  }
  for (const auto& t : targets) {
    if (name == t) return true;
    if (name.size() > t.size() && name.ends_with(t) && name[name.size() - t.size() - 1] == '.') return true;
  }
  return false;
}

std::vector<std::string> select_targets(const model::TransformerImpl& model, const LoraConfig& cfg) {
  auto names = model.linear_names();
  std::vector<std::string> out;
  bool all_linear = cfg.target_linear ||
                    (cfg.target_modules.size() == 1 && cfg.target_modules[0] == "all-linear");
  if (all_linear) {
    for (const auto& n : names)
      if (n != "lm_head") out.push_back(n);
  } else {
    if (cfg.target_modules.empty())
      fail("LoRA needs lora_target_modules (e.g. [q_proj, v_proj]) or lora_target_linear: true");
    for (const auto& n : names)
      if (matches_target(n, cfg.target_modules)) out.push_back(n);
    bool regex = cfg.target_modules.size() == 1 && !plain_name(cfg.target_modules[0]);
    std::set<std::string> suffixes;
    for (const auto& n : names) suffixes.insert(last_component(n));
    std::vector<std::string> sfx(suffixes.begin(), suffixes.end());
    if (!regex)
      for (const auto& t : cfg.target_modules) {
        bool hit = false;
        for (const auto& n : names) hit = hit || matches_target(n, {t});
        if (!hit) {
          auto m = closest_match(t, sfx);
          fail("lora_target_modules entry \"{}\" matches no linear layer of this model{}; linear names end with: {}", t,
               m ? fmt::format(" (did you mean \"{}\"?)", *m) : "", fmt::join(sfx, ", "));
        }
      }
    if (out.empty())
      fail("lora_target_modules regex \"{}\" matches no linear layer (it must match a full name such as \"{}\")",
           cfg.target_modules[0], names.empty() ? "" : names[0]);
  }
  return out;
}

}  // namespace llmtune::peft
