// Unit tests for the non-LoRA PEFT methods: DoRA math and merge, IA3 math and merge, prompt and
// prefix tuning through the model hooks (cache vs no cache, gradients, checkpointing), BitFit bias
// insertion and merge, bottleneck adapters, and save/load round trips. The hidden test
// [.adapter-logits] dumps logits of base+adapter for tests/parity/test_peft_methods.py.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/ranges.h>

#include "config/config.h"
#include "core/core.h"
#include "io/io.h"
#include "peft/peft.h"

namespace fs = std::filesystem;
using namespace llmtune;

namespace {

model::Transformer small_model(bool tied = false) {
  nlohmann::json j = {{"model_type", "llama"}, {"vocab_size", 40}, {"hidden_size", 16},
                      {"intermediate_size", 24}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
                      {"num_key_value_heads", 2}, {"max_position_embeddings", 64}, {"rms_norm_eps", 1e-5},
                      {"tie_word_embeddings", tied}};
  auto m = model::Transformer(model::ModelConfig::from_json(j, "test"));
  m->init_weights(7);
  m->eval();
  return m;
}

fs::path tmp_dir(const std::string& tag) {
  auto d = fs::temp_directory_path() / fmt::format("llmtune-peftm-{}-{}", tag, ::getpid());
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

// Perturbs every trainable tensor so the adapter is not a no-op.
void perturb(torch::nn::Module& m, uint64_t seed, double scale = 0.3) {
  torch::NoGradGuard ng;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (auto& p : m.parameters())
    if (p.requires_grad()) p.add_(at::normal(0.0, scale, p.sizes(), gen).to(p.options()));
}

const torch::Tensor kIds = torch::tensor({{1, 5, 9, 33, 2, 7}, {3, 3, 12, 8, 30, 1}});

}  // namespace

TEST_CASE("DoRA forward equals PEFT's formula and merge equals unmerged", "[peft][dora]") {
  auto base = std::make_shared<model::DenseLinearImpl>(6, 5, true, torch::kFloat);
  torch::NoGradGuard ng;
  base->weight.copy_(torch::randn({5, 6}));
  base->bias.copy_(torch::randn({5}));
  peft::LoraLinearImpl l(base, 3, 2.0, 0.0, 1);
  l.enable_dora();
  auto x = torch::randn({2, 4, 6});
  // fresh: B = 0 and m = ||W||_row, so the layer is the base layer
  CHECK(max_diff(l.forward(x), base->forward(x)) < 1e-5);
  l.lora_B->weight.copy_(torch::randn({5, 3}));
  l.lora_magnitude_vector.mul_(torch::rand({5}) + 0.5);
  auto W = base->weight, BA = torch::matmul(l.lora_B->weight, l.lora_A->weight);
  auto Wp = W + 2.0 * BA;
  auto s = l.lora_magnitude_vector / (Wp).pow(2).sum(1).sqrt();
  auto expect = torch::matmul(x, (s.unsqueeze(1) * Wp).t()) + base->bias;
  CHECK(max_diff(l.forward(x), expect) < 1e-5);
  CHECK(max_diff(l.merge()->forward(x), expect) < 1e-5);
  auto names = l.named_parameters().keys();
  CHECK(std::find(names.begin(), names.end(), "lora_magnitude_vector") != names.end());
}

TEST_CASE("DoRA: norm is detached, magnitude and A/B get gradients", "[peft][dora]") {
  auto base = std::make_shared<model::DenseLinearImpl>(4, 3, false, torch::kFloat);
  {
    torch::NoGradGuard ng;
    base->weight.copy_(torch::randn({3, 4}));
  }
  base->weight.set_requires_grad(false);
  peft::LoraLinearImpl l(base, 2, 1.0, 0.0, 2);
  l.enable_dora();
  {
    torch::NoGradGuard ng;
    l.lora_B->weight.copy_(torch::randn({3, 2}));
  }
  auto x = torch::randn({5, 4});
  l.forward(x).pow(2).sum().backward();
  CHECK(l.lora_magnitude_vector.grad().defined());
  CHECK(l.lora_A->weight.grad().defined());
  // With the norm detached: d out / d m = (x W'^T) / n, a closed form we can check.
  torch::NoGradGuard ng;
  auto Wp = base->weight + torch::matmul(l.lora_B->weight, l.lora_A->weight);
  auto n = (Wp).pow(2).sum(1).sqrt();
  auto y = l.forward(x);
  auto g = (2 * y * torch::matmul(x, Wp.t()) / n).sum(0);
  CHECK(max_diff(l.lora_magnitude_vector.grad(), g) < 1e-4);
}

TEST_CASE("DoRA adapter: save, load, merge on a model", "[peft][dora]") {
  auto m = small_model();
  peft::LoraConfig c;
  c.r = 4;
  c.alpha = 8;
  c.use_dora = true;
  c.target_modules = {"q_proj", "v_proj", "down_proj"};
  peft::apply_lora(*m, c, 3);
  perturb(*m, 11);
  torch::NoGradGuard ng;
  auto ref = m->forward(kIds);
  auto dir = tmp_dir("dora");
  peft::save_adapter(*m, c, dir);
  auto st = io::SafetensorsFile::open(dir / "adapter_model.safetensors");
  auto names = st->names();
  CHECK(std::find(names.begin(), names.end(), "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector") != names.end());
  auto m2 = small_model();
  auto cfg = peft::load_any_adapter(*m2, dir);
  CHECK(cfg.lora.use_dora);
  CHECK(max_diff(m2->forward(kIds), ref) < 1e-5);
  peft::merge_all(*m2);
  CHECK(peft::lora_modules(*m2).empty());
  CHECK(max_diff(m2->forward(kIds), ref) < 1e-4);
  fs::remove_all(dir);
}

TEST_CASE("IA3: defaults, math, merge, round trip", "[peft][ia3]") {
  auto m = small_model();
  config::Recipe r;
  auto c = peft::Ia3Config::from_recipe(r);
  CHECK(c.target_modules == std::vector<std::string>{"k_proj", "v_proj", "down_proj"});
  CHECK(c.feedforward_modules == std::vector<std::string>{"down_proj"});
  torch::NoGradGuard ng;
  auto base_logits = m->forward(kIds);
  auto wrapped = peft::apply_ia3(*m, c);
  CHECK(wrapped.size() == 6);
  CHECK(max_diff(m->forward(kIds), base_logits) < 1e-6);  // ones: no-op
  auto k = std::dynamic_pointer_cast<peft::Ia3LinearImpl>(m->get_linear("model.layers.0.self_attn.k_proj"));
  auto d = std::dynamic_pointer_cast<peft::Ia3LinearImpl>(m->get_linear("model.layers.0.mlp.down_proj"));
  REQUIRE(k);
  REQUIRE(d);
  CHECK(k->ia3_l.sizes() == at::IntArrayRef({8, 1}));
  CHECK(d->ia3_l.sizes() == at::IntArrayRef({1, 24}));
  for (auto& p : m->named_parameters())
    if (p.key().ends_with("ia3_l")) p.value().copy_(torch::rand(p.value().sizes()) + 0.5);
  auto x = torch::randn({3, 24});
  auto dw = std::dynamic_pointer_cast<model::DenseLinearImpl>(d->base_layer)->weight;
  CHECK(max_diff(d->forward(x), torch::matmul(x * d->ia3_l, dw.t())) < 1e-5);
  auto ref = m->forward(kIds);
  auto dir = tmp_dir("ia3");
  peft::AdapterConfig ac;
  ac.method = "ia3";
  ac.ia3 = c;
  peft::save_any_adapter(*m, ac, dir);
  auto m2 = small_model();
  auto got = peft::load_any_adapter(*m2, dir);
  CHECK(got.method == "ia3");
  CHECK(max_diff(m2->forward(kIds), ref) < 1e-6);
  peft::merge_all(*m2);
  CHECK(peft::ia3_modules(*m2).empty());
  CHECK(max_diff(m2->forward(kIds), ref) < 1e-5);
  fs::remove_all(dir);
}

TEST_CASE("prompt tuning: equals explicit inputs_embeds; cache and generation consistent", "[peft][prompt]") {
  auto m = small_model();
  peft::PromptConfig pc;
  pc.num_virtual_tokens = 3;
  auto base = m->forward(kIds);
  peft::apply_prompt(*m, pc, 5);
  REQUIRE(m->virtual_tokens());
  torch::NoGradGuard ng;
  auto got = m->forward(kIds);
  CHECK(got.sizes() == base.sizes());
  CHECK(max_diff(got, base) > 1e-3);
  // reference: the plain model on [prompt; embed(ids)], first 3 outputs dropped
  auto emb = m->virtual_tokens()->input_embeddings();
  auto vt = m->virtual_tokens();
  m->set_virtual_tokens(nullptr);
  model::ForwardOptions fo;
  fo.inputs_embeds = torch::cat({emb.unsqueeze(0).expand({2, 3, 16}), m->embed(kIds)}, 1);
  auto ref = m->forward(torch::Tensor(), fo).narrow(1, 3, 6);
  m->set_virtual_tokens(vt);
  CHECK(max_diff(got, ref) < 1e-5);
  // KV cache: prefill then token by token equals the full forward
  model::KVCache cache(m->config(), 2, 4, torch::kFloat);
  model::ForwardOptions co;
  co.cache = &cache;
  auto a = m->forward(kIds.narrow(1, 0, 4), co);
  auto b = m->forward(kIds.narrow(1, 4, 2), co);
  CHECK(cache.length() == 3 + 6);
  CHECK(max_diff(torch::cat({a, b}, 1), got) < 1e-5);
  // left padding: row 0 padded by 2 equals its unpadded forward
  auto mask = torch::tensor({{0, 0, 1, 1, 1, 1}});
  model::ForwardOptions po;
  po.attention_mask = mask;
  auto padded = m->forward(torch::tensor({{0, 0, 1, 5, 9, 33}}), po).narrow(1, 2, 4);
  auto plain = m->forward(torch::tensor({{1, 5, 9, 33}}));
  CHECK(max_diff(padded, plain) < 1e-5);
}

TEST_CASE("prefix tuning: cache vs no cache, padding, gradients, checkpointing", "[peft][prefix]") {
  for (bool projection : {false, true}) {
    auto m = small_model();
    peft::PromptConfig pc;
    pc.prefix = true;
    pc.num_virtual_tokens = 4;
    pc.prefix_projection = projection;
    peft::apply_prompt(*m, pc, 9);
    CHECK(pc.token_dim == 8);  // head_dim 4 x 2 kv heads (PEFT's GQA rule)
    auto kv = m->virtual_tokens()->key_values();
    REQUIRE(kv.size() == 2);
    CHECK(kv[0].first.sizes() == at::IntArrayRef({2, 4, 4}));
    torch::Tensor full;
    {
      torch::NoGradGuard ng;
      full = m->forward(kIds);
      model::KVCache cache(m->config(), 2, 4, torch::kFloat);
      model::ForwardOptions co;
      co.cache = &cache;
      auto a = m->forward(kIds.narrow(1, 0, 3), co);
      auto b = m->forward(kIds.narrow(1, 3, 1), co);
      auto c = m->forward(kIds.narrow(1, 4, 2), co);
      CHECK(max_diff(torch::cat({a, b, c}, 1), full) < 1e-5);
      model::ForwardOptions po;
      po.attention_mask = torch::tensor({{0, 1, 1, 1}});
      auto padded = m->forward(torch::tensor({{0, 1, 5, 9}}), po).narrow(1, 1, 3);
      CHECK(max_diff(padded, m->forward(torch::tensor({{1, 5, 9}}))) < 1e-5);
    }
    // gradients reach the prefix; gradient checkpointing gives the same gradient
    for (auto& p : m->parameters()) p.set_requires_grad(false);
    for (auto& p : m->virtual_tokens()->parameters()) p.set_requires_grad(true);
    m->train();
    auto loss = [&](bool ckpt) {
      model::ForwardOptions fo;
      fo.gradient_checkpointing = ckpt;
      return m->forward(kIds, fo).pow(2).mean();
    };
    auto emb = std::dynamic_pointer_cast<peft::PrefixEncoderImpl>(m->virtual_tokens())->embedding;
    loss(false).backward();
    auto g1 = emb.grad().clone();
    emb.mutable_grad().zero_();
    loss(true).backward();
    CHECK(g1.abs().max().item<double>() > 0);
    CHECK(max_diff(emb.grad(), g1) < 1e-6);
    m->eval();
  }
}

TEST_CASE("prompt and prefix tuning: save/load round trip, merge refused", "[peft][prompt]") {
  for (const char* method : {"prompt_tuning", "prefix_tuning"}) {
    auto m = small_model();
    peft::AdapterConfig ac;
    ac.method = method;
    ac.prompt.prefix = std::string(method) == "prefix_tuning";
    ac.prompt.num_virtual_tokens = 2;
    ac.prompt.prefix_projection = ac.prompt.prefix;  // saved projected, loaded flat
    peft::apply_method(*m, ac, 4);
    CHECK(peft::parameter_stats(*m).trainable > 0);
    torch::NoGradGuard ng;
    auto ref = m->forward(kIds);
    auto dir = tmp_dir(method);
    peft::save_any_adapter(*m, ac, dir);
    auto m2 = small_model();
    auto got = peft::load_any_adapter(*m2, dir);
    CHECK(got.method == method);
    CHECK(max_diff(m2->forward(kIds), ref) < 1e-5);
    CHECK_THROWS_WITH(peft::merge_all(*m2), Catch::Contains("cannot be merged"));
    fs::remove_all(dir);
  }
}

TEST_CASE("BitFit: adds zero biases, trains only biases, merged checkpoint reloads", "[peft][bitfit]") {
  auto m = small_model();
  peft::AdapterConfig ac;
  ac.method = "bitfit";
  ac.bitfit.target_modules = {"q_proj", "down_proj"};
  torch::NoGradGuard ng;
  auto base = m->forward(kIds);
  peft::apply_method(*m, ac, 1);
  CHECK(max_diff(m->forward(kIds), base) < 1e-6);
  for (const auto& p : m->named_parameters())
    CHECK(p.value().requires_grad() == (p.key().ends_with(".bias")));
  CHECK(peft::parameter_stats(*m).trainable == 2 * (16 + 16));
  perturb(*m, 3);
  auto ref = m->forward(kIds);
  auto dir = tmp_dir("bitfit");
  peft::save_any_adapter(*m, ac, dir / "adapter");
  auto m2 = small_model();
  peft::load_any_adapter(*m2, dir / "adapter");
  CHECK(max_diff(m2->forward(kIds), ref) < 1e-6);
  peft::merge_all(*m2);
  CHECK(m2->config().attention_bias);
  CHECK(m2->config().mlp_bias);
  model::save_pretrained(*m2, dir / "merged");
  auto m3 = model::load_pretrained(dir / "merged");
  CHECK(max_diff(m3->forward(kIds), ref) < 1e-5);
  fs::remove_all(dir);
}

TEST_CASE("bottleneck adapters: identity at start, identity activation merges, relu refuses", "[peft][bottleneck]") {
  for (const char* act : {"identity", "relu"}) {
    auto m = small_model();
    peft::AdapterConfig ac;
    ac.method = "bottleneck";
    ac.bottleneck.size = 3;
    ac.bottleneck.activation = act;
    torch::NoGradGuard ng;
    auto base = m->forward(kIds);
    peft::apply_method(*m, ac, 2);
    CHECK(max_diff(m->forward(kIds), base) < 1e-6);
    CHECK(peft::parameter_stats(*m).trainable == 2 * 2 * (16 * 3 + 3 + 3 * 16 + 16));
    perturb(*m, 8);
    auto ref = m->forward(kIds);
    CHECK(max_diff(ref, base) > 1e-3);
    auto dir = tmp_dir(std::string("bn-") + act);
    peft::save_any_adapter(*m, ac, dir);
    auto m2 = small_model();
    peft::load_any_adapter(*m2, dir);
    CHECK(max_diff(m2->forward(kIds), ref) < 1e-6);
    if (std::string(act) == "identity") {
      peft::merge_all(*m2);
      CHECK(!m2->decoder->layer_list[0]->attn_adapter);
      CHECK(max_diff(m2->forward(kIds), ref) < 1e-4);
      CHECK(m2->config().attention_bias);  // o_proj / down_proj got biases from the adapter biases
    } else {
      CHECK_THROWS_WITH(peft::merge_all(*m2), Catch::Contains("cannot be merged"));
    }
    fs::remove_all(dir);
  }
}

// For tests/parity/test_peft_methods.py: LLMTUNE_PEFT_MODEL, LLMTUNE_PEFT_ADAPTER, LLMTUNE_PEFT_IDS
// ("1,2,3;4,5,6" rows of equal length), LLMTUNE_PEFT_OUT (safetensors with "logits" [B,T,V] fp32).
TEST_CASE("dump logits of base + adapter", "[.adapter-logits]") {
  const char* model_dir = std::getenv("LLMTUNE_PEFT_MODEL");
  const char* adapter = std::getenv("LLMTUNE_PEFT_ADAPTER");
  const char* ids_s = std::getenv("LLMTUNE_PEFT_IDS");
  const char* out = std::getenv("LLMTUNE_PEFT_OUT");
  if (!model_dir || !adapter || !ids_s || !out) FAIL("set LLMTUNE_PEFT_MODEL, _ADAPTER, _IDS and _OUT");
  auto m = model::load_pretrained(model_dir);
  peft::load_any_adapter(*m, adapter);
  m->eval();
  std::vector<std::vector<int64_t>> rows(1);
  std::string tok;
  for (char ch : std::string(ids_s) + ";") {
    if (ch == ',' || ch == ';') {
      if (!tok.empty()) rows.back().push_back(std::stoll(tok));
      tok.clear();
      if (ch == ';') rows.emplace_back();
    } else {
      tok += ch;
    }
  }
  rows.pop_back();
  std::vector<torch::Tensor> ts;
  for (const auto& r : rows) ts.push_back(torch::tensor(r, torch::kLong));
  torch::NoGradGuard ng;
  auto logits = m->forward(torch::stack(ts)).to(torch::kFloat);
  io::safetensors_save(out, {{"logits", logits.contiguous()}});
}

// For the learning test: greedy generation for many prompts in one process (left-padded batches).
// LLMTUNE_PEFT_MODEL, LLMTUNE_PEFT_ADAPTER ("" = base only), LLMTUNE_PEFT_PROMPTS (one prompt per
// line, comma-separated token ids), LLMTUNE_PEFT_N (max new tokens), LLMTUNE_PEFT_OUT (one line of
// generated ids per prompt).
TEST_CASE("batch greedy generation with an adapter", "[.adapter-generate]") {
  const char* model_dir = std::getenv("LLMTUNE_PEFT_MODEL");
  const char* adapter = std::getenv("LLMTUNE_PEFT_ADAPTER");
  const char* prompts_path = std::getenv("LLMTUNE_PEFT_PROMPTS");
  const char* n = std::getenv("LLMTUNE_PEFT_N");
  const char* out = std::getenv("LLMTUNE_PEFT_OUT");
  if (!model_dir || !adapter || !prompts_path || !n || !out) FAIL("set LLMTUNE_PEFT_MODEL, _ADAPTER, _PROMPTS, _N and _OUT");
  auto m = model::load_pretrained(model_dir);
  if (std::string(adapter).size()) peft::load_any_adapter(*m, adapter);
  m->eval();
  std::vector<std::vector<int64_t>> prompts;
  std::istringstream in(io::read_text_file(prompts_path));
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    prompts.emplace_back();
    std::istringstream ls(line);
    for (std::string t; std::getline(ls, t, ',');) prompts.back().push_back(std::stoll(t));
  }
  auto g = model::GenerationConfig::from_model_dir(model_dir, m->config());
  g.do_sample = false;
  g.max_new_tokens = std::stoll(n);
  std::string text;
  for (size_t i = 0; i < prompts.size(); i += 16) {
    std::vector<std::vector<int64_t>> chunk(prompts.begin() + i, prompts.begin() + std::min(prompts.size(), i + 16));
    for (const auto& r : model::generate_batch(*m, chunk, g)) text += fmt::format("{}\n", fmt::join(r, ","));
  }
  std::ofstream(out) << text;
}
