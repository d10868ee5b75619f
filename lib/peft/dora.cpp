// DoRA (weight-decomposed LoRA) on top of LoraLinearImpl, following PEFT's DoraLinearLayer
// (formats.md §5.3): a learned magnitude m [out] per output row, the row norm of W + scaling*B A
// taken with B A detached and then detached itself. Caveat: needs a dense (or LoRA-over-dense) base.
#include "core/core.h"
#include "peft/peft.h"

namespace llmtune::peft {

namespace {
// The weight the DoRA layer decomposes, fp32 [out, in]: the dense base, or for a stacked adapter
// the already-merged weight below it (PEFT's "merged in turn").
torch::Tensor dora_base_weight(const LoraLinearImpl& l) {
  if (auto inner = std::dynamic_pointer_cast<LoraLinearImpl>(l.base_layer)) return inner->merged_weight_fp32();
  return l.dense_base()->weight.detach().to(torch::kFloat);
}
}  // namespace

void LoraLinearImpl::enable_dora() {
  torch::NoGradGuard ng;
  auto w = dora_base_weight(*this);
  auto ba = torch::matmul(lora_B->weight.detach(), lora_A->weight.detach()).to(w.device());
  auto norm = (w + scaling * ba).pow(2).sum(1).sqrt();
  lora_magnitude_vector = register_parameter("lora_magnitude_vector", norm.to(lora_A->weight.options()).contiguous());
}

torch::Tensor LoraLinearImpl::dora_weight_norm() const {
  torch::NoGradGuard ng;
  auto w = dora_base_weight(*this).to(lora_A->weight.device());
  auto ba = torch::matmul(lora_B->weight.detach(), lora_A->weight.detach());
  return (w + scaling * ba).pow(2).sum(1).sqrt();
}

torch::Tensor LoraLinearImpl::dora_forward(const torch::Tensor& x) {
  auto y = base_layer->forward(x);
  const auto dt = lora_A->weight.scalar_type();
  auto h = x.to(dt);
  torch::Tensor base_result;  // x W^T without the base bias, in the adapter dtype
  if (dropout > 0 && is_training()) {
    h = torch::dropout(h, dropout, true);
    base_result = torch::linear(h, dora_base_weight(*this).to(h.device()));
  } else {
    // y = x W^T + b, also when W is a stack of merged-in-turn adapters below this one.
    base_result = y.to(dt);
    auto b = base_bias();
    if (b.defined()) base_result = base_result - b.to(dt);
  }
  auto scale = lora_magnitude_vector / dora_weight_norm();  // [out]; norm is a constant (no grad)
  auto lora = lora_B->forward(lora_A->forward(h)) * scaling;
  auto out = y.to(dt) + (scale - 1) * base_result + scale * lora;
  return out.to(y.scalar_type());
}

}  // namespace llmtune::peft
