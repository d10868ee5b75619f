// Reading GPTQ/AWQ checkpoints: config.json's quantization_config, the per-module packed tensors
// (formats.md §8.2, §8.3) and LinearGroupQuant, the frozen linear that dequantizes on the fly.
// Used by `eval`/`generate` and as the frozen base a LoRA adapter trains over (sft).
#include <cctype>
#include <fstream>
#include <set>

#include <fmt/ranges.h>

#include "core/core.h"
#include "io/io.h"
#include "quant/quant.h"
#include "quant/quant_impl.h"

namespace llmtune::quant {

LinearGroupQuantImpl::LinearGroupQuantImpl(GroupQuantized gq, torch::Tensor b, torch::ScalarType compute, std::string m)
    : g(std::move(gq)), compute_dtype(compute), method(std::move(m)) {
  if (b.defined()) bias = register_parameter("bias", b, false);
}

torch::Tensor LinearGroupQuantImpl::forward(const torch::Tensor& x) {
  auto w = g.dequantize().to(compute_dtype);  // [out, in]
  auto y = torch::matmul(x.to(compute_dtype), w.t());
  if (bias.defined()) y = y + bias.to(y.scalar_type());
  return y.to(x.scalar_type());
}

std::shared_ptr<model::DenseLinearImpl> LinearGroupQuantImpl::to_dense(torch::ScalarType dtype) const {
  auto d = std::make_shared<model::DenseLinearImpl>(in_features(), out_features(), bias.defined(),
                                                    torch::TensorOptions().dtype(dtype));
  torch::NoGradGuard ng;
  d->weight.copy_(g.dequantize());
  d->weight.set_requires_grad(false);
  if (bias.defined()) d->bias.copy_(bias.detach());
  return d;
}

void LinearGroupQuantImpl::pretty_print(std::ostream& os) const {
  os << fmt::format("LinearGroupQuant(in={}, out={}, {} {}-bit, group={})", in_features(), out_features(), method,
                    g.bits, g.group_size);
}

nlohmann::json GroupQuantConfig::to_json() const {
  if (method == "awq")
    return {{"quant_method", "awq"}, {"zero_point", true},        {"group_size", group_size},
            {"bits", bits},          {"version", "gemm"},         {"modules_to_not_convert", nullptr}};
  return {{"quant_method", "gptq"},  {"bits", bits},          {"group_size", group_size},
          {"damp_percent", 0.01},    {"desc_act", desc_act},  {"static_groups", false},
          {"sym", sym},              {"true_sequential", true}, {"checkpoint_format", v2 ? "gptq_v2" : "gptq"},
          {"model_name_or_path", nullptr}, {"model_file_base_name", "model"}};
}

GroupQuantConfig GroupQuantConfig::from_json(const nlohmann::json& q, const std::string& src) {
  GroupQuantConfig c;
  try {
    c.method = q.value("quant_method", std::string());
    if (c.method != "gptq" && c.method != "awq") fail("{}: quant_method \"{}\" is not gptq or awq", src, c.method);
    c.bits = q.value("bits", q.value("w_bit", 4));
    c.group_size = q.value("group_size", q.value("q_group_size", int64_t{128}));
    if (c.method == "gptq") {
      c.sym = q.value("sym", true);
      c.desc_act = q.value("desc_act", false);
      std::string fmt_name = q.value("checkpoint_format", q.value("format", std::string("gptq")));
      if (fmt_name == "gptq_v2") c.v2 = true;
      else if (fmt_name != "gptq")
        fail("{}: checkpoint_format \"{}\" is not supported (gptq, gptq_v2)", src, fmt_name);
      if (c.bits != 4 && c.bits != 8 && c.bits != 2) fail("{}: bits {} is not supported (4 or 8)", src, c.bits);
    } else {
      std::string v = q.value("version", std::string("gemm"));
      for (auto& ch : v) ch = static_cast<char>(std::tolower(ch));
      if (v != "gemm") fail("{}: AWQ version \"{}\" is not supported; llmtune reads the GEMM packing", src, v);
      if (!q.value("zero_point", true)) fail("{}: AWQ without zero_point is not supported", src);
      if (c.bits != 4) fail("{}: AWQ bits {} is not supported (4)", src, c.bits);
      c.sym = false;  // AWQ always has zero points
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: {}", src, e.what());
  }
  return c;
}

std::string GroupQuantConfig::describe() const {
  std::string s = fmt::format("{} {}-bit, group {}", method, bits, group_size == -1 ? std::string("per row") : std::to_string(group_size));
  if (method == "gptq") s += fmt::format(", {}{}{}", sym ? "symmetric" : "asymmetric", desc_act ? ", act-order" : "",
                                         v2 ? ", gptq_v2 zeros" : "");
  else s += ", GEMM packing";
  return s;
}

std::optional<GroupQuantConfig> checkpoint_group_quant(const fs::path& dir) {
  const auto stored = detail::stored_quantization_config(dir);
  if (!stored) return std::nullopt;
  const std::string method = stored->value("quant_method", std::string());
  if (method != "gptq" && method != "awq") return std::nullopt;
  return GroupQuantConfig::from_json(*stored, (dir / "config.json").string() + ": quantization_config");
}

model::Transformer load_group_quantized(const fs::path& dir, const GroupQuantConfig& c, torch::ScalarType dtype,
                                        torch::Device device) {
  auto cfg = model::ModelConfig::from_file(dir / "config.json");
  io::CheckpointReader reader(dir);
  std::set<std::string> used;
  auto get = [&](const std::string& n) -> torch::Tensor {
    if (!reader.contains(n)) return {};
    used.insert(n);
    return reader.load(n);
  };
  int64_t n_quantized = 0;
  model::LinearFactory factory = [&](const model::LinearSpec& spec) -> model::LinearPtr {
    if (!reader.contains(spec.name + ".qweight")) {
      if (spec.name != "lm_head")
        fail("{}.qweight is missing from {} although config.json says {}; is the checkpoint complete?", spec.name,
             dir.string(), c.method);
      return model::make_dense_linear(spec);
    }
    const auto src = reader.file_of(spec.name + ".qweight").filename().string() + ": " + spec.name;
    auto qw = get(spec.name + ".qweight"), qz = get(spec.name + ".qzeros"), sc = get(spec.name + ".scales");
    GroupQuantized g;
    if (c.method == "awq") {
      g = awq_unpack(qw, qz, sc, c.group_size, spec.in_features, spec.out_features, src);
    } else {
      g = gptq_unpack(qw, qz, sc, get(spec.name + ".g_idx"), c.bits, c.group_size, spec.in_features,
                      spec.out_features, c.v2, src);
    }
    ++n_quantized;
    torch::Tensor bias;
    if (spec.bias) bias = torch::empty({spec.out_features}, spec.options);  // filled by the parameter loop
    auto lin = std::make_shared<LinearGroupQuantImpl>(std::move(g), bias, dtype, c.method);
    lin->config = c;
    return lin;
  };
  model::Transformer m(cfg, torch::TensorOptions().dtype(dtype).device(device), factory);
  torch::NoGradGuard ng;
  auto names = reader.names();
  for (auto& item : m->named_parameters()) {
    const std::string& name = item.key();
    if (!reader.contains(name)) {
      auto hint = closest_match(name, names);
      fail("{} is missing from checkpoint {}{}", name, dir.string(),
           hint ? fmt::format(" (closest stored name: {})", *hint) : "");
    }
    if (reader.info(name).shape != item.value().sizes().vec())
      fail("{} in {} has shape [{}] but config.json implies [{}]", name, dir.string(), fmt::join(reader.info(name).shape, ", "),
           fmt::join(item.value().sizes(), ", "));
    item.value().copy_(get(name));
  }
  std::vector<std::string> unexpected;
  for (const auto& n : names) {
    if (used.count(n) || n.find("rotary_emb.inv_freq") != std::string::npos) continue;
    if (n == "lm_head.weight" && cfg.tie_word_embeddings) continue;
    unexpected.push_back(n);
  }
  if (!unexpected.empty())
    fail("checkpoint {} has {} tensor(s) the model does not use, e.g. {}", dir.string(), unexpected.size(), unexpected[0]);
  m->eval();
  log::info(fmt::format("quant: {} linears read as {} {}-bit, group {}", n_quantized, c.method, c.bits, c.group_size));
  return m;
}

}  // namespace llmtune::quant
