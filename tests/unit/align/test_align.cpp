// Unit tests for llmtune::align: every preference loss against TRL's own code on fixed numbers
// (fixture scripts/fixtures/align_losses.py), record filters, batch layout, sequence log-probs by
// hand, the adapter-off reference (equals the base model; frozen weights untouched by DPO steps, which
// do move the policy), and reward-model save/load round trips.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <unistd.h>

#include "align/align.h"
#include "core/core.h"
#include "peft/peft.h"

namespace fs = std::filesystem;
using namespace llmtune;
using nlohmann::json;

namespace {

model::ModelConfig tiny_config() {
  json j = {{"model_type", "llama"}, {"vocab_size", 40}, {"hidden_size", 16}, {"intermediate_size", 24},
            {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
            {"max_position_embeddings", 64}, {"rms_norm_eps", 1e-5}, {"tie_word_embeddings", false}};
  return model::ModelConfig::from_json(j, "test");
}

model::Transformer tiny_model(uint64_t seed = 7) {
  auto m = model::Transformer(tiny_config());
  m->init_weights(seed);
  m->eval();
  return m;
}

json load_fixture() {
  const char* env = std::getenv("LLMTUNE_FIXTURES");
  REQUIRE(env != nullptr);  // set by ctest; run scripts/fixtures/align_losses.py --out DIR
  const std::string path = std::string(env) + "/align/losses.json";
  std::ifstream f(path);
  INFO("missing fixture " << path << ": run scripts/fixtures/align_losses.py --out " << env);
  REQUIRE(f.good());
  return json::parse(f);
}

torch::Tensor vec(const json& j) { return torch::tensor(j.get<std::vector<double>>(), torch::kDouble).to(torch::kFloat); }

std::vector<align::PreferenceExample> toy_examples() {
  std::vector<align::PreferenceExample> ex(4);
  for (int i = 0; i < 4; ++i) {
    ex[i].prompt = {1, 5 + i};
    ex[i].chosen = {10 + i, 11, 2};
    ex[i].rejected = {20 + i, 2};
    if (i == 3) ex[i].rejected = {20, 21, 22, 23, 2};
    ex[i].margin = 0.5 * i;
    ex[i].label = i % 2;
  }
  return ex;
}

}  // namespace

TEST_CASE("paired losses equal TRL on fixed log-probs", "[align][losses]") {
  json fx = load_fixture();
  const auto& in = fx["inputs"];
  align::PairInputs pi;
  pi.chosen = vec(in["chosen"]);
  pi.rejected = vec(in["rejected"]);
  pi.ref_chosen = vec(in["ref_chosen"]);
  pi.ref_rejected = vec(in["ref_rejected"]);
  pi.chosen_len = vec(in["chosen_len"]);
  pi.rejected_len = vec(in["rejected_len"]);
  int checked = 0;
  for (const auto& c : fx["cases"]) {
    const std::string type = c["type"];
    if (type == "kto") continue;
    align::LossConfig cfg;
    cfg.type = type == "sigmoid" ? align::LossType::sigmoid
               : type == "hinge" ? align::LossType::hinge
               : type == "ipo"   ? align::LossType::ipo
               : type == "robust" ? align::LossType::robust
               : type == "simpo" ? align::LossType::simpo
                                 : align::LossType::orpo;
    cfg.beta = c["beta"];
    cfg.label_smoothing = c.value("label_smoothing", 0.0);
    cfg.simpo_gamma = c.value("simpo_gamma", 0.5);
    INFO(type << " beta " << cfg.beta << " eps " << cfg.label_smoothing << " (" << c["source"].get<std::string>() << ")");
    auto out = align::pair_loss(pi, cfg);
    CHECK(out.losses.mean().item<double>() == Approx(c["loss"].get<double>()).epsilon(1e-5).margin(1e-7));
    auto m = align::reward_metrics(out.chosen_rewards, out.rejected_rewards);
    for (auto& [k, v] : out.extra) m[k] = v;
    for (auto it = c["metrics"].begin(); it != c["metrics"].end(); ++it) {
      const std::string k = it.key();
      const json& v = it.value();
      if (k.rfind("logps/", 0) == 0) {
        const auto& t = k == "logps/chosen" ? pi.chosen : pi.rejected;
        CHECK(t.mean().item<double>() == Approx(v.get<double>()).epsilon(1e-5));
        continue;
      }
      INFO("metric " << k);
      REQUIRE(m.count(k));
      CHECK(m[k] == Approx(v.get<double>()).epsilon(1e-5).margin(1e-7));
    }
    ++checked;
  }
  CHECK(checked == 14);  // 8 DPOTrainer cases, 2 cDPO, 2 SimPO, 2 ORPO
}

TEST_CASE("KTO loss equals TRL on fixed log-probs", "[align][losses]") {
  json fx = load_fixture();
  const auto& in = fx["kto_inputs"];
  align::KtoInputs ki;
  ki.logps = vec(in["logps"]);
  ki.ref_logps = vec(in["ref_logps"]);
  ki.desirable = vec(in["desirable"]);
  ki.kl_logps = vec(in["kl_logps"]);
  ki.ref_kl_logps = vec(in["ref_kl_logps"]);
  int checked = 0;
  for (const auto& c : fx["cases"]) {
    if (c["type"] != "kto") continue;
    align::LossConfig cfg;
    cfg.type = align::LossType::kto;
    cfg.beta = c["beta"];
    cfg.kto_desirable_weight = c["desirable_weight"];
    cfg.kto_undesirable_weight = c["undesirable_weight"];
    auto out = align::kto_loss(ki, cfg);
    CHECK(out.losses.mean().item<double>() == Approx(c["loss"].get<double>()).epsilon(1e-5));
    CHECK(out.kl == Approx(c["metrics"]["kl"].get<double>()).epsilon(1e-5).margin(1e-7));
    auto des = ki.desirable > 0.5;
    CHECK(out.rewards.masked_select(des).mean().item<double>() ==
          Approx(c["metrics"]["rewards/chosen"].get<double>()).epsilon(1e-5));
    CHECK(out.rewards.masked_select(des.logical_not()).mean().item<double>() ==
          Approx(c["metrics"]["rewards/rejected"].get<double>()).epsilon(1e-5));
    ++checked;
  }
  CHECK(checked == 2);
}

TEST_CASE("record filters", "[align][data]") {
  json rec = {{"status", "win"}, {"chosen_score", 8.5}, {"csv_score", "9"}, {"meta", {{"lang", "en"}}}, {"flag", true}};
  CHECK(align::RecordFilter::parse("status != \"tie\"").matches(rec));
  CHECK_FALSE(align::RecordFilter::parse("status == 'tie'").matches(rec));
  CHECK(align::RecordFilter::parse("chosen_score >= 8").matches(rec));
  CHECK_FALSE(align::RecordFilter::parse("chosen_score > 8.5").matches(rec));
  CHECK(align::RecordFilter::parse("csv_score >= 8").matches(rec));  // numeric strings compare as numbers
  CHECK(align::RecordFilter::parse("meta.lang == \"en\"").matches(rec));
  CHECK(align::RecordFilter::parse("flag == true").matches(rec));
  CHECK_FALSE(align::RecordFilter::parse("missing >= 1").matches(rec));  // missing = null: no ordering
  CHECK(align::RecordFilter::parse("missing != \"tie\"").matches(rec));
  CHECK(align::RecordFilter::parse("missing == null").matches(rec));
  CHECK_THROWS_WITH(align::RecordFilter::parse("status tie"), Catch::Contains("no comparison operator"));
  CHECK_THROWS_WITH(align::RecordFilter::parse("score >= abc"), Catch::Contains("not a number"));
  CHECK_THROWS_WITH(align::RecordFilter::parse("s == \"x"), Catch::Contains("unterminated"));
}

TEST_CASE("preference batches: row layout, labels, padding, KTO mismatched rows", "[align][data]") {
  auto ex = toy_examples();
  auto b = align::make_preference_batch(ex, {0, 3}, align::DataKind::paired, 0);
  REQUIRE(b.input_ids.sizes() == torch::IntArrayRef({4, 7}));  // 2 + 5 longest row
  CHECK(b.num_target_tokens == 2);
  // row 0: prompt 1,5 | chosen 10,11,2 | pad
  auto row0 = b.input_ids[0];
  CHECK(row0[0].item<int64_t>() == 1);
  CHECK(row0[2].item<int64_t>() == 10);
  CHECK(b.labels[0][1].item<int64_t>() == -100);
  CHECK(b.labels[0][2].item<int64_t>() == 10);
  CHECK(b.labels[0][5].item<int64_t>() == -100);
  CHECK(b.attention_mask[0].sum().item<int64_t>() == 5);
  // row 3 = rejected of example 3 (5 tokens)
  CHECK(b.input_ids[3][6].item<int64_t>() == 2);
  CHECK(b.labels[3].ne(-100).sum().item<int64_t>() == 5);
  CHECK(b.extra.at("margin")[1].item<float>() == Approx(1.5));
  CHECK(b.num_tokens == 5 + 5 + 4 + 7);
  // KTO: row B+k = prompt of example k with the completion of example k-2 (mod 4)
  auto k = align::make_preference_batch(ex, {0, 1}, align::DataKind::unpaired, 0);
  REQUIRE(k.input_ids.size(0) == 4);
  CHECK(k.input_ids[2][1].item<int64_t>() == 5);    // prompt of example 0
  CHECK(k.input_ids[2][2].item<int64_t>() == 12);   // completion of example 2
  CHECK(k.input_ids[3][2].item<int64_t>() == 13);   // example 1 gets example 3's completion
  CHECK(k.extra.at("label")[1].item<float>() == 1.0f);
  // Prompts: left padded
  std::vector<align::PreferenceExample> p(2);
  p[0].prompt = {1, 2, 3};
  p[1].prompt = {4};
  auto pb = align::make_preference_batch(p, {0, 1}, align::DataKind::prompts, 9);
  CHECK(pb.input_ids[1][0].item<int64_t>() == 9);
  CHECK(pb.input_ids[1][2].item<int64_t>() == 4);
  CHECK_FALSE(pb.labels.defined());
}

TEST_CASE("sequence log-probs sum the completion tokens of log_softmax(logits[t-1])", "[align][logprobs]") {
  auto m = tiny_model();
  auto ex = toy_examples();
  auto b = align::make_preference_batch(ex, {1, 3}, align::DataKind::paired, 0);
  torch::NoGradGuard ng;
  auto lp = align::sequence_log_probs(*m, b.input_ids, b.attention_mask, b.labels);
  for (int64_t r = 0; r < 4; ++r) {
    const int64_t n = b.attention_mask[r].sum().item<int64_t>();
    auto ids = b.input_ids[r].slice(0, 0, n).unsqueeze(0);
    auto logits = m->forward(ids).squeeze(0).to(torch::kFloat);  // unpadded forward
    auto logsm = torch::log_softmax(logits, -1);
    double want = 0;
    int count = 0;
    for (int64_t t = 1; t < n; ++t)
      if (b.labels[r][t].item<int64_t>() != -100) {
        want += logsm[t - 1][b.input_ids[r][t].item<int64_t>()].item<double>();
        ++count;
      }
    CHECK(lp.sum[r].item<double>() == Approx(want).epsilon(1e-4));
    CHECK(lp.count[r].item<double>() == count);
  }
  // temperature: log_softmax(logits / T)
  align::LogProbOptions o;
  o.temperature = 0.7;
  auto lpt = align::sequence_log_probs(*m, b.input_ids, b.attention_mask, b.labels, o);
  auto ids0 = b.input_ids[0].slice(0, 0, b.attention_mask[0].sum().item<int64_t>()).unsqueeze(0);
  auto logsm = torch::log_softmax(m->forward(ids0).squeeze(0).to(torch::kFloat) / 0.7, -1);
  double want = 0;
  for (int64_t t = 1; t < ids0.size(1); ++t)
    if (b.labels[0][t].item<int64_t>() != -100) want += logsm[t - 1][ids0[0][t].item<int64_t>()].item<double>();
  CHECK(lpt.sum[0].item<double>() == Approx(want).epsilon(1e-4));
}

TEST_CASE("reference with the adapter off equals the base model; DPO steps leave it untouched", "[align][reference]") {
  auto base = tiny_model();
  auto policy = tiny_model();
  peft::LoraConfig lc;
  lc.r = 4;
  lc.alpha = 8;
  lc.target_modules = {"q_proj", "v_proj", "down_proj"};
  peft::apply_lora(*policy, lc, 3);
  // Non-zero B so the adapter changes the output.
  {
    torch::NoGradGuard ng;
    for (const auto& name : peft::lora_modules(*policy)) {
      auto l = std::dynamic_pointer_cast<peft::LoraLinearImpl>(policy->get_linear(name));
      l->lora_B->weight.normal_(0, 0.3);
    }
  }
  auto ex = toy_examples();
  auto b = align::make_preference_batch(ex, {0, 1, 2, 3}, align::DataKind::paired, 0);
  auto ref = align::ReferenceModel::adapter_disabled(*policy);
  auto r0 = ref.log_probs(b.input_ids, b.attention_mask, b.labels).sum;
  torch::Tensor want, with_adapter;
  {
    torch::NoGradGuard ng;
    want = align::sequence_log_probs(*base, b.input_ids, b.attention_mask, b.labels).sum;
    with_adapter = align::sequence_log_probs(*policy, b.input_ids, b.attention_mask, b.labels).sum;
  }
  CHECK(torch::allclose(r0, want, 1e-5, 1e-5));
  CHECK_FALSE(torch::allclose(with_adapter, want, 1e-3, 1e-3));  // the switch really switches
  {
    peft::DisabledAdapters off(*policy);
    CHECK(off.count() == 6);
  }
  // A few DPO steps through the loop move the policy but neither the frozen weights nor the reference.
  std::map<std::string, torch::Tensor> frozen;
  for (const auto& p : policy->named_parameters())
    if (!p.value().requires_grad()) frozen[p.key()] = p.value().detach().clone();
  align::LossConfig cfg;
  cfg.beta = 0.5;
  align::PreferenceObjective obj(*policy, &ref, cfg, torch::kCPU);
  align::PreferenceBatchSource src(ex, align::DataKind::paired, 2, 0, true, 1);
  train::TrainOptions topt;
  topt.output_dir = fs::temp_directory_path() / fmt::format("llmtune-align-ref-{}", ::getpid());
  fs::remove_all(topt.output_dir);
  topt.max_steps = 6;
  topt.optimizer.lr = 5e-2;
  topt.progress = false;
  topt.plot = false;
  topt.logging_steps = 1;
  policy->train();
  train::run_training(*policy, obj, src, nullptr, topt);
  policy->eval();
  for (const auto& p : policy->named_parameters())
    if (frozen.count(p.key())) CHECK(torch::equal(frozen[p.key()], p.value()));
  auto r1 = ref.log_probs(b.input_ids, b.attention_mask, b.labels).sum;
  CHECK(torch::equal(r0, r1));
  torch::Tensor after;
  {
    torch::NoGradGuard ng;
    after = align::sequence_log_probs(*policy, b.input_ids, b.attention_mask, b.labels).sum;
  }
  // The policy moved towards chosen over rejected: the DPO margin grew.
  auto margin = [&](const torch::Tensor& s) {
    return ((s.slice(0, 0, 4) - r0.slice(0, 0, 4)) - (s.slice(0, 4, 8) - r0.slice(0, 4, 8))).mean().item<double>();
  };
  CHECK(margin(after) > margin(with_adapter) + 0.1);
  fs::remove_all(topt.output_dir);
}

TEST_CASE("reward model: scores at the last real token, save/load round trip, Bradley-Terry", "[align][reward]") {
  auto rm = align::make_reward_model(tiny_model(), 1, 5);
  auto ex = toy_examples();
  auto b = align::make_preference_batch(ex, {0, 3}, align::DataKind::paired, 0);
  torch::NoGradGuard ng;
  auto s = align::reward_scores(rm, b.input_ids, b.attention_mask);
  REQUIRE(s.sizes() == torch::IntArrayRef({4}));
  // Equals the score of the unpadded sequence's last hidden state.
  for (int64_t r = 0; r < 4; ++r) {
    const int64_t n = b.attention_mask[r].sum().item<int64_t>();
    auto h = rm.net->hidden_states(b.input_ids[r].slice(0, 0, n).unsqueeze(0));
    auto want = rm.score->forward(h[0][n - 1].unsqueeze(0).to(torch::kFloat))[0][0].item<double>();
    CHECK(s[r].item<double>() == Approx(want).epsilon(1e-4).margin(1e-6));
  }
  auto dir = fs::temp_directory_path() / fmt::format("llmtune-align-rm-{}", ::getpid());
  fs::remove_all(dir);
  align::save_reward_model(rm, dir, 0);
  auto cfg = json::parse(std::ifstream(dir / "config.json"));
  CHECK(cfg["architectures"][0] == "LlamaForSequenceClassification");
  CHECK(cfg["id2label"].size() == 1);
  CHECK(cfg["pad_token_id"] == 0);
  auto loaded = align::load_reward_model(dir);
  auto s2 = align::reward_scores(loaded, b.input_ids, b.attention_mask);
  CHECK(torch::allclose(s, s2, 1e-6, 1e-6));
  fs::remove_all(dir);
  // Bradley-Terry with a margin
  auto l = align::bradley_terry_loss(torch::tensor({2.0f}), torch::tensor({1.0f}), torch::tensor({0.5f}));
  CHECK(l[0].item<double>() == Approx(std::log1p(std::exp(-0.5))));
  auto lc = align::bradley_terry_loss(torch::tensor({2.0f}), torch::tensor({1.0f}), {}, 0.01);
  CHECK(lc[0].item<double>() == Approx(std::log1p(std::exp(-1.0)) + 0.01 * 9));
}
