// The fused cross-entropy kernel (lib/model/fused_cross_entropy.h) against LibTorch's
// cross_entropy and autograd, for every vector code path this CPU runs, fp32 and bf16 logits.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cmath>

#include "model/fused_cross_entropy.h"
#include "model/vector_math.h"

using namespace llmtune;

namespace {

struct Reference {
  double loss_sum;
  torch::Tensor grad;  // fp32
};

// LibTorch on the same (possibly bf16-rounded) values, in fp32: sum of the per-row losses, and the
// gradient of that sum with respect to the logits.
Reference reference(const torch::Tensor& logits, const torch::Tensor& targets) {
  auto x = logits.to(torch::kFloat).detach().requires_grad_(true);
  auto loss = torch::nn::functional::cross_entropy(
      x, targets, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  loss.backward();
  auto per_row = torch::nn::functional::cross_entropy(
      x.detach().to(torch::kDouble), targets, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  return {per_row.item<double>(), x.grad()};
}

double max_abs(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat) - b.to(torch::kFloat)).abs().max().item<double>();
}

}  // namespace

TEST_CASE("fused cross-entropy equals LibTorch's loss and logits gradient", "[model][loss][fused]") {
  const auto isas = model::detail::vector_math::available_isas();
  REQUIRE(isas.back() == "generic");
  torch::manual_seed(21);
  // V = 1000 leaves a tail of 8 after the 16-wide vectors; V = 16 has none; V = 5 is all tail.
  for (int64_t V : {1000, 16, 5}) {
    auto logits = torch::randn({7, V}) * 3;
    logits[2] = torch::linspace(-200, 50, V);  // a row that spans e^-250: underflow to 0 on the way
    auto targets = torch::randint(0, V, {7});
    targets[2] = 0;  // the least likely token of that row: a loss of 250
    for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
      auto x = logits.to(dtype);
      auto ref = reference(x, targets);
      for (const auto& isa : isas) {
        INFO("V " << V << " dtype " << c10::toString(dtype) << " isa " << isa);
        auto got = model::detail::cross_entropy_with_grad(x, targets, isa);
        REQUIRE(got.grad.scalar_type() == dtype);
        REQUIRE(got.grad.sizes() == x.sizes());
        // The loss is summed in fp64 from fp32 row values: relative 1e-6 of the fp64 reference.
        CHECK(got.loss_sum == Approx(ref.loss_sum).epsilon(1e-6));
        // Probabilities are at most 1: fp32 gradients agree to a few fp32 roundings; bf16 ones are
        // the fp32 value rounded once (half an ulp, 2^-9 relative), and LibTorch rounds the same way.
        const double tol = dtype == torch::kFloat ? 1e-6 : 1.0 / 256;
        CHECK(max_abs(got.grad, ref.grad) <= tol);
        // Every row of softmax - onehot sums to 0.
        CHECK(got.grad.to(torch::kFloat).sum(1).abs().max().item<double>() <= (dtype == torch::kFloat ? 1e-5 : 2e-2));
      }
    }
  }
}

TEST_CASE("fused cross-entropy code paths agree with each other", "[model][loss][fused]") {
  torch::manual_seed(22);
  auto x = (torch::randn({16, 49152 / 16}) * 4).to(torch::kBFloat16);
  auto targets = torch::randint(0, x.size(1), {16});
  auto generic = model::detail::cross_entropy_with_grad(x, targets, "generic");
  for (const auto& isa : model::detail::vector_math::available_isas()) {
    INFO(isa);
    auto got = model::detail::cross_entropy_with_grad(x, targets, isa);
    CHECK(got.loss_sum == Approx(generic.loss_sum).epsilon(1e-7));
    // FMA contraction differs between the paths: at most one bf16 rounding apart.
    CHECK(max_abs(got.grad, generic.grad) <= 1.0 / 256);
  }
}

TEST_CASE("fused cross-entropy: non-finite logits and bad targets", "[model][loss][fused]") {
  auto x = torch::randn({3, 40});
  x[1][7] = std::numeric_limits<float>::quiet_NaN();
  auto targets = torch::tensor({1, 2, 3});
  for (const auto& isa : model::detail::vector_math::available_isas()) {
    INFO(isa);
    auto got = model::detail::cross_entropy_with_grad(x, targets, isa);
    CHECK(std::isnan(got.loss_sum));  // the trainer's NaN guard sees it
    CHECK(got.grad[1].isnan().all().item<bool>());
    CHECK(got.grad[0].isfinite().all().item<bool>());
    CHECK(got.grad[2].isfinite().all().item<bool>());
    auto inf = torch::zeros({1, 40});
    inf[0][3] = std::numeric_limits<float>::infinity();
    CHECK(std::isnan(model::detail::cross_entropy_with_grad(inf, torch::tensor({0}), isa).loss_sum));
  }
  CHECK_THROWS_WITH(model::detail::cross_entropy_with_grad(torch::zeros({2, 10}), torch::tensor({3, 10})),
                    Catch::Contains("target 10 is outside the vocabulary [0, 10)"));
  CHECK_THROWS_WITH(model::detail::cross_entropy_with_grad(torch::zeros({2, 10}), torch::tensor({3})),
                    Catch::Contains("targets for 2 rows"));
  CHECK_THROWS_WITH(model::detail::cross_entropy_with_grad(torch::zeros({2, 10}, torch::kHalf), torch::tensor({3, 1})),
                    Catch::Contains("fp32/bf16"));
}
