// Loading a Llama-family checkpoint with quantized linears: the model's linear factory reads each
// targeted weight as the Transformer is built and returns a Linear4bit/Linear8bit (quantized from
// the stored 16/32-bit tensor, or read as bitsandbytes saved it), so only one layer's weight is
// ever held in full precision. Everything else loads as in model::load_pretrained (strict names and
// shapes). Also: writing bitsandbytes' HF layout, memory accounting and the base fingerprint.
#include <fstream>
#include <set>

#include <fmt/ranges.h>

#include "core/core.h"
#include "io/io.h"
#include "quant/quant.h"
#include "quant/quant_impl.h"

namespace llmtune::quant {

namespace {

std::string dtype_name(torch::ScalarType t) {
  return t == torch::kBFloat16 ? "bfloat16" : t == torch::kHalf ? "float16" : "float32";
}
torch::ScalarType dtype_from_name(const std::string& s, const std::string& where) {
  if (s == "bfloat16" || s == "bf16") return torch::kBFloat16;
  if (s == "float16" || s == "fp16") return torch::kHalf;
  if (s == "float32" || s == "fp32") return torch::kFloat;
  fail("{}: compute dtype \"{}\" is not supported (bfloat16, float16, float32)", where, s);
}
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
std::string shape_str(const std::vector<int64_t>& s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

bool skipped(const std::string& name, const QuantOptions& o) {
  if (name == "lm_head") return true;
  for (const auto& s : o.skip_modules)
    if (name == s || ends_with(name, "." + s)) return true;
  return false;
}

}  // namespace

nlohmann::json QuantOptions::to_json() const {
  nlohmann::json j = {{"quant_method", "bitsandbytes"},
                      {"load_in_4bit", bits == Bits::four},
                      {"load_in_8bit", bits == Bits::eight},
                      {"bnb_4bit_quant_type", to_string(type)},
                      {"bnb_4bit_use_double_quant", double_quant},
                      {"bnb_4bit_compute_dtype", dtype_name(compute_dtype)},
                      {"bnb_4bit_quant_storage", "uint8"},
                      {"llm_int8_skip_modules", skip_modules.empty() ? nlohmann::json(nullptr) : nlohmann::json(skip_modules)}};
  return j;
}

QuantOptions QuantOptions::from_json(const nlohmann::json& j, const std::string& source) {
  QuantOptions o;
  try {
    o.bits = j.value("load_in_4bit", false) ? Bits::four : j.value("load_in_8bit", false) ? Bits::eight : Bits::none;
    o.type = quant_type_from_string(j.value("bnb_4bit_quant_type", std::string("fp4")), source);
    o.double_quant = j.value("bnb_4bit_use_double_quant", false);
    auto cd = j.value("bnb_4bit_compute_dtype", nlohmann::json("float32"));
    o.compute_dtype = dtype_from_name(cd.is_string() ? cd.get<std::string>() : "float32", source);
    if (j.contains("llm_int8_skip_modules") && j["llm_int8_skip_modules"].is_array())
      o.skip_modules = j["llm_int8_skip_modules"].get<std::vector<std::string>>();
    if (j.contains("blocksize")) o.blocksize = j["blocksize"].get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    fail("{}: quantization_config: {}", source, e.what());
  }
  return o;
}

namespace detail {
std::optional<nlohmann::json> stored_quantization_config(const fs::path& dir) {
  std::ifstream f(dir / "config.json");
  if (!f) return std::nullopt;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (...) {
    return std::nullopt;
  }
  if (!j.contains("quantization_config")) return std::nullopt;
  return j["quantization_config"];
}
}  // namespace detail

std::optional<QuantOptions> checkpoint_quantization(const fs::path& dir) {
  const auto stored = detail::stored_quantization_config(dir);
  if (!stored) return std::nullopt;
  const auto& q = *stored;
  const std::string src = (dir / "config.json").string();
  const std::string method = q.value("quant_method", std::string());
  if (method == "gptq" || method == "awq") return std::nullopt;  // checkpoint_group_quant reads those
  if (method != "bitsandbytes")
    fail("{}: quantization_config.quant_method \"{}\" is not supported; llmtune reads bitsandbytes 4-bit "
         "checkpoints (or quantizes 16-bit ones itself with load_in_4bit)", src, q.value("quant_method", std::string("?")));
  auto o = QuantOptions::from_json(q, src);
  if (o.bits == QuantOptions::Bits::eight)
    fail("{}: this checkpoint was saved 8-bit by bitsandbytes (int8 weights + SCB); reading it is not supported. "
         "Use the original 16-bit checkpoint with load_in_8bit: true", src);
  if (o.bits != QuantOptions::Bits::four) return std::nullopt;
  return o;
}

model::Transformer load_quantized(const fs::path& dir, const QuantOptions& options, torch::ScalarType dtype,
                                  torch::Device device) {
  if (dtype != torch::kFloat && dtype != torch::kBFloat16 && dtype != torch::kHalf)
    fail("unsupported model dtype {}; use float32, bfloat16 or float16", c10::toString(dtype));
  if (!fs::is_directory(dir)) fail("model directory {} does not exist", dir.string());
  if (!fs::exists(dir / "config.json")) fail("{} has no config.json; is it a Hugging Face model directory?", dir.string());
  if (auto gq = checkpoint_group_quant(dir)) {
    if (options.bits == QuantOptions::Bits::eight || options.bits == QuantOptions::Bits::four)
      log::info(fmt::format("{} is stored {} {}-bit; using the stored weights as the frozen base", dir.string(),
                            gq->method, gq->bits));
    return load_group_quantized(dir, *gq, dtype, device);
  }
  auto cfg = model::ModelConfig::from_file(dir / "config.json");
  io::CheckpointReader reader(dir);
  auto stored = checkpoint_quantization(dir);
  QuantOptions o = options;
  if (stored) {
    if (o.bits == QuantOptions::Bits::eight)
      fail("{} is already quantized to 4 bits by bitsandbytes; load_in_8bit needs a 16-bit checkpoint", dir.string());
    if (o.bits == QuantOptions::Bits::four && (stored->type != o.type || stored->double_quant != o.double_quant))
      log::warn(fmt::format("{} is stored {}{} by bitsandbytes; the recipe asks for {}{} — using the stored weights",
                            dir.string(), to_string(stored->type), stored->double_quant ? " + double quant" : "",
                            to_string(o.type), o.double_quant ? " + double quant" : ""));
    o.bits = QuantOptions::Bits::four;
    o.type = stored->type;
    o.double_quant = stored->double_quant;
    o.skip_modules = stored->skip_modules;
  }
  if (o.bits == QuantOptions::Bits::none) fail("load_quantized: no quantization requested (load_in_4bit or load_in_8bit)");

  std::set<std::string> used;
  auto get = [&](const std::string& n) -> torch::Tensor {
    if (!reader.contains(n)) return {};
    used.insert(n);
    return reader.load(n);
  };
  int64_t n_quantized = 0, n_read = 0;
  model::LinearFactory factory = [&](const model::LinearSpec& spec) -> model::LinearPtr {
    if (skipped(spec.name, o)) return model::make_dense_linear(spec);
    const std::string wn = spec.name + ".weight";
    if (!reader.contains(wn))
      fail("{} is missing from checkpoint {}; config.json implies shape [{}, {}]", wn, dir.string(), spec.out_features,
           spec.in_features);
    torch::Tensor bias;
    if (spec.bias) bias = torch::empty({spec.out_features}, spec.options);  // filled by the parameter loop below
    const auto& info = reader.info(wn);
    const std::vector<int64_t> want = {spec.out_features, spec.in_features};
    if (info.dtype == "U8") {
      if (o.bits != QuantOptions::Bits::four)
        fail("{} in {} is stored as packed uint8 but config.json has no bitsandbytes 4-bit quantization_config",
             wn, reader.file_of(wn).filename().string());
      auto st = state_from_tensors(wn, get, reader.file_of(wn).string());
      if (st.shape != want)
        fail("{} in {} has quantized shape {} but config.json implies {}", wn, reader.file_of(wn).filename().string(),
             shape_str(st.shape), shape_str(want));
      ++n_read;
      return std::make_shared<Linear4bitImpl>(st.to(device), bias, o.compute_dtype);
    }
    if (info.shape != want)
      fail("{} in {} has shape {} but config.json implies {}", wn, reader.file_of(wn).filename().string(),
           shape_str(info.shape), shape_str(want));
    auto w = get(wn);
    if (!w.is_floating_point()) fail("{} in {} has dtype {}; expected a float tensor", wn, reader.file_of(wn).string(), info.dtype);
    w = w.to(dtype);  // as transformers does: cast to the load dtype, then quantize
    ++n_quantized;
    if (o.bits == QuantOptions::Bits::eight)
      return std::make_shared<Linear8bitImpl>(w.to(device), bias, o.compute_dtype);
    return std::make_shared<Linear4bitImpl>(quantize_4bit(w, o.type, o.double_quant, o.blocksize).to(device), bias,
                                            o.compute_dtype);
  };
  model::Transformer m(cfg, torch::TensorOptions().dtype(dtype).device(device), factory);

  auto names = reader.names();
  torch::NoGradGuard ng;
  for (auto& item : m->named_parameters()) {
    const std::string& name = item.key();
    torch::Tensor& p = item.value();
    if (!reader.contains(name)) {
      auto hint = closest_match(name, names);
      fail("{} is missing from checkpoint {}{}; config.json implies shape {} ({})", name, dir.string(),
           hint ? fmt::format(" (closest stored name: {})", *hint) : "", shape_str(p.sizes().vec()),
           m->shape_explanation(name));
    }
    const auto& info = reader.info(name);
    if (info.shape != p.sizes().vec())
      fail("{} in {} has shape {} but config.json implies {} ({})", name, reader.file_of(name).filename().string(),
           shape_str(info.shape), shape_str(p.sizes().vec()), m->shape_explanation(name));
    p.copy_(get(name));
  }
  std::vector<std::string> unexpected;
  for (const auto& n : names) {
    if (used.count(n) || ends_with(n, "rotary_emb.inv_freq")) continue;
    if (n == "lm_head.weight" && cfg.tie_word_embeddings) continue;
    unexpected.push_back(n);
  }
  if (!unexpected.empty())
    fail("checkpoint {} has {} tensor(s) the model does not use, e.g. {}; is config.json from another model?",
         dir.string(), unexpected.size(), fmt::join(std::vector<std::string>(unexpected.begin(), unexpected.begin() + std::min<size_t>(3, unexpected.size())), ", "));
  m->eval();
  const int64_t qbytes = quantized_weight_bytes(*m);
  log::info(fmt::format("quant: {} linears {} ({}{}, block {}, compute {}); quantized weights hold {:.1f} MiB",
                        n_quantized + n_read, n_read ? "read as saved by bitsandbytes" : "quantized at load time",
                        o.bits == QuantOptions::Bits::eight ? "int8 per-row" : to_string(o.type),
                        o.bits == QuantOptions::Bits::four && o.double_quant ? " + double quant" : "", o.blocksize,
                        c10::toString(o.compute_dtype), static_cast<double>(qbytes) / (1 << 20)));
  return m;
}

void save_quantized(model::TransformerImpl& model, const fs::path& dir, const QuantOptions& options) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::set<std::string> covered;
  for (const auto& name : model.linear_names()) {
    auto lin = model.get_linear(name);
    auto q = std::dynamic_pointer_cast<Linear4bitImpl>(lin);
    if (!q) {
      if (!std::dynamic_pointer_cast<model::DenseLinearImpl>(lin))
        fail("save_quantized: {} is neither a 4-bit nor a plain linear (merge adapters first)", name);
      continue;
    }
    for (auto& kv : state_to_tensors(q->state, name + ".weight")) tensors.push_back(kv);
    covered.insert(name + ".weight");
  }
  for (const auto& item : model.named_parameters()) {
    if (covered.count(item.key())) continue;
    tensors.emplace_back(item.key(), item.value().detach().to(torch::kCPU).contiguous());
  }
  fs::create_directories(dir);
  io::checkpoint_save(dir, tensors);
  auto cfg = model.config().to_json();
  auto qc = options.to_json();
  qc["load_in_4bit"] = true;
  qc["load_in_8bit"] = false;
  cfg["quantization_config"] = qc;
  std::ofstream f(dir / "config.json");
  f << cfg.dump(2) << "\n";
  if (!f) fail("cannot write {}", (dir / "config.json").string());
}

std::vector<std::string> quantized_linears(const model::TransformerImpl& model) {
  std::vector<std::string> out;
  for (const auto& item : model.named_modules("", false)) {
    const auto& m = item.value();
    if (!std::dynamic_pointer_cast<Linear4bitImpl>(m) && !std::dynamic_pointer_cast<Linear8bitImpl>(m) &&
        !std::dynamic_pointer_cast<LinearGroupQuantImpl>(m))
      continue;
    std::string n = item.key();
    if (ends_with(n, ".base_layer")) n = n.substr(0, n.size() - 11);
    out.push_back(n);
  }
  return out;
}

int64_t quantized_weight_bytes(const model::TransformerImpl& model) {
  int64_t b = 0;
  for (const auto& item : model.named_modules("", false)) {
    if (auto q = std::dynamic_pointer_cast<Linear4bitImpl>(item.value())) b += q->state.bytes();
    else if (auto q8 = std::dynamic_pointer_cast<Linear8bitImpl>(item.value())) b += q8->qweight.numel() + q8->scale.numel() * 4;
    else if (auto g = std::dynamic_pointer_cast<LinearGroupQuantImpl>(item.value()))
      b += g->g.q.numel() * g->g.bits / 8 + g->g.scales.numel() * 2 + g->g.zeros.numel() * g->g.bits / 8;
  }
  return b;
}

uint64_t quantized_fingerprint(const model::TransformerImpl& model) {
  uint64_t h = 1469598103934665603ULL;
  auto mix = [&](const torch::Tensor& t) {
    auto c = t.to(torch::kCPU).contiguous();
    const auto* p = static_cast<const uint8_t*>(c.data_ptr());
    const size_t n = static_cast<size_t>(c.numel()) * c.element_size();
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  };
  for (const auto& item : model.named_modules("", false)) {
    if (auto q = std::dynamic_pointer_cast<Linear4bitImpl>(item.value())) {
      mix(q->state.packed);
      mix(q->absmax);
    } else if (auto q8 = std::dynamic_pointer_cast<Linear8bitImpl>(item.value())) {
      mix(q8->qweight);
      mix(q8->scale);
    } else if (auto g = std::dynamic_pointer_cast<LinearGroupQuantImpl>(item.value())) {
      mix(g->g.q);
      mix(g->g.scales);
      mix(g->g.zeros);
      mix(g->g.g_idx);  // act-order: the same codes under another column-to-group map are another base
    }
  }
  return h;
}

std::string BaseRecord::describe() const {
  if (group_quant) return group_quant->describe();
  if (options.bits == QuantOptions::Bits::eight)
    return fmt::format("bitsandbytes int8 per-row, compute {}", c10::toString(options.compute_dtype));
  return fmt::format("bitsandbytes {}{}, compute {}", to_string(options.type), options.double_quant ? " + double quant" : "",
                     c10::toString(options.compute_dtype));
}

void write_base_record(const fs::path& dir, const BaseRecord& r) {
  nlohmann::json j = {{"base_model_name_or_path", r.base_model}};
  if (r.group_quant) {  // a GPTQ/AWQ checkpoint: its own quantization_config (what was trained against)
    auto qc = r.group_quant->to_json();
    for (const char* k : {"damp_percent", "model_name_or_path", "model_file_base_name"}) qc.erase(k);  // not properties of the weights
    j["quantization_config"] = qc;
  } else {
    j["quantization_config"] = r.options.to_json();
    j["blocksize"] = r.options.blocksize;
  }
  j["quantized_fingerprint"] = fmt::format("{:016x}", r.fingerprint);
  j["quantized_linears"] = r.n_quantized;
  j["note"] = r.group_quant
                  ? "this adapter was trained against the stored GPTQ/AWQ checkpoint described here; merge it into that "
                    "checkpoint dequantized (llmtune merge --base THAT_DIR does), not into the original 16-bit weights"
                  : "this adapter was trained against the quantized base described here; merge it into that base "
                    "dequantized (llmtune merge does), not into the original 16-bit weights";
  fs::create_directories(dir);
  std::ofstream f(dir / "llmtune_qlora.json");
  f << j.dump(2) << "\n";
  if (!f) fail("cannot write {}", (dir / "llmtune_qlora.json").string());
}

std::optional<BaseRecord> read_base_record(const fs::path& dir) {
  const fs::path p = dir / "llmtune_qlora.json";
  if (!fs::exists(p)) return std::nullopt;
  try {
    auto j = nlohmann::json::parse(std::ifstream(p));
    BaseRecord r;
    r.base_model = j.value("base_model_name_or_path", std::string());
    const auto& qc = j.at("quantization_config");
    const std::string method = qc.value("quant_method", std::string("bitsandbytes"));
    if (method == "gptq" || method == "awq") {
      r.group_quant = GroupQuantConfig::from_json(qc, p.string() + ": quantization_config");
    } else {
      r.options = QuantOptions::from_json(qc, p.string());
      r.options.blocksize = j.value("blocksize", int64_t{64});
    }
    r.fingerprint = std::stoull(j.value("quantized_fingerprint", std::string("0")), nullptr, 16);
    r.n_quantized = j.value("quantized_linears", int64_t{0});
    return r;
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    fail("{} is not a valid llmtune QLoRA base record: {}", p.string(), e.what());
  }
}

}  // namespace llmtune::quant
