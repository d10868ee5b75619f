// Blocked causal attention with batched GEMMs: see causal_attention.h for why and how.
#include "model/causal_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "model/vector_math.h"

namespace llmtune::model::detail {

namespace {

using namespace vector_math;

// Softmax of one row of fp32 scores over its first `valid` entries, written in the output dtype,
// with zeros after them (the causally masked keys): the mask, the softmax and the rounding to bf16
// in one pass over data that stays in L1. `buffer` holds `len` floats.
template <typename Out>
LLMTUNE_ALWAYS_INLINE void softmax_row(const float* s, int64_t valid, int64_t len, float* buffer, Out* out) {
  bool finite;  // unused: a masked score is -inf
  const float max = row_max(s, valid, &finite);
  const float sum = exp_into(s, valid, max, buffer);
  scale_into(buffer, valid, 1.0f / sum, out);
  for (int64_t j = valid; j < len; ++j) out[j] = from_float<Out>(0.0f);
}

// Rows [begin, end) of scores [rows, len]. Within each matrix of `rows_per_matrix` rows, row r may
// see keys [0, first_valid + r / group) (`group` 0: every key, the mask is already in the scores).
struct SoftmaxRows {
  const float* scores;
  int64_t len, rows_per_matrix, first_valid, group;
};

template <typename Out>
LLMTUNE_ALWAYS_INLINE void softmax_rows(const SoftmaxRows& a, int64_t begin, int64_t end, float* buffer, Out* out) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t valid = a.group == 0 ? a.len : std::min(a.len, a.first_valid + (r % a.rows_per_matrix) / a.group);
    softmax_row(a.scores + r * a.len, valid, a.len, buffer, out + r * a.len);
  }
}

template <typename Out>
LLMTUNE_TARGET_AVX512 void softmax_rows_avx512(const SoftmaxRows& a, int64_t begin, int64_t end, float* buffer,
                                               Out* out) {
  softmax_rows(a, begin, end, buffer, out);
}

template <typename Out>
LLMTUNE_TARGET_AVX2 void softmax_rows_avx2(const SoftmaxRows& a, int64_t begin, int64_t end, float* buffer, Out* out) {
  softmax_rows(a, begin, end, buffer, out);
}

template <typename Out>
void softmax_rows_generic(const SoftmaxRows& a, int64_t begin, int64_t end, float* buffer, Out* out) {
  softmax_rows(a, begin, end, buffer, out);
}

template <typename Out>
void run_softmax(const SoftmaxRows& a, int64_t rows, Out* out) {
  static const std::string isa = widest_isa();
  auto* fn = isa == "avx512" ? &softmax_rows_avx512<Out> : isa == "avx2" ? &softmax_rows_avx2<Out>
                                                                          : &softmax_rows_generic<Out>;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(static_cast<size_t>(a.len));
    fn(a, begin, end, buffer.data(), out);
  });
}

// Probabilities of fp32 scores [B, Hkv, rows, len] in `dtype` (fp32 or bf16); see SoftmaxRows.
torch::Tensor masked_softmax(const torch::Tensor& scores, int64_t first_valid, int64_t group,
                             torch::ScalarType dtype) {
  TORCH_CHECK(scores.scalar_type() == torch::kFloat && scores.is_contiguous() && scores.dim() == 4);
  auto out = torch::empty(scores.sizes(), scores.options().dtype(dtype));
  const SoftmaxRows a{scores.data_ptr<float>(), scores.size(3), scores.size(2), first_valid, group};
  const int64_t rows = scores.numel() / std::max<int64_t>(1, scores.size(3));
  if (dtype == torch::kBFloat16) run_softmax(a, rows, out.data_ptr<c10::BFloat16>());
  else if (dtype == torch::kFloat) run_softmax(a, rows, out.data_ptr<float>());
  else return at::_softmax(scores, -1, false).to(dtype);
  return out;
}

// Query blocks: at most 8 (the skipped upper-right grows towards half the square as blocks
// shrink), at least 64 positions each (smaller GEMMs lose more to call overhead than they save).
struct Blocks {
  int64_t count, size;
};

Blocks blocks_for(int64_t seq) {
  const int64_t count = std::clamp<int64_t>((seq + 63) / 64, 1, 8);
  return {count, (seq + count - 1) / count};
}

// [B, H, T, D] -> [B, Hkv, T·G, D] with rows ordered (position, head within the group).
torch::Tensor to_grouped_rows(const torch::Tensor& x, int64_t kv_heads) {
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), G = H / kv_heads;
  return x.reshape({B, kv_heads, G, T, D}).transpose(2, 3).reshape({B, kv_heads, T * G, D});
}

torch::Tensor from_grouped_rows(const torch::Tensor& x, int64_t heads) {
  const int64_t B = x.size(0), Hkv = x.size(1), D = x.size(3), G = heads / Hkv, T = x.size(2) / G;
  return x.reshape({B, Hkv, T, G, D}).transpose(2, 3).reshape({B, heads, T, D});
}

class BlockedCausalAttention : public torch::autograd::Function<BlockedCausalAttention> {
 public:
  // `allowed` is the bool mask [B, 1, T, T], or an empty tensor for plain causality (undefined
  // tensors do not pass through Function::apply).
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& allowed) {
    const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), T = q.size(2), D = q.size(3), G = H / Hkv;
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    auto qr = to_grouped_rows(q * scale, Hkv);  // scaled once here, as SDPA does
    auto kc = k.contiguous(), vc = v.contiguous();
    auto kt = kc.to(torch::kFloat).transpose(-1, -2);  // [B, Hkv, D, T] for fp32 scores
    const auto blocks = blocks_for(T);
    const bool keep = ctx != nullptr;
    std::vector<torch::Tensor> outputs, saved{qr, kc, vc};
    for (int64_t t0 = 0; t0 < T; t0 += blocks.size) {
      const int64_t n = std::min(blocks.size, T - t0), end = t0 + n;
      auto scores = torch::matmul(qr.narrow(2, t0 * G, n * G).to(torch::kFloat), kt.narrow(-1, 0, end));
      torch::Tensor probs;
      if (allowed.numel() == 0) {
        // Row r of the block is position t0 + r / G: it sees keys [0, t0 + r / G + 1).
        probs = masked_softmax(scores, t0 + 1, G, q.scalar_type());
      } else {  // rows (position, head) as [B, Hkv, n, G, end]; the mask broadcasts over heads
        auto block_allowed = allowed.narrow(2, t0, n).narrow(3, 0, end).unsqueeze(3);
        scores.view({B, Hkv, n, G, end}).masked_fill_(block_allowed.logical_not(),
                                                      -std::numeric_limits<float>::infinity());
        probs = masked_softmax(scores, end, 0, q.scalar_type());
      }
      outputs.push_back(torch::matmul(probs, vc.narrow(2, 0, end)));
      if (keep) saved.push_back(probs);
    }
    if (keep) ctx->save_for_backward(saved);
    return from_grouped_rows(torch::cat(outputs, 2), H);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &qr = saved[0], &kc = saved[1], &vc = saved[2];
    const int64_t Hkv = kc.size(1), T = kc.size(2), D = kc.size(3), G = qr.size(2) / T, H = Hkv * G;
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    auto dout = to_grouped_rows(grads[0].to(qr.scalar_type()), Hkv);
    // k and v gradients gather contributions from every later block: accumulate them in fp32.
    auto dk = torch::zeros(kc.sizes(), kc.options().dtype(torch::kFloat));
    auto dv = torch::zeros(vc.sizes(), vc.options().dtype(torch::kFloat));
    std::vector<torch::Tensor> dq_blocks;
    const auto blocks = blocks_for(T);
    size_t index = 3;
    for (int64_t t0 = 0; t0 < T; t0 += blocks.size) {
      const int64_t n = std::min(blocks.size, T - t0), end = t0 + n;
      const auto& probs = saved[index++];
      auto dout_block = dout.narrow(2, t0 * G, n * G);
      dv.narrow(2, 0, end).add_(torch::matmul(probs.transpose(-1, -2), dout_block));
      auto dprobs = torch::matmul(dout_block, vc.narrow(2, 0, end).transpose(-1, -2));
      auto dscores = at::_softmax_backward_data(dprobs, probs, -1, probs.scalar_type());
      dq_blocks.push_back(torch::matmul(dscores, kc.narrow(2, 0, end)));
      dk.narrow(2, 0, end).add_(torch::matmul(dscores.transpose(-1, -2), qr.narrow(2, t0 * G, n * G)));
    }
    auto dq = from_grouped_rows(torch::cat(dq_blocks, 2).mul_(scale), H);
    return {dq, dk.to(kc.scalar_type()), dv.to(vc.scalar_type()), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor blocked_causal_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                       const std::optional<torch::Tensor>& allowed) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "blocked attention wants [B, H, T, D] tensors");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "blocked attention: q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes(), " do not match");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "blocked attention: ", q.size(1), " heads over ", k.size(1), " KV heads");
  torch::Tensor mask = torch::empty({0}, q.options().dtype(torch::kBool));
  if (allowed) {
    TORCH_CHECK(allowed->scalar_type() == torch::kBool && allowed->dim() == 4 && allowed->size(1) == 1 &&
                    allowed->size(2) == q.size(2) && allowed->size(3) == q.size(2),
                "blocked attention: the mask must be bool [B, 1, T, T], got ", allowed->sizes());
    mask = allowed->expand({q.size(0), 1, q.size(2), q.size(2)});
  }
  if (torch::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad()))
    return BlockedCausalAttention::apply(q, k, v, mask);
  // No gradient wanted: the same forward without an autograd node or kept probabilities.
  torch::NoGradGuard no_grad;
  return BlockedCausalAttention::forward(nullptr, q, k, v, mask);
}

int64_t blocked_attention_saved_bytes(int64_t batch, int64_t heads, int64_t seq, int64_t element_size) {
  const auto blocks = blocks_for(seq);
  int64_t key_positions = 0;  // sum over blocks of (rows in the block) x (keys it attends)
  for (int64_t t0 = 0; t0 < seq; t0 += blocks.size) {
    const int64_t n = std::min(blocks.size, seq - t0);
    key_positions += n * (t0 + n);
  }
  return batch * heads * key_positions * element_size;
}

}  // namespace llmtune::model::detail
