// GGUF export unit tests: fp16/bf16 rounding vs torch, block (de)quantizers vs the `gguf`
// package's numpy reference (fixtures from scripts/fixtures/export_make.py), k-quant accuracy,
// the GGUF reader/writer round trip and its errors, llama.cpp's `_M` type policy, and an export
// of the fixture model read back tensor by tensor.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "core/core.h"
#include "export/export.h"
#include "model/model.h"

namespace ex = llmtune::exporter;
namespace fs = std::filesystem;

namespace {

fs::path fixtures() {
  const char* env = std::getenv("LLMTUNE_FIXTURES");
  fs::path root = env ? fs::path(env) / "export" : fs::path("build/fixtures/export");
  if (!fs::exists(root / ".version"))
    FAIL("GGUF export fixtures missing at " << root.string()
                                            << ": run scripts/fixtures/export_make.py --out <build>/fixtures");
  return root;
}

std::vector<uint8_t> slice(const std::string& blob, const nlohmann::json& range) {
  const size_t off = range[0].get<size_t>(), n = range[1].get<size_t>();
  REQUIRE(off + n <= blob.size());
  return {blob.begin() + long(off), blob.begin() + long(off + n)};
}

std::vector<float> as_floats(const std::vector<uint8_t>& b) {
  std::vector<float> f(b.size() / 4);
  std::memcpy(f.data(), b.data(), f.size() * 4);
  return f;
}

double rel_rmse(const std::vector<float>& a, const std::vector<float>& b) {
  double e = 0, s = 0;
  for (size_t i = 0; i < a.size(); ++i) { e += double(a[i] - b[i]) * (a[i] - b[i]); s += double(a[i]) * a[i]; }
  return std::sqrt(e / std::max(s, 1e-30));
}

}  // namespace

TEST_CASE("fp16 and bf16 rounding match torch bit for bit", "[export][gguf]") {
  auto x = torch::randn({20000}, torch::TensorOptions().dtype(torch::kFloat)) * 10;
  // Subnormal-range, overflow-range and exact-tie values too.
  auto extra = torch::tensor({1e-6f, -3e-7f, 6e-8f, 2.98e-8f, 65504.0f, 65519.0f, 65520.0f, 1e6f, -0.0f,
                              1.00048828125f, 1.000732421875f, 0.0f});
  x = torch::cat({x, extra, torch::randn({5000}) * 1e-5});
  auto h = x.to(torch::kHalf).contiguous();
  auto b = x.to(torch::kBFloat16).contiguous();
  const float* xp = x.data_ptr<float>();
  const uint16_t* hp = reinterpret_cast<const uint16_t*>(h.data_ptr());
  const uint16_t* bp = reinterpret_cast<const uint16_t*>(b.data_ptr());
  int64_t bad_h = 0, bad_b = 0, bad_back = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    bad_h += ex::fp32_to_fp16(xp[i]) != hp[i];
    bad_b += ex::fp32_to_bf16(xp[i]) != bp[i];
    bad_back += ex::fp16_to_fp32(hp[i]) != h[i].item<float>();
  }
  CHECK(bad_h == 0);
  CHECK(bad_b == 0);
  CHECK(bad_back == 0);
}

TEST_CASE("block quantizers and dequantizers match gguf.quants", "[export][gguf]") {
  const auto root = fixtures();
  std::ifstream f(root / "quants.bin", std::ios::binary);
  const std::string blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  nlohmann::json meta;
  std::ifstream(root / "quants.json") >> meta;
  const auto x = as_floats(slice(blob, meta["input"]));
  REQUIRE(int64_t(x.size()) == meta["n"].get<int64_t>());
  for (const auto& [name, e] : meta["types"].items()) {
    INFO("type " << name);
    const auto type = ex::ggml_type_from_id(e["type_id"].get<uint32_t>());
    REQUIRE(type);
    const auto ref_q = slice(blob, e["quantized"]);
    const auto ref_y = as_floats(slice(blob, e["dequantized"]));
    // Dequantizing the reference bytes gives the reference values (any type).
    const auto y = ex::ggml_dequantize(*type, ref_q, int64_t(x.size()));
    double max_abs = 0, max_diff = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      max_abs = std::max(max_abs, double(std::fabs(ref_y[i])));
      max_diff = std::max(max_diff, double(std::fabs(y[i] - ref_y[i])));
    }
    CHECK(max_diff <= 1e-6 * std::max(max_abs, 1.0));
    // Where gguf.quants quantizes (f16, bf16, legacy types), llmtune's bytes are identical.
    if (!e.value("random_bytes", false)) {
      const auto q = ex::ggml_quantize(*type, x);
      CHECK(q == ref_q);
    }
  }
}

TEST_CASE("k-quants reconstruct at least as well as the legacy type of similar size", "[export][gguf]") {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> x(256 * 64);
  for (auto& v : x) v = nd(rng);
  for (size_t i = 0; i < x.size(); i += 131) x[i] *= 6;  // outliers, as in real weights
  auto err = [&](ex::GgmlType t) { return rel_rmse(x, ex::ggml_dequantize(t, ex::ggml_quantize(t, x), int64_t(x.size()))); };
  const double e8 = err(ex::GgmlType::Q8_0), e6 = err(ex::GgmlType::Q6_K), e5k = err(ex::GgmlType::Q5_K),
               e5 = err(ex::GgmlType::Q5_1), e4k = err(ex::GgmlType::Q4_K), e4 = err(ex::GgmlType::Q4_1),
               e3 = err(ex::GgmlType::Q3_K), e2 = err(ex::GgmlType::Q2_K), e40 = err(ex::GgmlType::Q4_0);
  INFO("q8_0 " << e8 << " q6_K " << e6 << " q5_K " << e5k << " q5_1 " << e5 << " q4_K " << e4k << " q4_1 " << e4
               << " q4_0 " << e40 << " q3_K " << e3 << " q2_K " << e2);
  // Bounds: ~1.5x the values measured on this data; ordering by bits per weight.
  // measured: q8_0 0.0075, q6_K 0.022, q5_K 0.042, q4_K 0.084, q3_K 0.175, q2_K 0.291
  CHECK(e8 < 0.011);
  CHECK(e6 < 0.033);
  CHECK(e5k < 0.063);
  CHECK(e4k < 0.125);
  CHECK(e3 < 0.26);
  CHECK(e2 < 0.44);
  CHECK(e6 < e5k);
  CHECK(e5k <= e5 * 1.05);   // 5.5 bpw vs 6 bpw
  CHECK(e4k <= e4 * 1.05);   // 4.5 bpw vs 5 bpw
  CHECK(e4k < e40);
  CHECK(e3 < e2);
  // An all-zero block stays zero; a constant block is reproduced closely.
  std::vector<float> z(256, 0.0f), c(256, 0.75f);
  for (auto t : {ex::GgmlType::Q2_K, ex::GgmlType::Q3_K, ex::GgmlType::Q4_K, ex::GgmlType::Q5_K, ex::GgmlType::Q6_K,
                 ex::GgmlType::Q4_0, ex::GgmlType::Q5_1, ex::GgmlType::Q8_0}) {
    INFO(ex::ggml_type_info(t).name);
    for (float v : ex::ggml_dequantize(t, ex::ggml_quantize(t, z), 256)) CHECK(v == 0.0f);
    CHECK(rel_rmse(c, ex::ggml_dequantize(t, ex::ggml_quantize(t, c), 256)) < 0.1);
  }
}

TEST_CASE("GGUF writer and reader round trip; bad files are named", "[export][gguf]") {
  const fs::path dir = fs::temp_directory_path() / "llmtune_test_gguf";
  fs::create_directories(dir);
  const fs::path p = dir / "t.gguf";
  ex::GgufWriter w;
  w.set("general.architecture", ex::GgufValue::str("llama"));
  w.set("a.u32", ex::GgufValue::u32(4000000000u));
  w.set("a.i32", ex::GgufValue::i32(-7));
  w.set("a.f32", ex::GgufValue::f32(0.25f));
  w.set("a.bool", ex::GgufValue::boolean(true));
  w.set("a.strs", ex::GgufValue::str_array({"x", "", "y z"}));
  w.set("a.floats", ex::GgufValue::f32_array({1.5f, -2.0f}));
  w.set("a.ints", ex::GgufValue::i32_array({3, -4}));
  std::vector<float> v(64 * 3);
  for (size_t i = 0; i < v.size(); ++i) v[i] = std::sin(float(i));
  w.add_tensor("m.q8", {3, 64}, ex::GgmlType::Q8_0, ex::ggml_quantize(ex::GgmlType::Q8_0, v));
  w.add_tensor("m.f32", {5}, ex::GgmlType::F32, ex::ggml_quantize(ex::GgmlType::F32, std::vector<float>(v.begin(), v.begin() + 5)));
  CHECK_THROWS_WITH(w.add_tensor("m.bad", {3, 64}, ex::GgmlType::Q8_0, {}), Catch::Contains("m.bad"));
  w.write(p);
  const auto g = ex::gguf_read(p);
  CHECK(g.version == 3);
  CHECK(g.metadata.size() == 8);
  CHECK(g.at("a.u32").as_int() == 4000000000LL);
  CHECK(g.at("a.i32").as_int() == -7);
  CHECK(g.at("a.f32").as_float() == 0.25);
  CHECK(g.at("a.bool").as_bool());
  CHECK(g.at("a.strs").array.size() == 3);
  CHECK(std::get<std::string>(g.at("a.strs").array[2]) == "y z");
  CHECK(g.at("a.ints").elem_type == ex::GgufValueType::INT32);
  REQUIRE(g.tensors.size() == 2);
  CHECK(g.tensors[0].ne == std::vector<int64_t>{64, 3});
  CHECK(g.tensors[1].offset % 32 == 0);
  CHECK(g.data_offset % 32 == 0);
  const auto back = g.tensor_f32("m.q8");
  CHECK(rel_rmse(v, back) < 0.01);
  CHECK(g.tensor_f32("m.f32")[4] == v[4]);
  CHECK_THROWS_WITH(g.at("missing.key"), Catch::Contains("missing.key"));
  const auto text = ex::gguf_describe(g);
  CHECK(text.find("a.strs") != std::string::npos);
  CHECK(text.find("q8_0") != std::string::npos);

  // Truncated copy and wrong magic.
  {
    std::ifstream in(p, std::ios::binary);
    std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(dir / "cut.gguf", std::ios::binary) << all.substr(0, all.size() - 100);
    std::ofstream(dir / "bad.gguf", std::ios::binary) << "GGUX" << all.substr(4);
  }
  CHECK_THROWS_WITH(ex::gguf_read(dir / "cut.gguf"), Catch::Contains("cut.gguf") && Catch::Contains("past the end"));
  CHECK_THROWS_WITH(ex::gguf_read(dir / "bad.gguf"), Catch::Contains("not a GGUF file"));
  fs::remove_all(dir);
}

TEST_CASE("tensor types follow llama.cpp's _M mixes", "[export][gguf]") {
  const auto& q4km = ex::gguf_file_type("q4_k_m");
  const auto& q3km = ex::gguf_file_type("Q3_K_M");
  const auto& q2k = ex::gguf_file_type("q2_k");
  const auto& q40 = ex::gguf_file_type("q4_0");
  const auto& f16 = ex::gguf_file_type("f16");
  CHECK_THROWS_WITH(ex::gguf_file_type("q4_k_x"), Catch::Contains("did you mean"));
  ex::TensorTypeContext c;
  c.ne0 = 4096;
  c.n_attn_v = c.n_ffn_down = 32;
  // use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2
  std::vector<int> more;
  for (int i = 0; i < 32; ++i) {
    c.i_attn_v = c.i_ffn_down = i;
    const auto v = ex::gguf_tensor_type(q4km, "blk.0.attn_v.weight", c);
    CHECK(ex::gguf_tensor_type(q4km, "blk.0.ffn_down.weight", c) == v);
    if (v == ex::GgmlType::Q6_K) more.push_back(i);
    else CHECK(v == ex::GgmlType::Q4_K);
  }
  CHECK(more == std::vector<int>{0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31});
  CHECK(ex::gguf_tensor_type(q4km, "blk.0.attn_q.weight", c) == ex::GgmlType::Q4_K);
  CHECK(ex::gguf_tensor_type(q4km, "output.weight", c) == ex::GgmlType::Q6_K);
  CHECK(ex::gguf_tensor_type(q40, "output.weight", c) == ex::GgmlType::Q6_K);
  CHECK(ex::gguf_tensor_type(q40, "token_embd.weight", c) == ex::GgmlType::Q4_0);
  c.has_output = false;
  CHECK(ex::gguf_tensor_type(q40, "token_embd.weight", c) == ex::GgmlType::Q6_K);
  c.has_output = true;
  c.i_attn_v = 1;
  CHECK(ex::gguf_tensor_type(q3km, "blk.1.attn_v.weight", c) == ex::GgmlType::Q5_K);
  c.i_attn_v = 2;
  CHECK(ex::gguf_tensor_type(q3km, "blk.2.attn_v.weight", c) == ex::GgmlType::Q4_K);
  c.i_ffn_down = 1;
  CHECK(ex::gguf_tensor_type(q3km, "blk.1.ffn_down.weight", c) == ex::GgmlType::Q5_K);
  c.i_ffn_down = 2;
  CHECK(ex::gguf_tensor_type(q3km, "blk.2.ffn_down.weight", c) == ex::GgmlType::Q4_K);
  CHECK(ex::gguf_tensor_type(q3km, "blk.2.attn_output.weight", c) == ex::GgmlType::Q4_K);
  c.n_gqa = 4;
  CHECK(ex::gguf_tensor_type(q2k, "blk.0.attn_v.weight", c) == ex::GgmlType::Q4_K);
  c.n_gqa = 2;
  CHECK(ex::gguf_tensor_type(q2k, "blk.0.attn_v.weight", c) == ex::GgmlType::Q3_K);
  CHECK(ex::gguf_tensor_type(q2k, "blk.0.ffn_down.weight", c) == ex::GgmlType::Q3_K);
  CHECK(ex::gguf_tensor_type(q2k, "blk.0.ffn_up.weight", c) == ex::GgmlType::Q2_K);
  CHECK(ex::gguf_tensor_type(f16, "output.weight", c) == ex::GgmlType::F16);
  c.n_dims = 1;
  CHECK(ex::gguf_tensor_type(q4km, "blk.0.attn_norm.weight", c) == ex::GgmlType::F32);
  c.n_dims = 2;
  // Rows that are not a multiple of 256 fall back as llama.cpp does (q4_K -> q5_0, q6_K -> q8_0).
  c.ne0 = 128;
  c.i_attn_v = 0;
  CHECK(ex::gguf_tensor_type(q4km, "blk.0.attn_q.weight", c) == ex::GgmlType::Q5_0);
  CHECK(ex::gguf_tensor_type(q4km, "blk.0.attn_v.weight", c) == ex::GgmlType::Q8_0);
  CHECK(ex::gguf_tensor_type(q4km, "output.weight", c) == ex::GgmlType::Q8_0);
  c.ne0 = 100;
  CHECK(ex::gguf_tensor_type(q40, "blk.0.attn_q.weight", c) == ex::GgmlType::F16);
}

TEST_CASE("export of the fixture model reads back with llama.cpp's names and Q/K order", "[export][gguf]") {
  const auto root = fixtures();
  const fs::path out = fs::temp_directory_path() / "llmtune_test_export_f32.gguf";
  ex::GgufExportOptions o;
  o.model_dir = root / "bpe";
  o.type = "f32";
  o.out = out;
  const auto rep = ex::export_gguf(o);
  const auto g = ex::gguf_read(out);
  auto m = llmtune::model::load_pretrained(root / "bpe", torch::kFloat);
  const auto& cfg = m->config();
  CHECK(g.at("general.architecture").as_string() == "llama");
  CHECK(g.at("llama.block_count").as_int() == cfg.num_hidden_layers);
  CHECK(g.at("llama.attention.head_count_kv").as_int() == cfg.num_key_value_heads);
  CHECK(g.at("tokenizer.ggml.model").as_string() == "gpt2");
  CHECK(g.at("tokenizer.ggml.pre").as_string() == "gpt-2");
  CHECK(int64_t(g.at("tokenizer.ggml.tokens").array.size()) == cfg.vocab_size);
  CHECK(g.find("tokenizer.chat_template"));
  CHECK(int64_t(g.tensors.size()) == rep.n_tensors);
  CHECK(g.tensors.size() == size_t(2 + 9 * cfg.num_hidden_layers + 1));
  // attn_k row h·d + 2i + t == HF row h·d + t·d/2 + i
  const auto k = g.tensor_f32("blk.1.attn_k.weight");
  auto hf = m->decoder->layer_list[1]->self_attn->k_proj->named_parameters()["weight"].contiguous();
  const int64_t D = cfg.head_dim, C = cfg.hidden_size;
  int64_t bad = 0;
  for (int64_t h = 0; h < cfg.num_key_value_heads; ++h)
    for (int64_t i = 0; i < D / 2; ++i)
      for (int64_t t = 0; t < 2; ++t) {
        const float* row = k.data() + (h * D + 2 * i + t) * C;
        auto ref = hf[h * D + t * (D / 2) + i];
        for (int64_t c = 0; c < C; ++c) bad += row[c] != ref[c].item<float>();
      }
  CHECK(bad == 0);
  const auto emb = g.tensor_f32("token_embd.weight");
  auto hemb = m->decoder->embed_tokens->weight.contiguous();
  CHECK(std::memcmp(emb.data(), hemb.data_ptr<float>(), emb.size() * 4) == 0);
  fs::remove(out);
}
