// The LoRA wrapper and everything that installs or removes it: applying to targeted linears,
// freezing (adapter / bias modes / modules_to_save / unfrozen_parameters), trainable statistics
// and merging back into plain dense linears. Adapter weights live in fp32 whatever the base dtype.
#include <cmath>
#include <regex>

#include "core/core.h"
#include "model/half_compute.h"
#include "peft/methods_impl.h"
#include "peft/peft.h"

namespace llmtune::peft {

LoraLinearImpl::LoraLinearImpl(model::LinearPtr base, int64_t r_, double scaling_, double dropout_,
                               std::optional<uint64_t> seed)
    : base_layer(std::move(base)), r(r_), scaling(scaling_), dropout(dropout_) {
  if (!base_layer) fail("LoRA: base layer is null");
  if (r <= 0) fail("LoRA rank r must be positive (got {})", r);
  auto o = torch::TensorOptions().dtype(torch::kFloat).device(linear_device(base_layer));
  register_module("base_layer", base_layer);
  lora_A = register_module("lora_A", std::make_shared<model::DenseLinearImpl>(in_features(), r, false, o));
  lora_B = register_module("lora_B", std::make_shared<model::DenseLinearImpl>(r, out_features(), false, o));
  torch::NoGradGuard ng;
  // kaiming_uniform_(a=sqrt(5)) on [r, in]: gain sqrt(2/(1+5)), bound gain*sqrt(3/in) = 1/sqrt(in).
  double bound = 1.0 / std::sqrt(static_cast<double>(in_features()));
  if (seed) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(*seed);
    lora_A->weight.copy_(torch::empty({r, in_features()}).uniform_(-bound, bound, gen));
  } else {
    lora_A->weight.copy_(torch::empty({r, in_features()}).uniform_(-bound, bound));
  }
  lora_B->weight.zero_();
}

std::shared_ptr<model::DenseLinearImpl> LoraLinearImpl::dense_base() const {
  if (auto d = std::dynamic_pointer_cast<model::DenseLinearImpl>(base_layer)) return d;
  if (auto l = std::dynamic_pointer_cast<LoraLinearImpl>(base_layer)) return l->dense_base();
  fail("LoRA: base layer {} is neither dense nor LoRA (quantized bases need their own merge)", base_layer->name());
}

torch::Tensor LoraLinearImpl::forward(const torch::Tensor& x) {
  if (disabled) return base_layer->forward(x);
  if (is_dora()) return dora_forward(x);
  auto y = base_layer->forward(x);
  const auto act = x.scalar_type();
  if (is_training() && (act == torch::kBFloat16 || act == torch::kHalf) &&
      !model::detail::half_products_in_fp32(act, x.device())) {
    // Mixed precision as torch.autocast does it: the fp32 adapter weights are cast to the
    // activation dtype for the two thin products, so no fp32 copy of x or y is made (or kept for
    // backward); gradients reach the fp32 weights through the casts. Evaluation and generation
    // keep the fp32 path below (PEFT's numerics). Where half products are slow (no native bf16),
    // the fp32 path is the faster one anyway.
    // The scaling goes into the thin B ([out, r]) rather than onto the [tokens, out] product, which
    // saves a pass over that product in backward.
    auto h = dropout > 0 ? torch::dropout(x, dropout, true) : x;
    auto delta = torch::linear(torch::linear(h, lora_A->weight.to(act)), (lora_B->weight * scaling).to(act));
    return y.add(delta);
  }
  auto h = x.to(lora_A->weight.scalar_type());
  if (dropout > 0 && is_training()) h = torch::dropout(h, dropout, true);
  auto delta = lora_B->forward(lora_A->forward(h)) * scaling;
  return (y.to(delta.scalar_type()) + delta).to(y.scalar_type());
}

DisabledAdapters::DisabledAdapters(torch::nn::Module& model) {
  for (const auto& m : model.modules(/*include_self=*/false))
    if (auto l = std::dynamic_pointer_cast<LoraLinearImpl>(m)) {
      saved_.emplace_back(l, l->disabled);
      l->disabled = true;
    }
}

DisabledAdapters::~DisabledAdapters() {
  for (auto& [l, was] : saved_) l->disabled = was;
}

torch::Tensor LoraLinearImpl::merged_weight_fp32() const {
  torch::Tensor w;
  if (auto l = std::dynamic_pointer_cast<LoraLinearImpl>(base_layer)) w = l->merged_weight_fp32();
  else w = dense_base()->weight.detach().to(torch::kFloat);
  auto ba = torch::matmul(lora_B->weight.detach().to(torch::kFloat), lora_A->weight.detach().to(torch::kFloat));
  auto merged = w + ba.to(w.device()) * scaling;
  if (!is_dora()) return merged;
  // DoRA: W' = (m / ||W + s B A||_row)[:, None] * (W + s B A)
  auto norm = (merged).pow(2).sum(1).sqrt();
  return (lora_magnitude_vector.detach().to(torch::kFloat).to(w.device()) / norm).unsqueeze(1) * merged;
}

torch::Tensor LoraLinearImpl::base_bias() const { return dense_base()->bias; }

model::LinearPtr LoraLinearImpl::merge() const {
  torch::NoGradGuard ng;
  auto base = dense_base();
  auto opts = base->weight.options();
  auto out = std::make_shared<model::DenseLinearImpl>(in_features(), out_features(), base->bias.defined(), opts);
  out->weight.copy_(merged_weight_fp32().to(opts.dtype()));
  if (base->bias.defined()) out->bias.copy_(base->bias.detach());
  out->weight.set_requires_grad(base->weight.requires_grad());
  if (base->bias.defined()) out->bias.set_requires_grad(base->bias.requires_grad());
  return out;
}

// ---------------------------------------------------------------------------------------------

std::vector<std::string> lora_modules(const model::TransformerImpl& model) {
  std::vector<std::string> out;
  for (const auto& n : model.linear_names())
    if (std::dynamic_pointer_cast<LoraLinearImpl>(model.get_linear(n))) out.push_back(n);
  return out;
}

namespace {
void set_all(torch::nn::Module& m, bool on) {
  for (auto& p : m.parameters()) p.set_requires_grad(on);
}
// Module names of `model` (named_modules keys without the root) matching modules_to_save entries.
std::vector<std::string> save_module_names(model::TransformerImpl& model, const std::vector<std::string>& entries) {
  std::vector<std::string> out;
  if (entries.empty()) return out;
  for (const auto& e : entries) {
    bool hit = false;
    for (const auto& item : model.named_modules("", false)) {
      if (!matches_target(item.key(), {e})) continue;
      if (item.key().find("lora_") != std::string::npos || item.key().find("base_layer") != std::string::npos) continue;
      out.push_back(item.key());
      hit = true;
    }
    if (!hit) {
      if (e == "lm_head" && model.config().tie_word_embeddings)
        fail("modules_to_save entry \"lm_head\": this model ties lm_head to embed_tokens; list embed_tokens instead");
      fail("modules_to_save entry \"{}\" matches no module (try embed_tokens or lm_head)", e);
    }
  }
  return out;
}
}  // namespace

std::vector<std::string> modules_to_save_parameters(model::TransformerImpl& model,
                                                    const std::vector<std::string>& entries) {
  std::vector<std::string> out;
  for (const auto& m : save_module_names(model, entries))
    for (const auto& p : model.named_parameters(true))
      if (p.key().starts_with(m + ".")) out.push_back(p.key());
  return out;
}

namespace {
// Freezing after wrapping: adapters trainable, biases per mode, modules_to_save in full.
void set_trainable(model::TransformerImpl& model, const std::string& bias, const std::vector<std::string>& to_save) {
  set_all(model, false);
  for (const auto& n : lora_modules(model)) {
    auto l = std::dynamic_pointer_cast<LoraLinearImpl>(model.get_linear(n));
    for (auto* lin = l.get(); lin;) {  // every stacked adapter trains
      lin->lora_A->weight.set_requires_grad(true);
      lin->lora_B->weight.set_requires_grad(true);
      if (lin->is_dora()) lin->lora_magnitude_vector.set_requires_grad(true);
      lin = dynamic_cast<LoraLinearImpl*>(lin->base_layer.get());
    }
    if (bias == "lora_only" && l->base_bias().defined()) l->base_bias().set_requires_grad(true);
  }
  if (bias == "all")
    for (auto& p : model.named_parameters(true))
      if (p.key().ends_with(".bias")) p.value().set_requires_grad(true);
  auto names = modules_to_save_parameters(model, to_save);
  auto params = model.named_parameters(true);
  for (const auto& n : names) params[n].set_requires_grad(true);
}
}  // namespace

std::vector<std::string> apply_lora(model::TransformerImpl& model, const LoraConfig& cfg, uint64_t seed) {
  if (cfg.bias != "none" && cfg.bias != "all" && cfg.bias != "lora_only")
    fail("LoRA bias must be none, all or lora_only (got \"{}\")", cfg.bias);
  if (cfg.dropout < 0 || cfg.dropout >= 1) fail("lora_dropout must be in [0, 1) (got {})", cfg.dropout);
  auto targets = select_targets(model, cfg);
  double scaling = cfg.scaling();
  uint64_t i = 0;
  for (const auto& n : targets) {
    auto base = model.get_linear(n);
    auto l = std::make_shared<LoraLinearImpl>(base, cfg.r, scaling, cfg.dropout, seed * 1000003ULL + i++);
    if (cfg.use_dora) l->enable_dora();
    l->train(model.is_training());
    model.replace_linear(n, l);
  }
  set_trainable(model, cfg.bias, cfg.modules_to_save);
  return targets;
}

std::vector<std::string> unfreeze_matching(torch::nn::Module& model, const std::vector<std::string>& patterns) {
  set_all(model, false);
  std::vector<std::string> out;
  auto params = model.named_parameters(true);
  for (const auto& pat : patterns) {
    if (std::regex_search(pat, std::regex("\\[[0-9]*:[0-9]*\\]$")))
      fail("unfrozen_parameters entry \"{}\": row ranges ([start:end]) are not supported; unfreeze the whole tensor", pat);
    std::regex re;
    try {
      re = std::regex(pat);
    } catch (const std::regex_error& e) {
      fail("unfrozen_parameters entry \"{}\" is not a valid regex: {}", pat, e.what());
    }
    bool hit = false;
    for (auto& p : params) {
      if (!std::regex_search(p.key(), re, std::regex_constants::match_continuous)) continue;
      hit = true;
      if (!p.value().requires_grad()) out.push_back(p.key());
      p.value().set_requires_grad(true);
    }
    if (!hit)
      fail("unfrozen_parameters entry \"{}\" matches no parameter (names look like \"{}\")", pat,
           params.is_empty() ? "" : params.keys()[0]);
  }
  return out;
}

std::string ParamStats::to_string() const {
  auto grouped = [](int64_t v) {
    std::string s = std::to_string(v), out;
    for (size_t i = 0; i < s.size(); ++i) {
      if (i && (s.size() - i) % 3 == 0) out += ',';
      out += s[i];
    }
    return out;
  };
  return fmt::format("trainable params: {} || all params: {} || trainable%: {:.4f}", grouped(trainable),
                     grouped(total), percent());
}

ParamStats parameter_stats(torch::nn::Module& model) {
  ParamStats s;
  for (const auto& p : model.parameters()) {
    s.total += p.numel();
    if (p.requires_grad()) s.trainable += p.numel();
  }
  return s;
}

void print_trainable_parameters(torch::nn::Module& model) { log::info(parameter_stats(model).to_string()); }

void merge_all(model::TransformerImpl& model) {
  dequantize_bases(model);  // QLoRA: merge into the dequantized 4-bit base (qlora.cpp)
  for (const auto& n : lora_modules(model)) {
    auto l = std::dynamic_pointer_cast<LoraLinearImpl>(model.get_linear(n));
    model.replace_linear(n, l->merge());
  }
  detail::merge_other_methods(model);  // IA3, bottleneck, BitFit (methods.cpp)
}

}  // namespace llmtune::peft
