// Optimizers on plain tensors: parameter groups (no decay for norms/biases/1-D, LoRA+ lr for
// lora_B), AdamW and SGD with torch.optim's update rules. State is keyed by parameter name so a
// checkpoint can be restored into a freshly built model; step counts are per parameter, as in torch.
#include <cmath>
#include <set>

#include "core/core.h"
#include "train/train_impl.h"

namespace llmtune::train {
using detail::shape_str;

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

torch::Tensor find_state(const std::map<std::string, torch::Tensor>& tensors, const std::string& key,
                         const torch::Tensor& param) {
  auto it = tensors.find(key);
  if (it == tensors.end())
    fail("optimizer state is missing tensor '{}'; the checkpoint does not match this model's trainable "
         "parameters (resume with the same model, adapter and trainable settings)", key);
  if (it->second.sizes() != param.sizes())
    fail("optimizer state tensor '{}' has shape {} but the parameter has shape {}; the checkpoint was written "
         "for a different model", key, shape_str(it->second.sizes()), shape_str(param.sizes()));
  return it->second.to(param.options()).clone();
}
}  // namespace

bool is_no_decay_param(const std::string& name, const torch::Tensor& param) {
  if (param.dim() < 2) return true;
  if (ends_with(name, ".bias") || name == "bias") return true;
  return name.find("norm") != std::string::npos;
}

std::vector<ParamGroup> make_param_groups(const NamedTensors& named, double weight_decay, double loraplus_lr_ratio) {
  ParamGroup decay{"decay", {}, {}, weight_decay, 1.0};
  ParamGroup no_decay{"no_decay", {}, {}, 0.0, 1.0};
  ParamGroup lora_b{"lora_B", {}, {}, weight_decay, loraplus_lr_ratio};
  ParamGroup lora_b_nd{"lora_B_no_decay", {}, {}, 0.0, loraplus_lr_ratio};
  for (const auto& [name, p] : named) {
    bool nd = is_no_decay_param(name, p);
    bool is_b = loraplus_lr_ratio > 0 && name.find("lora_B") != std::string::npos;
    ParamGroup& g = is_b ? (nd ? lora_b_nd : lora_b) : (nd ? no_decay : decay);
    g.names.push_back(name);
    g.params.push_back(p);
  }
  std::vector<ParamGroup> out;
  for (auto* g : {&decay, &no_decay, &lora_b, &lora_b_nd})
    if (!g->params.empty()) out.push_back(std::move(*g));
  return out;
}

Optimizer::Optimizer(std::vector<ParamGroup> groups) : groups_(std::move(groups)) {
  for (const auto& g : groups_) {
    if (g.names.size() != g.params.size()) fail("internal: parameter group '{}' has names/params mismatch", g.name);
    for (const auto& p : g.params)
      if (p.scalar_type() != torch::kFloat32 && p.scalar_type() != torch::kFloat64)
        fail("internal: optimizer parameters must be fp32 masters (group '{}' has {})", g.name,
             std::string(c10::toString(p.scalar_type())));
  }
}

// ---- AdamW ---------------------------------------------------------------------------------

AdamW::AdamW(std::vector<ParamGroup> groups, double beta1, double beta2, double eps)
    : Optimizer(std::move(groups)), beta1_(beta1), beta2_(beta2), eps_(eps) {}

void AdamW::step(double base_lr) {
  torch::NoGradGuard no_grad;
  for (const auto& g : groups_) {
    // One fused multi-tensor update per group (LibTorch's _fused_adamw_, the kernel behind
    // torch.optim.AdamW(fused=True)): a LoRA model has hundreds of small tensors, where the
    // per-tensor update (eight ops each) cost more in dispatch than in arithmetic. Same formula:
    // p *= 1 - lr·wd; m = lerp(m, g, 1 - β1); v = β2·v + (1 - β2)·g²;
    // p -= lr / (1 - β1^t) · m / (sqrt(v) / sqrt(1 - β2^t) + eps).
    std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
    for (size_t i = 0; i < g.params.size(); ++i) {
      const torch::Tensor& p = g.params[i];
      const torch::Tensor& grad = p.grad();
      if (!grad.defined()) continue;
      State& s = state_[g.names[i]];
      if (!s.exp_avg.defined()) {
        s.exp_avg = torch::zeros_like(p, torch::MemoryFormat::Preserve);
        s.exp_avg_sq = torch::zeros_like(p, torch::MemoryFormat::Preserve);
      }
      s.step += 1;
      params.push_back(p);
      grads.push_back(grad);
      exp_avgs.push_back(s.exp_avg);
      exp_avg_sqs.push_back(s.exp_avg_sq);
      steps.push_back(torch::full({}, static_cast<double>(s.step), torch::TensorOptions().dtype(torch::kFloat)));
    }
    if (params.empty()) continue;
    at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps, base_lr * g.lr_scale, beta1_,
                      beta2_, g.weight_decay, eps_, /*amsgrad=*/false, /*maximize=*/false);
  }
}

int64_t AdamW::step_count(const std::string& param) const {
  auto it = state_.find(param);
  return it == state_.end() ? 0 : it->second.step;
}

NamedTensors AdamW::state_tensors() const {
  NamedTensors out;
  for (const auto& [name, s] : state_) {
    out.emplace_back(name + ".exp_avg", s.exp_avg);
    out.emplace_back(name + ".exp_avg_sq", s.exp_avg_sq);
  }
  return out;
}

nlohmann::json AdamW::state_scalars() const {
  nlohmann::json steps = nlohmann::json::object();
  for (const auto& [name, s] : state_) steps[name] = s.step;
  return {{"type", "adamw"}, {"beta1", beta1_}, {"beta2", beta2_}, {"eps", eps_}, {"step", steps}};
}

void AdamW::load_state(const std::map<std::string, torch::Tensor>& tensors, const nlohmann::json& scalars) {
  if (scalars.value("type", "") != "adamw")
    fail("checkpoint optimizer is '{}' but this run uses adamw; resume with the same optimizer",
         scalars.value("type", "?"));
  state_.clear();
  const auto& steps = scalars.at("step");
  for (const auto& g : groups_)
    for (size_t i = 0; i < g.params.size(); ++i) {
      const std::string& name = g.names[i];
      if (!steps.contains(name)) continue;  // never stepped (no grad so far)
      State s;
      s.step = steps.at(name).get<int64_t>();
      s.exp_avg = find_state(tensors, name + ".exp_avg", g.params[i]);
      s.exp_avg_sq = find_state(tensors, name + ".exp_avg_sq", g.params[i]);
      state_[name] = std::move(s);
    }
}

// ---- SGD -----------------------------------------------------------------------------------

SGD::SGD(std::vector<ParamGroup> groups, double momentum, double dampening, bool nesterov)
    : Optimizer(std::move(groups)), momentum_(momentum), dampening_(dampening), nesterov_(nesterov) {
  if (nesterov && (momentum <= 0 || dampening != 0))
    fail("optimizer sgd: nesterov needs momentum > 0 and dampening 0 (got momentum {}, dampening {})", momentum,
         dampening);
}

void SGD::step(double base_lr) {
  torch::NoGradGuard no_grad;
  for (const auto& g : groups_) {
    const double lr = base_lr * g.lr_scale;
    for (size_t i = 0; i < g.params.size(); ++i) {
      torch::Tensor p = g.params[i];
      if (!p.grad().defined()) continue;
      torch::Tensor d = p.grad();
      if (g.weight_decay != 0) d = d.add(p, g.weight_decay);
      if (momentum_ != 0) {
        torch::Tensor& buf = momentum_buffer_[g.names[i]];
        if (!buf.defined()) buf = d.clone();
        else buf.mul_(momentum_).add_(d, 1 - dampening_);
        d = nesterov_ ? d.add(buf, momentum_) : buf;
      }
      p.add_(d, -lr);
    }
  }
}

NamedTensors SGD::state_tensors() const {
  NamedTensors out;
  for (const auto& [name, b] : momentum_buffer_) out.emplace_back(name + ".momentum_buffer", b);
  return out;
}

nlohmann::json SGD::state_scalars() const {
  nlohmann::json names = nlohmann::json::array();
  for (const auto& kv : momentum_buffer_) names.push_back(kv.first);
  return {{"type", "sgd"}, {"momentum", momentum_}, {"buffers", names}};
}

void SGD::load_state(const std::map<std::string, torch::Tensor>& tensors, const nlohmann::json& scalars) {
  if (scalars.value("type", "") != "sgd")
    fail("checkpoint optimizer is '{}' but this run uses sgd; resume with the same optimizer",
         scalars.value("type", "?"));
  momentum_buffer_.clear();
  std::set<std::string> have;
  for (const auto& n : scalars.at("buffers")) have.insert(n.get<std::string>());
  for (const auto& g : groups_)
    for (size_t i = 0; i < g.params.size(); ++i)
      if (have.count(g.names[i]))
        momentum_buffer_[g.names[i]] = find_state(tensors, g.names[i] + ".momentum_buffer", g.params[i]);
}

namespace detail {
std::unique_ptr<Optimizer> make_adamw_8bit(std::vector<ParamGroup> groups, double beta1, double beta2, double eps);  // optim8bit.cpp
}

std::unique_ptr<Optimizer> make_optimizer(const OptimizerOptions& o, std::vector<ParamGroup> groups) {
  if (o.name == "adamw" || o.name == "adamw_torch") return std::make_unique<AdamW>(std::move(groups), o.beta1, o.beta2, o.eps);
  if (o.name == "adamw_8bit") return detail::make_adamw_8bit(std::move(groups), o.beta1, o.beta2, o.eps);
  if (o.name == "sgd") return std::make_unique<SGD>(std::move(groups), o.momentum, o.dampening, o.nesterov);
  auto hint = closest_match(o.name, {"adamw", "adamw_8bit", "sgd"});
  fail("unknown optimizer '{}'{}; available: adamw, adamw_8bit, sgd", o.name, hint ? fmt::format(" (did you mean '{}'?)", *hint) : "");
}

}  // namespace llmtune::train
