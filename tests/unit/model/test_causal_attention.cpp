// Blocked causal attention (lib/model/causal_attention.h) against LibTorch's SDPA: in fp32 the two
// are the same computation up to summation order; in bf16 its error against an fp32 reference is
// no larger than SDPA's own bf16 error, for outputs and for the gradients of q, k and v.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include "model_test_util.h"

#include "model/causal_attention.h"

using namespace llmtune;
using model_test::max_rel;

namespace {


struct Result {
  torch::Tensor out, dq, dk, dv;
};

// Runs `attend` on copies of q, k, v in `dtype` and back-propagates `up` (the upstream gradient).
template <typename F>
Result run(F attend, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& up,
           torch::ScalarType dtype) {
  auto qd = q.to(dtype).detach().requires_grad_(true);
  auto kd = k.to(dtype).detach().requires_grad_(true);
  auto vd = v.to(dtype).detach().requires_grad_(true);
  auto out = attend(qd, kd, vd);
  out.backward(up.to(dtype));
  return {out.detach().to(torch::kFloat), qd.grad().to(torch::kFloat), kd.grad().to(torch::kFloat),
          vd.grad().to(torch::kFloat)};
}

// Outputs and q/k/v gradients of two fp32 runs within 1e-5 of the reference's largest value.
void check_equal_in_fp32(const Result& got, const Result& ref) {
  CHECK(max_rel(got.out, ref.out) < 1e-5);
  CHECK(max_rel(got.dq, ref.dq) < 1e-5);
  CHECK(max_rel(got.dk, ref.dk) < 1e-5);
  CHECK(max_rel(got.dv, ref.dv) < 1e-5);
}

torch::Tensor sdpa(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  return at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/true, std::nullopt,
                                          /*enable_gqa=*/q.size(1) != k.size(1));
}

torch::Tensor blocked(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  return model::detail::blocked_causal_attention(q, k, v);
}

}  // namespace

TEST_CASE("blocked causal attention equals SDPA in fp32, gradients included", "[model][attention]") {
  torch::manual_seed(11);
  // Shapes: one block (T < 64), a ragged last block (130 = 44 + 44 + 42), GQA and plain heads, B > 1.
  struct Shape {
    int64_t B, H, Hkv, T, D;
  };
  for (auto s : {Shape{1, 4, 2, 7, 8}, Shape{2, 6, 2, 130, 16}, Shape{1, 3, 3, 64, 8}, Shape{1, 2, 1, 1, 4}}) {
    INFO("B " << s.B << " H " << s.H << " Hkv " << s.Hkv << " T " << s.T << " D " << s.D);
    auto q = torch::randn({s.B, s.H, s.T, s.D}) * 2, k = torch::randn({s.B, s.Hkv, s.T, s.D}) * 2;
    auto v = torch::randn({s.B, s.Hkv, s.T, s.D}), up = torch::randn({s.B, s.H, s.T, s.D});
    auto ref = run(sdpa, q, k, v, up, torch::kFloat);
    auto got = run(blocked, q, k, v, up, torch::kFloat);
    // fp32 throughout; only the order of summation differs.
    check_equal_in_fp32(got, ref);
  }
}

TEST_CASE("blocked causal attention in bf16 is as accurate as SDPA in bf16", "[model][attention]") {
  torch::manual_seed(12);
  // The SmolLM-135M attention shape (9 heads over 3 KV heads, head size 64) at 512 tokens: 8 blocks.
  // Scores of several units (q and k scaled by 2) make the softmax peaked, where rounding shows.
  auto q = torch::randn({1, 9, 512, 64}) * 2, k = torch::randn({1, 3, 512, 64}) * 2;
  auto v = torch::randn({1, 3, 512, 64}), up = torch::randn({1, 9, 512, 64});
  // Reference: fp32 attention of the bf16-rounded inputs.
  auto rq = q.to(torch::kBFloat16).to(torch::kFloat), rk = k.to(torch::kBFloat16).to(torch::kFloat);
  auto rv = v.to(torch::kBFloat16).to(torch::kFloat), rup = up.to(torch::kBFloat16).to(torch::kFloat);
  auto ref = run(sdpa, rq, rk, rv, rup, torch::kFloat);
  auto flash = run(sdpa, q, k, v, up, torch::kBFloat16);
  auto got = run(blocked, q, k, v, up, torch::kBFloat16);
  // Both round q·scale, the probabilities, the output and every gradient to bf16 (relative 2^-9
  // each); the comparison is with SDPA's own bf16 error on the same inputs, plus a margin of one
  // bf16 rounding (2^-8 relative to the largest value) for the different places they round.
  const double margin = 1.0 / 256;
  INFO("out " << max_rel(got.out, ref.out) << " vs " << max_rel(flash.out, ref.out));
  INFO("dq " << max_rel(got.dq, ref.dq) << " vs " << max_rel(flash.dq, ref.dq));
  INFO("dk " << max_rel(got.dk, ref.dk) << " vs " << max_rel(flash.dk, ref.dk));
  INFO("dv " << max_rel(got.dv, ref.dv) << " vs " << max_rel(flash.dv, ref.dv));
  CHECK(max_rel(got.out, ref.out) <= max_rel(flash.out, ref.out) + margin);
  CHECK(max_rel(got.dq, ref.dq) <= max_rel(flash.dq, ref.dq) + margin);
  CHECK(max_rel(got.dk, ref.dk) <= max_rel(flash.dk, ref.dk) + margin);
  CHECK(max_rel(got.dv, ref.dv) <= max_rel(flash.dv, ref.dv) + margin);
  // And in absolute terms: within 2^-5 of the largest value (a few bf16 roundings).
  CHECK(max_rel(got.out, ref.out) < 1.0 / 32);
  CHECK(max_rel(got.dq, ref.dq) < 1.0 / 32);
}

TEST_CASE("blocked attention with a mask equals SDPA with the same mask (padding, packed sequences)",
          "[model][attention]") {
  torch::manual_seed(14);
  const int64_t B = 2, H = 4, Hkv = 2, T = 150, D = 8;
  // Row 0: three packed sequences; row 1: one sequence followed by 40 padding positions. Queries see
  // earlier keys of their own sequence and themselves, as the transformer's masks are built.
  auto pos = torch::arange(T);
  auto segments = torch::stack({(pos >= 50).to(torch::kLong) + (pos >= 95).to(torch::kLong),
                                torch::where(pos < 110, torch::zeros_like(pos), pos)});
  auto causal = pos.unsqueeze(1) >= pos.unsqueeze(0);
  auto allowed = (causal.unsqueeze(0) & (segments.unsqueeze(2) == segments.unsqueeze(1))).unsqueeze(1);
  REQUIRE(allowed.sizes() == torch::IntArrayRef({B, 1, T, T}));
  auto q = torch::randn({B, H, T, D}) * 2, k = torch::randn({B, Hkv, T, D}) * 2;
  auto v = torch::randn({B, Hkv, T, D}), up = torch::randn({B, H, T, D});
  auto sdpa_masked = [&](const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& c) {
    return at::scaled_dot_product_attention(a, b, c, allowed, 0.0, false, std::nullopt, true);
  };
  auto blocked_masked = [&](const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& c) {
    return model::detail::blocked_causal_attention(a, b, c, allowed);
  };
  auto ref = run(sdpa_masked, q, k, v, up, torch::kFloat);
  auto got = run(blocked_masked, q, k, v, up, torch::kFloat);
  check_equal_in_fp32(got, ref);
  // A mask shared by the batch ([1, 1, T, T]) broadcasts.
  auto shared = causal.unsqueeze(0).unsqueeze(0);
  auto a = model::detail::blocked_causal_attention(q, k, v, shared);
  CHECK(max_rel(a, blocked(q, k, v)) < 1e-6);
}

TEST_CASE("blocked causal attention without gradients gives the same output", "[model][attention]") {
  torch::manual_seed(13);
  auto q = torch::randn({1, 4, 100, 16}).to(torch::kBFloat16), k = torch::randn({1, 2, 100, 16}).to(torch::kBFloat16);
  auto v = torch::randn({1, 2, 100, 16}).to(torch::kBFloat16);
  auto with_grad = blocked(q.clone().requires_grad_(true), k, v).detach();
  torch::Tensor without;
  {
    torch::NoGradGuard guard;
    without = blocked(q, k, v);
  }
  CHECK(!without.requires_grad());
  CHECK(torch::equal(with_grad, without));
}

TEST_CASE("blocked attention reports the probabilities it keeps", "[model][attention]") {
  // 512 positions in 8 blocks of 64: block i keeps 64 x 64(i+1) probabilities per head.
  const int64_t per_head = 64 * 64 * (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8);
  CHECK(model::detail::blocked_attention_saved_bytes(1, 9, 512, 2) == 9 * per_head * 2);
  CHECK(model::detail::blocked_attention_saved_bytes(2, 9, 512, 2) == 2 * 9 * per_head * 2);
  // One block: the full square.
  CHECK(model::detail::blocked_attention_saved_bytes(1, 1, 10, 4) == 10 * 10 * 4);
}
