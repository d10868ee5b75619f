// PEFT adapter directories: adapter_config.json + adapter_model.safetensors with tensor names
// `base_model.model.<module>.lora_A.weight` (adapter name already stripped, formats.md §5.2).
// Loading wraps the named modules (stacking over existing adapters) and checks every shape
// against the config's r; the training entry points for the sft stage live here too.
#include <fstream>
#include <map>
#include <set>

#include "config/config.h"
#include <fmt/ranges.h>

#include "core/core.h"
#include "io/io.h"
#include "peft/methods_impl.h"
#include "peft/peft.h"

namespace llmtune::peft {

namespace {
const std::string kPrefix = "base_model.model.";

std::string shape_str(at::IntArrayRef s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

std::string last_component(const std::string& name) {
  auto p = name.rfind('.');
  return p == std::string::npos ? name : name.substr(p + 1);
}

// Suffixes when they select exactly the wrapped set, else the full names (both load in PEFT).
std::vector<std::string> reduce_targets(const model::TransformerImpl& model, const std::vector<std::string>& wrapped) {
  std::set<std::string> w(wrapped.begin(), wrapped.end()), sfx;
  for (const auto& n : wrapped) sfx.insert(last_component(n));
  for (const auto& n : model.linear_names())
    if (!w.count(n) && sfx.count(last_component(n))) return wrapped;
  return {sfx.begin(), sfx.end()};
}
}  // namespace

LoraConfig read_adapter_config(const fs::path& dir) {
  auto path = dir / "adapter_config.json";
  if (!fs::exists(path))
    fail("{} does not exist: an adapter directory holds adapter_config.json and adapter_model.safetensors "
         "(as PEFT's save_pretrained writes them)", path.string());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(io::read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed JSON ({})", path.string(), e.what());
  }
  return LoraConfig::from_adapter_json(j, path.string());
}

void save_adapter(model::TransformerImpl& model, const LoraConfig& cfg, const fs::path& dir,
                  std::optional<torch::ScalarType> dtype) {
  auto wrapped = lora_modules(model);
  if (wrapped.empty()) fail("save_adapter: the model has no LoRA layers (apply_lora or load_adapter first)");
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  auto put = [&](const std::string& name, const torch::Tensor& t) {
    auto c = t.detach().to(torch::kCPU);
    if (dtype) c = c.to(*dtype);
    tensors.emplace_back(kPrefix + name, c.contiguous());
  };
  torch::NoGradGuard ng;
  for (const auto& n : wrapped) {
    auto l = std::dynamic_pointer_cast<LoraLinearImpl>(model.get_linear(n));
    if (std::dynamic_pointer_cast<LoraLinearImpl>(l->base_layer))
      fail("save_adapter: {} holds stacked adapters (several were loaded); merge them (llmtune merge) first", n);
    put(n + ".lora_A.weight", l->lora_A->weight);
    put(n + ".lora_B.weight", l->lora_B->weight);
    if (l->is_dora()) put(n + ".lora_magnitude_vector", l->lora_magnitude_vector);  // PEFT: no ".weight"
    if (cfg.bias == "lora_only" && l->base_bias().defined()) put(n + ".base_layer.bias", l->base_bias());
  }
  auto params = model.named_parameters(true);
  if (cfg.bias == "all")
    for (const auto& p : params)
      if (p.key().ends_with(".bias")) put(p.key(), p.value());
  for (const auto& name : modules_to_save_parameters(model, cfg.modules_to_save)) put(name, params[name]);
  fs::create_directories(dir);
  io::safetensors_save(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  auto j = cfg.to_adapter_json(reduce_targets(model, wrapped));
  std::ofstream out(dir / "adapter_config.json");
  if (!out) fail("cannot write {}", (dir / "adapter_config.json").string());
  out << j.dump(2) << "\n";
  if (!out) fail("error writing {}", (dir / "adapter_config.json").string());
}

LoraConfig load_adapter(model::TransformerImpl& model, const fs::path& dir, bool trainable) {
  auto cfg = read_adapter_config(dir);
  auto file = dir / "adapter_model.safetensors";
  if (!fs::exists(file)) {
    if (fs::exists(dir / "adapter_model.bin"))
      fail("{} has only adapter_model.bin (a pickle, which llmtune never loads); convert it in Python with "
           "safetensors.torch.save_file(torch.load(\"adapter_model.bin\"), \"adapter_model.safetensors\")",
           dir.string());
    fail("{} does not exist", file.string());
  }
  auto st = io::SafetensorsFile::open(file);
  const std::string src = file.string();
  struct Pair {
    std::string a, b, m;  // m: DoRA magnitude
  };
  std::map<std::string, Pair> lora;  // module -> tensor names
  std::vector<std::pair<std::string, std::string>> full;  // (tensor name, stripped name)
  for (const auto& name : st->names()) {
    if (!name.starts_with(kPrefix))
      fail("{}: tensor \"{}\" does not start with \"{}\" (not a PEFT causal-LM adapter)", src, name, kPrefix);
    std::string rest = name.substr(kPrefix.size());
    if (rest.ends_with(".lora_A.weight")) lora[rest.substr(0, rest.size() - 14)].a = name;
    else if (rest.ends_with(".lora_B.weight")) lora[rest.substr(0, rest.size() - 14)].b = name;
    else if (rest.ends_with(".lora_magnitude_vector")) lora[rest.substr(0, rest.size() - 22)].m = name;
    else if (rest.ends_with(".lora_magnitude_vector.weight")) lora[rest.substr(0, rest.size() - 29)].m = name;
    else if (rest.find("lora_embedding_") != std::string::npos)
      fail("{}: tensor \"{}\" is an embedding LoRA; LoRA on embed_tokens is not supported yet", src, name);
    else if (rest.find("lora_") != std::string::npos)
      fail("{}: tensor \"{}\" is not understood (expected lora_A.weight / lora_B.weight)", src, name);
    else full.emplace_back(name, rest);
  }
  if (lora.empty()) fail("{}: no lora_A/lora_B tensors found", src);
  const double scaling = cfg.scaling();
  torch::NoGradGuard ng;
  for (const auto& [module, p] : lora) {
    if (p.a.empty() || p.b.empty())
      fail("{}: module {} has {} but not {}", src, module, p.a.empty() ? "lora_B" : "lora_A",
           p.a.empty() ? "lora_A" : "lora_B");
    auto base = model.get_linear(module);  // errors with did-you-mean for unknown modules
    auto A = st->load(p.a), B = st->load(p.b);
    std::vector<int64_t> want_a = {cfg.r, base->in_features()}, want_b = {base->out_features(), cfg.r};
    if (A.sizes() != at::IntArrayRef(want_a))
      fail("{}: tensor \"{}\" has shape {} but {} expects {} (r = {} from adapter_config.json, in_features = {}); "
           "was this adapter trained for a different base model?",
           src, p.a, shape_str(A.sizes()), module, shape_str(want_a), cfg.r, base->in_features());
    if (B.sizes() != at::IntArrayRef(want_b))
      fail("{}: tensor \"{}\" has shape {} but {} expects {} (r = {} from adapter_config.json, out_features = {}); "
           "was this adapter trained for a different base model?",
           src, p.b, shape_str(B.sizes()), module, shape_str(want_b), cfg.r, base->out_features());
    auto l = std::make_shared<LoraLinearImpl>(base, cfg.r, scaling, cfg.dropout, 0);
    l->lora_A->weight.copy_(A.to(l->lora_A->weight.options()));
    l->lora_B->weight.copy_(B.to(l->lora_B->weight.options()));
    if (cfg.use_dora != !p.m.empty())
      fail("{}: module {} {} a lora_magnitude_vector but adapter_config.json says use_dora: {}", src, module,
           p.m.empty() ? "lacks" : "has", cfg.use_dora);
    if (cfg.use_dora) {
      auto M = st->load(p.m);
      if (M.dim() != 1 || M.size(0) != base->out_features())
        fail("{}: tensor \"{}\" has shape {} but {} expects [{}] (out_features)", src, p.m, shape_str(M.sizes()), module,
             base->out_features());
      l->enable_dora();
      l->lora_magnitude_vector.copy_(M.to(l->lora_magnitude_vector.options()));
    }
    l->train(model.is_training());
    model.replace_linear(module, l);
  }
  // Biases (bias: all / lora_only) and modules_to_save copies: whole parameters by live name.
  auto params = model.named_parameters(true);
  for (const auto& [tname, rest] : full) {
    std::vector<std::string> cands = {rest};
    auto dot = rest.rfind('.');
    if (dot != std::string::npos) {
      cands.push_back(rest.substr(0, dot) + ".base_layer" + rest.substr(dot));
      // stacked adapters put the original another level down
      cands.push_back(rest.substr(0, dot) + ".base_layer.base_layer" + rest.substr(dot));
    }
    const torch::Tensor* target = nullptr;
    for (const auto& c : cands)
      if (auto* t = params.find(c)) {
        target = t;
        break;
      }
    if (!target) fail("{}: tensor \"{}\" names no parameter of this model ({} not found)", src, tname, rest);
    auto t = st->load(tname);
    if (t.sizes() != target->sizes())
      fail("{}: tensor \"{}\" has shape {} but the model's parameter has shape {}", src, tname, shape_str(t.sizes()),
           shape_str(target->sizes()));
    const_cast<torch::Tensor*>(target)->copy_(t.to(target->options()));
  }
  for (auto& p : model.parameters()) p.set_requires_grad(false);
  if (trainable) {
    // Same rule as apply_lora: adapters, biases per mode, modules_to_save.
    for (const auto& n : lora_modules(model)) {
      auto l = std::dynamic_pointer_cast<LoraLinearImpl>(model.get_linear(n));
      l->lora_A->weight.set_requires_grad(true);
      l->lora_B->weight.set_requires_grad(true);
      if (l->is_dora()) l->lora_magnitude_vector.set_requires_grad(true);
      if (cfg.bias == "lora_only" && l->base_bias().defined()) l->base_bias().set_requires_grad(true);
    }
    if (cfg.bias == "all")
      for (auto& p : model.named_parameters(true))
        if (p.key().ends_with(".bias")) p.value().set_requires_grad(true);
    for (const auto& n : modules_to_save_parameters(model, cfg.modules_to_save)) params[n].set_requires_grad(true);
  }
  log::debug(fmt::format("loaded LoRA adapter {} (r={}, alpha={}, {} modules)", dir.string(), cfg.r, cfg.alpha,
                         lora.size()));
  return cfg;
}

void merge_adapters(model::TransformerImpl& model, const std::vector<fs::path>& dirs) {
  for (const auto& d : dirs) load_adapter(model, d, false);
  merge_all(model);
}

TrainingSetup prepare_for_training(model::TransformerImpl& model, const config::Recipe& recipe, uint64_t seed) {
  TrainingSetup s;
  std::string adapter = recipe.adapter.value_or("");
  if (adapter.empty() || adapter == "none" || adapter == "full") {
    if (!recipe.unfrozen_parameters.empty()) {
      s.unfrozen = unfreeze_matching(model, recipe.unfrozen_parameters);
    } else {
      for (auto& p : model.parameters()) p.set_requires_grad(true);
    }
  } else if (adapter == "lora" || adapter == "qlora") {
    // qlora: the same LoRA over a base loaded quantized (quant::load_quantized; qlora.cpp).
    if (adapter == "qlora" && !has_quantized_base(model))
      fail("adapter: qlora needs the base model loaded in 4 bits (load_in_4bit: true); this model has no quantized "
           "linear layers");
    if (!recipe.unfrozen_parameters.empty())
      fail("unfrozen_parameters selects tensors for full fine-tuning; with adapter: lora list extra trainable "
           "modules in lora_modules_to_save instead");
    if (recipe.lora_model_dir && !recipe.lora_model_dir->empty()) {
      s.lora = load_adapter(model, *recipe.lora_model_dir, true);
      s.lora->inference_mode = false;
      if (recipe.base_model) s.lora->base_model_name_or_path = *recipe.base_model;
      s.wrapped = lora_modules(model);
    } else {
      s.lora = LoraConfig::from_recipe(recipe);
      s.wrapped = apply_lora(model, *s.lora, seed);
    }
  } else if (adapter == "ia3" || adapter == "bitfit" || adapter == "prompt_tuning" || adapter == "prefix_tuning" ||
             adapter == "bottleneck") {
    s.adapter = detail::prepare_other_method(model, recipe, seed, adapter);  // methods.cpp
  } else {
    bool known = false;
    for (const auto& m : methods())
      if (m.recipe_adapter == adapter) {
        known = true;
        if (!m.implemented) fail("adapter: {} ({}) is not supported by llmtune yet; use adapter: lora", adapter, m.summary);
      }
    if (!known) fail("adapter: \"{}\" is unknown; use lora (or omit adapter for full fine-tuning)", adapter);
  }
  s.stats = parameter_stats(model);
  print_trainable_parameters(model);
  if (s.stats.trainable == 0) fail("no parameter is trainable after applying the recipe's adapter/freezing settings");
  return s;
}

void save_trained(model::TransformerImpl& model, const TrainingSetup& setup, const fs::path& dir,
                  std::optional<torch::ScalarType> dtype) {
  if (setup.lora) {
    save_adapter(model, *setup.lora, dir, dtype);
    write_qlora_record(model, setup.lora->base_model_name_or_path, dir);  // QLoRA: which base (qlora.cpp)
  } else if (setup.adapter) save_any_adapter(model, *setup.adapter, dir, dtype);
  else model::save_pretrained(model, dir, dtype);
}

}  // namespace llmtune::peft
