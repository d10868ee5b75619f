// 8-bit AdamW (`optimizer: adamw_8bit`, bitsandbytes' block-wise scheme): both moments are kept
// as uint8 codes into bitsandbytes' dynamic maps (signed for exp_avg, unsigned for exp_avg_sq) with
// one fp32 absmax per block of 256 values; each step dequantizes, applies torch's AdamW update in
// fp32 and re-quantizes (nearest code). Tensors smaller than 4096 values keep fp32 states, as
// bitsandbytes' min_8bit_size does. Caveat: quantization runs on the CPU (states of CUDA parameters
// are moved there and back).
#include <cmath>

#include "core/core.h"
#include "quant/quant.h"
#include "train/train_impl.h"

namespace llmtune::train::detail {

namespace {

constexpr int64_t kBlock = 256;
constexpr int64_t kMin8bit = 4096;

class AdamW8bit : public Optimizer {
 public:
  AdamW8bit(std::vector<ParamGroup> groups, double b1, double b2, double eps)
      : Optimizer(std::move(groups)), beta1_(b1), beta2_(b2), eps_(eps) {}

  void step(double base_lr) override {
    torch::NoGradGuard ng;
    for (const auto& g : groups_) {
      const double lr = base_lr * g.lr_scale;
      for (size_t i = 0; i < g.params.size(); ++i) {
        torch::Tensor p = g.params[i];
        const torch::Tensor& grad = p.grad();
        if (!grad.defined()) continue;
        State& s = state_[g.names[i]];
        const bool q8 = p.numel() >= kMin8bit;
        torch::Tensor m, v;
        if (s.step == 0) {
          m = torch::zeros_like(p);
          v = torch::zeros_like(p);
        } else if (q8) {
          m = quant::dequantize_blockwise({s.m_codes, s.m_absmax}, quant::dynamic_map_signed(), kBlock).to(p.device());
          v = quant::dequantize_blockwise({s.v_codes, s.v_absmax}, quant::dynamic_map_unsigned(), kBlock).to(p.device());
        } else {
          m = s.m32;
          v = s.v32;
        }
        s.step += 1;
        if (g.weight_decay != 0) p.mul_(1 - lr * g.weight_decay);
        m.mul_(beta1_).add_(grad, 1 - beta1_);
        v.mul_(beta2_).addcmul_(grad, grad, 1 - beta2_);
        const double bc1 = 1 - std::pow(beta1_, static_cast<double>(s.step));
        const double bc2 = 1 - std::pow(beta2_, static_cast<double>(s.step));
        p.addcdiv_(m, (v.sqrt() / std::sqrt(bc2)).add_(eps_), -lr / bc1);
        if (q8) {
          auto qm = quant::quantize_blockwise(m, quant::dynamic_map_signed(), kBlock);
          auto qv = quant::quantize_blockwise(v, quant::dynamic_map_unsigned(), kBlock);
          s.m_codes = qm.codes, s.m_absmax = qm.absmax, s.v_codes = qv.codes, s.v_absmax = qv.absmax;
        } else {
          s.m32 = m, s.v32 = v;
        }
      }
    }
  }

  NamedTensors state_tensors() const override {
    NamedTensors out;
    for (const auto& [name, s] : state_) {
      if (s.m_codes.defined()) {
        out.emplace_back(name + ".exp_avg_q8", s.m_codes);
        out.emplace_back(name + ".exp_avg_absmax", s.m_absmax);
        out.emplace_back(name + ".exp_avg_sq_q8", s.v_codes);
        out.emplace_back(name + ".exp_avg_sq_absmax", s.v_absmax);
      } else if (s.m32.defined()) {
        out.emplace_back(name + ".exp_avg", s.m32);
        out.emplace_back(name + ".exp_avg_sq", s.v32);
      }
    }
    return out;
  }

  nlohmann::json state_scalars() const override {
    nlohmann::json steps = nlohmann::json::object();
    for (const auto& [name, s] : state_) steps[name] = s.step;
    return {{"type", "adamw_8bit"}, {"beta1", beta1_}, {"beta2", beta2_}, {"eps", eps_}, {"block", kBlock},
            {"step", steps}};
  }

  void load_state(const std::map<std::string, torch::Tensor>& t, const nlohmann::json& scalars) override {
    if (scalars.value("type", "") != "adamw_8bit")
      fail("checkpoint optimizer is '{}' but this run uses adamw_8bit; resume with the same optimizer",
           scalars.value("type", "?"));
    state_.clear();
    const auto& steps = scalars.at("step");
    auto need = [&](const std::string& k, int64_t numel) {
      auto it = t.find(k);
      if (it == t.end()) fail("optimizer state is missing tensor '{}'; resume with the same model and adapter", k);
      if (it->second.numel() != numel)
        fail("optimizer state tensor '{}' has {} values, expected {}; the checkpoint was written for another model", k,
             it->second.numel(), numel);
      return it->second.clone();
    };
    for (const auto& g : groups_)
      for (size_t i = 0; i < g.params.size(); ++i) {
        const auto& name = g.names[i];
        if (!steps.contains(name)) continue;
        const auto& p = g.params[i];
        State s;
        s.step = steps.at(name).get<int64_t>();
        if (p.numel() >= kMin8bit) {
          const int64_t nb = (p.numel() + kBlock - 1) / kBlock;
          s.m_codes = need(name + ".exp_avg_q8", p.numel()).reshape(p.sizes());
          s.m_absmax = need(name + ".exp_avg_absmax", nb);
          s.v_codes = need(name + ".exp_avg_sq_q8", p.numel()).reshape(p.sizes());
          s.v_absmax = need(name + ".exp_avg_sq_absmax", nb);
        } else {
          s.m32 = need(name + ".exp_avg", p.numel()).reshape(p.sizes()).to(p.options());
          s.v32 = need(name + ".exp_avg_sq", p.numel()).reshape(p.sizes()).to(p.options());
        }
        state_[name] = std::move(s);
      }
  }

 private:
  struct State {
    torch::Tensor m_codes, m_absmax, v_codes, v_absmax;  // 8-bit states
    torch::Tensor m32, v32;                              // small tensors
    int64_t step = 0;
  };
  double beta1_, beta2_, eps_;
  std::map<std::string, State> state_;
};

}  // namespace

std::unique_ptr<Optimizer> make_adamw_8bit(std::vector<ParamGroup> groups, double beta1, double beta2, double eps) {
  return std::make_unique<AdamW8bit>(std::move(groups), beta1, beta2, eps);
}

}  // namespace llmtune::train::detail
