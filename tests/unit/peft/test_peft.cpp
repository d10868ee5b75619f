// Unit tests for llmtune::peft: LoRA math by hand, merge, rsLoRA, targeting, bias modes,
// trainable statistics, adapter save/load round trip and error messages. The hidden test
// [.write-adapter] writes an adapter with random A/B for tests/parity/test_peft_lora.py.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "core/core.h"
#include "io/io.h"
#include "peft/peft.h"

namespace fs = std::filesystem;
using namespace llmtune;

namespace {

model::ModelConfig tiny_config(bool tied = false, bool bias = false) {
  nlohmann::json j = {{"model_type", "llama"}, {"vocab_size", 40}, {"hidden_size", 16},
                      {"intermediate_size", 24}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
                      {"num_key_value_heads", 2}, {"max_position_embeddings", 64}, {"rms_norm_eps", 1e-5},
                      {"tie_word_embeddings", tied}, {"attention_bias", bias}};
  return model::ModelConfig::from_json(j, "test");
}

model::Transformer tiny_model(bool tied = false, bool bias = false) {
  auto m = model::Transformer(tiny_config(tied, bias));
  m->init_weights(7);
  m->eval();
  return m;
}

fs::path temp_dir(const std::string& tag) {
  auto d = fs::temp_directory_path() / fmt::format("llmtune-peft-{}-{}", tag, ::getpid());
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// Gives every LoRA layer random non-zero A and B so the adapter changes the output.
void randomize_lora(model::TransformerImpl& m, uint64_t seed) {
  torch::NoGradGuard ng;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (const auto& n : peft::lora_modules(m)) {
    auto l = std::dynamic_pointer_cast<peft::LoraLinearImpl>(m.get_linear(n));
    l->lora_A->weight.copy_(torch::randn(l->lora_A->weight.sizes(), gen) * 0.3);
    l->lora_B->weight.copy_(torch::randn(l->lora_B->weight.sizes(), gen) * 0.3);
  }
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

TEST_CASE("LoRA forward equals base + B A x * scaling", "[peft]") {
  auto base = std::make_shared<model::DenseLinearImpl>(6, 5, true, torch::kFloat);
  torch::NoGradGuard ng;
  base->weight.copy_(torch::randn({5, 6}));
  base->bias.copy_(torch::randn({5}));
  peft::LoraLinearImpl l(base, 3, 16.0 / 3, 0.0, 1);
  // PEFT init: B zero, A within +-1/sqrt(in)
  CHECK(l.lora_B->weight.abs().max().item<double>() == 0.0);
  CHECK(l.lora_A->weight.abs().max().item<double>() <= 1.0 / std::sqrt(6.0));
  CHECK(l.lora_A->weight.abs().max().item<double>() > 0.0);
  l.lora_B->weight.copy_(torch::randn({5, 3}));
  auto x = torch::randn({2, 4, 6});
  auto expect = torch::matmul(x, base->weight.t()) + base->bias +
                torch::matmul(torch::matmul(x, l.lora_A->weight.t()), l.lora_B->weight.t()) * (16.0 / 3);
  CHECK(max_diff(l.forward(x), expect) < 1e-5);
  // merge folds the delta into the weight
  auto merged = l.merge();
  CHECK(std::dynamic_pointer_cast<model::DenseLinearImpl>(merged));
  CHECK(max_diff(merged->forward(x), expect) < 1e-5);
  // parameter names follow PEFT's live modules
  auto names = l.named_parameters().keys();
  CHECK(std::find(names.begin(), names.end(), "base_layer.weight") != names.end());
  CHECK(std::find(names.begin(), names.end(), "lora_A.weight") != names.end());
  CHECK(std::find(names.begin(), names.end(), "lora_B.weight") != names.end());
}

TEST_CASE("LoRA dropout only in training", "[peft]") {
  auto base = std::make_shared<model::DenseLinearImpl>(8, 8, false, torch::kFloat);
  torch::NoGradGuard ng;
  base->weight.copy_(torch::randn({8, 8}));
  peft::LoraLinearImpl l(base, 2, 1.0, 0.5, 3);
  l.lora_B->weight.copy_(torch::randn({8, 2}));
  auto x = torch::randn({4, 8});
  l.eval();
  auto a = l.forward(x), b = l.forward(x);
  CHECK(max_diff(a, b) == 0.0);
  l.train();
  CHECK(max_diff(l.forward(x), a) > 0.0);
}

TEST_CASE("scaling: alpha/r and rsLoRA alpha/sqrt(r)", "[peft]") {
  peft::LoraConfig c;
  c.r = 16;
  c.alpha = 32;
  CHECK(c.scaling() == Approx(2.0));
  c.use_rslora = true;
  CHECK(c.scaling() == Approx(8.0));
  auto j = c.to_adapter_json({"q_proj"});
  CHECK(j["use_rslora"] == true);
  CHECK(peft::LoraConfig::from_adapter_json(j, "x").scaling() == Approx(8.0));
}

TEST_CASE("merged model equals unmerged forward", "[peft]") {
  auto m = tiny_model();
  peft::LoraConfig c;
  c.r = 4;
  c.alpha = 8;
  c.target_linear = true;
  peft::apply_lora(*m, c, 1);
  randomize_lora(*m, 5);
  m->eval();
  auto ids = torch::tensor({{1, 5, 9, 33, 2, 7}});
  torch::NoGradGuard ng;
  auto unmerged = m->forward(ids);
  peft::merge_all(*m);
  CHECK(peft::lora_modules(*m).empty());
  CHECK(max_diff(m->forward(ids), unmerged) < 1e-5);
  CHECK_NOTHROW(model::hf_state_dict(*m));
}

TEST_CASE("target selection: names, suffixes, regex, all-linear", "[peft]") {
  auto m = tiny_model();
  peft::LoraConfig c;
  c.target_modules = {"q_proj", "model.layers.1.mlp.down_proj"};
  auto t = peft::select_targets(*m, c);
  REQUIRE(t.size() == 3);
  CHECK(t[0] == "model.layers.0.self_attn.q_proj");
  CHECK(t[2] == "model.layers.1.mlp.down_proj");
  c.target_modules = {R"(.*layers\.1\.self_attn\.(k|v)_proj)"};
  t = peft::select_targets(*m, c);
  REQUIRE(t.size() == 2);
  CHECK(t[0] == "model.layers.1.self_attn.k_proj");
  c.target_modules = {};
  c.target_linear = true;
  t = peft::select_targets(*m, c);
  CHECK(t.size() == 14);  // 7 per layer, lm_head excluded
  CHECK(std::find(t.begin(), t.end(), "lm_head") == t.end());
  c.target_linear = false;
  c.target_modules = {"q_prj"};
  CHECK_THROWS_WITH(peft::select_targets(*m, c), Catch::Contains("q_prj") && Catch::Contains("did you mean \"q_proj\""));
  CHECK(peft::matches_target("model.layers.0.self_attn.q_proj", {"self_attn.q_proj"}));
  CHECK_FALSE(peft::matches_target("model.layers.0.self_attn.xq_proj", {"q_proj"}));
}

TEST_CASE("freezing, bias modes, modules_to_save and trainable stats", "[peft]") {
  auto m = tiny_model(false, true);
  peft::LoraConfig c;
  c.r = 2;
  c.target_modules = {"q_proj"};
  SECTION("none") {
    peft::apply_lora(*m, c);
    auto s = peft::parameter_stats(*m);
    CHECK(s.trainable == 2 * (2 * 16 + 16 * 2));  // two layers, A [2,16] and B [16,2]
    auto ps = m->named_parameters();
    CHECK_FALSE(ps["model.layers.0.self_attn.q_proj.base_layer.weight"].requires_grad());
    CHECK_FALSE(ps["model.layers.0.self_attn.q_proj.base_layer.bias"].requires_grad());
    CHECK(s.to_string().starts_with("trainable params: 128 || all params: "));
  }
  SECTION("lora_only") {
    c.bias = "lora_only";
    peft::apply_lora(*m, c);
    auto ps = m->named_parameters();
    CHECK(ps["model.layers.0.self_attn.q_proj.base_layer.bias"].requires_grad());
    CHECK_FALSE(ps["model.layers.0.self_attn.k_proj.bias"].requires_grad());
  }
  SECTION("all") {
    c.bias = "all";
    peft::apply_lora(*m, c);
    auto ps = m->named_parameters();
    CHECK(ps["model.layers.0.self_attn.k_proj.bias"].requires_grad());
    CHECK_FALSE(ps["model.layers.0.self_attn.k_proj.weight"].requires_grad());
  }
  SECTION("modules_to_save") {
    c.modules_to_save = {"lm_head", "embed_tokens"};
    peft::apply_lora(*m, c);
    auto ps = m->named_parameters();
    CHECK(ps["lm_head.weight"].requires_grad());
    CHECK(ps["model.embed_tokens.weight"].requires_grad());
    CHECK(peft::parameter_stats(*m).trainable == 128 + 2 * 40 * 16);
  }
  SECTION("unfrozen_parameters") {
    auto names = peft::unfreeze_matching(*m, {R"(model\.layers\.1\..*)", "^lm_head.weight$"});
    CHECK(names.size() == 9 + 4 + 1);  // layer 1: 7 weights + 4 attention biases + 2 norms; lm_head
    CHECK_THROWS_WITH(peft::unfreeze_matching(*m, {"nothing_here"}), Catch::Contains("matches no parameter"));
  }
}

TEST_CASE("adapter save -> load round trip and PEFT names", "[peft]") {
  auto m = tiny_model(false, true);
  peft::LoraConfig c;
  c.r = 4;
  c.alpha = 16;
  c.target_modules = {"q_proj", "v_proj"};
  c.modules_to_save = {"lm_head"};
  c.bias = "all";
  peft::apply_lora(*m, c, 2);
  randomize_lora(*m, 11);
  torch::NoGradGuard ng;
  m->named_parameters()["lm_head.weight"].mul_(1.5);
  m->named_parameters()["model.layers.0.self_attn.o_proj.bias"].add_(0.25);
  auto ids = torch::tensor({{3, 4, 5, 6, 7}});
  auto expect = m->forward(ids);
  auto dir = temp_dir("roundtrip");
  peft::save_adapter(*m, c, dir);
  auto st = io::SafetensorsFile::open(dir / "adapter_model.safetensors");
  CHECK(st->contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
  CHECK(st->contains("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"));
  CHECK(st->contains("base_model.model.lm_head.weight"));
  CHECK(st->contains("base_model.model.model.layers.0.self_attn.o_proj.bias"));
  auto j = nlohmann::json::parse(io::read_text_file(dir / "adapter_config.json"));
  CHECK(j["peft_type"] == "LORA");
  CHECK(j["target_modules"] == nlohmann::json({"q_proj", "v_proj"}));
  CHECK(j["r"] == 4);

  auto fresh = tiny_model(false, true);
  auto cfg = peft::load_adapter(*fresh, dir);
  CHECK(cfg.r == 4);
  CHECK(peft::lora_modules(*fresh).size() == 4);
  CHECK(max_diff(fresh->forward(ids), expect) < 1e-6);
  CHECK(peft::parameter_stats(*fresh).trainable == 0);
  auto again = tiny_model(false, true);
  peft::load_adapter(*again, dir, true);  // lora_model_dir: continue training
  CHECK(peft::parameter_stats(*again).trainable > 0);
  CHECK(again->named_parameters()["lm_head.weight"].requires_grad());

  auto merged = tiny_model(false, true);
  peft::merge_adapters(*merged, {dir});
  CHECK(max_diff(merged->forward(ids), expect) < 1e-5);
  fs::remove_all(dir);
}

TEST_CASE("adapter errors name tensor, shapes and r", "[peft]") {
  auto m = tiny_model();
  peft::LoraConfig c;
  c.r = 4;
  c.target_modules = {"q_proj"};
  peft::apply_lora(*m, c);
  auto dir = temp_dir("errors");
  peft::save_adapter(*m, c, dir);
  // a config claiming r=8 against r=4 tensors
  auto j = nlohmann::json::parse(io::read_text_file(dir / "adapter_config.json"));
  j["r"] = 8;
  std::ofstream(dir / "adapter_config.json") << j.dump();
  auto fresh = tiny_model();
  CHECK_THROWS_WITH(peft::load_adapter(*fresh, dir),
                    Catch::Contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") &&
                        Catch::Contains("[4, 16]") && Catch::Contains("[8, 16]") && Catch::Contains("r = 8"));
  j["peft_type"] = "IA3";
  std::ofstream(dir / "adapter_config.json") << j.dump();
  CHECK_THROWS_WITH(peft::load_adapter(*fresh, dir), Catch::Contains("IA3") && Catch::Contains("not a LoRA adapter"));
  j["peft_type"] = "P_TUNING";
  std::ofstream(dir / "adapter_config.json") << j.dump();
  CHECK_THROWS_WITH(peft::load_any_adapter(*fresh, dir), Catch::Contains("P_TUNING") && Catch::Contains("not supported"));
  j["peft_type"] = "LORA";
  j["r"] = 4;
  j["use_dora"] = true;
  std::ofstream(dir / "adapter_config.json") << j.dump();
  CHECK_THROWS_WITH(peft::load_adapter(*fresh, dir), Catch::Contains("lora_magnitude_vector") && Catch::Contains("use_dora"));
  CHECK_THROWS_WITH(peft::load_adapter(*fresh, dir / "missing"), Catch::Contains("adapter_config.json"));
  // a model of another size: tensor shape mismatch names in_features
  fs::remove_all(dir);
}

// Hidden: writes an adapter with random A/B (and modules_to_save lm_head) for a fixture model.
// Env: LLMTUNE_PEFT_MODEL (model dir), LLMTUNE_PEFT_OUT (adapter dir), LLMTUNE_PEFT_RSLORA (0/1).
TEST_CASE("write adapter for the PEFT parity test", "[.write-adapter]") {
  const char* model_dir = std::getenv("LLMTUNE_PEFT_MODEL");
  const char* out = std::getenv("LLMTUNE_PEFT_OUT");
  if (!model_dir || !out) FAIL("set LLMTUNE_PEFT_MODEL and LLMTUNE_PEFT_OUT");
  auto m = model::load_pretrained(model_dir);
  peft::LoraConfig c;
  c.r = 4;
  c.alpha = 8;
  c.target_linear = true;
  c.use_rslora = std::getenv("LLMTUNE_PEFT_RSLORA") && std::string(std::getenv("LLMTUNE_PEFT_RSLORA")) == "1";
  c.base_model_name_or_path = model_dir;
  peft::apply_lora(*m, c, 3);
  randomize_lora(*m, 17);
  peft::save_adapter(*m, c, out);
  REQUIRE(fs::exists(fs::path(out) / "adapter_model.safetensors"));
}
