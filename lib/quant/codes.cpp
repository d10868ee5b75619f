// Code books and the 8-bit block-wise quantizer: NF4/FP4 tables, bitsandbytes' "dynamic" maps
// (rebuilt with the same fp32 torch ops create_dynamic_map uses, so every value matches bit for
// bit), and quantize_blockwise with the reference nearest-code rule (midpoint bucketize).
#include <algorithm>
#include <cmath>

#include "core/core.h"
#include "quant/nf4_element.h"
#include "quant/quant.h"
#include "quant/quant_impl.h"

namespace llmtune::quant {

std::string to_string(QuantType t) { return t == QuantType::nf4 ? "nf4" : "fp4"; }

QuantType quant_type_from_string(const std::string& s, const std::string& where) {
  if (s == "nf4") return QuantType::nf4;
  if (s == "fp4") return QuantType::fp4;
  fail("{}: 4-bit quant type \"{}\" is not supported; use nf4 or fp4", where, s);
}

const std::array<float, 16>& code_table(QuantType t) {
  static const std::array<float, 16> nf4 = LLMTUNE_NF4_TABLE;
  static const std::array<float, 16> fp4 = LLMTUNE_FP4_TABLE;
  return t == QuantType::nf4 ? nf4 : fp4;
}

namespace {
// create_dynamic_map(signed, max_exponent_bits=7, total_bits=8), step for step in fp32 torch ops.
std::array<float, 256> make_dynamic_map(bool is_signed) {
  const int max_exp = 7, non_sign_bits = 7;
  std::vector<double> data;
  for (int i = 0; i < max_exp; ++i) {
    const int64_t items = is_signed ? (int64_t{1} << (i + non_sign_bits - max_exp)) + 1
                                    : (int64_t{1} << (i + non_sign_bits - max_exp + 1)) + 1;
    auto b = torch::linspace(0.1, 1, items, torch::kFloat);
    auto means = (b.slice(0, 0, items - 1) + b.slice(0, 1, items)) / 2.0;
    const double scale = std::pow(10.0, -(max_exp - 1) + i);  // Python's 10 ** k (exact for k = 0)
    auto pos = (means * scale).contiguous();
    for (int64_t k = 0; k < pos.numel(); ++k) data.push_back(pos.data_ptr<float>()[k]);
    if (is_signed) {
      auto neg = (means * -scale).contiguous();
      for (int64_t k = 0; k < neg.numel(); ++k) data.push_back(neg.data_ptr<float>()[k]);
    }
  }
  data.push_back(0.0);
  data.push_back(1.0);
  while (data.size() < 256) data.push_back(0.0);
  std::sort(data.begin(), data.end());
  std::array<float, 256> out{};
  for (size_t i = 0; i < 256; ++i) out[i] = static_cast<float>(data[i]);
  return out;
}
}  // namespace

const std::array<float, 256>& dynamic_map_signed() {
  static const auto m = make_dynamic_map(true);
  return m;
}
const std::array<float, 256>& dynamic_map_unsigned() {
  static const auto m = make_dynamic_map(false);
  return m;
}

namespace detail {

std::vector<float> midpoints(const float* sorted_code, int n) {
  std::vector<float> b(static_cast<size_t>(n - 1));
  for (int i = 0; i + 1 < n; ++i) b[static_cast<size_t>(i)] = (sorted_code[i] + sorted_code[i + 1]) / 2.0f;
  return b;
}

void check_blocksize(int64_t blocksize, const char* what) {
  if (blocksize < 16 || (blocksize & (blocksize - 1)) != 0)
    fail("{} block size {} is not supported; use a power of two (bitsandbytes: 32..4096, default 64)", what,
         blocksize);
}

}  // namespace detail

Blockwise8 quantize_blockwise(const torch::Tensor& x, const std::array<float, 256>& code, int64_t blocksize) {
  detail::check_blocksize(blocksize, "8-bit block-wise");
  auto xf = x.detach().to(torch::kCPU, torch::kFloat).contiguous().reshape(-1);
  const int64_t n = xf.numel(), nb = (n + blocksize - 1) / blocksize;
  Blockwise8 out{torch::empty({n}, torch::kUInt8), torch::empty({nb}, torch::kFloat)};
  const auto bounds = detail::midpoints(code.data(), 256);
  const float* src = xf.data_ptr<float>();
  uint8_t* q = out.codes.data_ptr<uint8_t>();
  float* am = out.absmax.data_ptr<float>();
  at::parallel_for(0, nb, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = b * blocksize, e = std::min(n, s + blocksize);
      const bool partial = e - s < blocksize;
      float m = 0;
      for (int64_t i = s; i < e; ++i) m = std::max(m, std::fabs(src[i]));
      am[b] = partial ? std::max(m, 1e-38f) : m;  // bitsandbytes stores the clamped value for the tail
      for (int64_t i = s; i < e; ++i)
        q[i] = static_cast<uint8_t>(elem::bucketize(bounds.data(), 255, elem::scale_to_unit(src[i], m, partial)));
    }
  });
  out.codes = out.codes.reshape(x.sizes()).to(x.device());
  out.absmax = out.absmax.to(x.device());
  return out;
}

torch::Tensor dequantize_blockwise(const Blockwise8& q, const std::array<float, 256>& code, int64_t blocksize) {
  auto c = q.codes.to(torch::kCPU).contiguous().reshape(-1);
  auto a = q.absmax.to(torch::kCPU, torch::kFloat).contiguous();
  const int64_t n = c.numel();
  auto out = torch::empty({n}, torch::kFloat);
  const uint8_t* cp = c.data_ptr<uint8_t>();
  const float* ap = a.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = code[cp[i]] * ap[i / blocksize];
  });
  return out.reshape(q.codes.sizes()).to(q.codes.device());
}

}  // namespace llmtune::quant
