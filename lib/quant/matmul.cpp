// Run-time kernel choice (cpuid, LLMTUNE_QUANT_ISA override) and the two 4-bit products the layer
// needs: y = x·Wᵀ (fused GEMV for a few rows, else tiles of W dequantized into the compute dtype
// and multiplied by one GEMM each) and dx = g·W for the backward. Only one tile of W exists in
// 16/32 bits at a time. CUDA states go to lib/cuda when it is built (LLMTUNE_WITH_CUDA).
#include <cstdlib>
#include <mutex>

#include "core/core.h"
#include "quant/nf4_element.h"
#include "quant/quant_impl.h"

#ifdef LLMTUNE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "cuda/nf4_cuda.h"
#endif

namespace llmtune::quant {

std::string to_string(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "scalar";
}

Isa detected_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
    return Isa::scalar;
  }();
  return isa;
}

namespace {
std::mutex g_mu;
std::optional<Isa> g_override;
bool g_env_read = false;
int64_t g_tile_elements = int64_t{1} << 24;  // 16M values: a whole layer of small models, tiles of 7B ones
constexpr int64_t kGemvMaxRows = 8;

bool supported(Isa isa) { return static_cast<int>(isa) <= static_cast<int>(detected_isa()); }
}  // namespace

void set_isa_override(std::optional<Isa> isa) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (isa && !supported(*isa))
    fail("this CPU does not support {} (best: {})", to_string(*isa), to_string(detected_isa()));
  g_override = isa;
  g_env_read = true;
}

Isa active_isa() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_env_read) {
    g_env_read = true;
    if (const char* e = std::getenv("LLMTUNE_QUANT_ISA")) {
      std::string s = e;
      std::optional<Isa> want;
      if (s == "scalar") want = Isa::scalar;
      else if (s == "avx2") want = Isa::avx2;
      else if (s == "avx512") want = Isa::avx512;
      else if (!s.empty() && s != "auto")
        fail("LLMTUNE_QUANT_ISA={} is not one of scalar, avx2, avx512, auto", s);
      if (want && !supported(*want))
        log::warn(fmt::format("LLMTUNE_QUANT_ISA={}: not supported by this CPU; using {}", s, to_string(detected_isa())));
      else g_override = want;
    }
  }
  return g_override.value_or(detected_isa());
}

void set_tile_elements(int64_t n) { g_tile_elements = std::max<int64_t>(1, n); }

bool cuda_kernels_built() {
#ifdef LLMTUNE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace {

detail::View4 view(const State4bit& s, const torch::Tensor& absmax) {
  if (s.shape.size() != 2) fail("4-bit matmul: weight must be 2-D, got {} dims", s.shape.size());
  return {s.packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code_table(s.type).data(), s.shape[0], s.shape[1],
          s.blocksize};
}

detail::DequantFn dequant_fn(Isa isa) {
  return isa == Isa::avx512 ? detail::dequant_avx512 : isa == Isa::avx2 ? detail::dequant_avx2 : detail::dequant_scalar;
}
detail::GemvFn gemv_fn(Isa isa) {
  return isa == Isa::avx512 ? detail::gemv_avx512 : isa == Isa::avx2 ? detail::gemv_avx2 : detail::gemv_scalar;
}

// One tile of rows [r0, r0+rows) in `compute` (bf16 and fp32 written directly; fp16 via fp32).
torch::Tensor dequant_tile(const State4bit& s, const torch::Tensor& absmax, int64_t r0, int64_t rows,
                           torch::ScalarType compute, Isa isa) {
  auto out = torch::empty({rows, s.shape[1]}, compute == torch::kBFloat16 ? torch::kBFloat16 : torch::kFloat);
  dequantize_rows(s, absmax, r0, rows, out, isa);
  return compute == torch::kHalf ? out.to(torch::kHalf) : out;
}

}  // namespace

void dequantize_rows(const State4bit& s, const torch::Tensor& absmax, int64_t row0, int64_t rows, torch::Tensor& out,
                     Isa isa) {
  auto v = view(s, absmax);
  if (row0 < 0 || rows < 0 || row0 + rows > v.rows) fail("dequantize_rows: rows [{}, {}) out of range", row0, row0 + rows);
  if (!out.is_contiguous() || out.numel() != rows * v.cols ||
      (out.scalar_type() != torch::kFloat && out.scalar_type() != torch::kBFloat16))
    fail("dequantize_rows: output must be a contiguous fp32/bf16 [{}, {}] tensor", rows, v.cols);
  auto fn = dequant_fn(isa);
  float* f32 = out.scalar_type() == torch::kFloat ? out.data_ptr<float>() : nullptr;
  uint16_t* bf = f32 ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t base = row0 * v.cols, n = rows * v.cols;
  at::parallel_for(0, n, 1 << 15, [&](int64_t a, int64_t b) {
    fn(v, base + a, base + b, f32 ? f32 + a : nullptr, bf ? bf + a : nullptr);
  });
}

torch::Tensor matmul_4bit(const torch::Tensor& x, const State4bit& s, const torch::Tensor& absmax,
                          torch::ScalarType compute, std::optional<Isa> isa_opt) {
  const int64_t in = s.shape.at(1), out_f = s.shape.at(0);
  if (x.size(-1) != in) fail("4-bit linear: input has {} features, the weight expects {}", x.size(-1), in);
  auto out_shape = x.sizes().vec();
  out_shape.back() = out_f;
  auto x2 = x.reshape({-1, in});
  const int64_t N = x2.size(0);
#ifdef LLMTUNE_WITH_CUDA
  if (s.packed.is_cuda()) {
    const cuda::Nf4View cv{s.packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), s.shape[0], s.shape[1], s.blocksize,
                           s.type == QuantType::nf4 ? 0 : 1};
    const int code = compute == torch::kBFloat16 ? 1 : compute == torch::kHalf ? 2 : 0;
    auto xc = x2.to(compute).contiguous();
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    if (N <= kGemvMaxRows) {
      auto y = torch::empty({N, out_f}, xc.options());
      cuda::nf4_gemv(cv, xc.data_ptr(), y.data_ptr(), N, code, stream);
      return y.reshape(out_shape);
    }
    auto w = torch::empty({out_f, in}, xc.options());  // one layer at a time, freed after the GEMM
    cuda::nf4_dequantize(cv, w.data_ptr(), code, stream);
    return torch::matmul(xc, w.t()).reshape(out_shape);
  }
#endif
  if (s.packed.is_cuda())
    fail("4-bit weights are on CUDA but llmtune was built without lib/cuda kernels (needs nvcc and a CUDA LibTorch)");
  const Isa isa = isa_opt.value_or(active_isa());
  auto v = view(s, absmax);
  if (N <= kGemvMaxRows) {
    auto xf = x2.to(torch::kFloat).contiguous();
    auto y = torch::empty({N, out_f}, torch::kFloat);
    auto fn = gemv_fn(isa);
    const float* xp = xf.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, out_f, 16, [&](int64_t a, int64_t b) { fn(v, xp, N, yp, a, b); });
    return y.to(compute).reshape(out_shape);
  }
  auto xc = x2.to(compute);
  const int64_t tile_rows = std::max<int64_t>(1, std::min(out_f, g_tile_elements / std::max<int64_t>(1, in)));
  if (tile_rows >= out_f) return torch::matmul(xc, dequant_tile(s, absmax, 0, out_f, compute, isa).t()).reshape(out_shape);
  std::vector<torch::Tensor> parts;
  for (int64_t r0 = 0; r0 < out_f; r0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, out_f - r0);
    parts.push_back(torch::matmul(xc, dequant_tile(s, absmax, r0, rows, compute, isa).t()));
  }
  return torch::cat(parts, 1).reshape(out_shape);
}

torch::Tensor matmul_4bit_t(const torch::Tensor& g, const State4bit& s, const torch::Tensor& absmax,
                            torch::ScalarType compute, std::optional<Isa> isa_opt) {
  const int64_t in = s.shape.at(1), out_f = s.shape.at(0);
  if (g.size(-1) != out_f) fail("4-bit linear backward: gradient has {} features, expected {}", g.size(-1), out_f);
  auto in_shape = g.sizes().vec();
  in_shape.back() = in;
  auto g2 = g.reshape({-1, out_f}).to(compute);
  const int64_t N = g2.size(0);
#ifdef LLMTUNE_WITH_CUDA
  if (s.packed.is_cuda()) {
    auto w = torch::empty({out_f, in}, g2.options());
    cuda::nf4_dequantize(cuda::Nf4View{s.packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), s.shape[0], s.shape[1],
                                       s.blocksize, s.type == QuantType::nf4 ? 0 : 1},
                         w.data_ptr(), compute == torch::kBFloat16 ? 1 : compute == torch::kHalf ? 2 : 0,
                         c10::cuda::getCurrentCUDAStream().stream());
    return torch::matmul(g2, w).reshape(in_shape);
  }
#endif
  const Isa isa = isa_opt.value_or(active_isa());
  const int64_t tile_rows = std::max<int64_t>(1, std::min(out_f, g_tile_elements / std::max<int64_t>(1, in)));
  torch::Tensor dx;
  for (int64_t r0 = 0; r0 < out_f; r0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, out_f - r0);
    auto part = torch::matmul(g2.narrow(1, r0, rows), dequant_tile(s, absmax, r0, rows, compute, isa));
    dx = dx.defined() ? dx.add_(part) : part;
  }
  (void)N;
  return dx.reshape(in_shape);
}

}  // namespace llmtune::quant
