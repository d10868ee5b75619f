// CPU kernels for 4-bit weights: the scalar reference (any shape), and AVX2 / AVX-512 versions
// of the two hot loops — dequantization of a flat element range (to fp32 or bf16) and the fused
// dequantize-and-dot GEMV used for small batches (generation). Vector code handles 32-element
// chunks that start on a multiple of 32 (inside one block, since blocks are multiples of 32); a
// scalar head/tail covers rows that start mid-block (e.g. in_features 344). Dequantized
// values are bit-identical across paths (one fp32 multiply, the same bf16 rounding); GEMV sums in
// a different order, so it is compared with a tolerance.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "core/core.h"
#include "quant/nf4_element.h"
#include "quant/quant_impl.h"

namespace llmtune::quant::detail {

// ---------------------------------------------------------------------------------------------
// Scalar reference

void dequant_scalar(const View4& v, int64_t i0, int64_t i1, float* f32, uint16_t* bf16) {
  for (int64_t i = i0; i < i1; ++i) {
    const float x = elem::dequant(v.code, v.packed, i, v.absmax[i / v.blocksize]);
    if (f32) f32[i - i0] = x;
    else bf16[i - i0] = elem::bf16_bits(x);
  }
}

// The unaligned edges of a row [a, b) for the vector GEMVs: tail[n] += w_k * x[n][k - base] for
// rows n < nn of x. Shared by the AVX-512 and AVX2 paths (inlined into each).
inline void gemv_edge(const View4& v, const float* x, int64_t nn, int64_t base, int64_t a, int64_t b, float* tail) {
  for (int64_t k = a; k < b; ++k) {
    const float w = elem::dequant(v.code, v.packed, k, v.absmax[k / v.blocksize]);
    for (int64_t n = 0; n < nn; ++n) tail[n] += w * x[n * v.cols + (k - base)];
  }
}

void gemv_scalar(const View4& v, const float* x, int64_t N, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t c = 0; c < v.cols; ++c) {
        const int64_t i = r * v.cols + c;
        acc += static_cast<double>(elem::dequant(v.code, v.packed, i, v.absmax[i / v.blocksize])) *
               static_cast<double>(x[n * v.cols + c]);
      }
      y[n * v.rows + r] = static_cast<float>(acc);
    }
}

#define LLMTUNE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define LLMTUNE_AVX2 __attribute__((target("avx2,fma")))

namespace {

// First index >= i that starts a 32-element chunk, capped at end.
inline int64_t chunk_start(int64_t i, int64_t end) { return std::min(end, (i + 31) & ~int64_t{31}); }

// Nibble indices of 32 consecutive elements (element order) as two 16-byte vectors.
LLMTUNE_AVX2 inline void unpack32(const uint8_t* p, __m128i& e0, __m128i& e1) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m128i lo = _mm_and_si128(bytes, mask);
  e0 = _mm_unpacklo_epi8(hi, lo);  // element 2k = high nibble of byte k
  e1 = _mm_unpackhi_epi8(hi, lo);
}

// ---------------------------------------------------------------------------------------------
// AVX-512: the 16-entry table fits one permutexvar.

LLMTUNE_AVX512 inline __m256i bf16_512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// 32 scaled weights of the chunk starting at flat index i (i % 32 == 0).
LLMTUNE_AVX512 inline void decode32_512(const View4& v, int64_t i, __m512 table, __m512& w0, __m512& w1) {
  __m128i e0, e1;
  unpack32(v.packed + i / 2, e0, e1);
  const __m512 scale = _mm512_set1_ps(v.absmax[i / v.blocksize]);
  w0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(e0), table), scale);
  w1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(e1), table), scale);
}

}  // namespace

LLMTUNE_AVX512 void dequant_avx512(const View4& v, int64_t i0, int64_t i1, float* f32, uint16_t* bf16) {
  const __m512 table = _mm512_loadu_ps(v.code);
  int64_t i = chunk_start(i0, i1);
  dequant_scalar(v, i0, i, f32, bf16);
  for (; i + 32 <= i1; i += 32) {
    __m512 w0, w1;
    decode32_512(v, i, table, w0, w1);
    const int64_t o = i - i0;
    if (f32) {
      _mm512_storeu_ps(f32 + o, w0);
      _mm512_storeu_ps(f32 + o + 16, w1);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(bf16 + o), bf16_512(w0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(bf16 + o + 16), bf16_512(w1));
    }
  }
  dequant_scalar(v, i, i1, f32 ? f32 + (i - i0) : nullptr, bf16 ? bf16 + (i - i0) : nullptr);
}

LLMTUNE_AVX512 void gemv_avx512(const View4& v, const float* x, int64_t N, float* y, int64_t r0, int64_t r1) {
  const __m512 table = _mm512_loadu_ps(v.code);
  constexpr int64_t kMaxN = 8;
  for (int64_t n0 = 0; n0 < N; n0 += kMaxN) {
    const int64_t nn = std::min(kMaxN, N - n0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * v.cols, end = base + v.cols;
      __m512 acc[kMaxN];
      float tail[kMaxN];
      for (int64_t n = 0; n < nn; ++n) acc[n] = _mm512_setzero_ps(), tail[n] = 0;
      int64_t i = chunk_start(base, end);
      gemv_edge(v, x + n0 * v.cols, nn, base, base, i, tail);
      for (; i + 32 <= end; i += 32) {
        __m512 w0, w1;
        decode32_512(v, i, table, w0, w1);
        for (int64_t n = 0; n < nn; ++n) {
          const float* xr = x + (n0 + n) * v.cols + (i - base);
          acc[n] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[n]);
          acc[n] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[n]);
        }
      }
      gemv_edge(v, x + n0 * v.cols, nn, base, i, end, tail);
      for (int64_t n = 0; n < nn; ++n) y[(n0 + n) * v.rows + r] = _mm512_reduce_add_ps(acc[n]) + tail[n];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2: 8-lane vectors; the 16-entry table is two 8-entry permutes blended on index bit 3.

namespace {

LLMTUNE_AVX2 inline __m256 lookup8(__m256i idx, __m256 tlo, __m256 thi) {
  const __m256 a = _mm256_permutevar8x32_ps(tlo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(thi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// 32 scaled weights of the chunk starting at flat index i (i % 32 == 0).
LLMTUNE_AVX2 inline void decode32_256(const View4& v, int64_t i, __m256 tlo, __m256 thi, __m256 w[4]) {
  __m128i e0, e1;
  unpack32(v.packed + i / 2, e0, e1);
  const __m256 scale = _mm256_set1_ps(v.absmax[i / v.blocksize]);
  w[0] = _mm256_mul_ps(lookup8(_mm256_cvtepu8_epi32(e0), tlo, thi), scale);
  w[1] = _mm256_mul_ps(lookup8(_mm256_cvtepu8_epi32(_mm_srli_si128(e0, 8)), tlo, thi), scale);
  w[2] = _mm256_mul_ps(lookup8(_mm256_cvtepu8_epi32(e1), tlo, thi), scale);
  w[3] = _mm256_mul_ps(lookup8(_mm256_cvtepu8_epi32(_mm_srli_si128(e1, 8)), tlo, thi), scale);
}

LLMTUNE_AVX2 inline __m256i bf16_rounded(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), nan));
}

LLMTUNE_AVX2 inline void store_bf16x16(uint16_t* out, __m256 a, __m256 b) {
  const __m256i packed = _mm256_packus_epi32(bf16_rounded(a), bf16_rounded(b));  // lanes interleaved
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(packed, 0xD8));
}

}  // namespace

LLMTUNE_AVX2 void dequant_avx2(const View4& v, int64_t i0, int64_t i1, float* f32, uint16_t* bf16) {
  const __m256 tlo = _mm256_loadu_ps(v.code), thi = _mm256_loadu_ps(v.code + 8);
  int64_t i = chunk_start(i0, i1);
  dequant_scalar(v, i0, i, f32, bf16);
  for (; i + 32 <= i1; i += 32) {
    __m256 w[4];
    decode32_256(v, i, tlo, thi, w);
    const int64_t o = i - i0;
    if (f32) {
      for (int k = 0; k < 4; ++k) _mm256_storeu_ps(f32 + o + 8 * k, w[k]);
    } else {
      store_bf16x16(bf16 + o, w[0], w[1]);
      store_bf16x16(bf16 + o + 16, w[2], w[3]);
    }
  }
  dequant_scalar(v, i, i1, f32 ? f32 + (i - i0) : nullptr, bf16 ? bf16 + (i - i0) : nullptr);
}

LLMTUNE_AVX2 void gemv_avx2(const View4& v, const float* x, int64_t N, float* y, int64_t r0, int64_t r1) {
  const __m256 tlo = _mm256_loadu_ps(v.code), thi = _mm256_loadu_ps(v.code + 8);
  constexpr int64_t kMaxN = 4;
  for (int64_t n0 = 0; n0 < N; n0 += kMaxN) {
    const int64_t nn = std::min(kMaxN, N - n0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * v.cols, end = base + v.cols;
      __m256 acc[kMaxN];
      float tail[kMaxN];
      for (int64_t n = 0; n < nn; ++n) acc[n] = _mm256_setzero_ps(), tail[n] = 0;
      int64_t i = chunk_start(base, end);
      gemv_edge(v, x + n0 * v.cols, nn, base, base, i, tail);
      for (; i + 32 <= end; i += 32) {
        __m256 w[4];
        decode32_256(v, i, tlo, thi, w);
        for (int64_t n = 0; n < nn; ++n) {
          const float* xr = x + (n0 + n) * v.cols + (i - base);
          for (int k = 0; k < 4; ++k) acc[n] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xr + 8 * k), acc[n]);
        }
      }
      gemv_edge(v, x + n0 * v.cols, nn, base, i, end, tail);
      for (int64_t n = 0; n < nn; ++n) {
        const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[n]), _mm256_extractf128_ps(acc[n], 1));
        const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
        y[(n0 + n) * v.rows + r] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1))) + tail[n];
      }
    }
  }
}

}  // namespace llmtune::quant::detail
