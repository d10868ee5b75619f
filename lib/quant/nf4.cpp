// 4-bit quantization in bitsandbytes' format (formats.md §6.2–6.4): block absmax, nearest code by
// midpoint bucketize (FP4 remapped through torch.argsort's order), high-nibble-first packing,
// double quantization of the scales (mean offset, dynamic map, blocks of 256), and the state's
// serialized tensors. Quantization runs on the CPU (load time); the result moves to w's device.
#include <cmath>
#include <cstring>

#include <fmt/ranges.h>

#include "core/core.h"
#include "quant/nf4_element.h"
#include "quant/quant.h"
#include "quant/quant_impl.h"

namespace llmtune::quant {

namespace detail {
const std::array<int, 16>& sorted_order(QuantType t) {
  // torch.argsort (not stable) on the table, exactly as bitsandbytes calls it; computed once with
  // the same library so the tie between FP4's two zeros (index 0 and 8) resolves the same way.
  static const auto make = [](QuantType q) {
    auto order = torch::argsort(torch::from_blob(const_cast<float*>(code_table(q).data()), {16}, torch::kFloat));
    std::array<int, 16> o{};
    for (int i = 0; i < 16; ++i) o[static_cast<size_t>(i)] = static_cast<int>(order[i].item<int64_t>());
    return o;
  };
  static const std::array<int, 16> nf4 = make(QuantType::nf4), fp4 = make(QuantType::fp4);
  return t == QuantType::nf4 ? nf4 : fp4;
}
}  // namespace detail

int64_t State4bit::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

torch::Tensor State4bit::absmax_fp32() const {
  if (!nested) return absmax.to(torch::kFloat);
  // absmax[i] = nested_code[u8[i]] * nested_absmax[i / 256] + offset, two roundings (§6.3).
  auto codes = absmax.to(torch::kCPU).contiguous();
  auto na = nested_absmax.to(torch::kCPU, torch::kFloat).contiguous();
  auto nc = nested_code.to(torch::kCPU, torch::kFloat).contiguous();
  const int64_t n = codes.numel();
  if (nc.numel() != 256) fail("4-bit state: nested_quant_map has {} entries; expected 256", nc.numel());
  if (na.numel() * nested_blocksize < n)
    fail("4-bit state: {} nested scales cannot cover {} block scales (nested block size {})", na.numel(), n,
         nested_blocksize);
  auto out = torch::empty({n}, torch::kFloat);
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    o[i] = elem::nested_absmax(codes.data_ptr<uint8_t>(), na.data_ptr<float>(), nc.data_ptr<float>(), nested_offset, i,
                               nested_blocksize);
  return out.to(packed.device());
}

int64_t State4bit::bytes() const {
  int64_t b = packed.numel() + absmax.numel() * absmax.element_size();
  if (nested) b += nested_absmax.numel() * 4 + nested_code.numel() * 4;
  return b;
}

State4bit State4bit::to(torch::Device d) const {
  State4bit s = *this;
  s.packed = packed.to(d);
  s.absmax = absmax.to(d);
  if (nested) {
    s.nested_absmax = nested_absmax.to(d);
    s.nested_code = nested_code.to(d);
  }
  return s;
}

State4bit quantize_4bit(const torch::Tensor& w, QuantType type, bool double_quant, int64_t blocksize) {
  detail::check_blocksize(blocksize, "4-bit");
  if (!w.is_floating_point()) fail("quantize_4bit: expected a float tensor, got {}", c10::toString(w.scalar_type()));
  State4bit s;
  s.type = type;
  s.blocksize = blocksize;
  s.shape = w.sizes().vec();
  s.dtype = w.scalar_type();
  auto xf = w.detach().to(torch::kCPU, torch::kFloat).contiguous().reshape(-1);
  const int64_t n = xf.numel(), nb = (n + blocksize - 1) / blocksize;
  const auto& code = code_table(type);
  const auto& order = detail::sorted_order(type);
  float sorted[16];
  for (int i = 0; i < 16; ++i) sorted[i] = code[static_cast<size_t>(order[static_cast<size_t>(i)])];
  const auto bounds = detail::midpoints(sorted, 16);
  auto packed = torch::zeros({(n + 1) / 2}, torch::kUInt8);
  auto absmax = torch::empty({nb}, torch::kFloat);
  const float* src = xf.data_ptr<float>();
  uint8_t* pk = packed.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  // Blocks are even-sized, so no byte is shared between two blocks (parallel writes are safe).
  at::parallel_for(0, nb, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t st = b * blocksize, e = std::min(n, st + blocksize);
      const bool partial = e - st < blocksize;
      float m = 0;
      for (int64_t i = st; i < e; ++i) m = std::max(m, std::fabs(src[i]));
      am[b] = partial ? std::max(m, 1e-38f) : m;
      for (int64_t i = st; i < e; ++i) {
        const int k = elem::bucketize(bounds.data(), 15, elem::scale_to_unit(src[i], m, partial));
        const auto q = static_cast<uint8_t>(order[static_cast<size_t>(k)]);
        pk[i >> 1] |= (i & 1) ? q : static_cast<uint8_t>(q << 4);
      }
      // odd n: the pad element is scaled 0.0 -> bucketize(0), as bitsandbytes pads `scaled` with 0
      if (e == n && (n & 1)) {
        const auto q = static_cast<uint8_t>(order[static_cast<size_t>(elem::bucketize(bounds.data(), 15, 0.0f))]);
        pk[n >> 1] |= q;
      }
    }
  });
  s.packed = packed;
  if (double_quant) {
    s.nested = true;
    auto offset = absmax.mean();  // torch's own reduction, as bitsandbytes computes it
    s.nested_offset = offset.item<float>();
    auto q = quantize_blockwise(absmax - offset, dynamic_map_signed(), s.nested_blocksize);
    s.absmax = q.codes;
    s.nested_absmax = q.absmax;
    s.nested_code = torch::from_blob(const_cast<float*>(dynamic_map_signed().data()), {256}, torch::kFloat).clone();
  } else {
    s.absmax = absmax;
  }
  return s.to(w.device());
}

torch::Tensor dequantize_4bit(const State4bit& s, torch::ScalarType dtype) {
  auto cpu = s.packed.device().is_cpu() ? s : s.to(torch::kCPU);
  auto am = cpu.absmax_fp32().contiguous();
  const int64_t n = s.numel();
  auto out = torch::empty({n}, torch::kFloat);
  const float* code = code_table(s.type).data();
  const uint8_t* pk = cpu.packed.contiguous().data_ptr<uint8_t>();
  const float* a = am.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = elem::dequant(code, pk, i, a[i / s.blocksize]);
  });
  return out.to(dtype).reshape(s.shape).to(s.packed.device());
}

// ---------------------------------------------------------------------------------------------
// Serialized form

namespace {
std::string dtype_name(torch::ScalarType t) {
  if (t == torch::kBFloat16) return "bfloat16";
  if (t == torch::kHalf) return "float16";
  return "float32";
}
torch::ScalarType dtype_from(const std::string& s, const std::string& where) {
  if (s == "bfloat16") return torch::kBFloat16;
  if (s == "float16") return torch::kHalf;
  if (s == "float32") return torch::kFloat;
  fail("{}: dtype \"{}\" in the quant_state is not supported (bfloat16, float16, float32)", where, s);
}
}  // namespace

std::vector<std::pair<std::string, torch::Tensor>> state_to_tensors(const State4bit& s, const std::string& wn) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  auto cpu = s.to(torch::kCPU);
  out.emplace_back(wn, cpu.packed.reshape({-1, 1}).contiguous());
  out.emplace_back(wn + ".absmax", cpu.absmax.contiguous());
  out.emplace_back(wn + ".quant_map",
                   torch::from_blob(const_cast<float*>(code_table(s.type).data()), {16}, torch::kFloat).clone());
  nlohmann::json j = {{"quant_type", to_string(s.type)}, {"blocksize", s.blocksize}, {"dtype", dtype_name(s.dtype)},
                      {"shape", s.shape}};
  if (s.nested) {
    out.emplace_back(wn + ".nested_absmax", cpu.nested_absmax.contiguous());
    out.emplace_back(wn + ".nested_quant_map", cpu.nested_code.contiguous());
    j["nested_blocksize"] = s.nested_blocksize;
    j["nested_dtype"] = "float32";
    j["nested_offset"] = s.nested_offset;
  }
  std::string text = j.dump();
  auto bytes = torch::empty({static_cast<int64_t>(text.size())}, torch::kUInt8);
  std::memcpy(bytes.data_ptr<uint8_t>(), text.data(), text.size());
  out.emplace_back(wn + ".quant_state.bitsandbytes__" + to_string(s.type), bytes);
  return out;
}

State4bit state_from_tensors(const std::string& wn, const std::function<torch::Tensor(const std::string&)>& get,
                             const std::string& source) {
  auto need = [&](const std::string& name) {
    auto t = get(name);
    if (!t.defined())
      fail("{}: {} is missing; a bitsandbytes 4-bit weight needs {}.absmax, .quant_map and .quant_state.*", source,
           name, wn);
    return t;
  };
  torch::Tensor js = get(wn + ".quant_state.bitsandbytes__nf4");
  if (!js.defined()) js = get(wn + ".quant_state.bitsandbytes__fp4");
  if (!js.defined())
    fail("{}: {} is stored as uint8 but {}.quant_state.bitsandbytes__nf4 (or __fp4) is missing; is this a "
         "bitsandbytes 4-bit checkpoint?", source, wn, wn);
  auto jb = js.to(torch::kCPU).contiguous();
  std::string text(reinterpret_cast<const char*>(jb.data_ptr<uint8_t>()), static_cast<size_t>(jb.numel()));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    fail("{}: {}.quant_state.* is not valid JSON ({})", source, wn, e.what());
  }
  State4bit s;
  const std::string where = fmt::format("{} ({}.quant_state)", source, wn);
  try {
    s.type = quant_type_from_string(j.at("quant_type").get<std::string>(), where);
    s.blocksize = j.at("blocksize").get<int64_t>();
    s.shape = j.at("shape").get<std::vector<int64_t>>();
    s.dtype = dtype_from(j.value("dtype", std::string("float32")), where);
    s.packed = need(wn).to(torch::kUInt8).reshape(-1);
    s.absmax = need(wn + ".absmax");
    if (j.contains("nested_blocksize")) {
      s.nested = true;
      s.nested_blocksize = j.at("nested_blocksize").get<int64_t>();
      s.nested_offset = j.at("nested_offset").get<float>();
      s.nested_absmax = need(wn + ".nested_absmax").to(torch::kFloat);
      s.nested_code = need(wn + ".nested_quant_map").to(torch::kFloat);
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: {}", where, e.what());
  }
  detail::check_blocksize(s.blocksize, "4-bit");
  auto qm = get(wn + ".quant_map");
  if (qm.defined()) {
    auto expect = torch::from_blob(const_cast<float*>(code_table(s.type).data()), {16}, torch::kFloat);
    if (qm.numel() != 16 || !torch::equal(qm.to(torch::kFloat).reshape(-1), expect))
      fail("{}: {}.quant_map is not bitsandbytes' {} table; custom 4-bit code books are not supported", source, wn,
           to_string(s.type));
  }
  const int64_t n = s.numel();
  if (s.packed.numel() != (n + 1) / 2)
    fail("{}: {} has {} bytes but shape [{}] needs {}", source, wn, s.packed.numel(), fmt::join(s.shape, ", "),
         (n + 1) / 2);
  if (s.absmax.numel() != s.n_blocks())
    fail("{}: {}.absmax has {} entries but {} blocks of {} are needed", source, wn, s.absmax.numel(), s.n_blocks(),
         s.blocksize);
  if (s.nested ? s.absmax.scalar_type() != torch::kUInt8 : !s.absmax.is_floating_point())
    fail("{}: {}.absmax has dtype {} ({} double quantization)", source, wn, c10::toString(s.absmax.scalar_type()),
         s.nested ? "uint8 expected with" : "float expected without");
  if (!s.nested) s.absmax = s.absmax.to(torch::kFloat);
  return s;
}

}  // namespace llmtune::quant
