// Tests for the loop's parts against torch and transformers: AdamW/SGD vs torch::optim, weight-decay
// exclusion and LoRA+ groups, LR schedules vs transformers' golden curves (fixture), the fp16 loss
// scaler rules, and clipping vs torch::nn::utils::clip_grad_norm_.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <fstream>

#include "core/core.h"
#include "train/train.h"

namespace tr = llmtune::train;

namespace {

std::vector<torch::Tensor> make_params(uint64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({4, 3}), torch::randn({3}), torch::randn({2, 5})};
}

void set_grads(const std::vector<torch::Tensor>& ps, int step) {
  torch::manual_seed(1000 + step);
  for (auto p : ps) p.mutable_grad() = torch::randn_like(p) * (1 + step);
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

TEST_CASE("AdamW matches torch::optim::AdamW, with no decay on 1-D params", "[optim]") {
  const double lr = 1e-2, wd = 0.1;
  auto ours = make_params(1);
  auto ref = make_params(1);
  for (auto& p : ours) p.set_requires_grad(true);
  for (auto& p : ref) p.set_requires_grad(true);
  tr::NamedTensors named = {{"layer.weight", ours[0]}, {"layer.bias", ours[1]}, {"other.weight", ours[2]}};
  auto groups = tr::make_param_groups(named, wd, 0.0);
  REQUIRE(groups.size() == 2);
  CHECK(groups[0].name == "decay");
  CHECK(groups[0].names == std::vector<std::string>{"layer.weight", "other.weight"});
  CHECK(groups[1].names == std::vector<std::string>{"layer.bias"});
  CHECK(groups[1].weight_decay == 0.0);
  tr::AdamW adam(groups, 0.9, 0.95, 1e-8);

  std::vector<torch::optim::OptimizerParamGroup> tg;
  tg.emplace_back(std::vector<torch::Tensor>{ref[0], ref[2]},
                  std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(lr).betas({0.9, 0.95}).eps(1e-8).weight_decay(wd)));
  tg.emplace_back(std::vector<torch::Tensor>{ref[1]},
                  std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(lr).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.0)));
  torch::optim::AdamW torch_adam(std::move(tg), torch::optim::AdamWOptions(lr));
  for (int s = 0; s < 10; ++s) {
    set_grads(ours, s);
    set_grads(ref, s);
    adam.step(lr);
    torch_adam.step();
  }
  for (size_t i = 0; i < ours.size(); ++i) CHECK(max_diff(ours[i], ref[i]) < 1e-6);
  CHECK(adam.step_count("layer.bias") == 10);
  // The bias really had no decay: a run with decay on it would differ measurably.
  auto again = make_params(1);
  tr::AdamW all_decay({tr::ParamGroup{"all", {"b"}, {again[1]}, wd, 1.0}});
  for (int s = 0; s < 10; ++s) {
    set_grads(ours, s);  // same grads as above for index 1
    again[1].mutable_grad() = ours[1].grad().clone();
    all_decay.step(lr);
  }
  CHECK(max_diff(again[1], ref[1]) > 1e-5);
}

TEST_CASE("decay exclusion covers norms, biases, 1-D params; LoRA+ scales lora_B lr", "[optim]") {
  CHECK(tr::is_no_decay_param("model.norm.weight", torch::zeros({4})));
  CHECK(tr::is_no_decay_param("model.layers.0.input_layernorm.weight", torch::zeros({4})));
  CHECK(tr::is_no_decay_param("q_proj.bias", torch::zeros({4, 4})));
  CHECK(tr::is_no_decay_param("scale", torch::zeros({4})));
  CHECK_FALSE(tr::is_no_decay_param("model.layers.0.self_attn.q_proj.weight", torch::zeros({4, 4})));
  tr::NamedTensors named = {{"q_proj.lora_A.weight", torch::zeros({2, 4})}, {"q_proj.lora_B.weight", torch::zeros({4, 2})}};
  auto groups = tr::make_param_groups(named, 0.01, 16.0);
  REQUIRE(groups.size() == 2);
  CHECK(groups[1].name == "lora_B");
  CHECK(groups[1].lr_scale == 16.0);
  // SGD step with lr 0.1: lora_A moves by 0.1 * g, lora_B by 1.6 * g.
  for (auto& [n, p] : named) p.mutable_grad() = torch::ones_like(p);
  tr::SGD sgd(tr::make_param_groups(named, 0.0, 16.0));
  sgd.step(0.1);
  CHECK(named[0].second[0][0].item<double>() == Approx(-0.1));
  CHECK(named[1].second[0][0].item<double>() == Approx(-1.6));
}

TEST_CASE("SGD with momentum / nesterov / weight decay matches torch::optim::SGD", "[optim]") {
  for (bool nesterov : {false, true}) {
    auto ours = make_params(2);
    auto ref = make_params(2);
    tr::SGD sgd({tr::ParamGroup{"all", {"a", "b", "c"}, ours, 0.01, 1.0}}, 0.9, 0.0, nesterov);
    torch::optim::SGD tsgd(ref, torch::optim::SGDOptions(0.05).momentum(0.9).nesterov(nesterov).weight_decay(0.01));
    for (int s = 0; s < 6; ++s) {
      set_grads(ours, s);
      set_grads(ref, s);
      sgd.step(0.05);
      tsgd.step();
    }
    for (size_t i = 0; i < ours.size(); ++i) CHECK(max_diff(ours[i], ref[i]) < 1e-6);
  }
}

TEST_CASE("optimizer state round-trips and rejects mismatched shapes", "[optim]") {
  auto ps = make_params(3);
  tr::AdamW a({tr::ParamGroup{"all", {"a", "b", "c"}, ps, 0.0, 1.0}});
  set_grads(ps, 0);
  a.step(1e-3);
  auto tensors = a.state_tensors();
  std::map<std::string, torch::Tensor> m(tensors.begin(), tensors.end());
  auto ps2 = make_params(3);
  tr::AdamW b({tr::ParamGroup{"all", {"a", "b", "c"}, ps2, 0.0, 1.0}});
  b.load_state(m, a.state_scalars());
  CHECK(b.step_count("c") == 1);
  m["a.exp_avg"] = torch::zeros({9});
  CHECK_THROWS_WITH(b.load_state(m, a.state_scalars()), Catch::Contains("a.exp_avg") && Catch::Contains("[4, 3]"));
  tr::SGD sgd({tr::ParamGroup{"all", {"a"}, {ps2[0]}, 0.0, 1.0}});
  CHECK_THROWS_AS(sgd.load_state(m, a.state_scalars()), llmtune::Error);
}

TEST_CASE("LR schedules equal transformers' schedulers (fixture)", "[schedule]") {
  const char* env = std::getenv("LLMTUNE_FIXTURES");
  REQUIRE(env != nullptr);  // set by ctest; run scripts/fixtures/train_schedules.py --out DIR
  const std::string path = std::string(env) + "/train/schedules.json";
  std::ifstream f(path);
  INFO("missing fixture " << path << ": run scripts/fixtures/train_schedules.py --out " << env);
  REQUIRE(f.good());
  auto j = nlohmann::json::parse(f);
  REQUIRE(j["cases"].size() >= 10);
  for (const auto& c : j["cases"]) {
    tr::ScheduleOptions o;
    o.type = c["type"];
    o.warmup_steps = c["warmup_steps"];
    o.warmup_ratio = c["warmup_ratio"];
    o.min_lr_ratio = c["min_lr_ratio"];
    o.min_lr = c["min_lr"];
    const double lr = c["lr"];
    tr::LrSchedule s(o, lr, c["total_steps"]);
    INFO(c["type"] << " total " << c["total_steps"] << " warmup " << c["resolved_warmup"]);
    CHECK(s.warmup_steps() == c["resolved_warmup"].get<int64_t>());
    const auto& lrs = c["lrs"];
    for (size_t k = 0; k < lrs.size(); ++k) {
      INFO("step " << k);
      CHECK(std::abs(s.lr(static_cast<int64_t>(k)) - lrs[k].get<double>()) <= 1e-7 * std::max(1.0, lr));
    }
  }
  CHECK_THROWS_WITH(tr::LrSchedule(tr::ScheduleOptions{"cosin"}, 1.0, 10), Catch::Contains("did you mean 'cosine'"));
}

TEST_CASE("loss scaler follows GradScaler rules", "[precision]") {
  tr::LossScaler s(true);
  CHECK(s.scale() == 65536.0);
  s.update(true);
  CHECK(s.scale() == 32768.0);
  for (int i = 0; i < 1999; ++i) s.update(false);
  CHECK(s.scale() == 32768.0);
  s.update(false);  // 2000th clean step in a row
  CHECK(s.scale() == 65536.0);
  for (int i = 0; i < 1000; ++i) s.update(false);
  s.update(true);  // an overflow resets the streak
  CHECK(s.scale() == 32768.0);
  for (int i = 0; i < 1999; ++i) s.update(false);
  CHECK(s.scale() == 32768.0);
  tr::LossScaler t(true);
  t.load_state(s.state());
  CHECK(t.scale() == 32768.0);
  CHECK(t.growth_tracker() == 1999);
  tr::LossScaler off(false);
  off.update(true);
  CHECK(off.scale() == 1.0);
}

TEST_CASE("clip_grad_norm matches torch::nn::utils::clip_grad_norm_", "[precision]") {
  for (double max_norm : {0.5, 1e6}) {
    auto ours = make_params(4);
    auto ref = make_params(4);
    set_grads(ours, 3);
    set_grads(ref, 3);
    double n = tr::clip_grad_norm(ours, max_norm);
    double tn = torch::nn::utils::clip_grad_norm_(ref, max_norm);
    CHECK(n == Approx(tn).epsilon(1e-6));
    for (size_t i = 0; i < ours.size(); ++i) CHECK(max_diff(ours[i].grad(), ref[i].grad()) < 1e-6);
  }
  auto ps = make_params(5);
  set_grads(ps, 0);
  ps[1].grad()[0] = std::nan("");
  auto before = ps[0].grad().clone();
  CHECK_FALSE(std::isfinite(tr::clip_grad_norm(ps, 1.0)));
  CHECK(torch::equal(ps[0].grad(), before));  // non-finite: nothing is scaled
  CHECK(tr::precision_from_string("bf16") == tr::Precision::bf16);
  CHECK_THROWS_AS(tr::precision_from_string("fp8"), llmtune::Error);
}
