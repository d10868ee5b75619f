// One entry point per operation for every PEFT method: read/load/save adapter directories by
// peft_type, install a fresh adapter from the recipe, and the non-LoRA half of merge_all. Tensor
// names are `base_model.model.<live name>` except prompt/prefix tuning (`prompt_embeddings`).
#include <fstream>
#include <set>

#include <fmt/ranges.h>

#include "config/config.h"
#include "core/core.h"
#include "io/io.h"
#include "tokenizer/tokenizer.h"
#include "peft/methods_impl.h"
#include "peft/peft.h"

namespace llmtune::peft {

namespace {
const std::string kPrefix = "base_model.model.";

std::string shape_str(at::IntArrayRef s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

nlohmann::json read_json(const fs::path& dir) {
  auto path = dir / "adapter_config.json";
  if (!fs::exists(path))
    fail("{} does not exist: an adapter directory holds adapter_config.json and adapter_model.safetensors", path.string());
  try {
    return nlohmann::json::parse(io::read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed JSON ({})", path.string(), e.what());
  }
}

std::shared_ptr<io::SafetensorsFile> open_weights(const fs::path& dir) {
  auto file = dir / "adapter_model.safetensors";
  if (!fs::exists(file)) {
    if (fs::exists(dir / "adapter_model.bin"))
      fail("{} has only adapter_model.bin (a pickle, which llmtune never loads); convert it with "
           "safetensors.torch.save_file(torch.load(\"adapter_model.bin\"), \"adapter_model.safetensors\")", dir.string());
    fail("{} does not exist", file.string());
  }
  return io::SafetensorsFile::open(file);
}

void write_json(const fs::path& dir, const nlohmann::json& j) {
  std::ofstream out(dir / "adapter_config.json");
  if (!out) fail("cannot write {}", (dir / "adapter_config.json").string());
  out << j.dump(2) << "\n";
  if (!out) fail("error writing {}", (dir / "adapter_config.json").string());
}

// Parameters (live names) that belong to the installed adapter of `method`.
std::vector<std::string> adapter_parameters(model::TransformerImpl& model, const AdapterConfig& cfg) {
  std::vector<std::string> out;
  for (const auto& p : model.named_parameters(true)) {
    const auto& n = p.key();
    bool mine = false;
    if (cfg.method == "ia3") mine = n.ends_with(".ia3_l");
    else if (cfg.method == "prompt_tuning" || cfg.method == "prefix_tuning") mine = n.starts_with("prompt_encoder.");
    else if (cfg.method == "bottleneck") mine = n.find("_adapter.") != std::string::npos;
    if (mine) out.push_back(n);
  }
  if (cfg.method == "bitfit")
    for (const auto& m : detail::bitfit_targets(model, cfg.bitfit)) out.push_back(m + ".bias");
  return out;
}

void set_trainable(model::TransformerImpl& model, const std::vector<std::string>& names) {
  for (auto& p : model.parameters()) p.set_requires_grad(false);
  auto params = model.named_parameters(true);
  for (const auto& n : names) params[n].set_requires_grad(true);
}

void check_prompt_sizes(const PromptConfig& file, const PromptConfig& model_cfg, const std::string& src) {
  auto chk = [&](const char* key, int64_t a, int64_t b) {
    if (a && a != b)
      fail("{}: {} = {} but this model implies {} (was the adapter made for another base model?)", src, key, a, b);
  };
  chk("token_dim", file.token_dim, model_cfg.token_dim);
  chk("num_layers", file.num_layers, model_cfg.num_layers);
  chk("num_attention_heads", file.num_attention_heads, model_cfg.num_attention_heads);
}
}  // namespace

std::string AdapterConfig::peft_type() const {
  if (method == "lora") return "LORA";
  if (method == "ia3") return "IA3";
  if (method == "prompt_tuning") return "PROMPT_TUNING";
  if (method == "prefix_tuning") return "PREFIX_TUNING";
  if (method == "bitfit") return "BITFIT";
  if (method == "bottleneck") return "BOTTLENECK";
  fail("unknown adapter method \"{}\"", method);
}

std::string AdapterConfig::summary() const {
  if (method == "lora")
    return fmt::format("{} r={} alpha={} scaling={:.6g}", lora.use_dora ? "DoRA" : (lora.use_rslora ? "rsLoRA" : "LoRA"),
                       lora.r, lora.alpha, lora.scaling());
  if (method == "ia3") return fmt::format("IA3 on {} (feed-forward {})", fmt::join(ia3.target_modules, ", "), fmt::join(ia3.feedforward_modules, ", "));
  if (method == "prompt_tuning") return fmt::format("prompt tuning, {} virtual tokens", prompt.num_virtual_tokens);
  if (method == "prefix_tuning")
    return fmt::format("prefix tuning, {} virtual tokens{}", prompt.num_virtual_tokens, prompt.prefix_projection ? " (MLP reparameterisation)" : "");
  if (method == "bitfit") return "BitFit (biases)";
  if (method == "bottleneck") return fmt::format("bottleneck adapters, size {} ({})", bottleneck.size, bottleneck.activation);
  return method;
}

bool AdapterConfig::mergeable() const {
  return method == "lora" || method == "ia3" || method == "bitfit" ||
         (method == "bottleneck" && bottleneck.activation == "identity");
}

AdapterConfig read_any_adapter_config(const fs::path& dir) {
  auto j = read_json(dir);
  const std::string src = (dir / "adapter_config.json").string();
  if (!j.is_object() || !j.contains("peft_type") || !j["peft_type"].is_string())
    fail("{}: missing string key \"peft_type\" (a PEFT adapter_config.json has e.g. \"peft_type\": \"LORA\")", src);
  std::string type = j["peft_type"];
  require_method(type, src);
  AdapterConfig c;
  if (type == "LORA") {
    c.method = "lora";
    c.lora = LoraConfig::from_adapter_json(j, src);
  } else if (type == "IA3") {
    c.method = "ia3";
    c.ia3 = Ia3Config::from_adapter_json(j, src);
  } else if (type == "PROMPT_TUNING" || type == "PREFIX_TUNING") {
    c.method = type == "PREFIX_TUNING" ? "prefix_tuning" : "prompt_tuning";
    c.prompt = PromptConfig::from_adapter_json(j, src);
  } else if (type == "BITFIT") {
    c.method = "bitfit";
    c.bitfit = BitFitConfig::from_adapter_json(j, src);
  } else if (type == "BOTTLENECK") {
    c.method = "bottleneck";
    c.bottleneck = BottleneckConfig::from_adapter_json(j, src);
  } else {
    fail("{}: peft_type \"{}\" cannot be loaded", src, type);
  }
  return c;
}

AdapterConfig load_any_adapter(model::TransformerImpl& model, const fs::path& dir, bool trainable) {
  auto cfg = read_any_adapter_config(dir);
  if (cfg.method == "lora") {
    cfg.lora = load_adapter(model, dir, trainable);
    return cfg;
  }
  auto st = open_weights(dir);
  const std::string src = (dir / "adapter_model.safetensors").string();
  torch::NoGradGuard ng;
  auto load_into = [&](const std::string& tname, torch::Tensor& target) {
    auto t = st->load(tname);
    if (t.sizes() != target.sizes())
      fail("{}: tensor \"{}\" has shape {} but the model expects {}; was this adapter made for another base model?", src,
           tname, shape_str(t.sizes()), shape_str(target.sizes()));
    target.copy_(t.to(target.options()));
  };
  if (cfg.method == "prompt_tuning" || cfg.method == "prefix_tuning") {
    if (model.virtual_tokens()) fail("{}: the model already has prompt/prefix-tuning tokens; load one such adapter only", src);
    PromptConfig mc = cfg.prompt;
    mc.prefix_projection = false;  // the file holds the projected (flat) prefixes
    cfg.prompt.prefix_projection = false;
    apply_prompt(model, mc, 0);
    check_prompt_sizes(cfg.prompt, mc, src);
    cfg.prompt.token_dim = mc.token_dim;
    cfg.prompt.num_layers = mc.num_layers;
    cfg.prompt.num_attention_heads = mc.num_attention_heads;
    cfg.prompt.encoder_hidden_size = mc.encoder_hidden_size;
    auto names = st->names();
    if (std::find(names.begin(), names.end(), "prompt_embeddings") == names.end())
      fail("{}: no tensor \"prompt_embeddings\" (PEFT's prompt/prefix tuning file holds exactly that one)", src);
    auto params = model.named_parameters(true);
    load_into("prompt_embeddings", params["prompt_encoder.embedding"]);
  } else {
    if (cfg.method == "bottleneck") apply_bottleneck(model, cfg.bottleneck, 0);
    auto params = model.named_parameters(true);
    std::set<std::string> seen;
    for (const auto& name : st->names()) {
      if (!name.starts_with(kPrefix)) fail("{}: tensor \"{}\" does not start with \"{}\"", src, name, kPrefix);
      const std::string rest = name.substr(kPrefix.size());
      if (cfg.method == "ia3") {
        if (!rest.ends_with(".ia3_l")) fail("{}: tensor \"{}\" is not an IA3 vector (…ia3_l)", src, name);
        const std::string module = rest.substr(0, rest.size() - 6);
        auto base = model.get_linear(module);
        auto l = std::make_shared<Ia3LinearImpl>(base, matches_target(module, cfg.ia3.feedforward_modules));
        load_into(name, l->ia3_l);
        l->train(model.is_training());
        model.replace_linear(module, l);
      } else if (cfg.method == "bitfit") {
        if (!rest.ends_with(".bias")) fail("{}: tensor \"{}\" is not a bias", src, name);
        auto d = std::dynamic_pointer_cast<model::DenseLinearImpl>(model.get_linear(rest.substr(0, rest.size() - 5)));
        if (!d) fail("{}: {} is not a plain dense linear (load BitFit before other adapters)", src, rest);
        detail::ensure_bias(*d);
        load_into(name, d->bias);
      } else {  // bottleneck: live names
        auto* t = params.find(rest);
        if (!t || rest.find("_adapter.") == std::string::npos)
          fail("{}: tensor \"{}\" names no bottleneck-adapter parameter of this model (expected e.g. "
               "model.layers.0.attn_adapter.down_proj.weight)", src, name);
        load_into(name, *t);
      }
      seen.insert(rest);
    }
    if (cfg.method == "bottleneck")
      for (const auto& n : adapter_parameters(model, cfg))
        if (!seen.count(n)) fail("{}: tensor \"{}{}\" is missing", src, kPrefix, n);
    if (seen.empty()) fail("{}: no adapter tensors", src);
  }
  for (auto& p : model.parameters()) p.set_requires_grad(false);
  if (trainable) set_trainable(model, adapter_parameters(model, cfg));
  log::debug(fmt::format("loaded adapter {}: {}", dir.string(), cfg.summary()));
  return cfg;
}

void save_any_adapter(model::TransformerImpl& model, const AdapterConfig& cfg, const fs::path& dir,
                      std::optional<torch::ScalarType> dtype) {
  if (cfg.method == "lora") return save_adapter(model, cfg.lora, dir, dtype);
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  torch::NoGradGuard ng;
  auto put = [&](const std::string& name, const torch::Tensor& t) {
    auto c = t.detach().to(torch::kCPU);
    if (dtype) c = c.to(*dtype);
    tensors.emplace_back(name, c.contiguous());
  };
  nlohmann::json j;
  if (cfg.method == "prompt_tuning" || cfg.method == "prefix_tuning") {
    auto vt = model.virtual_tokens();
    if (!vt) fail("save_any_adapter: the model has no prompt/prefix-tuning tokens");
    if (auto pe = std::dynamic_pointer_cast<PrefixEncoderImpl>(vt)) put("prompt_embeddings", pe->prompt_embeddings());
    else put("prompt_embeddings", vt->input_embeddings());
    j = cfg.prompt.to_adapter_json();
  } else {
    auto params = model.named_parameters(true);
    for (const auto& n : adapter_parameters(model, cfg)) put(kPrefix + n, params[n]);
    if (tensors.empty()) fail("save_any_adapter: the model holds no {} tensors", cfg.method);
    j = cfg.method == "ia3" ? cfg.ia3.to_adapter_json()
                            : (cfg.method == "bitfit" ? cfg.bitfit.to_adapter_json() : cfg.bottleneck.to_adapter_json());
  }
  fs::create_directories(dir);
  io::safetensors_save(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  write_json(dir, j);
}

void apply_method(model::TransformerImpl& model, AdapterConfig& cfg, uint64_t seed, const std::vector<int64_t>& init_ids) {
  if (cfg.method == "ia3") apply_ia3(model, cfg.ia3);
  else if (cfg.method == "bitfit") apply_bitfit(model, cfg.bitfit);
  else if (cfg.method == "bottleneck") apply_bottleneck(model, cfg.bottleneck, seed);
  else if (cfg.method == "prompt_tuning" || cfg.method == "prefix_tuning") apply_prompt(model, cfg.prompt, seed, init_ids);
  else fail("apply_method: method \"{}\" is installed elsewhere (lora: apply_lora)", cfg.method);
  set_trainable(model, adapter_parameters(model, cfg));
}

AdapterConfig detail::prepare_other_method(model::TransformerImpl& model, const config::Recipe& recipe, uint64_t seed,
                                           const std::string& adapter) {
  if (!recipe.unfrozen_parameters.empty())
    fail("unfrozen_parameters selects tensors for full fine-tuning; it cannot be combined with adapter: {}", adapter);
  if (!recipe.lora_modules_to_save.empty()) fail("lora_modules_to_save is only supported with adapter: lora");
  if (recipe.lora_model_dir && !recipe.lora_model_dir->empty()) {
    auto cfg = load_any_adapter(model, *recipe.lora_model_dir, true);
    if (cfg.method != adapter)
      fail("lora_model_dir {} holds a {} adapter but the recipe says adapter: {}", *recipe.lora_model_dir, cfg.method, adapter);
    return cfg;
  }
  AdapterConfig cfg;
  cfg.method = adapter;
  std::vector<int64_t> init_ids;
  if (adapter == "ia3") {
    cfg.ia3 = Ia3Config::from_recipe(recipe);
  } else if (adapter == "bitfit") {
    cfg.bitfit = BitFitConfig::from_recipe(recipe);
  } else if (adapter == "bottleneck") {
    cfg.bottleneck = BottleneckConfig::from_recipe(recipe);
  } else {
    cfg.prompt = PromptConfig::from_recipe(recipe, adapter == "prefix_tuning");
    if (!cfg.prompt.init_text.empty()) {  // PEFT: tokenizer(init_text)["input_ids"], specials included
      auto tok = tok::Tokenizer::load(io::resolve_model_path(cfg.prompt.tokenizer_name_or_path));
      for (int32_t t : tok->encode(cfg.prompt.init_text, true)) init_ids.push_back(t);
      if (init_ids.empty()) fail("prompt_tuning_init_text \"{}\" encodes to no tokens", cfg.prompt.init_text);
    }
  }
  apply_method(model, cfg, seed, init_ids);
  log::info("adapter: " + cfg.summary());
  return cfg;
}

void detail::merge_other_methods(model::TransformerImpl& model) {
  if (model.virtual_tokens())
    fail("prompt/prefix tuning cannot be merged: its virtual tokens are extra positions, not a change of weights. "
         "Use the adapter unmerged (llmtune generate/eval --adapter DIR)");
  for (const auto& n : ia3_modules(model)) {
    auto l = std::dynamic_pointer_cast<Ia3LinearImpl>(model.get_linear(n));
    model.replace_linear(n, l->merge());
  }
  // Identity bottlenecks: out' = (I + U D) out + (U d + u), folded into o_proj / down_proj.
  torch::NoGradGuard ng;
  bool folded = false;
  for (int64_t i = 0; i < (int64_t)model.decoder->layer_list.size(); ++i) {
    auto& layer = model.decoder->layer_list[i];
    for (auto [ad, target] : {std::pair{layer->attn_adapter, fmt::format("model.layers.{}.self_attn.o_proj", i)},
                              std::pair{layer->mlp_adapter, fmt::format("model.layers.{}.mlp.down_proj", i)}}) {
      if (!ad) continue;
      auto b = std::dynamic_pointer_cast<BottleneckAdapterImpl>(ad);
      if (!b) fail("merge: layer {} has an unknown sublayer adapter", i);
      if (b->activation != "identity")
        fail("bottleneck adapters with activation \"{}\" cannot be merged (the map y + up({}(down(y))) is not affine); "
             "only activation: identity folds into {}. Use the adapter unmerged (--adapter DIR)",
             b->activation, b->activation, target);
      auto d = std::dynamic_pointer_cast<model::DenseLinearImpl>(model.get_linear(target));
      if (!d) fail("merge: {} is not a plain dense linear", target);
      auto U = b->up_proj->weight.to(torch::kFloat), D = b->down_proj->weight.to(torch::kFloat);
      auto M = torch::eye(U.size(0), U.options()) + torch::matmul(U, D);
      auto c = torch::matmul(U, b->down_proj->bias.to(torch::kFloat)) + b->up_proj->bias.to(torch::kFloat);
      auto W = d->weight.to(torch::kFloat).to(M.device());
      auto bias = d->bias.defined() ? d->bias.to(torch::kFloat) : torch::zeros({W.size(0)}, M.options());
      auto nb = torch::matmul(M, bias) + c;
      d->weight.copy_(torch::matmul(M, W).to(d->weight.scalar_type()));
      if (!d->bias.defined() && nb.abs().max().item<double>() > 0) detail::ensure_bias(*d);
      if (d->bias.defined()) d->bias.copy_(nb.to(d->bias.scalar_type()));
      folded = true;
    }
    layer->set_adapters(nullptr, nullptr);
  }
  if (folded) log::info("merge: identity bottleneck adapters folded into o_proj / down_proj");
  bitfit_normalize_biases(model);
}

}  // namespace llmtune::peft
