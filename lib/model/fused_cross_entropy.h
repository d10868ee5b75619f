// Internal to lib/model: the cross-entropy of a chunk of logits and its gradient with respect to
// those logits, in one pass per row.
//
// Why: the chunked language-model loss (loss.cpp) computed each chunk as logits.to(fp32) ->
// log_softmax -> nll, then autograd's backward: nll backward (a zero-filled [n, V] fp32 tensor),
// log_softmax backward, and the cast back to bf16: about 50 bytes of memory traffic per logit, on
// the SmolLM-135M LoRA bench 25M logits per step (512 tokens x 49152). Here each row is read from
// its stored dtype, the softmax is formed in fp32 in a row buffer that stays in cache, and the
// gradient softmax - onehot is written once in the logits' dtype: about 6 bytes per logit for bf16.
//
// The loss per row is logsumexp(x) - x[target], computed in fp32 with an fp64 total. A row with a
// NaN or infinite logit gives a NaN loss and NaN gradients (the trainer's NaN guard sees it).
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

namespace llmtune::model::detail {

struct CrossEntropyWithGrad {
  double loss_sum = 0;  // summed over rows
  torch::Tensor grad;   // [n, V] in the logits' dtype: softmax(x) - onehot(target)
};

// logits [n, V] (fp32 or bf16, CPU), targets [n] int64 in [0, V). `isa` picks the vector code:
// "auto" (the widest this CPU runs), "avx512", "avx2" or "generic" (vector_math::available_isas).
CrossEntropyWithGrad cross_entropy_with_grad(const torch::Tensor& logits, const torch::Tensor& targets,
                                             const std::string& isa = "auto");

// Whether cross_entropy_with_grad computes these logits (CPU, fp32/bf16); otherwise callers use
// LibTorch's cross-entropy.
bool fused_cross_entropy_applies(const torch::Tensor& logits);

}  // namespace llmtune::model::detail
