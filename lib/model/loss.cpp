// Recompute-in-backward (checkpoint) and the chunked causal-LM loss: each chunk of tokens runs
// lm_head + log_softmax without keeping its [N,V] logits. In training the chunk's gradients are
// taken right away (EagerGradCE; on the CPU the loss and its logits gradient come from one fused
// pass over each row, fused_cross_entropy.h); otherwise (fp16, token log-probs) backward
// recomputes one chunk at a time. Gradients are returned to the checkpoint inputs and the parameters passed alongside,
// so frozen inputs with trainable adapters (LoRA) still get their gradients.
#include <fmt/ranges.h>

#include "core/core.h"
#include "model/fused_cross_entropy.h"
#include "model/model.h"

namespace llmtune::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using CheckpointFn = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;

struct FnHolder : torch::CustomClassHolder {
  CheckpointFn fn;
  int64_t n_inputs = 0;
};

struct CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
  static torch::Tensor forward(AutogradContext* ctx, c10::intrusive_ptr<FnHolder> holder, at::TensorList all) {
    std::vector<torch::Tensor> xs(all.begin(), all.begin() + holder->n_inputs);
    ctx->save_for_backward(all.vec());
    ctx->saved_data["fn"] = c10::IValue::make_capsule(holder);
    torch::NoGradGuard ng;
    return holder->fn(xs);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto holder = c10::static_intrusive_pointer_cast<FnHolder>(ctx->saved_data["fn"].toCapsule());
    auto saved = ctx->get_saved_variables();
    const int64_t n = holder->n_inputs;
    std::vector<torch::Tensor> xs;
    for (int64_t i = 0; i < n; ++i) {
      auto x = saved[i].detach();
      if (saved[i].requires_grad()) x.requires_grad_(true);
      xs.push_back(x);
    }
    std::vector<torch::Tensor> wrt;
    std::vector<int64_t> where;
    for (size_t i = 0; i < saved.size(); ++i) {
      const auto& t = (int64_t)i < n ? xs[i] : saved[i];
      if (t.requires_grad()) {
        wrt.push_back(t);
        where.push_back((int64_t)i);
      }
    }
    variable_list result(1 + saved.size());
    if (wrt.empty()) return result;
    torch::Tensor out;
    {
      torch::AutoGradMode enable(true);
      out = holder->fn(xs);
    }
    auto grads = torch::autograd::grad({out}, wrt, {grad_out[0]}, /*retain_graph=*/false, /*create_graph=*/false,
                                       /*allow_unused=*/true);
    for (size_t j = 0; j < where.size(); ++j) result[1 + where[j]] = grads[j];
    return result;
  }
};

}  // namespace

torch::Tensor checkpoint(const CheckpointFn& fn, const std::vector<torch::Tensor>& inputs,
                         const std::vector<torch::Tensor>& params) {
  bool needs_grad = torch::GradMode::is_enabled();
  if (needs_grad) {
    needs_grad = false;
    for (const auto& t : inputs) needs_grad |= t.requires_grad();
    for (const auto& t : params) needs_grad |= t.requires_grad();
  }
  if (!needs_grad) return fn(inputs);
  auto holder = c10::make_intrusive<FnHolder>();
  holder->fn = fn;
  holder->n_inputs = (int64_t)inputs.size();
  std::vector<torch::Tensor> all = inputs;
  all.insert(all.end(), params.begin(), params.end());
  return CheckpointFunction::apply(holder, at::TensorList(all));
}

namespace {

using HeadFn = std::function<torch::Tensor(const torch::Tensor&)>;

torch::Tensor ce_of_logits(const torch::Tensor& logits, const torch::Tensor& targets) {
  return torch::nn::functional::cross_entropy(logits.to(torch::kFloat), targets,
                                              torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
}

torch::Tensor ce_sum(const HeadFn& head, const torch::Tensor& rows, const torch::Tensor& targets) {
  return ce_of_logits(head(rows), targets);
}

struct HeadHolder : torch::CustomClassHolder {
  HeadFn head;
  torch::Tensor targets;
  int64_t chunk = 0;
};

// The summed cross-entropy of all rows, chunk by chunk, with its gradients taken in the forward:
// each chunk's logits live only while that chunk's loss and gradients are computed, and nothing is
// recomputed in backward (which only scales the stored gradients by the incoming one). This does
// the lm head's work once forward and once backward, as an unchunked loss does, where
// recompute-in-backward would do its forward twice. Inputs: rows [N,C], then the head's trainable
// parameters.
struct EagerGradCE : public torch::autograd::Function<EagerGradCE> {
  static torch::Tensor forward(AutogradContext* ctx, c10::intrusive_ptr<HeadHolder> h, at::TensorList inputs) {
    const torch::Tensor& rows = inputs[0];
    const int64_t N = rows.size(0);
    std::vector<torch::Tensor> params(inputs.begin() + 1, inputs.end());
    std::vector<torch::Tensor> param_grads(params.size());
    torch::Tensor grad_rows = rows.requires_grad() ? torch::empty_like(rows) : torch::Tensor();
    double total = 0;
    for (int64_t s = 0; s < N; s += h->chunk) {
      const int64_t len = std::min(h->chunk, N - s);
      torch::Tensor x = rows.narrow(0, s, len).detach();
      if (rows.requires_grad()) x.requires_grad_(true);
      std::vector<torch::Tensor> wrt;
      if (rows.requires_grad()) wrt.push_back(x);
      for (const auto& p : params) wrt.push_back(p);
      std::vector<torch::Tensor> g;
      {
        torch::AutoGradMode enable(true);
        auto logits = h->head(x);
        auto targets = h->targets.narrow(0, s, len);
        if (detail::fused_cross_entropy_applies(logits)) {
          // Loss and d(loss)/d(logits) in one pass (fused_cross_entropy.h), then the head's backward.
          auto ce = detail::cross_entropy_with_grad(logits.detach(), targets);
          g = torch::autograd::grad({logits}, wrt, {ce.grad}, /*retain_graph=*/false, /*create_graph=*/false,
                                    /*allow_unused=*/true);
          total += ce.loss_sum;
        } else {
          auto loss = ce_of_logits(logits, targets);
          g = torch::autograd::grad({loss}, wrt, {}, /*retain_graph=*/false, /*create_graph=*/false,
                                    /*allow_unused=*/true);
          total += loss.item<double>();
        }
      }
      size_t k = 0;
      if (rows.requires_grad()) grad_rows.narrow(0, s, len).copy_(g[k++]);
      for (size_t j = 0; j < params.size(); ++j, ++k) {
        if (!g[k].defined()) continue;
        if (param_grads[j].defined()) param_grads[j].add_(g[k]);
        else param_grads[j] = g[k].to(torch::kFloat);  // summed over chunks in fp32
      }
    }
    std::vector<torch::Tensor> saved{grad_rows.defined() ? grad_rows : torch::empty({0})};
    for (auto& g : param_grads) saved.push_back(g.defined() ? g : torch::empty({0}));
    ctx->save_for_backward(saved);
    ctx->saved_data["has_rows"] = grad_rows.defined();
    return torch::tensor(total, rows.options().dtype(torch::kFloat));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    const double g = grad_out[0].item<double>();  // a Scalar multiplies in fp32 even for bf16 tensors
    variable_list result(1 + saved.size());        // holder, rows, params
    if (ctx->saved_data["has_rows"].toBool()) result[1] = saved[0] * g;
    for (size_t j = 1; j < saved.size(); ++j)
      if (saved[j].numel() > 0) result[1 + j] = saved[j] * g;
    return result;
  }
};

// Rows of hidden [N,C] with their targets [N] (no -100), summed CE computed chunk by chunk.
torch::Tensor chunked_ce_sum(const HeadFn& head, const std::vector<torch::Tensor>& params, const torch::Tensor& rows,
                             const torch::Tensor& targets, int64_t chunk) {
  bool needs_grad = torch::GradMode::is_enabled() && rows.requires_grad();
  for (const auto& p : params) needs_grad |= torch::GradMode::is_enabled() && p.requires_grad();
  // fp16 keeps recompute-in-backward: its gradients must be formed under the loss scale, which only
  // backward knows.
  if (needs_grad && rows.scalar_type() != torch::kHalf) {
    auto holder = c10::make_intrusive<HeadHolder>();
    holder->head = head;
    holder->targets = targets;
    holder->chunk = chunk;
    std::vector<torch::Tensor> inputs{rows};
    inputs.insert(inputs.end(), params.begin(), params.end());
    return EagerGradCE::apply(holder, at::TensorList(inputs));
  }
  torch::Tensor total = torch::zeros({}, rows.options().dtype(torch::kFloat));
  const int64_t N = rows.size(0);
  for (int64_t s = 0; s < N; s += chunk) {
    int64_t len = std::min(chunk, N - s);
    auto tgt = targets.narrow(0, s, len);
    auto part = checkpoint([head, tgt](const std::vector<torch::Tensor>& xs) { return ce_sum(head, xs[0], tgt); },
                           {rows.narrow(0, s, len)}, params);
    total = total + part;
  }
  return total;
}

}  // namespace

LossSum causal_lm_loss_sum(const std::function<torch::Tensor(const torch::Tensor&)>& head,
                           const std::vector<torch::Tensor>& head_params, const torch::Tensor& hidden,
                           const torch::Tensor& labels, int64_t chunk_tokens) {
  if (hidden.dim() != 3 || labels.dim() != 2 || hidden.size(0) != labels.size(0) || hidden.size(1) != labels.size(1))
    fail("causal_lm_loss_sum: hidden [B,T,C] and labels [B,T] must agree, got {} and {}", hidden.sizes(),
         labels.sizes());
  if (chunk_tokens <= 0) fail("causal_lm_loss_sum: chunk_tokens must be positive");
  const int64_t B = hidden.size(0), T = hidden.size(1), C = hidden.size(2);
  // Shift: position t predicts labels[t+1]; the last position has no target.
  auto lab = labels.to(hidden.device()).to(torch::kLong);
  auto shifted = torch::full({B, T}, -100, lab.options());
  if (T > 1) shifted.narrow(1, 0, T - 1).copy_(lab.narrow(1, 1, T - 1));
  auto flat_t = shifted.reshape({B * T});
  auto keep = (flat_t != -100).nonzero().squeeze(1);
  LossSum out;
  out.n_tokens = keep.size(0);
  if (out.n_tokens == 0) {
    out.sum = (hidden.sum() * 0).to(torch::kFloat);  // keeps the graph connected
    return out;
  }
  auto rows = hidden.reshape({B * T, C}).index_select(0, keep);
  out.sum = chunked_ce_sum(head, head_params, rows, flat_t.index_select(0, keep), chunk_tokens);
  return out;
}

LossSum causal_lm_loss_sum(TransformerImpl& model, const torch::Tensor& hidden, const torch::Tensor& labels,
                           int64_t chunk_tokens) {
  std::vector<torch::Tensor> params;
  for (auto& p : model.lm_head_parameters())
    if (p.requires_grad()) params.push_back(p);
  return causal_lm_loss_sum([&model](const torch::Tensor& h) { return model.lm_head_logits(h); }, params, hidden,
                            labels, chunk_tokens);
}

torch::Tensor token_log_probs(TransformerImpl& model, const torch::Tensor& hidden, const torch::Tensor& targets,
                              int64_t chunk_tokens) {
  if (hidden.dim() != 3 || targets.dim() != 2 || hidden.size(0) != targets.size(0) || hidden.size(1) != targets.size(1))
    fail("token_log_probs: hidden [B,T,C] and targets [B,T] must agree, got {} and {}", hidden.sizes(),
         targets.sizes());
  const int64_t B = hidden.size(0), T = hidden.size(1), C = hidden.size(2);
  std::vector<torch::Tensor> params;
  for (auto& p : model.lm_head_parameters())
    if (p.requires_grad()) params.push_back(p);
  auto flat_h = hidden.reshape({B * T, C});
  auto flat_t = targets.to(hidden.device()).to(torch::kLong).reshape({B * T});
  auto valid = flat_t != -100;
  auto safe_t = flat_t.masked_fill(valid.logical_not(), 0);
  std::vector<torch::Tensor> parts;
  for (int64_t s = 0; s < B * T; s += chunk_tokens) {
    int64_t len = std::min(chunk_tokens, B * T - s);
    auto tgt = safe_t.narrow(0, s, len);
    parts.push_back(checkpoint(
        [&model, tgt](const std::vector<torch::Tensor>& xs) {
          auto lp = torch::log_softmax(model.lm_head_logits(xs[0]).to(torch::kFloat), -1);
          return lp.gather(1, tgt.unsqueeze(1)).squeeze(1);
        },
        {flat_h.narrow(0, s, len)}, params));
  }
  auto lp = torch::cat(parts).masked_fill(valid.logical_not(), 0.0);
  return lp.reshape({B, T});
}

LossSum sequence_nll(TransformerImpl& model, const torch::Tensor& input_ids,
                     const std::optional<torch::Tensor>& attention_mask, int64_t chunk_tokens) {
  torch::NoGradGuard ng;
  ForwardOptions o;
  if (attention_mask) o.attention_mask = *attention_mask;
  auto h = model.hidden_states(input_ids, o);
  auto labels = input_ids.clone();
  if (attention_mask) labels.masked_fill_(attention_mask->to(torch::kBool).logical_not(), -100);
  return causal_lm_loss_sum(model, h, labels, chunk_tokens);
}

}  // namespace llmtune::model
