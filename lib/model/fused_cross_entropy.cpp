// Fused cross-entropy with its logits gradient: see fused_cross_entropy.h for why.
//
// The row kernel is written once with the vector helpers of vector_math.h and compiled three times,
// into functions carrying target("avx512…"), target("avx2,fma") and no target attribute.
#include "model/fused_cross_entropy.h"

#include <ATen/Parallel.h>
#include <fmt/ranges.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "core/core.h"
#include "model/vector_math.h"

namespace llmtune::model::detail {

namespace {

using namespace vector_math;

// One row: returns logsumexp(x) - x[target] and writes softmax(x) - onehot(target) to grad.
// `buffer` holds V floats (e^(x - max) between the second and third pass; a 49k vocabulary is
// 192 KiB, which stays in L2).
template <typename T>
LLMTUNE_ALWAYS_INLINE double cross_entropy_row(const T* x, int64_t V, int64_t target, float* buffer, T* grad) {
  bool finite;
  const float max = row_max(x, V, &finite);
  if (!finite || V == 0) {
    const T nan = from_float<T>(std::numeric_limits<float>::quiet_NaN());
    for (int64_t j = 0; j < V; ++j) grad[j] = nan;
    return std::numeric_limits<double>::quiet_NaN();
  }
  const float sum = exp_into(x, V, max, buffer);  // e^(x - max), kept for the probabilities
  const float inv = 1.0f / sum;
  scale_into(buffer, V, inv, grad);
  grad[target] = from_float<T>(buffer[target] * inv - 1.0f);
  return static_cast<double>(max) + std::log(static_cast<double>(sum)) - static_cast<double>(to_float(x[target]));
}

template <typename T>
LLMTUNE_ALWAYS_INLINE void cross_entropy_rows(const T* x, int64_t V, const int64_t* targets, int64_t begin,
                                              int64_t end, float* buffer, T* grad, double* losses) {
  for (int64_t r = begin; r < end; ++r) losses[r] = cross_entropy_row(x + r * V, V, targets[r], buffer, grad + r * V);
}

template <typename T>
LLMTUNE_TARGET_AVX512 void rows_avx512(
    const T* x, int64_t V, const int64_t* targets, int64_t begin, int64_t end, float* buffer, T* grad,
    double* losses) {
  cross_entropy_rows(x, V, targets, begin, end, buffer, grad, losses);
}

template <typename T>
LLMTUNE_TARGET_AVX2 void rows_avx2(const T* x, int64_t V, const int64_t* targets, int64_t begin,
                                                   int64_t end, float* buffer, T* grad, double* losses) {
  cross_entropy_rows(x, V, targets, begin, end, buffer, grad, losses);
}

template <typename T>
void rows_generic(const T* x, int64_t V, const int64_t* targets, int64_t begin, int64_t end, float* buffer, T* grad,
                  double* losses) {
  cross_entropy_rows(x, V, targets, begin, end, buffer, grad, losses);
}

template <typename T>
void run_rows(const std::string& isa, const torch::Tensor& logits, const torch::Tensor& targets, torch::Tensor& grad,
              std::vector<double>& losses) {
  const int64_t n = logits.size(0), V = logits.size(1);
  const T* x = logits.data_ptr<T>();
  T* g = grad.data_ptr<T>();
  const int64_t* t = targets.data_ptr<int64_t>();
  auto* rows = isa == "avx512" ? &rows_avx512<T> : isa == "avx2" ? &rows_avx2<T> : &rows_generic<T>;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(static_cast<size_t>(V));
    rows(x, V, t, begin, end, buffer.data(), g, losses.data());
  });
}

}  // namespace

bool fused_cross_entropy_applies(const torch::Tensor& logits) {
  return logits.device().is_cpu() && logits.dim() == 2 &&
         (logits.scalar_type() == torch::kFloat || logits.scalar_type() == torch::kBFloat16);
}

CrossEntropyWithGrad cross_entropy_with_grad(const torch::Tensor& logits_in, const torch::Tensor& targets_in,
                                             const std::string& isa_in) {
  if (!fused_cross_entropy_applies(logits_in))
    fail("fused cross-entropy wants CPU fp32/bf16 logits [n, V], got {} {} on {}", logits_in.sizes(),
         c10::toString(logits_in.scalar_type()), logits_in.device().str());
  if (targets_in.dim() != 1 || targets_in.size(0) != logits_in.size(0))
    fail("fused cross-entropy: {} targets for {} rows of logits", targets_in.sizes(), logits_in.size(0));
  const std::string isa = isa_in == "auto" ? widest_isa() : isa_in;
  if (!cpu_runs(isa)) fail("fused cross-entropy: this CPU does not run the `{}` code path", isa);
  auto logits = logits_in.contiguous();
  auto targets = targets_in.to(torch::kLong).contiguous();
  const int64_t n = logits.size(0), V = logits.size(1);
  if (n > 0) {
    const int64_t lo = targets.min().item<int64_t>(), hi = targets.max().item<int64_t>();
    if (lo < 0 || hi >= V) fail("cross-entropy target {} is outside the vocabulary [0, {})", lo < 0 ? lo : hi, V);
  }
  CrossEntropyWithGrad out;
  out.grad = torch::empty_like(logits);
  std::vector<double> losses(static_cast<size_t>(n));
  if (logits.scalar_type() == torch::kFloat) run_rows<float>(isa, logits, targets, out.grad, losses);
  else run_rows<c10::BFloat16>(isa, logits, targets, out.grad, losses);
  for (double l : losses) out.loss_sum += l;  // in row order: the same total for any thread count
  return out;
}

}  // namespace llmtune::model::detail
