// The fused RMSNorm (lib/model/fused_rms_norm.h) against the same formula written as LibTorch ops
// (transformers' LlamaRMSNorm), values and gradients, fp32 and bf16, every vector code path.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include "model_test_util.h"

#include "model/fused_rms_norm.h"
#include "model/vector_math.h"

using namespace llmtune;
using model_test::max_rel;

namespace {

// LlamaRMSNorm: h = x·rsqrt(mean(x²) + eps) in fp32, weight · h.to(dtype).
torch::Tensor reference_rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  auto h = x.to(torch::kFloat);
  h = h * torch::rsqrt(h.pow(2).mean(-1, true) + eps);
  return w * h.to(x.scalar_type());
}


}  // namespace

TEST_CASE("fused RMSNorm equals LlamaRMSNorm's ops, gradients included", "[model][rmsnorm][fused]") {
  torch::manual_seed(31);
  const auto isas = model::detail::vector_math::available_isas();
  // C = 576 (SmolLM, 36 vectors), 72 (a tail of 8), 5 (all tail); a [2, 3, C] input.
  for (int64_t C : {576, 72, 5}) {
    for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
      auto x0 = (torch::randn({2, 3, C}) * 3).to(dtype);
      auto w0 = (torch::rand({C}) + 0.5).to(dtype);
      auto up = torch::randn({2, 3, C}).to(dtype);
      auto xr = x0.clone().requires_grad_(true), wr = w0.clone().requires_grad_(true);
      auto yr = reference_rms_norm(xr, wr, 1e-5);
      yr.backward(up);
      for (const auto& isa : isas) {
        INFO("C " << C << " dtype " << c10::toString(dtype) << " isa " << isa);
        auto x = x0.clone().requires_grad_(true), w = w0.clone().requires_grad_(true);
        auto y = model::detail::fused_rms_norm(x, w, 1e-5, isa);
        REQUIRE(y.scalar_type() == dtype);
        y.backward(up);
        if (dtype == torch::kFloat) {
          // fp32: only the order of the sum of squares differs.
          CHECK(max_rel(y, yr) < 1e-6);
          CHECK(max_rel(x.grad(), xr.grad()) < 1e-5);
          CHECK(max_rel(w.grad(), wr.grad()) < 1e-5);
        } else {
          // bf16: the two round h and y at the same places, so values agree to one bf16 rounding
          // (where rstd's last fp32 bit tips a rounding); autograd's backward also rounds g·w and
          // the intermediate products to bf16 where the fused backward stays in fp32: a few.
          CHECK(max_rel(y, yr) <= 1.0 / 128);
          CHECK(max_rel(x.grad(), xr.grad()) <= 1.0 / 32);
          CHECK(max_rel(w.grad(), wr.grad()) <= 1.0 / 64);
        }
        // Without gradients: the same values, no graph.
        torch::NoGradGuard no_grad;
        auto y2 = model::detail::fused_rms_norm(x0, w0, 1e-5, isa);
        CHECK(!y2.requires_grad());
        CHECK(torch::equal(y2, y.detach()));
      }
    }
  }
}

TEST_CASE("fused RMSNorm: frozen weight, non-contiguous input, refusals", "[model][rmsnorm][fused]") {
  torch::manual_seed(32);
  auto x = torch::randn({4, 16, 8}).transpose(1, 2).requires_grad_(false);  // [4, 8, 16], not contiguous
  auto xg = x.detach().clone().requires_grad_(true);
  auto w = torch::rand({16}) + 0.5;  // frozen, as under LoRA
  auto y = model::detail::fused_rms_norm(xg.transpose(1, 2).transpose(1, 2), w, 1e-6);
  y.sum().backward();
  CHECK(max_rel(y, reference_rms_norm(x, w, 1e-6)) < 1e-6);
  CHECK(xg.grad().defined());
  CHECK(!w.grad().defined());
  CHECK(!model::detail::fused_rms_norm_applies(x.to(torch::kHalf), w.to(torch::kHalf)));
  CHECK(!model::detail::fused_rms_norm_applies(x, w.to(torch::kBFloat16)));
  CHECK_THROWS_WITH(model::detail::fused_rms_norm(x, torch::ones({3}), 1e-6), Catch::Contains("weight [C]"));
}
