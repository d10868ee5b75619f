// RMSNorm in one vectorised pass per row: see fused_rms_norm.h for why and for the formulas.
#include "model/fused_rms_norm.h"

#include <ATen/Parallel.h>
#include <fmt/ranges.h>

#include <cmath>

#include "core/core.h"
#include "model/vector_math.h"

namespace llmtune::model::detail {

namespace {

using namespace vector_math;

// y = round(w · round(x · rstd)); returns rstd.
template <typename T>
LLMTUNE_ALWAYS_INLINE float forward_row(const T* x, const T* w, int64_t C, float eps, T* y) {
  const int64_t vec_end = C - C % kLanes;
  f32v ss = splat(0.0f);
  for (int64_t j = 0; j < vec_end; j += kLanes) {
    const f32v v = load(x + j);
    ss += v * v;
  }
  float sum = horizontal_sum(ss);
  for (int64_t j = vec_end; j < C; ++j) sum += to_float(x[j]) * to_float(x[j]);
  const float rstd = 1.0f / std::sqrt(sum / static_cast<float>(C) + eps);
  for (int64_t j = 0; j < vec_end; j += kLanes) store(y + j, load(w + j) * round_to<T>(load(x + j) * rstd));
  for (int64_t j = vec_end; j < C; ++j)
    y[j] = from_float<T>(to_float(w[j]) * to_float(from_float<T>(to_float(x[j]) * rstd)));
  return rstd;
}

// gx = rstd · (g·w − x̂ · mean(g·w · x̂)), x̂ = x · rstd.
template <typename T>
LLMTUNE_ALWAYS_INLINE void backward_row(const T* g, const T* x, const T* w, int64_t C, float rstd, T* gx) {
  const int64_t vec_end = C - C % kLanes;
  f32v dot_v = splat(0.0f);
  for (int64_t j = 0; j < vec_end; j += kLanes) dot_v += load(g + j) * load(w + j) * (load(x + j) * rstd);
  float dot = horizontal_sum(dot_v);
  for (int64_t j = vec_end; j < C; ++j) dot += to_float(g[j]) * to_float(w[j]) * (to_float(x[j]) * rstd);
  const float mean = dot / static_cast<float>(C);
  for (int64_t j = 0; j < vec_end; j += kLanes)
    store(gx + j, (load(g + j) * load(w + j) - load(x + j) * rstd * mean) * rstd);
  for (int64_t j = vec_end; j < C; ++j)
    gx[j] = from_float<T>((to_float(g[j]) * to_float(w[j]) - to_float(x[j]) * rstd * mean) * rstd);
}

struct Rows {
  int64_t C;
  float eps;
};

template <typename T>
LLMTUNE_ALWAYS_INLINE void forward_rows(const Rows& a, const T* x, const T* w, int64_t begin, int64_t end, T* y,
                                        float* rstd) {
  for (int64_t r = begin; r < end; ++r) rstd[r] = forward_row(x + r * a.C, w, a.C, a.eps, y + r * a.C);
}

template <typename T>
LLMTUNE_ALWAYS_INLINE void backward_rows(const Rows& a, const T* g, const T* x, const T* w, const float* rstd,
                                         int64_t begin, int64_t end, T* gx) {
  for (int64_t r = begin; r < end; ++r) backward_row(g + r * a.C, x + r * a.C, w, a.C, rstd[r], gx + r * a.C);
}

template <typename T>
LLMTUNE_TARGET_AVX512 void forward_avx512(const Rows& a, const T* x, const T* w, int64_t b, int64_t e, T* y, float* r) {
  forward_rows(a, x, w, b, e, y, r);
}
template <typename T>
LLMTUNE_TARGET_AVX2 void forward_avx2(const Rows& a, const T* x, const T* w, int64_t b, int64_t e, T* y, float* r) {
  forward_rows(a, x, w, b, e, y, r);
}
template <typename T>
void forward_generic(const Rows& a, const T* x, const T* w, int64_t b, int64_t e, T* y, float* r) {
  forward_rows(a, x, w, b, e, y, r);
}
template <typename T>
LLMTUNE_TARGET_AVX512 void backward_avx512(const Rows& a, const T* g, const T* x, const T* w, const float* r,
                                           int64_t b, int64_t e, T* gx) {
  backward_rows(a, g, x, w, r, b, e, gx);
}
template <typename T>
LLMTUNE_TARGET_AVX2 void backward_avx2(const Rows& a, const T* g, const T* x, const T* w, const float* r, int64_t b,
                                       int64_t e, T* gx) {
  backward_rows(a, g, x, w, r, b, e, gx);
}
template <typename T>
void backward_generic(const Rows& a, const T* g, const T* x, const T* w, const float* r, int64_t b, int64_t e,
                      T* gx) {
  backward_rows(a, g, x, w, r, b, e, gx);
}

// Grain: rows per task, so that a task is a few thousand elements or more.
int64_t grain_for(int64_t C) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)); }

template <typename T>
void run_forward(const std::string& isa, const Rows& a, const torch::Tensor& x, const torch::Tensor& w,
                 torch::Tensor& y, torch::Tensor& rstd) {
  auto* fn = isa == "avx512" ? &forward_avx512<T> : isa == "avx2" ? &forward_avx2<T> : &forward_generic<T>;
  const T *px = x.data_ptr<T>(), *pw = w.data_ptr<T>();
  T* py = y.data_ptr<T>();
  float* pr = rstd.data_ptr<float>();
  at::parallel_for(0, rstd.numel(), grain_for(a.C), [&](int64_t b, int64_t e) { fn(a, px, pw, b, e, py, pr); });
}

template <typename T>
void run_backward(const std::string& isa, const Rows& a, const torch::Tensor& g, const torch::Tensor& x,
                  const torch::Tensor& w, const torch::Tensor& rstd, torch::Tensor& gx) {
  auto* fn = isa == "avx512" ? &backward_avx512<T> : isa == "avx2" ? &backward_avx2<T> : &backward_generic<T>;
  const T *pg = g.data_ptr<T>(), *px = x.data_ptr<T>(), *pw = w.data_ptr<T>();
  const float* pr = rstd.data_ptr<float>();
  T* pgx = gx.data_ptr<T>();
  at::parallel_for(0, rstd.numel(), grain_for(a.C), [&](int64_t b, int64_t e) { fn(a, pg, px, pw, pr, b, e, pgx); });
}

// Returns (y, rstd [rows] fp32) for contiguous x [rows·C] and w [C].
std::pair<torch::Tensor, torch::Tensor> forward_impl(const std::string& isa, const torch::Tensor& x,
                                                     const torch::Tensor& w, double eps) {
  const Rows a{w.numel(), static_cast<float>(eps)};
  auto y = torch::empty_like(x);
  auto rstd = torch::empty({x.numel() / std::max<int64_t>(a.C, 1)}, x.options().dtype(torch::kFloat));
  if (x.scalar_type() == torch::kFloat) run_forward<float>(isa, a, x, w, y, rstd);
  else run_forward<c10::BFloat16>(isa, a, x, w, y, rstd);
  return {y, rstd};
}

class FusedRMSNorm : public torch::autograd::Function<FusedRMSNorm> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               double eps, const std::string& isa) {
    auto [y, rstd] = forward_impl(isa, x, w, eps);
    ctx->save_for_backward({x, w, rstd});
    ctx->saved_data["isa"] = isa;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &rstd = saved[2];
    const std::string isa = ctx->saved_data["isa"].toStringRef();
    auto g = grads[0].to(x.scalar_type()).contiguous();
    torch::Tensor gx, gw;
    if (ctx->needs_input_grad(0)) {
      gx = torch::empty_like(x);
      const Rows a{w.numel(), 0.0f};
      if (x.scalar_type() == torch::kFloat) run_backward<float>(isa, a, g, x, w, rstd, gx);
      else run_backward<c10::BFloat16>(isa, a, g, x, w, rstd, gx);
    }
    if (ctx->needs_input_grad(1)) {
      // d/dw of w · h is the sum over rows of g · h, h as the forward rounded it.
      const int64_t C = w.numel();
      auto h = (x.reshape({-1, C}).to(torch::kFloat) * rstd.unsqueeze(1)).to(x.scalar_type()).to(torch::kFloat);
      gw = (g.reshape({-1, C}).to(torch::kFloat) * h).sum(0).to(w.scalar_type());
    }
    return {gx, gw, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

bool fused_rms_norm_applies(const torch::Tensor& x, const torch::Tensor& weight) {
  const auto t = x.scalar_type();
  return x.device().is_cpu() && weight.device().is_cpu() && weight.dim() == 1 && x.dim() >= 1 &&
         x.size(-1) == weight.size(0) && weight.scalar_type() == t && (t == torch::kFloat || t == torch::kBFloat16);
}

torch::Tensor fused_rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, const std::string& isa_in) {
  if (!fused_rms_norm_applies(x, weight))
    fail("fused RMSNorm wants CPU x [..., C] and weight [C] of one dtype (fp32 or bf16), got {} {} and {} {}",
         x.sizes(), c10::toString(x.scalar_type()), weight.sizes(), c10::toString(weight.scalar_type()));
  const std::string isa = isa_in == "auto" ? widest_isa() : isa_in;
  if (!vector_math::cpu_runs(isa)) fail("fused RMSNorm: this CPU does not run the `{}` code path", isa);
  auto xc = x.contiguous(), wc = weight.contiguous();
  if (torch::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad()))
    return FusedRMSNorm::apply(xc, wc, eps, isa);
  torch::NoGradGuard no_grad;
  return forward_impl(isa, xc, wc, eps).first;
}

}  // namespace llmtune::model::detail
