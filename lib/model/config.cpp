// ModelConfig: HF config.json (transformers v4 and v5 spellings) -> one normalised struct, and back.
// Mirrors the defaults of LlamaConfig / MistralConfig / Qwen2Config and transformers'
// rope standardisation (rope_scaling wins over rope_parameters when both are set, as in v5).
#include <cmath>
#include <set>

#include <fmt/ranges.h>

#include "core/core.h"
#include "io/io.h"
#include "model/model.h"

namespace llmtune::model {

using nlohmann::json;

namespace {

const char* kSupported = "llama (Llama 1/2/3, TinyLlama, SmolLM), mistral, qwen2";
const std::set<std::string> kRopeTypes = {"default", "linear", "dynamic", "llama3", "yarn", "longrope"};

const char* type_name(const json& v) { return v.type_name(); }

bool has(const json& j, const std::string& key) { return j.contains(key) && !j.at(key).is_null(); }

int64_t get_int(const json& j, const std::string& key, const std::string& src, std::optional<int64_t> def = {}) {
  if (!has(j, key)) {
    if (def) return *def;
    fail("{}: missing required key \"{}\" (an integer); config.json files written by transformers always have it",
         src, key);
  }
  const json& v = j.at(key);
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>()) return (int64_t)v.get<double>();
  fail("{}: key \"{}\" must be an integer, got {} ({})", src, key, v.dump(), type_name(v));
}

double get_num(const json& j, const std::string& key, const std::string& src, double def) {
  if (!has(j, key)) return def;
  const json& v = j.at(key);
  if (!v.is_number()) fail("{}: key \"{}\" must be a number, got {} ({})", src, key, v.dump(), type_name(v));
  return v.get<double>();
}

std::optional<double> get_opt_num(const json& j, const std::string& key, const std::string& src) {
  if (!has(j, key)) return std::nullopt;
  return get_num(j, key, src, 0.0);
}

bool get_bool(const json& j, const std::string& key, const std::string& src, bool def) {
  if (!has(j, key)) return def;
  const json& v = j.at(key);
  if (!v.is_boolean()) fail("{}: key \"{}\" must be true or false, got {}", src, key, v.dump());
  return v.get<bool>();
}

std::string get_str(const json& j, const std::string& key, const std::string& src, const std::string& def) {
  if (!has(j, key)) return def;
  const json& v = j.at(key);
  if (!v.is_string()) fail("{}: key \"{}\" must be a string, got {}", src, key, v.dump());
  return v.get<std::string>();
}

std::vector<double> get_num_list(const json& j, const std::string& key, const std::string& src) {
  std::vector<double> out;
  if (!has(j, key)) return out;
  const json& v = j.at(key);
  if (!v.is_array()) fail("{}: key \"{}\" must be a list of numbers", src, key);
  for (const auto& e : v) {
    if (!e.is_number()) fail("{}: key \"{}\" must be a list of numbers, found {}", src, key, e.dump());
    out.push_back(e.get<double>());
  }
  return out;
}

RopeConfig parse_rope(const json& j, const std::string& src, int64_t head_dim, int64_t max_pos) {
  // Priority as in transformers v5 (convert_rope_params_to_dict): rope_scaling, else rope_parameters.
  json rp = json::object();
  std::string where = "rope_parameters";
  if (has(j, "rope_scaling") && !j.at("rope_scaling").empty()) {
    rp = j.at("rope_scaling");
    where = "rope_scaling";
  } else if (has(j, "rope_parameters")) {
    rp = j.at("rope_parameters");
  }
  if (!rp.is_object()) fail("{}: \"{}\" must be an object, got {}", src, where, rp.dump());
  for (const char* lt : {"full_attention", "sliding_attention"})
    if (rp.contains(lt))
      fail("{}: per-layer-type \"{}\" (key \"{}\") is not supported for this model family; use one dict", src,
           where, lt);
  RopeConfig r;
  r.theta = has(rp, "rope_theta") ? get_num(rp, "rope_theta", src + " " + where, 10000.0)
                                  : get_num(j, "rope_theta", src, 10000.0);
  r.type = has(rp, "rope_type") ? get_str(rp, "rope_type", src, "default") : get_str(rp, "type", src, "default");
  if (!kRopeTypes.count(r.type))
    fail("{}: {}.rope_type \"{}\" is not supported; supported: default, linear, dynamic, llama3, yarn, longrope",
         src, where, r.type);
  double prf = get_num(rp, "partial_rotary_factor", src, get_num(j, "partial_rotary_factor", src, 1.0));
  if (prf != 1.0) fail("{}: partial_rotary_factor {} is not supported (only 1.0)", src, prf);
  std::string s = src + " " + where;
  r.factor = get_opt_num(rp, "factor", s);
  auto require_factor = [&]() {
    if (!r.factor) fail("{}: rope type \"{}\" needs \"factor\"", s, r.type);
  };
  if (r.type == "linear" || r.type == "dynamic") require_factor();
  if (r.type == "llama3" || r.type == "yarn" || r.type == "longrope") {
    // Phi-3 style top-level original_max_position_embeddings takes priority (as in transformers).
    if (has(j, "original_max_position_embeddings"))
      r.original_max_position_embeddings = get_int(j, "original_max_position_embeddings", src);
    else
      r.original_max_position_embeddings = get_int(rp, "original_max_position_embeddings", s, max_pos);
  }
  if (r.type == "llama3") {
    require_factor();
    for (const char* k : {"low_freq_factor", "high_freq_factor"})
      if (!has(rp, k)) fail("{}: rope type \"llama3\" needs \"{}\"", s, k);
    r.low_freq_factor = get_num(rp, "low_freq_factor", s, 1.0);
    r.high_freq_factor = get_num(rp, "high_freq_factor", s, 4.0);
    if (r.high_freq_factor == r.low_freq_factor) fail("{}: llama3 high_freq_factor must differ from low_freq_factor", s);
  }
  if (r.type == "yarn") {
    r.attention_factor = get_opt_num(rp, "attention_factor", s);
    r.beta_fast = get_opt_num(rp, "beta_fast", s);
    r.beta_slow = get_opt_num(rp, "beta_slow", s);
    r.mscale = get_opt_num(rp, "mscale", s);
    r.mscale_all_dim = get_opt_num(rp, "mscale_all_dim", s);
    r.truncate = get_bool(rp, "truncate", s, true);
  }
  if (r.type == "longrope") {
    r.attention_factor = get_opt_num(rp, "attention_factor", s);
    r.short_factor = get_num_list(rp, "short_factor", s);
    r.long_factor = get_num_list(rp, "long_factor", s);
    if ((int64_t)r.short_factor.size() != head_dim / 2 || (int64_t)r.long_factor.size() != head_dim / 2)
      fail("{}: longrope short_factor and long_factor must each have head_dim/2 = {} entries (got {} and {})", s,
           head_dim / 2, r.short_factor.size(), r.long_factor.size());
  }
  return r;
}

}  // namespace

json RopeConfig::to_json() const {
  json j = {{"rope_type", type}, {"rope_theta", theta}};
  if (factor) j["factor"] = *factor;
  if (type == "llama3") {
    j["low_freq_factor"] = low_freq_factor;
    j["high_freq_factor"] = high_freq_factor;
  }
  if (original_max_position_embeddings) j["original_max_position_embeddings"] = *original_max_position_embeddings;
  if (attention_factor) j["attention_factor"] = *attention_factor;
  if (beta_fast) j["beta_fast"] = *beta_fast;
  if (beta_slow) j["beta_slow"] = *beta_slow;
  if (mscale) j["mscale"] = *mscale;
  if (mscale_all_dim) j["mscale_all_dim"] = *mscale_all_dim;
  if (type == "yarn" && !truncate) j["truncate"] = false;
  if (!short_factor.empty()) j["short_factor"] = short_factor;
  if (!long_factor.empty()) j["long_factor"] = long_factor;
  return j;
}

ModelConfig ModelConfig::from_json(const json& j, const std::string& src) {
  if (!j.is_object()) fail("{}: expected a JSON object at the top level", src);
  ModelConfig c;
  c.raw = j;
  if (!has(j, "model_type"))
    fail("{}: missing \"model_type\"; supported: {}", src, kSupported);
  c.model_type = get_str(j, "model_type", src, "");
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2")
    fail("{}: model_type \"{}\" is not supported; supported model types: {}", src, c.model_type, kSupported);
  if (has(j, "architectures"))
    for (const auto& a : j.at("architectures"))
      if (a.is_string()) c.architectures.push_back(a.get<std::string>());

  c.vocab_size = get_int(j, "vocab_size", src);
  c.hidden_size = get_int(j, "hidden_size", src);
  c.intermediate_size = get_int(j, "intermediate_size", src);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", src);
  c.num_attention_heads = get_int(j, "num_attention_heads", src);
  c.num_key_value_heads = get_int(j, "num_key_value_heads", src, c.num_attention_heads);
  for (auto [k, v] : {std::pair{"vocab_size", c.vocab_size}, {"hidden_size", c.hidden_size},
                      {"intermediate_size", c.intermediate_size}, {"num_hidden_layers", c.num_hidden_layers},
                      {"num_attention_heads", c.num_attention_heads}, {"num_key_value_heads", c.num_key_value_heads}})
    if (v <= 0) fail("{}: \"{}\" must be positive, got {}", src, k, v);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    fail("{}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", src, c.num_attention_heads,
         c.num_key_value_heads);
  if (!has(j, "head_dim") && c.hidden_size % c.num_attention_heads != 0)
    fail("{}: hidden_size ({}) is not a multiple of num_attention_heads ({}) and no head_dim is given", src,
         c.hidden_size, c.num_attention_heads);
  c.head_dim = get_int(j, "head_dim", src, c.hidden_size / c.num_attention_heads);
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) fail("{}: head_dim must be positive and even, got {}", src, c.head_dim);

  c.hidden_act = get_str(j, "hidden_act", src, "silu");
  if (c.hidden_act != "silu" && c.hidden_act != "swish")
    fail("{}: hidden_act \"{}\" is not supported for {}; only \"silu\"", src, c.hidden_act, c.model_type);
  int64_t default_max_pos = c.model_type == "llama" ? 2048 : c.model_type == "mistral" ? 4096 * 32 : 32768;
  c.max_position_embeddings = get_int(j, "max_position_embeddings", src, default_max_pos);
  c.rms_norm_eps = get_num(j, "rms_norm_eps", src, 1e-6);
  c.initializer_range = get_num(j, "initializer_range", src, 0.02);
  c.rope = parse_rope(j, src, c.head_dim, c.max_position_embeddings);
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", src, false);

  if (c.model_type == "llama") {
    c.attention_bias = get_bool(j, "attention_bias", src, false);
    c.mlp_bias = get_bool(j, "mlp_bias", src, false);
    c.qkv_bias = c.o_bias = c.attention_bias;
  } else if (c.model_type == "qwen2") {
    c.qkv_bias = true;  // hard-coded in Qwen2Attention; o_proj and MLP never have bias
  }

  c.layer_sliding.assign(c.num_hidden_layers, false);
  if (c.model_type == "mistral") {
    if (has(j, "sliding_window")) {
      c.sliding_window = get_int(j, "sliding_window", src);
      c.layer_sliding.assign(c.num_hidden_layers, true);
    }
  } else if (c.model_type == "qwen2") {
    bool use = get_bool(j, "use_sliding_window", src, false);
    if (use && has(j, "sliding_window")) {
      c.sliding_window = get_int(j, "sliding_window", src);
      if (has(j, "layer_types")) {
        const json& lt = j.at("layer_types");
        if (!lt.is_array() || (int64_t)lt.size() != c.num_hidden_layers)
          fail("{}: layer_types must be a list of {} entries (num_hidden_layers)", src, c.num_hidden_layers);
        for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
          std::string t = lt[i].is_string() ? lt[i].get<std::string>() : lt[i].dump();
          if (t != "full_attention" && t != "sliding_attention")
            fail("{}: layer_types[{}] is \"{}\"; expected \"full_attention\" or \"sliding_attention\"", src, i, t);
          c.layer_sliding[i] = t == "sliding_attention";
        }
      } else {
        int64_t mwl = get_int(j, "max_window_layers", src, 28);
        for (int64_t i = 0; i < c.num_hidden_layers; ++i) c.layer_sliding[i] = i >= mwl;
      }
    }
  }
  if (c.sliding_window && *c.sliding_window <= 0) fail("{}: sliding_window must be positive", src);

  if (has(j, "bos_token_id")) c.bos_token_id = get_int(j, "bos_token_id", src);
  if (has(j, "pad_token_id")) c.pad_token_id = get_int(j, "pad_token_id", src);
  if (has(j, "eos_token_id")) {
    const json& e = j.at("eos_token_id");
    if (e.is_array()) {
      for (const auto& x : e) {
        if (!x.is_number_integer()) fail("{}: eos_token_id list must hold integers, found {}", src, x.dump());
        c.eos_token_ids.push_back(x.get<int64_t>());
      }
    } else {
      c.eos_token_ids.push_back(get_int(j, "eos_token_id", src));
    }
  }
  c.dtype = has(j, "dtype") ? get_str(j, "dtype", src, "float32") : get_str(j, "torch_dtype", src, "float32");
  return c;
}

ModelConfig ModelConfig::from_file(const fs::path& path) {
  std::string text = io::read_text_file(path);
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    fail("{}: invalid JSON ({})", path.string(), e.what());
  }
  return from_json(j, path.string());
}

json ModelConfig::to_json() const {
  json j = raw.is_object() ? raw : json::object();
  std::string arch = model_type == "llama" ? "LlamaForCausalLM" : model_type == "mistral" ? "MistralForCausalLM"
                                                                                          : "Qwen2ForCausalLM";
  j["architectures"] = architectures.empty() ? std::vector<std::string>{arch} : architectures;
  j["model_type"] = model_type;
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["hidden_act"] = hidden_act;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["initializer_range"] = initializer_range;
  j["tie_word_embeddings"] = tie_word_embeddings;
  // Both spellings: v5 reads rope_parameters (or rope_scaling if set), v4 and llama.cpp read rope_theta/rope_scaling.
  j["rope_parameters"] = rope.to_json();
  j["rope_theta"] = rope.theta;
  if (rope.type == "default") {
    j["rope_scaling"] = nullptr;
  } else {
    j["rope_scaling"] = rope.to_json();
    j["rope_scaling"].erase("rope_theta");
  }
  if (model_type == "llama") {
    j["attention_bias"] = attention_bias;
    j["mlp_bias"] = mlp_bias;
  }
  if (model_type == "mistral") j["sliding_window"] = sliding_window ? json(*sliding_window) : json(nullptr);
  if (model_type == "qwen2") {
    j["use_sliding_window"] = sliding_window.has_value();
    if (sliding_window) {
      j["sliding_window"] = *sliding_window;
      std::vector<std::string> lt;
      for (bool s : layer_sliding) lt.push_back(s ? "sliding_attention" : "full_attention");
      j["layer_types"] = lt;
    }
  }
  j["bos_token_id"] = bos_token_id ? json(*bos_token_id) : json(nullptr);
  j["pad_token_id"] = pad_token_id ? json(*pad_token_id) : json(nullptr);
  if (eos_token_ids.empty())
    j["eos_token_id"] = nullptr;
  else if (eos_token_ids.size() == 1)
    j["eos_token_id"] = eos_token_ids[0];
  else
    j["eos_token_id"] = eos_token_ids;
  j["dtype"] = dtype;
  j["torch_dtype"] = dtype;
  j.erase("transformers_version");  // not written by transformers, so do not claim it was
  return j;
}

torch::ScalarType ModelConfig::torch_dtype() const {
  if (dtype == "bfloat16") return torch::kBFloat16;
  if (dtype == "float16" || dtype == "half") return torch::kHalf;
  return torch::kFloat;
}

}  // namespace llmtune::model
