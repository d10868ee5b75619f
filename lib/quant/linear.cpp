// The frozen quantized linear layers: Linear4bit (bitsandbytes NF4/FP4 state) and Linear8bit
// (int8, per-row absmax). Both run through a custom autograd function whose backward recomputes
// the input gradient from the packed weight (tile by tile), so a training step never keeps a 16-bit
// copy of any weight alive. The quantized tensors are plain members moved by the overridden to()
// (never converted to another dtype); only `bias` is a (frozen) parameter.
#include <fmt/ranges.h>

#include "core/core.h"
#include "quant/quant.h"
#include "quant/quant_impl.h"

namespace llmtune::quant {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

State4bit state_from_saved(AutogradContext* ctx) {
  State4bit s;
  auto& d = ctx->saved_data;
  s.packed = d["packed"].toTensor();
  s.shape = {d["rows"].toInt(), d["cols"].toInt()};
  s.blocksize = d["blocksize"].toInt();
  s.type = d["type"].toInt() == 0 ? QuantType::nf4 : QuantType::fp4;
  return s;
}

struct Matmul4bitFn : public torch::autograd::Function<Matmul4bitFn> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const State4bit& s,
                               const torch::Tensor& absmax, torch::ScalarType compute) {
    auto& d = ctx->saved_data;
    d["packed"] = s.packed;
    d["absmax"] = absmax;
    d["rows"] = s.shape[0];
    d["cols"] = s.shape[1];
    d["blocksize"] = s.blocksize;
    d["type"] = static_cast<int64_t>(s.type == QuantType::nf4 ? 0 : 1);
    d["compute"] = static_cast<int64_t>(compute);
    d["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    return matmul_4bit(x, s, absmax, compute);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = state_from_saved(ctx);
    auto& d = ctx->saved_data;
    auto compute = static_cast<torch::ScalarType>(d["compute"].toInt());
    auto dx = matmul_4bit_t(grads[0], s, d["absmax"].toTensor(), compute)
                  .to(static_cast<torch::ScalarType>(d["x_dtype"].toInt()));
    return {dx, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// int8 weight dequantized like bitsandbytes' int8_vectorwise_dequant: q * absmax * (1/127 in fp32).
torch::Tensor dequant8(const torch::Tensor& q, const torch::Tensor& absmax, torch::ScalarType dtype) {
  return (q.to(torch::kFloat) * absmax.unsqueeze(1) * 7.874015718698502e-3f).to(dtype);
}

struct Matmul8bitFn : public torch::autograd::Function<Matmul8bitFn> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& q,
                               const torch::Tensor& absmax, torch::ScalarType compute) {
    ctx->saved_data["q"] = q;
    ctx->saved_data["absmax"] = absmax;
    ctx->saved_data["compute"] = static_cast<int64_t>(compute);
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    return torch::matmul(x.to(compute), dequant8(q, absmax, compute).t());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto& d = ctx->saved_data;
    auto compute = static_cast<torch::ScalarType>(d["compute"].toInt());
    auto w = dequant8(d["q"].toTensor(), d["absmax"].toTensor(), compute);
    auto dx = torch::matmul(grads[0].to(compute), w).to(static_cast<torch::ScalarType>(d["x_dtype"].toInt()));
    return {dx, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

torch::Tensor add_bias(torch::Tensor y, const torch::Tensor& bias) {
  return bias.defined() ? y + bias.to(y.scalar_type()) : y;
}

void check_compute(torch::ScalarType t) {
  if (t != torch::kFloat && t != torch::kBFloat16 && t != torch::kHalf)
    fail("bnb_4bit_compute_dtype must be float32, bfloat16 or float16 (got {})", c10::toString(t));
}

}  // namespace

// ---------------------------------------------------------------------------------------------

Linear4bitImpl::Linear4bitImpl(State4bit s, torch::Tensor b, torch::ScalarType compute)
    : state(std::move(s)), compute_dtype(compute) {
  check_compute(compute);
  if (state.shape.size() != 2) fail("Linear4bit: weight shape must be [out, in], got {} dims", state.shape.size());
  absmax = state.absmax_fp32().contiguous();
  if (b.defined()) {
    bias = register_parameter("bias", b, false);
  }
}

torch::Tensor Linear4bitImpl::forward(const torch::Tensor& x) {
  torch::Tensor y;
  if (x.requires_grad() && torch::GradMode::is_enabled()) y = Matmul4bitFn::apply(x, state, absmax, compute_dtype);
  else y = matmul_4bit(x, state, absmax, compute_dtype);
  return add_bias(y, bias).to(x.scalar_type());
}

torch::Tensor Linear4bitImpl::dequantized(torch::ScalarType dtype) const { return dequantize_4bit(state, dtype); }

std::shared_ptr<model::DenseLinearImpl> Linear4bitImpl::to_dense(torch::ScalarType dtype) const {
  auto opts = torch::TensorOptions().dtype(dtype).device(state.packed.device());
  auto d = std::make_shared<model::DenseLinearImpl>(in_features(), out_features(), bias.defined(), opts);
  torch::NoGradGuard ng;
  d->weight.copy_(dequantized(dtype));
  d->weight.set_requires_grad(false);
  if (bias.defined()) {
    d->bias.copy_(bias.detach());
    d->bias.set_requires_grad(bias.requires_grad());
  }
  return d;
}

void Linear4bitImpl::pretty_print(std::ostream& os) const {
  os << fmt::format("Linear4bit(in={}, out={}, {}{}, block={}, compute={})", in_features(), out_features(),
                    to_string(state.type), state.nested ? "+double-quant" : "", state.blocksize,
                    c10::toString(compute_dtype));
}

// ---------------------------------------------------------------------------------------------

Linear8bitImpl::Linear8bitImpl(const torch::Tensor& w, torch::Tensor b, torch::ScalarType compute)
    : compute_dtype(compute) {
  check_compute(compute);
  if (w.dim() != 2) fail("Linear8bit: weight must be 2-D");
  torch::NoGradGuard ng;
  auto wf = w.detach().to(torch::kFloat);
  scale = wf.abs().amax(1);  // per-row absmax (bitsandbytes' row_stats)
  // 127 / absmax as torch evaluates `127.0 / t` (reciprocal, then a multiply): bit-exact codes.
  auto q = torch::round(wf * (scale.clamp_min(1e-38f).reciprocal() * 127.0f).unsqueeze(1));
  qweight = q.clamp(-127, 127).to(torch::kInt8).contiguous();
  if (b.defined()) bias = register_parameter("bias", b, false);
}

torch::Tensor Linear8bitImpl::forward(const torch::Tensor& x) {
  torch::Tensor y;
  if (x.requires_grad() && torch::GradMode::is_enabled()) y = Matmul8bitFn::apply(x, qweight, scale, compute_dtype);
  else y = torch::matmul(x.to(compute_dtype), dequant8(qweight, scale, compute_dtype).t());
  return add_bias(y, bias).to(x.scalar_type());
}

torch::Tensor Linear8bitImpl::dequantized(torch::ScalarType dtype) const { return dequant8(qweight, scale, dtype); }

std::shared_ptr<model::DenseLinearImpl> Linear8bitImpl::to_dense(torch::ScalarType dtype) const {
  auto opts = torch::TensorOptions().dtype(dtype).device(qweight.device());
  auto d = std::make_shared<model::DenseLinearImpl>(in_features(), out_features(), bias.defined(), opts);
  torch::NoGradGuard ng;
  d->weight.copy_(dequantized(dtype));
  d->weight.set_requires_grad(false);
  if (bias.defined()) d->bias.copy_(bias.detach());
  return d;
}

model::LinearPtr dequantize_linear(const model::LinearPtr& m, std::optional<torch::ScalarType> dtype) {
  if (auto q = std::dynamic_pointer_cast<Linear4bitImpl>(m)) return q->to_dense(dtype.value_or(q->compute_dtype));
  if (auto q = std::dynamic_pointer_cast<Linear8bitImpl>(m)) return q->to_dense(dtype.value_or(q->compute_dtype));
  if (auto q = std::dynamic_pointer_cast<LinearGroupQuantImpl>(m)) return q->to_dense(dtype.value_or(q->compute_dtype));
  return nullptr;
}

}  // namespace llmtune::quant
