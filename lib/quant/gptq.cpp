// GPTQ (Frantar et al. 2022) and AWQ (Lin et al. 2023) weight quantization of one linear, written
// from the papers and formats.md §8: integer codes with one (scale, zero) per group of input
// columns and output row. The calibration statistic both use is H = Σ x xᵀ over calibration tokens
// (the factor 2 of the paper cancels: damping is relative, and AWQ only compares losses), so the
// output error of a weight error E [out, in] on those tokens is exactly tr(E H Eᵀ).
// Caveat: asymmetric GPTQ zeros are kept in [1, maxq] so the v1 checkpoint's "zero − 1" fits.
#include <algorithm>
#include <cmath>
#include <numeric>

#include <fmt/ranges.h>

#include "core/core.h"
#include "quant/quant.h"

namespace llmtune::quant {

namespace {

// (scale, zero) of every row of wg [out, n] under GPTQ's min/max quantizer (formats.md §8.1 item 7).
std::pair<torch::Tensor, torch::Tensor> gptq_params(const torch::Tensor& wg, int64_t maxq, bool sym) {
  auto zero = torch::zeros({wg.size(0)}, wg.options());
  auto xmin = torch::minimum(std::get<0>(wg.min(1)), zero);
  auto xmax = torch::maximum(std::get<0>(wg.max(1)), zero);
  if (sym) {
    xmax = torch::maximum(xmin.abs(), xmax);
    xmin = torch::where(xmin < 0, -xmax, xmin);
  }
  auto both0 = (xmin == 0).logical_and(xmax == 0);
  xmin = torch::where(both0, torch::full_like(xmin, -1), xmin);
  xmax = torch::where(both0, torch::full_like(xmax, 1), xmax);
  auto scale = (xmax - xmin) / static_cast<double>(maxq);
  torch::Tensor z;
  if (sym) z = torch::full_like(scale, static_cast<double>((maxq + 1) / 2));
  else z = torch::round(-xmin / scale).clamp(1, maxq);  // ≥ 1: the v1 layout stores zero − 1
  return {scale, z};
}

// AWQ's zero-point quantizer on wg [out, n] (formats.md §8.3): no forced zero in the range.
std::pair<torch::Tensor, torch::Tensor> awq_params(const torch::Tensor& wg, int64_t maxq) {
  auto mx = std::get<0>(wg.max(1)), mn = std::get<0>(wg.min(1));
  auto scale = (mx - mn).clamp_min(1e-5) / static_cast<double>(maxq);
  auto z = (-torch::round(mn / scale)).clamp(0, maxq);
  return {scale, z};
}

torch::Tensor codes(const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& zero, int64_t maxq) {
  return torch::clamp(torch::round(w / scale) + zero, 0, maxq);
}

void check_params(const torch::Tensor& w, const GroupQuantParams& p) {
  if (w.dim() != 2) fail("group quantization: weight must be 2-D [out, in]");
  if (p.bits != 2 && p.bits != 4 && p.bits != 8) fail("--bits {} is not supported; use 4 or 8", p.bits);
  const int64_t gs = p.group_size < 0 ? w.size(1) : p.group_size;
  if (gs <= 0 || w.size(1) % gs != 0)
    fail("--group-size {} does not divide the {} input features of a [{}, {}] weight; use a divisor (e.g. {}) or -1",
         p.group_size, w.size(1), w.size(0), w.size(1), std::gcd<int64_t>(w.size(1), 128));
}

}  // namespace

int64_t GroupQuantized::groups() const { return scales.size(0); }

torch::Tensor GroupQuantized::dequantize() const {
  auto gi = g_idx.to(torch::kLong);
  auto s = scales.to(torch::kFloat).index_select(0, gi);  // [in, out]
  auto z = zeros.to(torch::kFloat).index_select(0, gi);
  return ((q.to(torch::kFloat).t() - z) * s).t().contiguous();  // [out, in]
}

GroupQuantized rtn_quantize(const torch::Tensor& w_in, const GroupQuantParams& p) {
  check_params(w_in, p);
  auto w = w_in.detach().to(torch::kFloat);
  const int64_t out = w.size(0), in = w.size(1), gs = p.group_size < 0 ? in : p.group_size, G = in / gs;
  const int64_t maxq = (1 << p.bits) - 1;
  GroupQuantized r;
  r.bits = p.bits;
  r.group_size = gs;
  r.scales = torch::empty({G, out});
  r.zeros = torch::empty({G, out});
  r.q = torch::empty({out, in});
  for (int64_t g = 0; g < G; ++g) {
    auto wg = w.narrow(1, g * gs, gs);
    auto [s, z] = p.awq_quantizer ? awq_params(wg, maxq) : gptq_params(wg, maxq, p.sym);
    r.scales[g] = s;
    r.zeros[g] = z;
    r.q.narrow(1, g * gs, gs).copy_(codes(wg, s.unsqueeze(1), z.unsqueeze(1), maxq));
  }
  r.q = r.q.to(torch::kUInt8);
  r.zeros = r.zeros.to(torch::kInt);
  r.g_idx = torch::arange(in, torch::kInt).div(gs, "floor").to(torch::kInt);
  return r;
}

GroupQuantized gptq_quantize(const torch::Tensor& w_in, const torch::Tensor& h_in, const GroupQuantParams& p) {
  check_params(w_in, p);
  torch::NoGradGuard ng;
  auto W = w_in.detach().to(torch::kFloat).clone();
  auto H = h_in.detach().to(torch::kFloat).clone();
  const int64_t out = W.size(0), in = W.size(1), gs = p.group_size < 0 ? in : p.group_size, G = in / gs;
  const int64_t maxq = (1 << p.bits) - 1;
  if (H.size(0) != in || H.size(1) != in) fail("gptq: Hessian is [{}, {}], weight has {} inputs", H.size(0), H.size(1), in);

  // Inputs never seen in calibration: their weights cannot matter there; quantize them as zero.
  auto dead = H.diagonal() == 0;
  H.diagonal().masked_fill_(dead, 1.0);
  W.index_put_({torch::indexing::Slice(), dead}, 0.0);

  torch::Tensor perm, invperm;
  if (p.act_order) {  // largest Hessian diagonal (most active input) first
    perm = torch::argsort(H.diagonal(), /*stable=*/true, /*dim=*/0, /*descending=*/true);
    W = W.index_select(1, perm);
    H = H.index_select(0, perm).index_select(1, perm);
    invperm = torch::argsort(perm);
  }

  // Hinv = upper Cholesky factor of (H + λI)⁻¹; λ = damp · mean(diag H), raised if H is singular.
  torch::Tensor Hinv;
  double damp = p.damp_percent;
  for (int attempt = 0;; ++attempt) {
    auto Hd = H.clone();
    Hd.diagonal().add_(damp * H.diagonal().mean().item<double>());
    auto [L, info] = torch::linalg_cholesky_ex(Hd.to(torch::kDouble));
    if (info.item<int>() == 0) {
      auto U = torch::linalg_cholesky_ex(torch::cholesky_inverse(L), /*upper=*/true);
      if (std::get<1>(U).item<int>() == 0) {
        Hinv = std::get<0>(U).to(torch::kFloat);
        break;
      }
    }
    if (attempt == 5) fail("gptq: the calibration Hessian stays singular even with damping {}", damp);
    damp *= 10;
  }

  auto Q = torch::empty({out, in});  // integer codes, permuted column order
  auto scales = torch::empty({G, out}), zeros = torch::empty({G, out});
  std::vector<float> sc(out), zr(out);
  float* qp = Q.data_ptr<float>();
  for (int64_t i1 = 0; i1 < in; i1 += p.block_size) {
    const int64_t n = std::min(p.block_size, in - i1);
    auto W1 = W.narrow(1, i1, n).contiguous().clone();  // [out, n], updated in place below
    auto Err1 = torch::empty({out, n});
    auto Hinv1 = Hinv.narrow(0, i1, n).narrow(1, i1, n).contiguous();
    float* w = W1.data_ptr<float>();
    float* e = Err1.data_ptr<float>();
    const float* h = Hinv1.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t col = i1 + i;
      if (col % gs == 0) {
        // The group's range from W as updated by every earlier block and column of this block.
        auto wg = torch::cat({W1.narrow(1, i, std::min(gs, n - i)),
                              W.narrow(1, i1 + n, std::max<int64_t>(0, std::min(gs - (n - i), in - i1 - n)))},
                             1);
        auto [scale, zero] = gptq_params(wg, maxq, p.sym);
        scales[col / gs] = scale;
        zeros[col / gs] = zero;
        auto s_c = scale.contiguous(), z_c = zero.contiguous();
        std::copy(s_c.data_ptr<float>(), s_c.data_ptr<float>() + out, sc.begin());
        std::copy(z_c.data_ptr<float>(), z_c.data_ptr<float>() + out, zr.begin());
      }
      // Quantize column i, then let the remaining columns of the block absorb its error
      // (err = (w − q) / Hinv[i,i]; W[:, j] −= err · Hinv[i, j]), the paper's lazy batch update.
      const float d = h[i * n + i];
      const float* hr = h + i * n;
      for (int64_t o = 0; o < out; ++o) {
        float* wr = w + o * n;
        const float x = wr[i];
        const float q = std::clamp(std::nearbyint(x / sc[o]) + zr[o], 0.0f, static_cast<float>(maxq));
        qp[o * in + col] = q;
        const float err = (x - sc[o] * (q - zr[o])) / d;
        e[o * n + i] = err;
        for (int64_t j = i + 1; j < n; ++j) wr[j] -= err * hr[j];
      }
    }
    if (i1 + n < in) W.narrow(1, i1 + n, in - i1 - n).sub_(Err1.matmul(Hinv.narrow(0, i1, n).narrow(1, i1 + n, in - i1 - n)));
  }

  GroupQuantized r;
  r.bits = p.bits;
  r.group_size = gs;
  r.scales = scales;
  r.zeros = zeros.to(torch::kInt);
  auto g_idx = torch::arange(in, torch::kLong).div(gs, "floor");  // group of each permuted position
  if (p.act_order) {
    Q = Q.index_select(1, invperm);
    g_idx = g_idx.index_select(0, invperm);  // g_idx[original column] = group it was quantized in
  }
  r.q = Q.to(torch::kUInt8).contiguous();
  r.g_idx = g_idx.to(torch::kInt);
  return r;
}

// ---------------------------------------------------------------------------------------------
// AWQ

double weighted_error(const torch::Tensor& e, const torch::Tensor& H) { return (e.matmul(H) * e).sum().item<double>(); }

torch::Tensor awq_search_scales(const std::vector<torch::Tensor>& ws, const torch::Tensor& H, const torch::Tensor& x_absmean,
                                const GroupQuantParams& p, double* best_alpha, int grid) {
  torch::NoGradGuard ng;
  GroupQuantParams qp = p;
  qp.awq_quantizer = true;
  auto Hf = H.to(torch::kFloat);
  auto x = x_absmean.to(torch::kFloat);
  double best = INFINITY, alpha_best = 0;
  torch::Tensor s_best = torch::ones_like(x);
  for (int k = 0; k < grid; ++k) {
    const double alpha = static_cast<double>(k) / grid;
    auto s = x.pow(alpha).clamp_min(1e-4);
    s = s / std::sqrt(s.max().item<double>() * s.min().item<double>());
    double loss = 0;
    for (const auto& w : ws) {
      auto wf = w.to(torch::kFloat);
      auto deq = rtn_quantize(wf * s, qp).dequantize() / s;
      loss += weighted_error(wf - deq, Hf);
    }
    if (loss < best) {
      best = loss;
      alpha_best = alpha;
      s_best = s;
    }
  }
  if (best_alpha) *best_alpha = alpha_best;
  return s_best;
}

GroupQuantized awq_clip_quantize(const torch::Tensor& w_in, const torch::Tensor& H, const GroupQuantParams& p, bool clip) {
  torch::NoGradGuard ng;
  GroupQuantParams qp = p;
  qp.awq_quantizer = true;
  auto w = w_in.detach().to(torch::kFloat);
  if (!clip) return rtn_quantize(w, qp);
  check_params(w, qp);
  const int64_t out = w.size(0), in = w.size(1), gs = qp.group_size < 0 ? in : qp.group_size, G = in / gs;
  // Per (row, group) error with the group's own block of H (cross-group terms ignored, like AWQ's
  // per-group output comparison); pick the shrink of the absolute range with the lowest error.
  auto Hb = torch::stack([&] {
    std::vector<torch::Tensor> b;
    for (int64_t g = 0; g < G; ++g) b.push_back(H.to(torch::kFloat).narrow(0, g * gs, gs).narrow(1, g * gs, gs));
    return b;
  }());                                             // [G, gs, gs]
  auto w3 = w.view({out, G, gs}).permute({1, 0, 2});  // [G, out, gs]
  auto absmax = w3.abs().amax(2, true);              // [G, out, 1]
  auto best_err = torch::full({G, out, 1}, INFINITY);
  auto best_max = absmax.clone();
  for (int k = 0; k < 10; ++k) {
    auto mx = absmax * (1.0 - k / 20.0);
    auto wc = torch::max(torch::min(w3, mx), -mx);
    auto deq = rtn_quantize(wc.permute({1, 0, 2}).reshape({out, in}), qp).dequantize().view({out, G, gs}).permute({1, 0, 2});
    auto e = w3 - deq;
    auto err = (e.matmul(Hb) * e).sum(2, true);
    auto better = err < best_err;
    best_err = torch::where(better, err, best_err);
    best_max = torch::where(better, mx, best_max);
  }
  auto wc = torch::max(torch::min(w3, best_max), -best_max).permute({1, 0, 2}).reshape({out, in});
  return rtn_quantize(wc, qp);
}

// ---------------------------------------------------------------------------------------------
// Hugging Face layouts

namespace {

// Packs v [rows, cols] (small non-negative ints) along dim 1: word c holds columns c*per + order[k]
// in bits [k·bits, (k+1)·bits). Result int32 [rows, cols/per] (bit pattern of a uint32).
torch::Tensor pack_cols(const torch::Tensor& v, int bits, const std::vector<int64_t>& order) {
  const int64_t per = 32 / bits, rows = v.size(0), cols = v.size(1);
  if (cols % per != 0) fail("cannot pack {} columns {} per 32-bit word", cols, per);
  auto v3 = v.to(torch::kLong).view({rows, cols / per, per});
  auto word = torch::zeros({rows, cols / per}, torch::kLong);
  for (int64_t k = 0; k < per; ++k) word.bitwise_or_(v3.select(2, order[k]).bitwise_left_shift(bits * k));
  word = torch::where(word >= (int64_t{1} << 31), word - (int64_t{1} << 32), word);
  return word.to(torch::kInt).contiguous();
}

torch::Tensor unpack_cols(const torch::Tensor& packed, int bits, const std::vector<int64_t>& order) {
  const int64_t per = 32 / bits, rows = packed.size(0), words = packed.size(1);
  auto w = packed.to(torch::kLong).bitwise_and(0xFFFFFFFFLL);
  auto out = torch::empty({rows, words, per}, torch::kLong);
  for (int64_t k = 0; k < per; ++k) out.select(2, order[k]).copy_(w.bitwise_right_shift(bits * k).bitwise_and((1 << bits) - 1));
  return out.view({rows, words * per});
}

std::vector<int64_t> identity_order(int bits) {
  std::vector<int64_t> o(32 / bits);
  for (size_t i = 0; i < o.size(); ++i) o[i] = static_cast<int64_t>(i);
  return o;
}
const std::vector<int64_t> kAwqOrder = {0, 2, 4, 6, 1, 3, 5, 7};

void check_shape(const torch::Tensor& t, const std::vector<int64_t>& want, const std::string& what) {
  if (!t.defined()) fail("{} is missing", what);
  if (t.sizes().vec() != want)
    fail("{} has shape [{}] but [{}] was expected from the layer's size and quantization_config", what,
         fmt::join(t.sizes(), ", "), fmt::join(want, ", "));
}

}  // namespace

std::vector<std::pair<std::string, torch::Tensor>> gptq_pack(const GroupQuantized& g, bool v2) {
  const auto order = identity_order(g.bits);
  // qweight packs along the input dim: q [out, in] packed per row, then transposed to [in/per, out].
  auto qweight = pack_cols(g.q, g.bits, order).t().contiguous();
  auto z = g.zeros.to(torch::kLong) - (v2 ? 0 : 1);
  auto qzeros = pack_cols(z, g.bits, order);  // [G, out/per]
  return {{"qweight", qweight}, {"qzeros", qzeros}, {"scales", g.scales.to(torch::kHalf).contiguous()},
          {"g_idx", g.g_idx.to(torch::kInt).contiguous()}};
}

GroupQuantized gptq_unpack(const torch::Tensor& qweight, const torch::Tensor& qzeros, const torch::Tensor& scales,
                           const torch::Tensor& g_idx, int bits, int64_t group_size, int64_t in, int64_t out, bool v2,
                           const std::string& name) {
  const int64_t per = 32 / bits;
  if (in % per || out % per) fail("{}: [{}, {}] cannot hold {}-bit codes packed {} per int32", name, out, in, bits, per);
  const int64_t gs = group_size < 0 ? in : group_size, G = (in + gs - 1) / gs;
  check_shape(qweight, {in / per, out}, name + ".qweight");
  check_shape(qzeros, {G, out / per}, name + ".qzeros");
  check_shape(scales, {G, out}, name + ".scales");
  const auto order = identity_order(bits);
  GroupQuantized r;
  r.bits = bits;
  r.group_size = gs;
  r.q = unpack_cols(qweight.t().contiguous(), bits, order).to(torch::kUInt8);  // [out, in]
  r.zeros = (unpack_cols(qzeros, bits, order) + (v2 ? 0 : 1)).to(torch::kInt);
  r.scales = scales.to(torch::kFloat);
  if (g_idx.defined()) {
    check_shape(g_idx, {in}, name + ".g_idx");
    r.g_idx = g_idx.to(torch::kInt);
    if (r.g_idx.min().item<int>() < 0 || r.g_idx.max().item<int>() >= G)
      fail("{}.g_idx holds group indices outside [0, {})", name, G);
  } else {
    r.g_idx = torch::arange(in, torch::kLong).div(gs, "floor").to(torch::kInt);
  }
  return r;
}

std::vector<std::pair<std::string, torch::Tensor>> awq_pack(const GroupQuantized& g) {
  if (g.bits != 4) fail("AWQ GEMM packing is 4-bit only");
  auto qweight = pack_cols(g.q.t().contiguous(), 4, kAwqOrder);  // [in, out/8]
  auto qzeros = pack_cols(g.zeros, 4, kAwqOrder);                // [G, out/8]
  return {{"qweight", qweight}, {"qzeros", qzeros}, {"scales", g.scales.to(torch::kHalf).contiguous()}};
}

GroupQuantized awq_unpack(const torch::Tensor& qweight, const torch::Tensor& qzeros, const torch::Tensor& scales,
                          int64_t group_size, int64_t in, int64_t out, const std::string& name) {
  if (out % 8) fail("{}: {} outputs cannot be packed 8 per int32 (AWQ GEMM)", name, out);
  const int64_t gs = group_size < 0 ? in : group_size;
  if (in % gs) fail("{}: group_size {} does not divide {} inputs", name, gs, in);
  const int64_t G = in / gs;
  check_shape(qweight, {in, out / 8}, name + ".qweight");
  check_shape(qzeros, {G, out / 8}, name + ".qzeros");
  check_shape(scales, {G, out}, name + ".scales");
  GroupQuantized r;
  r.bits = 4;
  r.group_size = gs;
  r.q = unpack_cols(qweight, 4, kAwqOrder).t().contiguous().to(torch::kUInt8);
  r.zeros = unpack_cols(qzeros, 4, kAwqOrder).to(torch::kInt);
  r.scales = scales.to(torch::kFloat);
  r.g_idx = torch::arange(in, torch::kLong).div(gs, "floor").to(torch::kInt);
  return r;
}

}  // namespace llmtune::quant
