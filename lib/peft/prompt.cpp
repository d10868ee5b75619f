// Prompt tuning and prefix tuning (formats.md §5.4) as the model's VirtualTokens hook. PEFT's file
// holds one tensor `prompt_embeddings`: [N, C] for prompt tuning, [N, L*2*Hkv*D] for prefix tuning
// (already through the reparameterisation MLP when prefix_projection is on, so a loaded prefix
// adapter is always the flat form, as in PEFT's inference mode). Inits follow PEFT: N(0, 1)
// embeddings (nn.Embedding), TEXT init = the init text's token embeddings repeated to N.
#include <cmath>

#include "config/config.h"
#include "core/core.h"
#include "peft/peft.h"

namespace llmtune::peft {

void PromptConfig::derive_sizes(const model::ModelConfig& mc) {
  num_layers = mc.num_hidden_layers;
  if (prefix) {  // PEFT #1901: GQA prefixes are per key/value head
    token_dim = mc.head_dim * mc.num_key_value_heads;
    num_attention_heads = mc.num_key_value_heads;
    if (encoder_hidden_size <= 0) encoder_hidden_size = token_dim;
  } else {
    token_dim = mc.hidden_size;
    num_attention_heads = mc.num_attention_heads;
  }
}

PromptConfig PromptConfig::from_recipe(const config::Recipe& rc, bool prefix) {
  PromptConfig c;
  c.prefix = prefix;
  c.num_virtual_tokens = rc.num_virtual_tokens;
  if (c.num_virtual_tokens <= 0) fail("num_virtual_tokens must be positive (got {})", c.num_virtual_tokens);
  if (rc.base_model) c.base_model_name_or_path = *rc.base_model;
  if (prefix) {
    c.prefix_projection = rc.prefix_projection;
    c.encoder_hidden_size = rc.prefix_encoder_hidden_size;
    if (!rc.prompt_tuning_init_text.empty()) fail("prompt_tuning_init_text belongs to adapter: prompt_tuning, not prefix_tuning");
  } else {
    c.init_text = rc.prompt_tuning_init_text;
    c.tokenizer_name_or_path = rc.tokenizer_config.value_or(c.base_model_name_or_path);
    if (rc.prefix_projection) fail("prefix_projection belongs to adapter: prefix_tuning, not prompt_tuning");
  }
  if (rc.sample_packing) fail("adapter: {} cannot be combined with sample_packing (every sequence needs its own virtual tokens); set sample_packing: false",
                              prefix ? "prefix_tuning" : "prompt_tuning");
  return c;
}

nlohmann::json PromptConfig::to_adapter_json() const {
  nlohmann::json j;
  j["peft_type"] = prefix ? "PREFIX_TUNING" : "PROMPT_TUNING";
  j["task_type"] = "CAUSAL_LM";
  j["auto_mapping"] = nullptr;
  j["base_model_name_or_path"] = base_model_name_or_path.empty() ? nlohmann::json(nullptr) : nlohmann::json(base_model_name_or_path);
  j["revision"] = nullptr;
  j["inference_mode"] = true;  // what PEFT's save_pretrained writes
  j["num_virtual_tokens"] = num_virtual_tokens;
  j["token_dim"] = token_dim;
  j["num_transformer_submodules"] = 1;
  j["num_attention_heads"] = num_attention_heads;
  j["num_layers"] = num_layers;
  j["modules_to_save"] = nullptr;
  if (prefix) {
    j["encoder_hidden_size"] = encoder_hidden_size;
    j["prefix_projection"] = prefix_projection;
    j["init_weights"] = nullptr;
  } else {
    j["prompt_tuning_init"] = init_text.empty() ? "RANDOM" : "TEXT";
    j["prompt_tuning_init_text"] = init_text.empty() ? nlohmann::json(nullptr) : nlohmann::json(init_text);
    j["tokenizer_name_or_path"] = init_text.empty() ? nlohmann::json(nullptr) : nlohmann::json(tokenizer_name_or_path);
    j["tokenizer_kwargs"] = nullptr;
  }
  return j;
}

PromptConfig PromptConfig::from_adapter_json(const nlohmann::json& j, const std::string& source) {
  PromptConfig c;
  std::string type = j["peft_type"];
  c.prefix = type == "PREFIX_TUNING";
  auto integer = [&](const char* key, int64_t def) -> int64_t {
    if (!j.contains(key) || j[key].is_null()) return def;
    if (!j[key].is_number_integer()) fail("{}: key \"{}\" must be an integer (got {})", source, key, j[key].dump());
    return j[key].get<int64_t>();
  };
  c.num_virtual_tokens = integer("num_virtual_tokens", 0);
  if (c.num_virtual_tokens <= 0) fail("{}: num_virtual_tokens must be a positive integer", source);
  c.token_dim = integer("token_dim", 0);
  c.num_layers = integer("num_layers", 0);
  c.num_attention_heads = integer("num_attention_heads", 0);
  c.encoder_hidden_size = integer("encoder_hidden_size", 0);
  if (integer("num_transformer_submodules", 1) != 1)
    fail("{}: num_transformer_submodules must be 1 for a decoder-only causal LM", source);
  if (j.contains("prefix_projection") && j["prefix_projection"].is_boolean()) c.prefix_projection = j["prefix_projection"];
  if (j.contains("prompt_tuning_init_text") && j["prompt_tuning_init_text"].is_string()) c.init_text = j["prompt_tuning_init_text"];
  if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string())
    c.base_model_name_or_path = j["base_model_name_or_path"];
  return c;
}

PromptEmbeddingImpl::PromptEmbeddingImpl(int64_t n, int64_t dim, torch::TensorOptions o) {
  embedding = register_parameter("embedding", torch::zeros({n, dim}, o));
}

PrefixEncoderImpl::PrefixEncoderImpl(const PromptConfig& c, torch::TensorOptions o)
    : layers(c.num_layers), heads(c.num_attention_heads), head_dim(c.token_dim / c.num_attention_heads) {
  const int64_t flat = c.num_layers * 2 * c.token_dim;
  if (c.prefix_projection) {
    embedding = register_parameter("embedding", torch::zeros({c.num_virtual_tokens, c.token_dim}, o));
    transform_0 = register_module("transform_0", std::make_shared<model::DenseLinearImpl>(c.token_dim, c.encoder_hidden_size, true, o));
    transform_2 = register_module("transform_2", std::make_shared<model::DenseLinearImpl>(c.encoder_hidden_size, flat, true, o));
  } else {
    embedding = register_parameter("embedding", torch::zeros({c.num_virtual_tokens, flat}, o));
  }
}

torch::Tensor PrefixEncoderImpl::prompt_embeddings() {
  if (!transform_0) return embedding;
  return transform_2->forward(torch::tanh(transform_0->forward(embedding)));
}

std::vector<std::pair<torch::Tensor, torch::Tensor>> PrefixEncoderImpl::key_values() {
  const int64_t N = embedding.size(0);
  auto pe = prompt_embeddings().view({N, 2 * layers, heads, head_dim});  // PEFT's view, batch dropped
  std::vector<std::pair<torch::Tensor, torch::Tensor>> out;
  for (int64_t l = 0; l < layers; ++l)
    out.emplace_back(pe.select(1, 2 * l).permute({1, 0, 2}), pe.select(1, 2 * l + 1).permute({1, 0, 2}));  // [Hkv,N,D]
  return out;
}

void apply_prompt(model::TransformerImpl& model, PromptConfig& cfg, uint64_t seed, const std::vector<int64_t>& init_ids) {
  const auto& mc = model.config();
  cfg.derive_sizes(mc);
  auto dev = model.decoder->embed_tokens->weight.device();
  auto o = torch::TensorOptions().dtype(torch::kFloat).device(dev);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 1000003ULL + 17);
  torch::NoGradGuard ng;
  const int64_t N = cfg.num_virtual_tokens;
  if (!cfg.prefix) {
    auto pe = std::make_shared<PromptEmbeddingImpl>(N, cfg.token_dim, o);
    if (!init_ids.empty()) {  // PEFT TEXT init: the text's ids repeated / cut to N
      std::vector<int64_t> ids;
      while ((int64_t)ids.size() < N)
        for (int64_t t : init_ids)
          if ((int64_t)ids.size() < N) ids.push_back(t);
      for (int64_t t : ids)
        if (t < 0 || t >= mc.vocab_size) fail("prompt_tuning_init_text: token id {} outside the vocabulary", t);
      auto w = model.decoder->embed_tokens->weight.index_select(0, torch::tensor(ids, torch::kLong).to(dev));
      pe->embedding.copy_(w.to(torch::kFloat));
    } else {
      pe->embedding.copy_(at::normal(0.0, 1.0, {N, cfg.token_dim}, gen));
    }
    model.set_virtual_tokens(pe);
  } else {
    if (cfg.token_dim % cfg.num_attention_heads) fail("prefix tuning: token_dim {} is not a multiple of {} heads", cfg.token_dim, cfg.num_attention_heads);
    auto enc = std::make_shared<PrefixEncoderImpl>(cfg, o);
    enc->embedding.copy_(at::normal(0.0, 1.0, enc->embedding.sizes(), gen));
    for (auto* lin : {enc->transform_0.get(), enc->transform_2.get()}) {
      if (!lin) continue;
      double bound = 1.0 / std::sqrt(static_cast<double>(lin->in_features()));  // nn.Linear default
      lin->weight.copy_(torch::empty(lin->weight.sizes()).uniform_(-bound, bound, gen));
      lin->bias.copy_(torch::empty(lin->bias.sizes()).uniform_(-bound, bound, gen));
    }
    model.set_virtual_tokens(enc);
  }
}

}  // namespace llmtune::peft
