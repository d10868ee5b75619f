// HF checkpoint -> GGUF for llama.cpp's `llama` (Llama, Mistral) and `qwen2` architectures:
// tensor names, the Q/K row permutation (llama only: its RoPE rotates adjacent pairs), model and
// tokenizer metadata, and llama.cpp's per-tensor type policy for the k-quant `_M` mixes
// (formats.md §7.4–7.6). Caveats: sliding-window attention and dynamic/longrope RoPE have no
// llama.cpp equivalent under these architectures (a warning is printed); tokenizer.json files with
// SentencePiece-style BPE and no tokenizer.model are refused.
#include <sentencepiece_processor.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include <fmt/ranges.h>

#include "core/core.h"
#include "export/export.h"
#include "model/model.h"
#include "peft/peft.h"
#include "tokenizer/tokenizer.h"

namespace llmtune::exporter {

namespace {

using nlohmann::json;

// llama.cpp token types (llama_token_type)
constexpr int32_t kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6;

bool use_more_bits(int64_t i, int64_t n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

bool is_quantized(GgmlType t) { return t != GgmlType::F32 && t != GgmlType::F16 && t != GgmlType::BF16; }

// llama.cpp's replacement when a row length is not a multiple of the chosen block size. It uses
// IQ4_NL for q2_K/q3_K, which llmtune does not write; q4_0 has the same 32-element block.
GgmlType fallback_type(GgmlType t) {
  switch (t) {
    case GgmlType::Q2_K: case GgmlType::Q3_K: return GgmlType::Q4_0;
    case GgmlType::Q4_K: return GgmlType::Q5_0;
    case GgmlType::Q5_K: return GgmlType::Q5_1;
    case GgmlType::Q6_K: return GgmlType::Q8_0;
    default: return GgmlType::F16;
  }
}

json read_json(const fs::path& p) {
  std::ifstream f(p);
  if (!f) fail("cannot open {}", p.string());
  try {
    return json::parse(f);
  } catch (const json::exception& e) {
    fail("{}: invalid JSON: {}", p.string(), e.what());
  }
}

// Which llama.cpp pre-tokenizer (tokenizer.ggml.pre) a tokenizer.json's pre_tokenizer matches.
std::string detect_pre(const json& pre, std::vector<std::string>& warnings) {
  const std::string llama3 =
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
  const std::string qwen2 =
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
  auto type = [](const json& j) { return j.is_object() ? j.value("type", std::string()) : std::string(); };
  if (type(pre) == "ByteLevel" && pre.value("use_regex", true)) return "gpt-2";
  if (type(pre) == "Sequence" && pre.contains("pretokenizers")) {
    const auto& seq = pre["pretokenizers"];
    std::string pattern;
    bool digits_individual = false, bytelevel = false;
    for (const auto& p : seq) {
      if (type(p) == "Split" && p.contains("pattern") && p["pattern"].contains("Regex"))
        pattern = p["pattern"]["Regex"].get<std::string>();
      if (type(p) == "Digits" && p.value("individual_digits", false)) digits_individual = true;
      if (type(p) == "ByteLevel") bytelevel = true;
    }
    if (pattern == llama3) return "llama-bpe";
    if (pattern == qwen2) return "qwen2";
    if (pattern.empty() && digits_individual && bytelevel && seq.size() == 2) return "smollm";
  }
  warnings.push_back(
      "the tokenizer's pre-tokenizer is not one llmtune recognises (gpt-2, llama-bpe, qwen2, smollm); wrote "
      "tokenizer.ggml.pre = \"default\", so llama.cpp may split text differently from the original tokenizer");
  return "default";
}

// Byte-level BPE from tokenizer.json ("gpt2" in GGUF): tokens, types, merges, pre-tokenizer name.
void gpt2_vocab(const fs::path& dir, const tok::Tokenizer& tk, int64_t n_vocab, GgufWriter& w,
                std::vector<std::string>& warnings) {
  const auto path = dir / "tokenizer.json";
  const json j = read_json(path);
  const auto& m = j.at("model");
  if (m.value("type", std::string("BPE")) != "BPE") fail("{}: model.type {} is not BPE", path.string(), m["type"].dump());
  std::vector<std::string> tokens(static_cast<size_t>(n_vocab));
  std::vector<int32_t> types(static_cast<size_t>(n_vocab), -1);
  for (const auto& [piece, id_j] : m.at("vocab").items()) {
    const int64_t id = id_j.get<int64_t>();
    if (id >= n_vocab)
      fail("{}: token '{}' has id {} but the model's vocab_size is {}", path.string(), piece, id, n_vocab);
    tokens[size_t(id)] = piece;
    types[size_t(id)] = kNormal;
  }
  if (j.contains("added_tokens"))
    for (const auto& a : j["added_tokens"]) {
      const int64_t id = a.at("id").get<int64_t>();
      if (id >= n_vocab)
        fail("{}: added token '{}' has id {} but the model's vocab_size is {}", path.string(),
             a.at("content").get<std::string>(), id, n_vocab);
      tokens[size_t(id)] = a.at("content").get<std::string>();
      types[size_t(id)] = a.value("special", false) ? kControl : kUserDefined;
    }
  for (int64_t i = 0; i < n_vocab; ++i)
    if (types[size_t(i)] < 0) {
      tokens[size_t(i)] = fmt::format("[PAD{}]", i);
      types[size_t(i)] = kUserDefined;  // as convert_hf_to_gguf.py marks gpt2-vocab gaps
    }
  std::vector<std::string> merges;
  for (const auto& mg : m.value("merges", json::array())) {
    if (mg.is_string()) merges.push_back(mg.get<std::string>());
    else merges.push_back(mg.at(0).get<std::string>() + " " + mg.at(1).get<std::string>());
  }
  w.set("tokenizer.ggml.model", GgufValue::str("gpt2"));
  w.set("tokenizer.ggml.pre", GgufValue::str(detect_pre(j.value("pre_tokenizer", json()), warnings)));
  w.set("tokenizer.ggml.tokens", GgufValue::str_array(std::move(tokens)));
  w.set("tokenizer.ggml.token_type", GgufValue::i32_array(types));
  w.set("tokenizer.ggml.merges", GgufValue::str_array(std::move(merges)));
}

// SentencePiece tokenizer.model ("llama" in GGUF): pieces, scores, types from the model; ids past
// the SentencePiece vocabulary come from the added tokens.
void spm_vocab(const fs::path& dir, const tok::Tokenizer& tk, int64_t n_vocab, GgufWriter& w,
               std::vector<std::string>& warnings) {
  sentencepiece::SentencePieceProcessor sp;
  const auto path = dir / "tokenizer.model";
  auto st = sp.Load(path.string());
  if (!st.ok()) fail("{}: cannot load SentencePiece model: {}", path.string(), st.ToString());
  const int n_sp = sp.GetPieceSize();
  if (n_sp > n_vocab) fail("{}: {} pieces but the model's vocab_size is {}", path.string(), n_sp, n_vocab);
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;
  for (int i = 0; i < n_sp; ++i) {
    tokens.push_back(sp.IdToPiece(i));
    scores.push_back(sp.GetScore(i));
    types.push_back(sp.IsUnknown(i) ? kUnknown : sp.IsControl(i) ? kControl : sp.IsUnused(i) ? kUnused
                    : sp.IsByte(i) ? kByte : kNormal);
  }
  for (int64_t i = n_sp; i < n_vocab; ++i) {
    const std::string t = tk.id_to_token(int32_t(i));
    if (!t.empty()) {
      tokens.push_back(t);
      scores.push_back(-1000.0f);
      types.push_back(tk.is_special(int32_t(i)) ? kControl : kUserDefined);
    } else {
      tokens.push_back(fmt::format("[PAD{}]", i));
      scores.push_back(-1000.0f);
      types.push_back(kUnused);
    }
  }
  // add_dummy_prefix is in the normaliser spec; observable as a leading U+2581 on "a".
  std::vector<std::string> pieces;
  sp.Encode("a", &pieces);
  const bool space_prefix = !pieces.empty() && pieces[0].rfind("\xE2\x96\x81", 0) == 0;
  // llama.cpp's `llama` tokenizer applies no SentencePiece normaliser: it only maps ' ' to U+2581.
  // Models trained with the default nmt_nfkc rule / remove_extra_whitespaces (Llama's own are not)
  // collapse "x  y" and turn "\n" into a space, so llama.cpp would tokenize such text differently.
  pieces.clear();
  sp.Encode("x  y\nz", &pieces);
  std::string joined;
  for (const auto& p : pieces) joined += p;
  const std::string expect = std::string(space_prefix ? "\xE2\x96\x81" : "") + "x\xE2\x96\x81\xE2\x96\x81y";
  if (joined.rfind(expect, 0) != 0 || (joined.find('\n') == std::string::npos && joined.find("<0x0A>") == std::string::npos))
    warnings.push_back(fmt::format(
        "{}: the SentencePiece normaliser rewrites text (collapses repeated spaces or maps newlines); llama.cpp's "
        "`llama` tokenizer does not normalise, so it may tokenize such text differently from the original", path.string()));
  w.set("tokenizer.ggml.model", GgufValue::str("llama"));
  w.set("tokenizer.ggml.pre", GgufValue::str("default"));
  w.set("tokenizer.ggml.tokens", GgufValue::str_array(std::move(tokens)));
  w.set("tokenizer.ggml.scores", GgufValue::f32_array(scores));
  w.set("tokenizer.ggml.token_type", GgufValue::i32_array(types));
  w.set("tokenizer.ggml.add_space_prefix", GgufValue::boolean(space_prefix));
}

void tokenizer_metadata(const fs::path& dir, const model::ModelConfig& cfg, GgufWriter& w,
                        std::vector<std::string>& warnings) {
  auto tk = tok::Tokenizer::load(dir);
  const bool has_json = fs::exists(dir / "tokenizer.json"), has_spm = fs::exists(dir / "tokenizer.model");
  bool bytelevel = false;
  if (has_json) {
    const json j = read_json(dir / "tokenizer.json");
    const std::string s = j.value("pre_tokenizer", json()).dump() + j.value("decoder", json()).dump();
    bytelevel = s.find("ByteLevel") != std::string::npos;
  }
  if (has_json && bytelevel) gpt2_vocab(dir, *tk, cfg.vocab_size, w, warnings);
  else if (has_spm) spm_vocab(dir, *tk, cfg.vocab_size, w, warnings);
  else
    fail("{}: the tokenizer is neither byte-level BPE (tokenizer.json) nor SentencePiece (tokenizer.model); "
         "GGUF export needs one of them", dir.string());
  auto put_id = [&](const char* key, std::optional<int64_t> id) {
    if (id && *id >= 0) w.set(key, GgufValue::u32(uint32_t(*id)));
  };
  const auto& sp = tk->specials();
  put_id("tokenizer.ggml.bos_token_id", sp.bos_id ? std::optional<int64_t>(*sp.bos_id) : cfg.bos_token_id);
  put_id("tokenizer.ggml.eos_token_id", sp.eos_id ? std::optional<int64_t>(*sp.eos_id)
                                        : cfg.eos_token_ids.empty() ? std::nullopt
                                                                    : std::optional<int64_t>(cfg.eos_token_ids[0]));
  put_id("tokenizer.ggml.unknown_token_id", sp.unk_id ? std::optional<int64_t>(*sp.unk_id) : std::nullopt);
  put_id("tokenizer.ggml.padding_token_id", sp.pad_id ? std::optional<int64_t>(*sp.pad_id) : cfg.pad_token_id);
  w.set("tokenizer.ggml.add_bos_token", GgufValue::boolean(tk->add_bos()));
  w.set("tokenizer.ggml.add_eos_token", GgufValue::boolean(tk->add_eos()));
  if (!tk->chat_template().empty()) w.set("tokenizer.chat_template", GgufValue::str(tk->chat_template()));
}

// Rows of a q_proj/k_proj weight or bias, HF half-split head layout -> llama.cpp adjacent pairs.
torch::Tensor permute_rows(const torch::Tensor& t, int64_t n_head) {
  const int64_t rows = t.size(0), d = rows / n_head;
  std::vector<int64_t> shape = {n_head, 2, d / 2};
  for (int64_t i = 1; i < t.dim(); ++i) shape.push_back(t.size(i));
  return t.reshape(shape).transpose(1, 2).reshape(t.sizes()).contiguous();
}

// llama3 RoPE as llama.cpp wants it: per-frequency divisors of the base frequencies.
std::vector<float> llama3_rope_factors(const model::ModelConfig& c) {
  const auto& r = c.rope;
  const double factor = r.factor.value_or(8.0), lo = r.low_freq_factor, hi = r.high_freq_factor;
  const double old_ctx = double(r.original_max_position_embeddings.value_or(8192));
  const double lo_wavelen = old_ctx / lo, hi_wavelen = old_ctx / hi;
  std::vector<float> out;
  for (int64_t i = 0; i < c.head_dim; i += 2) {
    const double freq = 1.0 / std::pow(r.theta, double(i) / double(c.head_dim));
    const double wavelen = 2 * M_PI / freq;
    if (wavelen < hi_wavelen) out.push_back(1.0f);
    else if (wavelen > lo_wavelen) out.push_back(float(factor));
    else {
      const double s = (old_ctx / wavelen - lo) / (hi - lo);
      out.push_back(float(1.0 / ((1 - s) / factor + s)));
    }
  }
  return out;
}

std::string gguf_name(const std::string& hf) {
  static const std::vector<std::pair<std::string, std::string>> inner = {
      {"input_layernorm", "attn_norm"},     {"post_attention_layernorm", "ffn_norm"},
      {"self_attn.q_proj", "attn_q"},       {"self_attn.k_proj", "attn_k"},
      {"self_attn.v_proj", "attn_v"},       {"self_attn.o_proj", "attn_output"},
      {"mlp.gate_proj", "ffn_gate"},        {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"},
  };
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  const std::string pre = "model.layers.";
  if (hf.rfind(pre, 0) == 0) {
    const auto dot = hf.find('.', pre.size());
    const std::string layer = hf.substr(pre.size(), dot - pre.size()), rest = hf.substr(dot + 1);
    for (const auto& [from, to] : inner)
      if (rest.rfind(from + ".", 0) == 0) return "blk." + layer + "." + to + rest.substr(from.size());
  }
  fail("no GGUF name for checkpoint tensor '{}'", hf);
}

}  // namespace

const std::vector<GgufFileType>& gguf_file_types() {
  static const std::vector<GgufFileType> types = {
      {"f32", GgmlType::F32, 0},     {"f16", GgmlType::F16, 1},       {"bf16", GgmlType::BF16, 32},
      {"q8_0", GgmlType::Q8_0, 7},   {"q4_0", GgmlType::Q4_0, 2},     {"q4_1", GgmlType::Q4_1, 3},
      {"q5_0", GgmlType::Q5_0, 8},   {"q5_1", GgmlType::Q5_1, 9},     {"q6_k", GgmlType::Q6_K, 18},
      {"q5_k_m", GgmlType::Q5_K, 17}, {"q4_k_m", GgmlType::Q4_K, 15}, {"q3_k_m", GgmlType::Q3_K, 12},
      {"q2_k", GgmlType::Q2_K, 10},
  };
  return types;
}

const GgufFileType& gguf_file_type(const std::string& name) {
  std::string lower;
  for (char c : name) lower += char(std::tolower(static_cast<unsigned char>(c)));
  std::vector<std::string> names;
  for (const auto& t : gguf_file_types()) {
    if (t.name == lower) return t;
    names.push_back(t.name);
  }
  const auto near = closest_match(lower, names);
  fail("unknown GGUF type '{}'{}; choose one of: {}", name, near ? fmt::format(" (did you mean '{}'?)", *near) : "",
       fmt::join(names, ", "));
}

GgmlType gguf_tensor_type(const GgufFileType& ft, const std::string& name, const TensorTypeContext& c) {
  if (c.n_dims < 2 || name.find("_norm.weight") != std::string::npos || name == "rope_freqs.weight") return GgmlType::F32;
  GgmlType t = ft.base;
  if (is_quantized(ft.base)) {
    const auto f = ft.llama_ftype;
    constexpr uint32_t Q2_K = 10, Q3_K_M = 12, Q4_K_M = 15, Q5_K_M = 17;
    const bool is_output = name == "output.weight" || (!c.has_output && name == "token_embd.weight");
    if (is_output) {
      if (c.ne0 % 256 != 0) t = GgmlType::Q8_0;
      else if (t != GgmlType::Q8_0) t = GgmlType::Q6_K;
    } else if (name.find("attn_v.weight") != std::string::npos) {
      if (f == Q2_K) t = c.n_gqa >= 4 ? GgmlType::Q4_K : GgmlType::Q3_K;
      else if (f == Q3_K_M) t = c.i_attn_v < 2 ? GgmlType::Q5_K : GgmlType::Q4_K;
      else if ((f == Q4_K_M || f == Q5_K_M) && use_more_bits(c.i_attn_v, c.n_attn_v)) t = GgmlType::Q6_K;
    } else if (name.find("ffn_down") != std::string::npos) {
      if (f == Q2_K) t = GgmlType::Q3_K;
      else if (f == Q3_K_M) t = c.i_ffn_down < c.n_ffn_down / 16 ? GgmlType::Q5_K : GgmlType::Q4_K;
      else if ((f == Q4_K_M || f == Q5_K_M) && use_more_bits(c.i_ffn_down, c.n_ffn_down)) t = GgmlType::Q6_K;
    } else if (name.find("attn_output.weight") != std::string::npos) {
      if (f == Q2_K) t = GgmlType::Q3_K;
      else if (f == Q3_K_M) t = GgmlType::Q4_K;
    }
  }
  if (c.ne0 % ggml_type_info(t).block != 0) {
    t = fallback_type(t);
    if (c.ne0 % ggml_type_info(t).block != 0) t = GgmlType::F16;
  }
  return t;
}

GgufExportReport export_gguf(const GgufExportOptions& o) {
  const double t0 = now_seconds();
  GgufExportReport rep;
  const auto& ft = gguf_file_type(o.type);
  const fs::path dir = o.model_dir;
  if (!fs::exists(dir / "config.json")) fail("{}: no config.json; --model must be a Hugging Face checkpoint directory", dir.string());
  auto cfg = model::ModelConfig::from_file(dir / "config.json");
  std::string arch;
  if (cfg.model_type == "llama" || cfg.model_type == "mistral") arch = "llama";
  else if (cfg.model_type == "qwen2") arch = "qwen2";
  else fail("{}: model_type '{}' has no GGUF export yet (llama, mistral, qwen2)", (dir / "config.json").string(), cfg.model_type);

  auto model = model::load_pretrained(dir, torch::kFloat);
  model->eval();
  if (!o.adapters.empty()) peft::merge_adapters(*model, o.adapters);
  cfg = model->config();  // a merge may switch bias flags on
  torch::NoGradGuard ng;
  const auto sd = model::hf_state_dict(*model, torch::kFloat);

  GgufWriter w;
  const std::string a = arch + ".";
  w.set("general.architecture", GgufValue::str(arch));
  w.set("general.type", GgufValue::str("model"));
  w.set("general.name", GgufValue::str(o.name.empty() ? fs::absolute(dir).lexically_normal().filename().string() : o.name));
  w.set(a + "vocab_size", GgufValue::u32(uint32_t(cfg.vocab_size)));
  w.set(a + "context_length", GgufValue::u32(uint32_t(cfg.max_position_embeddings)));
  w.set(a + "embedding_length", GgufValue::u32(uint32_t(cfg.hidden_size)));
  w.set(a + "block_count", GgufValue::u32(uint32_t(cfg.num_hidden_layers)));
  w.set(a + "feed_forward_length", GgufValue::u32(uint32_t(cfg.intermediate_size)));
  w.set(a + "attention.head_count", GgufValue::u32(uint32_t(cfg.num_attention_heads)));
  w.set(a + "attention.head_count_kv", GgufValue::u32(uint32_t(cfg.num_key_value_heads)));
  w.set(a + "attention.layer_norm_rms_epsilon", GgufValue::f32(float(cfg.rms_norm_eps)));
  w.set(a + "attention.key_length", GgufValue::u32(uint32_t(cfg.head_dim)));
  w.set(a + "attention.value_length", GgufValue::u32(uint32_t(cfg.head_dim)));
  w.set(a + "rope.dimension_count", GgufValue::u32(uint32_t(cfg.head_dim)));
  w.set(a + "rope.freq_base", GgufValue::f32(float(cfg.rope.theta)));
  const auto& rope = cfg.rope;
  if (rope.type == "linear") {
    w.set(a + "rope.scaling.type", GgufValue::str("linear"));
    w.set(a + "rope.scaling.factor", GgufValue::f32(float(rope.factor.value_or(1.0))));
  } else if (rope.type == "yarn") {
    w.set(a + "rope.scaling.type", GgufValue::str("yarn"));
    w.set(a + "rope.scaling.factor", GgufValue::f32(float(rope.factor.value_or(1.0))));
    if (rope.original_max_position_embeddings)
      w.set(a + "rope.scaling.original_context_length", GgufValue::u32(uint32_t(*rope.original_max_position_embeddings)));
  } else if (rope.type != "default" && rope.type != "llama3") {
    rep.warnings.push_back(fmt::format("rope type '{}' has no llama.cpp equivalent; the GGUF uses plain RoPE, so "
                                       "outputs differ beyond the original context length", rope.type));
  }
  if (cfg.sliding_window && *cfg.sliding_window < cfg.max_position_embeddings)
    rep.warnings.push_back(fmt::format("sliding_window {} is not expressed in GGUF for '{}'; llama.cpp attends to the "
                                       "full context (same results for prompts up to {} tokens)",
                                       *cfg.sliding_window, arch, *cfg.sliding_window));
  w.set("general.file_type", GgufValue::u32(ft.llama_ftype));
  w.set("general.quantization_version", GgufValue::u32(2));
  tokenizer_metadata(dir, cfg, w, rep.warnings);

  // Tensors: token_embd, then each layer in order, output_norm, output (the order llama.cpp's
  // quantizer counts attn_v / ffn_down in), rope_freqs for llama3 scaling.
  std::map<std::string, torch::Tensor> by_name(sd.begin(), sd.end());
  const bool has_output = by_name.count("lm_head.weight") > 0;
  std::vector<std::string> order = {"model.embed_tokens.weight"};
  const char* parts[] = {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
                         "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                         "self_attn.v_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
                         "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.gate_proj.bias",
                         "mlp.up_proj.weight", "mlp.up_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias"};
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (const char* p : parts) order.push_back(fmt::format("model.layers.{}.{}", l, p));
  order.push_back("model.norm.weight");
  if (has_output) order.push_back("lm_head.weight");
  size_t used = 0;
  TensorTypeContext ctx;
  ctx.n_attn_v = ctx.n_ffn_down = cfg.num_hidden_layers;
  ctx.n_gqa = cfg.num_attention_heads / std::max<int64_t>(cfg.num_key_value_heads, 1);
  ctx.has_output = has_output;
  auto emit = [&](const std::string& gname, torch::Tensor t) {
    t = t.to(torch::kFloat).contiguous();
    ctx.ne0 = t.size(-1);
    ctx.n_dims = t.dim();
    const GgmlType type = gguf_tensor_type(ft, gname, ctx);
    std::vector<uint8_t> bytes(size_t(ggml_row_bytes(type, t.size(-1)) * (t.numel() / t.size(-1))));
    ggml_quantize(type, t.data_ptr<float>(), t.numel(), bytes.data());
    rep.n_params += t.numel();
    rep.file_bytes += int64_t(bytes.size());
    rep.type_counts[ggml_type_info(type).name]++;
    w.add_tensor(gname, t.sizes().vec(), type, std::move(bytes));
  };
  ProgressBar bar("quantize", int64_t(order.size()), "tensors");
  for (const auto& hf : order) {
    bar.update(1);
    auto it = by_name.find(hf);
    if (it == by_name.end()) continue;
    ++used;
    torch::Tensor t = it->second;
    const std::string gname = gguf_name(hf);
    if (arch == "llama" && hf.find("self_attn.q_proj.") != std::string::npos) t = permute_rows(t, cfg.num_attention_heads);
    if (arch == "llama" && hf.find("self_attn.k_proj.") != std::string::npos) t = permute_rows(t, cfg.num_key_value_heads);
    emit(gname, t);
    if (gname.find("attn_v.weight") != std::string::npos) ++ctx.i_attn_v;
    if (gname.find("ffn_down.weight") != std::string::npos) ++ctx.i_ffn_down;
  }
  bar.finish();
  if (used != sd.size()) {
    std::vector<std::string> left;
    for (const auto& [k, v] : sd)
      if (std::find(order.begin(), order.end(), k) == order.end()) left.push_back(k);
    fail("GGUF export: checkpoint tensors without a GGUF mapping: {}", fmt::join(left, ", "));
  }
  if (rope.type == "llama3") {
    auto f = llama3_rope_factors(cfg);
    emit("rope_freqs.weight", torch::from_blob(f.data(), {int64_t(f.size())}, torch::kFloat).clone());
  }
  for (const auto& [k, n] : rep.type_counts) rep.n_tensors += n;
  w.write(o.out);
  rep.bits_per_weight = rep.n_params ? 8.0 * double(rep.file_bytes) / double(rep.n_params) : 0.0;
  rep.file_bytes = int64_t(fs::file_size(o.out));
  rep.seconds = now_seconds() - t0;
  return rep;
}

}  // namespace llmtune::exporter
