// The fp32 route for half-precision products (lib/model/half_compute.h): values and gradients equal
// an fp32 computation on the same half-precision inputs, rounded back to the input dtype, and the
// route keeps no fp32 copies alive between forward and backward.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include "model_test_util.h"

#include "model/half_compute.h"

using namespace llmtune;
using model_test::max_rel;

TEST_CASE("half products through fp32 equal an fp32 reference, gradients included", "[model][half]") {
  torch::manual_seed(3);
  for (auto dtype : {torch::kBFloat16, torch::kHalf}) {
    auto x = torch::randn({2, 5, 24}).to(dtype).requires_grad_(true);
    auto w = torch::randn({16, 24}).mul(0.2).to(dtype).requires_grad_(true);
    auto b = torch::randn({16}).to(dtype).requires_grad_(true);
    auto up = torch::randn({2, 5, 16});
    auto y = model::detail::linear_in_fp32(x, w, b);
    REQUIRE(y.scalar_type() == dtype);
    (y.to(torch::kFloat) * up).sum().backward();

    // Reference: the same half-precision values as fp32 leaves.
    auto xr = x.detach().to(torch::kFloat).requires_grad_(true);
    auto wr = w.detach().to(torch::kFloat).requires_grad_(true);
    auto br = b.detach().to(torch::kFloat).requires_grad_(true);
    auto yr = torch::linear(xr, wr, br);
    (yr * up).sum().backward();
    // The output is the fp32 value rounded once to the half type: within one rounding (2^-8 for
    // bf16, 2^-11 for fp16) of the largest value. Gradients see two: autograd hands the incoming
    // gradient over in the output's (half) dtype, then the result is rounded again.
    const double tol = dtype == torch::kBFloat16 ? 1.0 / 256 : 1.0 / 2048;
    CHECK(max_rel(y, yr) <= tol);
    CHECK(max_rel(x.grad(), xr.grad()) <= 2 * tol);
    CHECK(max_rel(w.grad(), wr.grad()) <= 2 * tol);
    CHECK(max_rel(b.grad(), br.grad()) <= 2 * tol);
    CHECK(x.grad().scalar_type() == dtype);
    CHECK(w.grad().scalar_type() == dtype);
  }
}

TEST_CASE("the fp32 route skips gradients nobody asked for (frozen weights, LoRA bases)", "[model][half]") {
  torch::manual_seed(4);
  auto x = torch::randn({3, 8}).to(torch::kBFloat16).requires_grad_(true);
  auto w = torch::randn({4, 8}).to(torch::kBFloat16);  // frozen
  auto y = model::detail::linear_in_fp32(x, w);
  y.to(torch::kFloat).sum().backward();
  REQUIRE(x.grad().defined());
  CHECK(!w.grad().defined());
  auto expect = torch::ones({3, 4}).matmul(w.to(torch::kFloat));
  CHECK(max_rel(x.grad(), expect) <= 1.0 / 256);
}

TEST_CASE("attention with the half policy matches fp32 attention", "[model][half]") {
  torch::manual_seed(5);
  auto q = torch::randn({1, 4, 6, 8}).to(torch::kBFloat16);
  auto k = torch::randn({1, 2, 6, 8}).to(torch::kBFloat16);
  auto v = torch::randn({1, 2, 6, 8}).to(torch::kBFloat16);
  auto y = model::detail::attention(q, k, v, std::nullopt, true, true);
  auto yr = at::scaled_dot_product_attention(q.to(torch::kFloat), k.to(torch::kFloat), v.to(torch::kFloat),
                                             std::nullopt, 0.0, true, std::nullopt, true);
  REQUIRE(y.scalar_type() == torch::kBFloat16);
  // Native bf16 attention rounds its intermediate products; the fp32 route rounds only the output.
  CHECK(max_rel(y, yr) <= 1.0 / 64);
}
