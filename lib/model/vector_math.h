// Internal to lib/model: 16-lane fp32 vector helpers for the CPU kernels written in this module
// (fused_cross_entropy.cpp, causal_attention.cpp).
//
// They use GCC vector types and are always inlined, so one source compiles to AVX-512, AVX2 or
// plain SSE code: each kernel is instantiated in functions carrying target("avx512f,…"),
// target("avx2,fma") or no target attribute, and the helpers take on the instruction set of the
// function they are inlined into. The CPU is asked at run time which of those to call
// (vector_math::cpu_runs).
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

// The 64-byte vector types only pass between always-inline functions, so GCC's note that their
// calling convention differs with and without AVX-512 does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#define LLMTUNE_ALWAYS_INLINE inline __attribute__((always_inline))
#define LLMTUNE_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#define LLMTUNE_TARGET_AVX2 __attribute__((target("avx2,fma")))

namespace llmtune::model::detail::vector_math {

// Whether this CPU runs the code path named "avx512", "avx2" or "generic".
inline bool cpu_runs(const std::string& isa) {
  if (isa == "generic") return true;
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return false;
}

// The code paths this CPU runs, widest first ("avx512", "avx2", "generic"; tests run each).
inline std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* isa : {"avx512", "avx2", "generic"})
    if (cpu_runs(isa)) out.push_back(isa);
  return out;
}

// The widest code path this CPU runs.
inline std::string widest_isa() { return cpu_runs("avx512") ? "avx512" : cpu_runs("avx2") ? "avx2" : "generic"; }

constexpr int64_t kLanes = 16;
using f32v = float __attribute__((vector_size(64)));
using i32v = int32_t __attribute__((vector_size(64)));
using u32v = uint32_t __attribute__((vector_size(64)));
using u16v = uint16_t __attribute__((vector_size(32)));

LLMTUNE_ALWAYS_INLINE f32v splat(float x) { return f32v{} + x; }

LLMTUNE_ALWAYS_INLINE f32v load(const float* p) {
  f32v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bf16 is the top half of an fp32: widening is a shift.
LLMTUNE_ALWAYS_INLINE f32v load(const c10::BFloat16* p) {
  u16v h;
  std::memcpy(&h, p, sizeof h);
  u32v w = __builtin_convertvector(h, u32v) << 16;
  f32v v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

LLMTUNE_ALWAYS_INLINE void store(float* p, f32v v) { std::memcpy(p, &v, sizeof v); }

// Round to nearest even, as LibTorch's fp32 -> bf16 conversion does (the values here are finite).
LLMTUNE_ALWAYS_INLINE void store(c10::BFloat16* p, f32v v) {
  u32v u;
  std::memcpy(&u, &v, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  u16v h = __builtin_convertvector(u >> 16, u16v);
  std::memcpy(p, &h, sizeof h);
}

// v rounded to T's precision and widened back (T = float: v itself).
template <typename T>
LLMTUNE_ALWAYS_INLINE f32v round_to(f32v v);
template <>
LLMTUNE_ALWAYS_INLINE f32v round_to<float>(f32v v) {
  return v;
}
template <>
LLMTUNE_ALWAYS_INLINE f32v round_to<c10::BFloat16>(f32v v) {
  u32v u;
  std::memcpy(&u, &v, sizeof u);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

LLMTUNE_ALWAYS_INLINE float to_float(float x) { return x; }
LLMTUNE_ALWAYS_INLINE float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
template <typename T>
LLMTUNE_ALWAYS_INLINE T from_float(float x) {
  return static_cast<T>(x);
}

// e^x for x <= 0 (here x - max). e^x = 2^n · e^(y), n = round(x log2 e), y = (x log2 e - n) ln 2
// in [-0.347, 0.347], where the Taylor series to degree 7 is within 6e-9 (relative) of e^y, below
// fp32's rounding. Below e^-86 (2^-124) the result is 0, as fp32's normal range ends there.
LLMTUNE_ALWAYS_INLINE f32v exp_nonpositive(f32v x) {
  const f32v t = x * 1.44269504088896341f;
  const f32v tc = t < -124.0f ? splat(-124.0f) : t;
  const i32v n = __builtin_convertvector(tc - 0.5f, i32v);  // tc <= 0: truncation rounds to nearest
  const f32v y = (tc - __builtin_convertvector(n, f32v)) * 0.693147180559945309f;
  f32v p = splat(1.0f / 5040);
  p = p * y + 1.0f / 720;
  p = p * y + 1.0f / 120;
  p = p * y + 1.0f / 24;
  p = p * y + 1.0f / 6;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  const i32v bits = (n + 127) << 23;
  f32v scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const f32v r = p * scale;
  return t < -124.0f ? splat(0.0f) : r;
}

LLMTUNE_ALWAYS_INLINE float horizontal_max(const f32v& v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

LLMTUNE_ALWAYS_INLINE float horizontal_sum(const f32v& v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// Row helpers for softmax-like kernels (a row of a few hundred to ~50k values).

// The largest of x[0, n) (-inf for n = 0). `finite` is set to whether every value is finite:
// x - x is 0 for finite x and NaN otherwise.
template <typename T>
LLMTUNE_ALWAYS_INLINE float row_max(const T* x, int64_t n, bool* finite) {
  const int64_t vec_end = n - n % kLanes;
  f32v m = splat(-__builtin_inff()), zero_if_finite = splat(0.0f);
  for (int64_t j = 0; j < vec_end; j += kLanes) {
    const f32v v = load(x + j);
    m = v > m ? v : m;
    zero_if_finite += v - v;
  }
  float max = horizontal_max(m), check = horizontal_sum(zero_if_finite);
  for (int64_t j = vec_end; j < n; ++j) {
    const float v = to_float(x[j]);
    max = v > max ? v : max;
    check += v - v;
  }
  *finite = check == 0.0f;  // false for NaN too
  return max;
}

// buffer[j] = e^(x[j] - max) for j < n (max >= every x[j]; a -inf x[j] gives 0); returns their sum.
template <typename T>
LLMTUNE_ALWAYS_INLINE float exp_into(const T* x, int64_t n, float max, float* buffer) {
  const int64_t vec_end = n - n % kLanes;
  f32v sum_v = splat(0.0f);
  for (int64_t j = 0; j < vec_end; j += kLanes) {
    const f32v e = exp_nonpositive(load(x + j) - max);
    store(buffer + j, e);
    sum_v += e;
  }
  float sum = horizontal_sum(sum_v);
  for (int64_t j = vec_end; j < n; ++j) {
    buffer[j] = __builtin_expf(to_float(x[j]) - max);
    sum += buffer[j];
  }
  return sum;
}

// out[j] = buffer[j] · scale for j < n, rounded to out's dtype.
template <typename T>
LLMTUNE_ALWAYS_INLINE void scale_into(const float* buffer, int64_t n, float scale, T* out) {
  const int64_t vec_end = n - n % kLanes;
  for (int64_t j = 0; j < vec_end; j += kLanes) store(out + j, load(buffer + j) * scale);
  for (int64_t j = vec_end; j < n; ++j) out[j] = from_float<T>(buffer[j] * scale);
}

}  // namespace llmtune::model::detail::vector_math
