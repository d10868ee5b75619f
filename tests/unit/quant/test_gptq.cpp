// Unit tests for GPTQ/AWQ (lib/quant/gptq.cpp): the HF packings word by word (formats.md §8.2,
// §8.3) and their round trips; GPTQ with H = I is exactly round-to-nearest (no error to
// compensate); with correlated inputs GPTQ (and act-order) beats RTN in output error tr(E H Eᵀ);
// the act-order g_idx; AWQ's scale search never loses to α = 0 (plain RTN).
#include <fstream>

#include <catch2/catch.hpp>

#include "quant/quant.h"

using namespace llmtune;

namespace {

torch::Tensor correlated_hessian(int64_t in, int64_t tokens) {
  auto a = torch::randn({in, in}) / std::sqrt(static_cast<double>(in));
  auto scale = torch::exp(torch::randn({in}));  // uneven channel magnitudes, like real activations
  auto x = torch::randn({tokens, in}).matmul(a) * scale;
  return x.t().matmul(x) / static_cast<double>(tokens);
}

}  // namespace

TEST_CASE("gptq packing: qweight along inputs, qzeros minus one (v1), round trip", "[quant][gptq]") {
  torch::manual_seed(0);
  quant::GroupQuantized g;
  g.bits = 4;
  g.group_size = 8;
  g.q = torch::randint(0, 16, {16, 32}).to(torch::kUInt8);
  for (int64_t i = 0; i < 8; ++i) g.q[0][i] = i;  // output 0, inputs 0..7 -> word 0x76543210
  g.scales = torch::rand({4, 16}) + 0.1;
  g.zeros = torch::randint(1, 16, {4, 16}).to(torch::kInt);
  g.zeros[0].narrow(0, 0, 8).copy_(torch::arange(1, 9));  // stored 0..7 -> word 0x76543210
  g.g_idx = torch::arange(32).div(8, "floor").to(torch::kInt);
  auto packed = quant::gptq_pack(g);
  REQUIRE(packed[0].first == "qweight");
  auto qweight = packed[0].second, qzeros = packed[1].second;
  CHECK(qweight.sizes() == torch::IntArrayRef({4, 16}));
  CHECK(qzeros.sizes() == torch::IntArrayRef({4, 2}));
  CHECK(qweight[0][0].item<int32_t>() == 0x76543210);
  CHECK(qzeros[0][0].item<int32_t>() == 0x76543210);
  auto back = quant::gptq_unpack(qweight, qzeros, packed[2].second, packed[3].second, 4, 8, 32, 16, false, "t");
  CHECK(torch::equal(back.q, g.q));
  CHECK(torch::equal(back.zeros, g.zeros));
  CHECK(torch::allclose(back.dequantize(), g.dequantize(), 1e-3, 1e-3));  // scales go through fp16

  g.bits = 8;
  g.q = torch::randint(0, 256, {16, 32}).to(torch::kUInt8);
  g.zeros = torch::randint(1, 256, {4, 16}).to(torch::kInt);
  auto p8 = quant::gptq_pack(g);
  CHECK(p8[0].second.sizes() == torch::IntArrayRef({8, 16}));
  auto b8 = quant::gptq_unpack(p8[0].second, p8[1].second, p8[2].second, p8[3].second, 8, 8, 32, 16, false, "t");
  CHECK(torch::equal(b8.q, g.q));
  CHECK(torch::equal(b8.zeros, g.zeros));
}

TEST_CASE("awq GEMM packing: along outputs in the [0,2,4,6,1,3,5,7] order", "[quant][awq]") {
  torch::manual_seed(1);
  quant::GroupQuantized g;
  g.bits = 4;
  g.group_size = 16;
  g.q = torch::randint(0, 16, {16, 32}).to(torch::kUInt8);
  for (int64_t o = 0; o < 8; ++o) g.q[o][0] = o;  // input 0, outputs 0..7
  g.scales = torch::rand({2, 16}) + 0.1;
  g.zeros = torch::randint(0, 16, {2, 16}).to(torch::kInt);
  g.g_idx = torch::arange(32).div(16, "floor").to(torch::kInt);
  auto packed = quant::awq_pack(g);
  auto qweight = packed[0].second;
  CHECK(qweight.sizes() == torch::IntArrayRef({32, 2}));
  // nibble k holds output ORDER[k] = 0,2,4,6,1,3,5,7
  CHECK(static_cast<uint32_t>(qweight[0][0].item<int32_t>()) == 0x75316420u);
  auto back = quant::awq_unpack(qweight, packed[1].second, packed[2].second, 16, 32, 16, "t");
  CHECK(torch::equal(back.q, g.q));
  CHECK(torch::equal(back.zeros, g.zeros));
}

TEST_CASE("gptq: H = I is round-to-nearest; correlated inputs: GPTQ beats RTN", "[quant][gptq]") {
  torch::manual_seed(2);
  auto w = torch::randn({48, 128});
  quant::GroupQuantParams p;
  p.group_size = 32;
  auto rtn = quant::rtn_quantize(w, p);
  auto eye = quant::gptq_quantize(w, torch::eye(128), p);
  CHECK(torch::equal(eye.q, rtn.q));
  CHECK(torch::equal(eye.zeros, rtn.zeros));

  auto H = correlated_hessian(128, 2048);
  const double e_rtn = quant::weighted_error(w - rtn.dequantize(), H);
  auto g = quant::gptq_quantize(w, H, p);
  const double e_gptq = quant::weighted_error(w - g.dequantize(), H);
  CHECK(e_gptq < 0.8 * e_rtn);
  for (bool sym : {false, true}) {
    p.act_order = true;
    p.sym = sym;
    auto a = quant::gptq_quantize(w, H, p);
    CHECK(quant::weighted_error(w - a.dequantize(), H) < e_rtn);
    // act-order: groups follow the permutation, so g_idx is non-monotonic but each group has 32 columns
    auto counts = torch::bincount(a.g_idx.to(torch::kLong));
    CHECK(torch::equal(counts, torch::full({4}, 32, torch::kLong)));
    CHECK_FALSE(torch::equal(a.g_idx, rtn.g_idx));
    if (sym) CHECK((a.zeros == 8).all().item<bool>());
  }
  // 8 bits: far smaller error than 4
  p = {};
  p.bits = 8;
  p.group_size = 32;
  auto g8 = quant::gptq_quantize(w, H, p);
  CHECK(quant::weighted_error(w - g8.dequantize(), H) < e_gptq / 100);
}

TEST_CASE("awq: the scale search never loses to plain RTN on the same statistics", "[quant][awq]") {
  torch::manual_seed(3);
  auto w = torch::randn({64, 128});
  auto H = correlated_hessian(128, 2048);
  auto xmean = H.diagonal().sqrt();  // a stand-in for mean |x|
  quant::GroupQuantParams p;
  p.group_size = 32;
  double alpha = -1;
  auto s = quant::awq_search_scales({w}, H, xmean, p, &alpha);
  CHECK(alpha >= 0);
  CHECK(alpha < 1);
  p.awq_quantizer = true;
  const double e_rtn = quant::weighted_error(w - quant::rtn_quantize(w, p).dequantize(), H);
  auto ws = w * s.unsqueeze(0);
  auto Hs = H / s.unsqueeze(1) / s.unsqueeze(0);
  auto g = quant::awq_clip_quantize(ws, Hs, p, true);
  const double e_awq = quant::weighted_error(ws - g.dequantize(), Hs);
  CHECK(e_awq <= e_rtn * 1.02);  // clip choice uses per-group blocks of H only
  CHECK(std::abs(quant::weighted_error(ws, Hs) - quant::weighted_error(w, H)) < 1e-3 * quant::weighted_error(w, H));
}

TEST_CASE("group quantization: clear errors for bad bits and group sizes", "[quant][gptq]") {
  quant::GroupQuantParams p;
  p.group_size = 48;
  CHECK_THROWS_WITH(quant::rtn_quantize(torch::randn({8, 128}), p), Catch::Contains("does not divide"));
  p.group_size = 32;
  p.bits = 3;
  CHECK_THROWS_WITH(quant::rtn_quantize(torch::randn({8, 128}), p), Catch::Contains("--bits 3"));
}

TEST_CASE("base record: a GPTQ/AWQ base is recorded as what it is, not as bitsandbytes nf4", "[quant][gptq]") {
  const auto dir = std::filesystem::temp_directory_path() / "llmtune-test-base-record";
  std::filesystem::remove_all(dir);
  quant::BaseRecord r;
  r.base_model = "out/model-gptq";
  r.group_quant = quant::GroupQuantConfig{};
  r.group_quant->method = "gptq";
  r.group_quant->bits = 4;
  r.group_quant->group_size = 64;
  r.group_quant->sym = false;
  r.group_quant->desc_act = true;
  r.fingerprint = 0x0123456789abcdefULL;
  r.n_quantized = 42;
  quant::write_base_record(dir, r);
  auto j = nlohmann::json::parse(std::ifstream(dir / "llmtune_qlora.json"));
  const auto& qc = j.at("quantization_config");
  CHECK(qc.at("quant_method") == "gptq");
  CHECK(qc.at("bits") == 4);
  CHECK(qc.at("group_size") == 64);
  CHECK(qc.at("desc_act") == true);
  CHECK(qc.at("sym") == false);
  CHECK_FALSE(qc.contains("bnb_4bit_quant_type"));
  CHECK_FALSE(j.contains("blocksize"));
  auto back = quant::read_base_record(dir);
  REQUIRE(back);
  REQUIRE(back->group_quant);
  CHECK(back->group_quant->method == "gptq");
  CHECK(back->group_quant->group_size == 64);
  CHECK(back->group_quant->desc_act);
  CHECK_FALSE(back->group_quant->sym);
  CHECK(back->fingerprint == r.fingerprint);
  CHECK(back->describe() == "gptq 4-bit, group 64, asymmetric, act-order");

  r.group_quant->method = "awq";
  r.group_quant->group_size = -1;
  quant::write_base_record(dir, r);
  back = quant::read_base_record(dir);
  REQUIRE(back->group_quant);
  CHECK(back->describe() == "awq 4-bit, group per row, GEMM packing");

  quant::BaseRecord b;  // bitsandbytes still round-trips as before
  b.options.bits = quant::QuantOptions::Bits::four;
  b.options.type = quant::QuantType::nf4;
  b.options.double_quant = true;
  quant::write_base_record(dir, b);
  back = quant::read_base_record(dir);
  CHECK_FALSE(back->group_quant);
  CHECK(back->options.type == quant::QuantType::nf4);
  CHECK(back->describe().rfind("bitsandbytes nf4 + double quant", 0) == 0);
  std::filesystem::remove_all(dir);
}
