// Internal to lib/model: causal self-attention computed in query blocks with batched GEMMs, for
// bf16 training on CPUs with native bf16 products (AVX512_BF16 / AMX).
//
// Why: LibTorch's CPU flash-attention kernel (what at::scaled_dot_product_attention runs for bf16)
// took 420 ms of a 1.19 s LoRA step on the SmolLM-135M shape at 512 tokens (README, "sft
// benchmark"), while the same products as oneDNN bf16 GEMMs run near the CPU's bf16 rate.
//
// How: the rows of q are reordered to (position, head within its KV group), so the queries of a
// block of positions, for every head sharing one KV head, form one contiguous [n·G, D] matrix and
// GQA needs no copies of k and v. Block i attends keys [0, end_i) only: the causal upper-right is
// never computed, so the work is about (blocks+1)/(2·blocks) of the full square. Scores are fp32
// (an fp32 GEMM on the bf16 values: the softmax sees what flash attention sees); one vectorised
// pass per row applies the causal mask, takes the softmax and rounds the probabilities to bf16 for
// the P·V product. They are kept for backward, where LibTorch's fused softmax backward turns dP
// into dS in one pass (rowsum(P∘dP) = rowsum(dO∘O), so no extra reduction).
// Memory: the kept probabilities are B·H·T²·(blocks+1)/blocks bytes per layer (2.6 MB for the
// SmolLM shape at 512 tokens), which is why long sequences stay on flash attention.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <optional>

namespace llmtune::model::detail {

// Causal attention: q [B, H, T, D], k and v [B, Hkv, T, D] with H a multiple of Hkv (GQA: head h
// uses KV head h / (H/Hkv), as transformers' repeat_kv does). Returns [B, H, T, D] in q's dtype.
// Gradients flow to q, k and v. Scale 1/sqrt(D), no dropout. `allowed`, when given, is a bool mask
// [B or 1, 1, T, T] of the (query, key) pairs that may attend (padding, packed sequences); it must
// lie within the causal triangle (keys after the query are never computed) and every row must
// allow at least one key.
torch::Tensor blocked_causal_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                       const std::optional<torch::Tensor>& allowed = std::nullopt);

// Bytes of probabilities blocked_causal_attention keeps for backward on these shapes.
int64_t blocked_attention_saved_bytes(int64_t batch, int64_t heads, int64_t seq, int64_t element_size);

}  // namespace llmtune::model::detail
