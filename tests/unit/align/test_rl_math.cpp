// PPO/GRPO arithmetic against hand-computed numbers: GAE, masked whitening, KL-shaped rewards, the
// clipped policy and value losses, group-normalised advantages, the k3 KL, the adaptive KL
// controller and the verifiable rewards.
#include <catch2/catch.hpp>

#include <cmath>

#include "align/align.h"

using namespace llmtune;

namespace {
torch::Tensor t(std::vector<float> v, std::vector<int64_t> shape) { return torch::tensor(v).reshape(shape); }
double el(const torch::Tensor& x, int64_t i, int64_t j) { return x[i][j].item<double>(); }
}  // namespace

TEST_CASE("gae: backwards over the masked response, V beyond the end = 0") {
  auto r = t({0.5f, 1.0f, 9.0f}, {1, 3}), v = t({0.2f, 0.4f, 7.0f}, {1, 3}), m = t({1, 1, 0}, {1, 3});
  auto g = align::gae(r, v, m, 0.9, 0.8);
  // t1: delta = 1 - 0.4 = 0.6; t0: delta = 0.5 + 0.9*0.4 - 0.2 = 0.66, A0 = 0.66 + 0.72*0.6
  CHECK(el(g.advantages, 0, 1) == Approx(0.6));
  CHECK(el(g.advantages, 0, 0) == Approx(1.092));
  CHECK(el(g.advantages, 0, 2) == 0.0);
  CHECK(el(g.returns, 0, 0) == Approx(1.292));
  CHECK(el(g.returns, 0, 1) == Approx(1.0));
}

TEST_CASE("masked whitening uses the unbiased variance of the masked entries") {
  auto x = t({1, 2, 3, 100}, {1, 4}), m = t({1, 1, 1, 0}, {1, 4});
  auto w = align::masked_whiten(x, m);
  CHECK(el(w, 0, 0) == Approx(-1.0).epsilon(1e-6));
  CHECK(el(w, 0, 1) == Approx(0.0).margin(1e-6));
  CHECK(el(w, 0, 2) == Approx(1.0).epsilon(1e-6));
  CHECK(align::masked_mean(x, m).item<double>() == Approx(2.0));
}

TEST_CASE("per-token rewards: -kl_coef (logp - ref) plus the score on the last real token") {
  auto r = align::ppo_token_rewards(t({-1, -2, 0}, {1, 3}), t({-1.5f, -1, 0}, {1, 3}), t({1, 1, 0}, {1, 3}),
                                    torch::tensor({3.0f}), 0.1);
  CHECK(el(r, 0, 0) == Approx(-0.05));
  CHECK(el(r, 0, 1) == Approx(3.1));
  CHECK(el(r, 0, 2) == 0.0);
}

TEST_CASE("clipped policy loss and clip fraction") {
  auto logp = torch::log(torch::tensor({1.5f, 0.5f, 0.5f})), old = torch::zeros({3});
  auto adv = torch::tensor({1.0f, 1.0f, -1.0f});
  auto pl = align::ppo_policy_loss(logp, old, adv, 0.2);
  CHECK(pl.per_token[0].item<double>() == Approx(-1.2));
  CHECK(pl.per_token[1].item<double>() == Approx(-0.5));
  CHECK(pl.per_token[2].item<double>() == Approx(0.8));
  CHECK(pl.clipped[0].item<bool>());
  CHECK_FALSE(pl.clipped[1].item<bool>());
  CHECK(pl.clipped[2].item<bool>());
  CHECK(pl.approx_kl[0].item<double>() == Approx(0.5 * std::pow(std::log(1.5), 2)));
}

TEST_CASE("clipped value loss") {
  auto vl = align::ppo_value_loss(torch::tensor({1.0f, 0.0f, 1.0f}), torch::tensor({0.5f, 0.5f, 0.5f}),
                                  torch::tensor({0.0f, 1.0f, 2.0f}), 0.2);
  CHECK(vl.per_token[0].item<double>() == Approx(0.5));
  CHECK(vl.per_token[1].item<double>() == Approx(0.5));
  CHECK(vl.per_token[2].item<double>() == Approx(0.845));
  CHECK(vl.clipped[2].item<bool>());
  CHECK_FALSE(vl.clipped[0].item<bool>());
}

TEST_CASE("GRPO: group-normalised advantages, k3 KL and the token loss") {
  auto a = align::group_advantages(torch::tensor({1.0f, 0.0f, 0.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f}), 4);
  const double s = 0.5 / (std::sqrt(1.0 / 3.0) + 1e-4);
  CHECK(a[0].item<double>() == Approx(s));
  CHECK(a[1].item<double>() == Approx(-s));
  CHECK(a[5].item<double>() == 0.0);  // a group with equal rewards has no signal
  CHECK(align::kl_k3(torch::tensor({-1.0f}), torch::tensor({-2.0f})).item<double>() == Approx(std::exp(-1.0)));
  // ratio 1.5, A = 1: -min(1.5, 1.2) = -1.2; plus beta * k3 (logp = log 1.5 vs ref = log 1.5 - 1)
  auto logp = torch::log(torch::tensor({{1.5f}}));
  auto loss = align::grpo_token_loss(logp, torch::zeros({1, 1}), logp - 1.0, torch::tensor({1.0f}), 0.2, 0.1);
  CHECK(loss.item<double>() == Approx(-1.2 + 0.1 * std::exp(-1.0)));
}

TEST_CASE("adaptive KL controller and verifiable rewards") {
  align::AdaptiveKl c{0.1, 6.0, 10000};
  c.update(12.0, 100);  // error clipped to +0.2
  CHECK(c.value == Approx(0.1 * (1 + 0.2 * 100 / 10000.0)));
  align::VerifiableReward em;
  CHECK(em.score(" yes\n", "yes") == 1.0);
  CHECK(em.score("yes no", "yes") == 0.0);
  align::VerifiableReward re{"regex", R"(^\s*{answer}\b)"};
  CHECK(re.score(" a.b c", "a.b") == 1.0);
  CHECK(re.score("axb", "a.b") == 0.0);  // the answer is escaped
}
