// llmtune::train::Batch — one (micro-)batch as the training loop and objectives see it.
// Defined here because lib/data had no Batch when the loop was written; if lib/data grows its
// own, this header should become an alias of it (`using Batch = data::Batch;`), not a second type.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>

namespace llmtune::train {

// Shapes: B batch rows, T time. Undefined tensors are allowed where a stage has no use for them.
struct Batch {
  torch::Tensor input_ids;       // [B, T] int64
  torch::Tensor labels;          // [B, T] int64, unshifted (HF convention: the model shifts); -100 = ignored
  torch::Tensor attention_mask;  // [B, T] 1 = real token, 0 = padding; undefined = all real
  torch::Tensor position_ids;    // [B, T] restarts at 0 for each packed sequence; undefined = arange(T)
  torch::Tensor segment_ids;     // [B, T] index of the packed sequence a token belongs to (no attention across)
  // Positions that contribute to the loss (labels[:, 1:] != -100 for causal LM). -1 = let the
  // objective count it from `labels`. Used to build the accumulation-group normaliser.
  int64_t num_target_tokens = -1;
  // Non-padding tokens, for tokens/s. -1 = count from attention_mask (or numel of input_ids).
  int64_t num_tokens = -1;
  // Objective-specific tensors (for example DPO's rejected_input_ids / reference log-probs).
  std::map<std::string, torch::Tensor> extra;
};

// Header-only on purpose: lib/data uses Batch without linking lib/train.
// num_target_tokens if set, else the causal-LM count labels[:, 1:] != -100 (position 0 is never
// predicted).
inline int64_t count_target_tokens(const Batch& b) {
  if (b.num_target_tokens >= 0) return b.num_target_tokens;
  if (!b.labels.defined() || b.labels.dim() != 2) return 0;
  using torch::indexing::Slice;
  return b.labels.index({Slice(), Slice(1, torch::indexing::None)}).ne(-100).sum().item<int64_t>();
}
// num_tokens if set, else attention_mask.sum(), else input_ids.numel().
inline int64_t count_tokens(const Batch& b) {
  if (b.num_tokens >= 0) return b.num_tokens;
  if (b.attention_mask.defined()) return b.attention_mask.sum().item<int64_t>();
  return b.input_ids.defined() ? b.input_ids.numel() : 0;
}

}  // namespace llmtune::train
