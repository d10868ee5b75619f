// Sequence log-probabilities of completions and the frozen reference policy. The reference is either
// the policy's own weights with LoRA switched off (peft::DisabledAdapters: no second copy) or a separate
// frozen model; both run under NoGradGuard. Logits are never materialised for the whole batch: the
// chunked model::token_log_probs is used.
#include "align/align.h"
#include "core/core.h"
#include "peft/peft.h"

namespace llmtune::align {

using torch::indexing::None;
using torch::indexing::Slice;

SequenceLogProbs sequence_log_probs(model::TransformerImpl& m, const torch::Tensor& input_ids,
                                    const torch::Tensor& attention_mask, const torch::Tensor& labels,
                                    const LogProbOptions& o) {
  if (!labels.defined() || labels.sizes() != input_ids.sizes())
    fail("sequence_log_probs: labels must be [R, T] like input_ids");
  if (o.temperature <= 0) fail("sequence_log_probs: temperature must be positive (got {})", o.temperature);
  model::ForwardOptions fo;
  if (attention_mask.defined()) fo.attention_mask = attention_mask;
  fo.gradient_checkpointing = o.gradient_checkpointing && torch::GradMode::is_enabled();
  auto hidden = m.hidden_states(input_ids, fo);                 // [R, T, C]
  auto h = hidden.index({Slice(), Slice(None, -1)});            // position t predicts token t+1
  // Llama-family heads have no bias, so lm_head(h / T) = lm_head(h) / T: temperature scales h.
  if (o.temperature != 1.0) h = h / o.temperature;
  auto tgt = labels.index({Slice(), Slice(1, None)}).to(h.device());
  SequenceLogProbs out;
  out.per_token = model::token_log_probs(m, h, tgt, o.chunk_tokens);  // [R, T-1], 0 where -100
  out.sum = out.per_token.sum(1);
  out.count = tgt.ne(-100).sum(1).to(torch::kFloat);
  return out;
}

ReferenceModel ReferenceModel::adapter_disabled(model::TransformerImpl& policy) {
  ReferenceModel r;
  r.model_ = &policy;
  return r;
}

ReferenceModel ReferenceModel::frozen(model::Transformer reference) {
  ReferenceModel r;
  r.owned_ = std::move(reference);
  r.owned_->eval();
  for (auto& p : r.owned_->parameters()) p.set_requires_grad(false);
  r.model_ = r.owned_.get();
  return r;
}

SequenceLogProbs ReferenceModel::log_probs(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                                           const torch::Tensor& labels, const LogProbOptions& options) {
  torch::NoGradGuard ng;
  LogProbOptions o = options;
  o.gradient_checkpointing = false;
  if (owned_) return sequence_log_probs(*model_, input_ids, attention_mask, labels, o);
  peft::DisabledAdapters off(*model_);
  return sequence_log_probs(*model_, input_ids, attention_mask, labels, o);
}

torch::Tensor precompute_reference_log_probs(ReferenceModel& ref, const std::vector<PreferenceExample>& examples,
                                             DataKind kind, int64_t batch_size, int32_t pad_id,
                                             const LogProbOptions& options, bool progress) {
  if (kind == DataKind::prompts) fail("precompute_reference_log_probs: prompt data has no completions");
  const int64_t n = static_cast<int64_t>(examples.size());
  auto out = torch::zeros({n, 2}, torch::kFloat);
  if (n == 0) return out;
  const torch::Device dev = ref.model().decoder->embed_tokens->weight.device();
  const bool was_training = ref.model().is_training();
  ref.model().eval();
  std::unique_ptr<ProgressBar> bar;
  const int64_t bs = std::max<int64_t>(1, batch_size);
  if (progress) bar = std::make_unique<ProgressBar>("reference log-probs", (n + bs - 1) / bs, "batch");
  for (int64_t s = 0; s < n; s += bs) {
    std::vector<int64_t> idx;
    for (int64_t i = s; i < std::min(n, s + bs); ++i) idx.push_back(i);
    auto b = make_preference_batch(examples, idx, kind, pad_id);
    auto lp = ref.log_probs(b.input_ids.to(dev), b.attention_mask.to(dev), b.labels.to(dev), options).sum.to(torch::kCPU);
    const int64_t B = static_cast<int64_t>(idx.size());
    out.index_put_({Slice(s, s + B), 0}, lp.index({Slice(0, B)}));
    out.index_put_({Slice(s, s + B), 1}, lp.index({Slice(B, 2 * B)}));
    if (bar) bar->update(1);
  }
  if (bar) bar->finish();
  if (was_training) ref.model().train();
  return out;
}

}  // namespace llmtune::align
