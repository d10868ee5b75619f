// Config parsing and RoPE variants (inv_freq from transformers), packed sequences, gradient
// checkpointing (equal grads, lower peak memory via a counting CPU allocator), linear slots,
// save/load round trip, and the error messages for broken checkpoints.
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <fstream>

#include "core/core.h"
#include "model_test_util.h"

using namespace llmtune;
using namespace model_test;
using nlohmann::json;

namespace {

json tiny_config() {
  return json{{"model_type", "llama"}, {"vocab_size", 256},      {"hidden_size", 64}, {"intermediate_size", 128},
              {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
              {"rms_norm_eps", 1e-5},   {"max_position_embeddings", 128}};
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no llmtune::Error thrown>";
}

fs::path temp_dir(const std::string& tag) {
  auto d = fs::temp_directory_path() / fmt::format("llmtune-model-test-{}-{}", tag, ::getpid());
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// A copy of a fixture checkpoint (without the golden file) that a test may break.
fs::path copy_fixture(const std::string& name, const std::string& tag) {
  auto d = temp_dir(tag);
  for (auto& e : fs::directory_iterator(fixture_dir(name)))
    if (e.path().filename() != "golden.safetensors") fs::copy(e.path(), d / e.path().filename());
  return d;
}

void edit_config(const fs::path& dir, const std::function<void(json&)>& f) {
  json j = json::parse(io::read_text_file(dir / "config.json"));
  f(j);
  std::ofstream(dir / "config.json") << j.dump(2);
}

}  // namespace

TEST_CASE("config.json parsing: defaults, families, both rope spellings", "[model][config]") {
  auto c = model::ModelConfig::from_json(tiny_config());
  CHECK(c.head_dim == 16);
  CHECK(c.rope.type == "default");
  CHECK(c.rope.theta == 10000.0);
  CHECK_FALSE(c.qkv_bias);

  auto j = tiny_config();
  j.erase("num_key_value_heads");
  j["eos_token_id"] = json::array({128001, 128008, 128009});
  j["torch_dtype"] = "bfloat16";
  j["rope_theta"] = 500000;
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2}};
  c = model::ModelConfig::from_json(j);
  CHECK(c.num_key_value_heads == 4);
  CHECK(c.eos_token_ids == std::vector<int64_t>{128001, 128008, 128009});
  CHECK(c.torch_dtype() == torch::kBFloat16);
  CHECK(c.rope.type == "linear");
  CHECK(*c.rope.factor == 2.0);
  CHECK(c.rope.theta == 500000.0);
  // v5 spelling of the same thing gives the same inv_freq.
  auto j5 = tiny_config();
  j5["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 2.0}, {"rope_theta", 500000.0}};
  CHECK(torch::equal(model::rope_inv_freq(c).first, model::rope_inv_freq(model::ModelConfig::from_json(j5)).first));

  auto q = tiny_config();
  q["model_type"] = "qwen2";
  q["attention_bias"] = false;  // ignored: Qwen2 always has q/k/v bias
  q["sliding_window"] = 8;      // ignored: use_sliding_window is false
  c = model::ModelConfig::from_json(q);
  CHECK(c.qkv_bias);
  CHECK_FALSE(c.o_bias);
  CHECK_FALSE(c.sliding_window.has_value());
  q["use_sliding_window"] = true;
  q["max_window_layers"] = 1;
  c = model::ModelConfig::from_json(q);
  CHECK(c.layer_sliding == std::vector<bool>{false, true});

  // to_json round trip keeps every field and unknown keys.
  j["custom_key"] = "kept";
  auto back = model::ModelConfig::from_json(model::ModelConfig::from_json(j).to_json());
  CHECK(back.to_json() == model::ModelConfig::from_json(j).to_json());
  CHECK(back.raw["custom_key"] == "kept");
  CHECK(back.to_json()["architectures"][0] == "LlamaForCausalLM");
}

TEST_CASE("config.json errors name the key and list what is supported", "[model][config]") {
  auto j = tiny_config();
  j["model_type"] = "gemma";
  auto msg = error_of([&] { model::ModelConfig::from_json(j, "x/config.json"); });
  CHECK_THAT(msg, Catch::Contains("x/config.json: model_type \"gemma\" is not supported"));
  CHECK_THAT(msg, Catch::Contains("llama") && Catch::Contains("mistral") && Catch::Contains("qwen2"));
  j = tiny_config();
  j["hidden_act"] = "gelu";
  CHECK_THAT(error_of([&] { model::ModelConfig::from_json(j); }), Catch::Contains("hidden_act \"gelu\""));
  j = tiny_config();
  j["rope_scaling"] = {{"rope_type", "proportional"}};
  CHECK_THAT(error_of([&] { model::ModelConfig::from_json(j); }), Catch::Contains("rope_type \"proportional\" is not supported"));
  j = tiny_config();
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8}};
  CHECK_THAT(error_of([&] { model::ModelConfig::from_json(j); }), Catch::Contains("low_freq_factor"));
  j = tiny_config();
  j["num_key_value_heads"] = 3;
  CHECK_THAT(error_of([&] { model::ModelConfig::from_json(j); }), Catch::Contains("multiple of num_key_value_heads"));
  j = tiny_config();
  j["hidden_size"] = "64";
  CHECK_THAT(error_of([&] { model::ModelConfig::from_json(j); }), Catch::Contains("\"hidden_size\" must be an integer"));
}

TEST_CASE("RoPE inv_freq for every variant equals transformers' ROPE_INIT_FUNCTIONS", "[model][rope]") {
  fixture_dir("llama-gqa");  // fails with instructions if fixtures are missing
  auto f = io::SafetensorsFile::open(fs::path(std::getenv("LLMTUNE_FIXTURES")) / "model" / "rope_golden.safetensors");
  int checked = 0;
  for (const auto& [name, text] : f->metadata()) {
    if (name == "format") continue;
    auto j = json::parse(text);
    int64_t seq_len = j["seq_len"].get<int64_t>();
    j.erase("seq_len");
    auto cfg = model::ModelConfig::from_json(j, name);
    auto [inv, scaling] = model::rope_inv_freq(cfg, seq_len);
    auto want = f->load(name);
    INFO(name << " max rel diff " << ((inv - want).abs() / want).max().item<double>());
    CHECK(torch::allclose(inv, want, 1e-6, 0));
    CHECK(scaling == Approx(f->load(name + ".scaling").item<double>()).epsilon(1e-6));
    ++checked;
  }
  CHECK(checked == 7);
}

TEST_CASE("packed sequences with segment_ids equal separate forwards", "[model][packing]") {
  for (std::string name : {"llama-gqa", "mistral-sw", "qwen2-sw"}) {
    SECTION(name) {
      auto m = model::load_pretrained(fixture_dir(name), torch::kFloat);
      torch::NoGradGuard ng;
      auto ids = golden(name)["input_ids"][0];
      auto a = ids.narrow(0, 0, 13).unsqueeze(0), b = ids.narrow(0, 13, 19).unsqueeze(0);
      auto packed = torch::cat({a, b}, 1);
      auto seg = torch::cat({torch::zeros({1, 13}, torch::kLong), torch::ones({1, 19}, torch::kLong)}, 1);
      model::ForwardOptions fo;
      fo.segment_ids = seg;  // positions restart per segment automatically
      auto lp = m->forward(packed, fo);
      CHECK(max_abs_diff(lp.narrow(1, 0, 13), m->forward(a)) <= 1e-5);
      CHECK(max_abs_diff(lp.narrow(1, 13, 19), m->forward(b)) <= 1e-5);
      // Right padding: real positions are unaffected by the pads.
      auto padded = torch::cat({a, torch::zeros({1, 5}, torch::kLong)}, 1);
      model::ForwardOptions po;
      po.attention_mask = torch::cat({torch::ones({1, 13}, torch::kLong), torch::zeros({1, 5}, torch::kLong)}, 1);
      CHECK(max_abs_diff(m->forward(padded, po).narrow(1, 0, 13), m->forward(a)) <= 1e-5);
    }
  }
}

namespace {

// Counts live bytes handed out by the CPU allocator so peak activation memory is measurable.
struct CountingAllocator : c10::Allocator {
  c10::Allocator* inner;
  std::atomic<int64_t> live{0}, peak{0};
  struct Ctx {
    c10::DataPtr orig;
    size_t n;
    CountingAllocator* self;
  };
  explicit CountingAllocator(c10::Allocator* a) : inner(a) {}
  static void del(void* p) {
    auto* c = static_cast<Ctx*>(p);
    c->self->live -= (int64_t)c->n;
    delete c;
  }
  c10::DataPtr allocate(size_t n) override {
    auto orig = inner->allocate(n);
    void* data = orig.get();
    auto dev = orig.device();
    auto* ctx = new Ctx{std::move(orig), n, this};
    int64_t now = (live += (int64_t)n);
    int64_t p = peak.load();
    while (now > p && !peak.compare_exchange_weak(p, now)) {
    }
    return {data, ctx, &CountingAllocator::del, dev};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

}  // namespace

TEST_CASE("gradient checkpointing gives the same gradients with lower peak memory", "[model][checkpointing]") {
  auto cj = tiny_config();
  cj["num_hidden_layers"] = 4;
  cj["hidden_size"] = 128;
  cj["intermediate_size"] = 344;
  auto cfg = model::ModelConfig::from_json(cj);
  model::Transformer m(cfg);
  m->init_weights(7);
  auto ids = torch::randint(0, 256, {2, 192}, torch::TensorOptions().dtype(torch::kLong));
  auto run = [&](bool ckpt) {
    m->zero_grad();
    model::ForwardOptions fo;
    fo.gradient_checkpointing = ckpt;
    auto h = m->hidden_states(ids, fo);
    auto loss = model::causal_lm_loss_sum(*m, h, ids, 100);
    (loss.sum / loss.n_tokens).backward();
    std::vector<torch::Tensor> g;
    for (auto& p : m->parameters()) g.push_back(p.grad().clone());
    return g;
  };
  auto g0 = run(false);
  auto g1 = run(true);
  REQUIRE(g0.size() == g1.size());
  double worst = 0;
  for (size_t i = 0; i < g0.size(); ++i) worst = std::max(worst, max_abs_diff(g0[i], g1[i]));
  INFO("max grad diff " << worst);
  CHECK(worst <= 1e-6);

  // Peak live CPU bytes during forward + backward.
  auto* prev = c10::GetCPUAllocator();
  CountingAllocator counting(prev);
  c10::SetCPUAllocator(&counting, /*priority=*/100);
  auto measure = [&](bool ckpt) {
    counting.peak = counting.live.load();
    int64_t base = counting.live.load();
    run(ckpt);
    return counting.peak.load() - base;
  };
  int64_t plain = measure(false), ckpt = measure(true);
  c10::SetCPUAllocator(prev, /*priority=*/100);
  std::printf("gradient checkpointing: peak extra CPU bytes %s without, %s with\n", human_bytes(plain).c_str(),
              human_bytes(ckpt).c_str());
  CHECK(ckpt < plain * 0.6);

  // Frozen base + a trainable wrapper (LoRA-like): gradients still reach the wrapper through
  // checkpointed layers whose input does not require grad.
  for (auto& p : m->parameters()) p.requires_grad_(false);
  struct Wrapper : model::LinearBaseImpl {
    model::LinearPtr base_layer;
    torch::Tensor scale;
    explicit Wrapper(model::LinearPtr b) : base_layer(register_module("base_layer", b)) {
      scale = register_parameter("lora_scale", torch::ones({b->out_features()}));
    }
    torch::Tensor forward(const torch::Tensor& x) override { return base_layer->forward(x) * scale; }
    int64_t in_features() const override { return base_layer->in_features(); }
    int64_t out_features() const override { return base_layer->out_features(); }
  };
  const std::string target = "model.layers.1.self_attn.v_proj";
  auto w = std::make_shared<Wrapper>(m->get_linear(target));
  m->replace_linear(target, w);
  auto params = m->named_parameters();
  CHECK(params.contains(target + ".base_layer.weight"));
  CHECK(params.contains(target + ".lora_scale"));
  CHECK_FALSE(params.contains(target + ".weight"));
  std::vector<torch::Tensor> grads;
  for (bool ck : {false, true}) {
    w->scale.mutable_grad() = torch::Tensor();
    model::ForwardOptions fo;
    fo.gradient_checkpointing = ck;
    auto loss = model::causal_lm_loss_sum(*m, m->hidden_states(ids, fo), ids, 64);
    loss.sum.backward();
    REQUIRE(w->scale.grad().defined());
    grads.push_back(w->scale.grad().clone());
  }
  CHECK(max_abs_diff(grads[0], grads[1]) <= 1e-5);
  CHECK(grads[0].abs().sum().item<double>() > 0);
  // save_pretrained refuses a wrapped model; names are validated with a suggestion.
  CHECK_THAT(error_of([&] { model::hf_state_dict(*m); }), Catch::Contains(target) && Catch::Contains("merge"));
  CHECK_THAT(error_of([&] { m->get_linear("model.layers.1.self_attn.q_prj"); }),
             Catch::Contains("did you mean \"model.layers.1.self_attn.q_proj\""));
  CHECK(m->linear_names().size() == 4 * 7 + 1);
}

TEST_CASE("chunked loss equals a full cross entropy, in value and gradient", "[model][loss]") {
  auto m = model::load_pretrained(fixture_dir("llama-tied"), torch::kFloat);
  auto g = golden("llama-tied");
  auto ids = g["input_ids"], labels = g["labels"];
  auto h = m->hidden_states(ids);
  auto ls = model::causal_lm_loss_sum(*m, h, labels, 7);
  ls.sum.backward();
  auto g_chunk = m->decoder->embed_tokens->weight.grad().clone();
  m->zero_grad();
  auto logits = m->forward(ids).narrow(1, 0, ids.size(1) - 1).reshape({-1, m->config().vocab_size});
  auto tgt = labels.narrow(1, 1, ids.size(1) - 1).reshape({-1});
  auto ref = torch::nn::functional::cross_entropy(
      logits, tgt, torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum));
  ref.backward();
  CHECK(ls.sum.item<double>() == Approx(ref.item<double>()).epsilon(1e-6));
  // Tied weight: lookup + head gradients summed in a different order; values are ~1e-1.
  CHECK(max_abs_diff(g_chunk, m->decoder->embed_tokens->weight.grad()) <= 1e-5);
  // token_log_probs agrees with log_softmax + gather, and sequence_nll with the loss over all tokens.
  torch::NoGradGuard ng;
  auto lp = model::token_log_probs(*m, m->hidden_states(ids), labels, 11);
  auto full = torch::log_softmax(m->forward(ids), -1);
  auto safe = labels.masked_fill(labels == -100, 0);
  auto want = full.gather(2, safe.unsqueeze(2)).squeeze(2).masked_fill(labels == -100, 0);
  CHECK(max_abs_diff(lp, want) <= 1e-5);
  auto nll = model::sequence_nll(*m, ids, std::nullopt, 13);
  CHECK(nll.n_tokens == ids.size(0) * (ids.size(1) - 1));
}

TEST_CASE("save_pretrained writes a checkpoint load_pretrained reads back", "[model][save]") {
  auto m = model::load_pretrained(fixture_dir("qwen2"), torch::kFloat);
  auto dir = temp_dir("save");
  model::save_pretrained(*m, dir / "out", torch::kBFloat16);
  CHECK(fs::exists(dir / "out" / "model.safetensors"));
  auto cj = json::parse(io::read_text_file(dir / "out" / "config.json"));
  CHECK(cj["architectures"][0] == "Qwen2ForCausalLM");
  CHECK(cj["dtype"] == "bfloat16");
  CHECK(cj["tie_word_embeddings"] == true);
  CHECK(fs::exists(dir / "out" / "generation_config.json"));
  io::CheckpointReader r(dir / "out");
  CHECK_FALSE(r.contains("lm_head.weight"));  // tied: not stored, as transformers does
  CHECK(r.contains("model.layers.0.self_attn.q_proj.bias"));
  auto back = model::load_pretrained(dir / "out", torch::kFloat);
  auto p0 = m->named_parameters(), p1 = back->named_parameters();
  REQUIRE(p0.size() == p1.size());
  for (auto& item : p0) CHECK(torch::equal(item.value().to(torch::kBFloat16).to(torch::kFloat), p1[item.key()]));
  // Sharded save also round-trips.
  model::save_pretrained(*m, dir / "sharded", std::nullopt, 40000);
  CHECK(fs::exists(dir / "sharded" / "model.safetensors.index.json"));
  auto sh = model::load_pretrained(dir / "sharded", torch::kFloat);
  for (auto& item : p0) CHECK(torch::equal(item.value(), sh->named_parameters()[item.key()]));
  fs::remove_all(dir);
}

TEST_CASE("broken checkpoints fail with messages naming tensor, file and shapes", "[model][errors]") {
  SECTION("wrong shape") {
    auto d = copy_fixture("llama-gqa", "shape");
    edit_config(d, [](json& j) { j["num_key_value_heads"] = 4; });
    auto msg = error_of([&] { model::load_pretrained(d); });
    CHECK_THAT(msg, Catch::Contains("model.layers.0.self_attn.k_proj.weight in model.safetensors has shape [32, 64] "
                                    "but config.json implies [64, 64] (num_key_value_heads=4, head_dim=16, "
                                    "hidden_size=64)"));
    fs::remove_all(d);
  }
  SECTION("missing and unexpected tensors") {
    auto d = copy_fixture("llama-gqa", "missing");
    io::CheckpointReader r(d);
    std::vector<std::pair<std::string, torch::Tensor>> ts;
    for (const auto& n : r.names())
      if (n != "model.layers.1.mlp.up_proj.weight") ts.emplace_back(n, r.load(n).clone());
    auto d2 = temp_dir("missing2");
    fs::copy(d / "config.json", d2 / "config.json");
    io::safetensors_save(d2 / "model.safetensors", ts);
    auto msg = error_of([&] { model::load_pretrained(d2); });
    CHECK_THAT(msg, Catch::Contains("model.layers.1.mlp.up_proj.weight is missing from checkpoint"));
    CHECK_THAT(msg, Catch::Contains("[172, 64]"));
    ts.emplace_back("model.layers.1.mlp.up_proj.weight", torch::zeros({172, 64}));
    ts.emplace_back("model.layers.0.self_attn.q_proj.bias", torch::zeros({64}));
    ts.emplace_back("model.layers.0.self_attn.rotary_emb.inv_freq", torch::zeros({8}));  // ignored
    io::safetensors_save(d2 / "model.safetensors", ts);
    msg = error_of([&] { model::load_pretrained(d2); });
    CHECK_THAT(msg, Catch::Contains("1 tensor(s) that config.json does not account for: "
                                    "model.layers.0.self_attn.q_proj.bias (in model.safetensors)"));
    CHECK_THAT(msg, Catch::Contains("attention_bias=false"));
    fs::remove_all(d);
    fs::remove_all(d2);
  }
  SECTION("unsupported model_type and untied config on a tied checkpoint") {
    auto d = copy_fixture("llama-tied", "type");
    edit_config(d, [](json& j) { j["tie_word_embeddings"] = false; });
    CHECK_THAT(error_of([&] { model::load_pretrained(d); }),
               Catch::Contains("lm_head.weight is missing") && Catch::Contains("tie_word_embeddings"));
    edit_config(d, [](json& j) { j["model_type"] = "phi3"; });
    CHECK_THAT(error_of([&] { model::load_pretrained(d); }),
               Catch::Contains("model_type \"phi3\" is not supported") && Catch::Contains("config.json"));
    fs::remove_all(d);
  }
}
