// ggml block formats: scalar reference quantizers and dequantizers (formats.md §7.3). Legacy
// types (q4_0, q4_1, q5_0, q5_1, q8_0) round exactly as ggml's reference code does, so files are
// byte-identical to llama.cpp's; k-quants (q2_K … q6_K) use llmtune's own scale search (a
// least-squares refit over candidate scales), so their bytes differ from llama-quantize's while
// the layout, and therefore every reader, is the same.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/core.h"
#include "export/export.h"

namespace llmtune::exporter {

namespace {

constexpr int QK = 32;    // legacy block
constexpr int QK_K = 256; // k-quant super-block

const GgmlTypeInfo kTypes[] = {
    {GgmlType::F32, "f32", 1, 4},        {GgmlType::F16, "f16", 1, 2},
    {GgmlType::Q4_0, "q4_0", 32, 18},    {GgmlType::Q4_1, "q4_1", 32, 20},
    {GgmlType::Q5_0, "q5_0", 32, 22},    {GgmlType::Q5_1, "q5_1", 32, 24},
    {GgmlType::Q8_0, "q8_0", 32, 34},    {GgmlType::Q2_K, "q2_K", 256, 84},
    {GgmlType::Q3_K, "q3_K", 256, 110},  {GgmlType::Q4_K, "q4_K", 256, 144},
    {GgmlType::Q5_K, "q5_K", 256, 176},  {GgmlType::Q6_K, "q6_K", 256, 210},
    {GgmlType::BF16, "bf16", 1, 2},
};

void put_f16(uint8_t* p, float v) {
  uint16_t h = fp32_to_fp16(v);
  p[0] = uint8_t(h & 0xFF);
  p[1] = uint8_t(h >> 8);
}
float get_f16(const uint8_t* p) { return fp16_to_fp32(uint16_t(p[0] | (p[1] << 8))); }

// ggml's nearest_int: round half away from zero for the magnitudes used here.
int nearest(float v) { return int(std::lround(v)); }

// ---- legacy 32-element blocks -------------------------------------------------------------

void quant_q8_0(const float* x, uint8_t* b) {
  float amax = 0;
  for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
  put_f16(b, d);
  for (int j = 0; j < QK; ++j) b[2 + j] = uint8_t(int8_t(std::roundf(x[j] * id)));
}

// Symmetric 4/5-bit: d = (value with the largest |x|) / -(2^(bits-1)).
float signed_max(const float* x) {
  float amax = 0, max = 0;
  for (int j = 0; j < QK; ++j)
    if (std::fabs(x[j]) > amax) { amax = std::fabs(x[j]); max = x[j]; }
  return max;
}

void quant_q4_0(const float* x, uint8_t* b) {
  const float d = signed_max(x) / -8.0f, id = d != 0 ? 1.0f / d : 0.0f;
  put_f16(b, d);
  for (int j = 0; j < QK / 2; ++j) {
    const uint8_t a = std::min<int8_t>(15, int8_t(x[j] * id + 8.5f));
    const uint8_t c = std::min<int8_t>(15, int8_t(x[j + QK / 2] * id + 8.5f));
    b[2 + j] = uint8_t(a | (c << 4));
  }
}

void min_max(const float* x, int n, float& mn, float& mx) {
  mn = INFINITY; mx = -INFINITY;
  for (int j = 0; j < n; ++j) { mn = std::min(mn, x[j]); mx = std::max(mx, x[j]); }
}

void quant_q4_1(const float* x, uint8_t* b) {
  float mn, mx;
  min_max(x, QK, mn, mx);
  const float d = (mx - mn) / 15.0f, id = d != 0 ? 1.0f / d : 0.0f;
  put_f16(b, d);
  put_f16(b + 2, mn);
  for (int j = 0; j < QK / 2; ++j) {
    const uint8_t a = std::min<int8_t>(15, int8_t((x[j] - mn) * id + 0.5f));
    const uint8_t c = std::min<int8_t>(15, int8_t((x[j + QK / 2] - mn) * id + 0.5f));
    b[4 + j] = uint8_t(a | (c << 4));
  }
}

void put_u32(uint8_t* p, uint32_t v) { for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i)); }
uint32_t get_u32(const uint8_t* p) { return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24; }

// Five-bit values: low nibbles packed like q4, bit 4 of element j in bit j of qh.
void pack5(const uint8_t* q, uint8_t* qh_out, uint8_t* qs) {
  uint32_t qh = 0;
  for (int j = 0; j < QK / 2; ++j) {
    qs[j] = uint8_t((q[j] & 0xF) | ((q[j + QK / 2] & 0xF) << 4));
    qh |= uint32_t((q[j] >> 4) & 1) << j;
    qh |= uint32_t((q[j + QK / 2] >> 4) & 1) << (j + QK / 2);
  }
  put_u32(qh_out, qh);
}

void quant_q5_0(const float* x, uint8_t* b) {
  const float d = signed_max(x) / -16.0f, id = d != 0 ? 1.0f / d : 0.0f;
  put_f16(b, d);
  uint8_t q[QK];
  for (int j = 0; j < QK; ++j) q[j] = uint8_t(std::min<int8_t>(31, int8_t(x[j] * id + 16.5f)));
  pack5(q, b + 2, b + 6);
}

void quant_q5_1(const float* x, uint8_t* b) {
  float mn, mx;
  min_max(x, QK, mn, mx);
  const float d = (mx - mn) / 31.0f, id = d != 0 ? 1.0f / d : 0.0f;
  put_f16(b, d);
  put_f16(b + 2, mn);
  uint8_t q[QK];
  for (int j = 0; j < QK; ++j) q[j] = uint8_t((x[j] - mn) * id + 0.5f);
  pack5(q, b + 4, b + 8);
}

void deq_legacy(GgmlType t, const uint8_t* b, float* y) {
  const float d = get_f16(b);
  switch (t) {
    case GgmlType::Q8_0:
      for (int j = 0; j < QK; ++j) y[j] = d * float(int8_t(b[2 + j]));
      break;
    case GgmlType::Q4_0:
      for (int j = 0; j < QK / 2; ++j) {
        y[j] = d * float((b[2 + j] & 0xF) - 8);
        y[j + QK / 2] = d * float((b[2 + j] >> 4) - 8);
      }
      break;
    case GgmlType::Q4_1: {
      const float m = get_f16(b + 2);
      for (int j = 0; j < QK / 2; ++j) {
        y[j] = d * float(b[4 + j] & 0xF) + m;
        y[j + QK / 2] = d * float(b[4 + j] >> 4) + m;
      }
      break;
    }
    case GgmlType::Q5_0:
    case GgmlType::Q5_1: {
      const bool has_min = t == GgmlType::Q5_1;
      const float m = has_min ? get_f16(b + 2) : 0.0f;
      const uint32_t qh = get_u32(b + (has_min ? 4 : 2));
      const uint8_t* qs = b + (has_min ? 8 : 6);
      const int off = has_min ? 0 : 16;
      for (int j = 0; j < QK / 2; ++j) {
        const int v0 = (qs[j] & 0xF) | int(((qh >> j) & 1) << 4);
        const int v1 = (qs[j] >> 4) | int(((qh >> (j + 16)) & 1) << 4);
        y[j] = d * float(v0 - off) + m;
        y[j + QK / 2] = d * float(v1 - off) + m;
      }
      break;
    }
    default: break;
  }
}

// ---- k-quant helpers ------------------------------------------------------------------------

// Symmetric sub-block fit: integer levels in [-nmax, nmax-1]. Tries scales around max/-nmax and
// keeps the one whose least-squares refit has the lowest squared error. Returns the scale; L gets
// levels shifted to [0, 2·nmax).
float fit_symmetric(const float* x, int n, int nmax, uint8_t* L) {
  float amax = 0, max = 0;
  for (int i = 0; i < n; ++i)
    if (std::fabs(x[i]) > amax) { amax = std::fabs(x[i]); max = x[i]; }
  if (amax < 1e-30f) {
    for (int i = 0; i < n; ++i) L[i] = uint8_t(nmax);
    return 0.0f;
  }
  float best_scale = 0, best_err = INFINITY;
  for (int step = -9; step <= 9; ++step) {
    const float iscale = -(float(nmax) + 0.1f * float(step)) / max;
    double sumlx = 0, suml2 = 0;
    int l[QK_K];
    for (int i = 0; i < n; ++i) {
      l[i] = std::clamp(nearest(iscale * x[i]), -nmax, nmax - 1);
      sumlx += double(x[i]) * l[i];
      suml2 += double(l[i]) * l[i];
    }
    if (suml2 <= 0) continue;
    const float scale = float(sumlx / suml2);
    double err = 0;
    for (int i = 0; i < n; ++i) { const double e = x[i] - scale * l[i]; err += e * e; }
    if (err < best_err) {
      best_err = float(err);
      best_scale = scale;
      for (int i = 0; i < n; ++i) L[i] = uint8_t(l[i] + nmax);
    }
  }
  return best_scale;
}

// Asymmetric sub-block fit x ≈ scale·L − mn with L in [0, nmax] and mn ≥ 0 (ggml stores the
// negated minimum). Candidate scales span (max − min)/nmax ± 10 %; each is refit by least squares.
void fit_asymmetric(const float* x, int n, int nmax, float& scale_out, float& min_out) {
  float mn, mx;
  min_max(x, n, mn, mx);
  mn = std::min(mn, 0.0f);
  if (mx <= mn) { scale_out = 0; min_out = -mn; return; }
  float best_err = INFINITY, best_scale = (mx - mn) / float(nmax), best_min = mn;
  for (int step = -10; step <= 10; ++step) {
    const float iscale = (float(nmax) + 0.1f * float(step)) / (mx - mn);
    double sl = 0, sl2 = 0, sx = 0, slx = 0;
    int l[32];
    for (int i = 0; i < n; ++i) {
      l[i] = std::clamp(nearest(iscale * (x[i] - mn)), 0, nmax);
      sl += l[i]; sl2 += double(l[i]) * l[i]; sx += x[i]; slx += double(l[i]) * x[i];
    }
    const double det = n * sl2 - sl * sl;
    if (det <= 0) continue;
    double s = (n * slx - sl * sx) / det, m = (sl2 * sx - sl * slx) / det;
    if (m > 0) { m = 0; s = slx / sl2; }  // the offset must stay ≤ 0
    double err = 0;
    for (int i = 0; i < n; ++i) { const double e = x[i] - (s * l[i] + m); err += e * e; }
    if (err < best_err) { best_err = float(err); best_scale = float(s); best_min = float(m); }
  }
  scale_out = best_scale;
  min_out = -best_min;
}

// 6-bit scale/min pairs of q4_K / q5_K (12 bytes for 8 sub-blocks).
void put_scale_min_k4(uint8_t* q, int j, uint8_t sc, uint8_t m) {
  if (j < 4) {
    q[j] = uint8_t((q[j] & 0xC0) | sc);
    q[j + 4] = uint8_t((q[j + 4] & 0xC0) | m);
  } else {
    q[j + 4] = uint8_t((sc & 0xF) | ((m & 0xF) << 4));
    q[j - 4] = uint8_t((q[j - 4] & 0x3F) | ((sc >> 4) << 6));
    q[j] = uint8_t((q[j] & 0x3F) | ((m >> 4) << 6));
  }
}
void get_scale_min_k4(const uint8_t* q, int j, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = uint8_t((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    m = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// Shared by q2_K (16 × 16, 4-bit scales), q4_K / q5_K (8 × 32, 6-bit scales): fit each sub-block,
// quantize the sub-scales against the super-block scales d / dmin, then re-derive the levels with
// the quantized scales. Returns levels in L[256], the integer scales/mins, and d / dmin.
void kquant_asymmetric(const float* x, int sub, int nmax, int scale_max, uint8_t* L, uint8_t* isc, uint8_t* imn,
                       float& d, float& dmin) {
  const int nsub = QK_K / sub;
  float scales[16], mins[16], max_scale = 0, max_min = 0;
  for (int j = 0; j < nsub; ++j) {
    fit_asymmetric(x + j * sub, sub, nmax, scales[j], mins[j]);
    max_scale = std::max(max_scale, scales[j]);
    max_min = std::max(max_min, mins[j]);
  }
  const float inv_scale = max_scale > 0 ? float(scale_max) / max_scale : 0.0f;
  const float inv_min = max_min > 0 ? float(scale_max) / max_min : 0.0f;
  for (int j = 0; j < nsub; ++j) {
    isc[j] = uint8_t(std::min(scale_max, nearest(inv_scale * scales[j])));
    imn[j] = uint8_t(std::min(scale_max, nearest(inv_min * mins[j])));
  }
  // Store the fp16-rounded values so the levels below are chosen against what readers will use.
  d = fp16_to_fp32(fp32_to_fp16(max_scale / float(scale_max)));
  dmin = fp16_to_fp32(fp32_to_fp16(max_min / float(scale_max)));
  for (int j = 0; j < nsub; ++j) {
    const float dl = d * isc[j], ml = dmin * imn[j];
    for (int i = 0; i < sub; ++i)
      L[j * sub + i] = dl != 0 ? uint8_t(std::clamp(nearest((x[j * sub + i] + ml) / dl), 0, nmax)) : 0;
  }
}

void quant_q2_k(const float* x, uint8_t* b) {
  uint8_t L[QK_K], isc[16], imn[16];
  float d, dmin;
  kquant_asymmetric(x, 16, 3, 15, L, isc, imn, d, dmin);
  uint8_t* scales = b;       // [16]: low nibble scale, high nibble min
  uint8_t* qs = b + 16;      // [64]
  for (int j = 0; j < 16; ++j) scales[j] = uint8_t(isc[j] | (imn[j] << 4));
  // Each 128-element half: 32 bytes, 4 crumbs per byte, crumb k of byte l holds element 32k + l.
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 32; ++l) {
      const uint8_t* q = L + 128 * h;
      qs[32 * h + l] = uint8_t(q[l] | (q[l + 32] << 2) | (q[l + 64] << 4) | (q[l + 96] << 6));
    }
  put_f16(b + 80, d);
  put_f16(b + 82, dmin);
}

// q4_K and q5_K share their first 16 bytes: f16 d, f16 dmin, then eight 6-bit scale/min pairs
// (32-element sub-blocks, mins up to 63). Fills L with the element levels 0..max_level.
void kquant_super_header(const float* x, int max_level, uint8_t* L, uint8_t* b) {
  uint8_t isc[8], imn[8];
  float d, dmin;
  kquant_asymmetric(x, 32, max_level, 63, L, isc, imn, d, dmin);
  put_f16(b, d);
  put_f16(b + 2, dmin);
  uint8_t* sc = b + 4;
  std::memset(sc, 0, 12);
  for (int j = 0; j < 8; ++j) put_scale_min_k4(sc, j, isc[j], imn[j]);
}

void quant_q4_k(const float* x, uint8_t* b) {
  uint8_t L[QK_K];
  kquant_super_header(x, 15, L, b);
  uint8_t* qs = b + 16;
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) qs[32 * c + l] = uint8_t(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
}

void quant_q5_k(const float* x, uint8_t* b) {
  uint8_t L[QK_K];
  kquant_super_header(x, 31, L, b);
  uint8_t* qh = b + 16;  // [32]: bit 2c / 2c+1 of byte l = high bit of element 64c + l / 64c + 32 + l
  uint8_t* qs = b + 48;  // [128]
  std::memset(qh, 0, 32);
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) {
      const uint8_t lo = L[64 * c + l], hi = L[64 * c + 32 + l];
      qs[32 * c + l] = uint8_t((lo & 0xF) | ((hi & 0xF) << 4));
      qh[l] |= uint8_t(((lo >> 4) & 1) << (2 * c));
      qh[l] |= uint8_t(((hi >> 4) & 1) << (2 * c + 1));
    }
}

// Symmetric k-quants (q3_K: 3-bit levels, 6-bit signed scales; q6_K: 6-bit levels, 8-bit scales),
// 16 sub-blocks of 16. Returns levels (offset by nmax) and int scales.
void kquant_symmetric(const float* x, int nmax, int scale_half, uint8_t* L, int* isc, float& d) {
  float scales[16], max_scale = 0, amax = 0;
  for (int j = 0; j < 16; ++j) {
    scales[j] = fit_symmetric(x + 16 * j, 16, nmax, L + 16 * j);
    if (std::fabs(scales[j]) > amax) { amax = std::fabs(scales[j]); max_scale = scales[j]; }
  }
  if (amax == 0) {
    d = 0;
    for (int j = 0; j < 16; ++j) isc[j] = 0;
    for (int i = 0; i < QK_K; ++i) L[i] = uint8_t(nmax);
    return;
  }
  const float iscale = -float(scale_half) / max_scale;
  for (int j = 0; j < 16; ++j) isc[j] = std::clamp(nearest(iscale * scales[j]), -scale_half, scale_half - 1);
  d = fp16_to_fp32(fp32_to_fp16(1.0f / iscale));
  for (int j = 0; j < 16; ++j) {
    const float dl = d * float(isc[j]);
    for (int i = 0; i < 16; ++i)
      L[16 * j + i] = dl != 0 ? uint8_t(std::clamp(nearest(x[16 * j + i] / dl), -nmax, nmax - 1) + nmax)
                              : uint8_t(nmax);
  }
}

void quant_q3_k(const float* x, uint8_t* b) {
  uint8_t L[QK_K];
  int isc[16];
  float d;
  kquant_symmetric(x, 4, 32, L, isc, d);
  uint8_t* hmask = b;       // [32]
  uint8_t* qs = b + 32;     // [64]
  uint8_t* sc = b + 96;     // [12]
  std::memset(b, 0, 110);
  for (int j = 0; j < 16; ++j) {
    const int s = isc[j] + 32;  // 6 bits: low nibble in bytes 0..7, top 2 bits in bytes 8..11
    if (j < 8) sc[j] |= uint8_t(s & 0xF);
    else sc[j - 8] |= uint8_t((s & 0xF) << 4);
    sc[8 + (j % 4)] |= uint8_t((s >> 4) << (2 * (j / 4)));
  }
  // Element 128h + 32k + l: low 2 bits in qs[32h + l] bits 2k, high bit in hmask[l] bit 4h + k.
  for (int h = 0; h < 2; ++h)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < 32; ++l) {
        const uint8_t v = L[128 * h + 32 * k + l];
        qs[32 * h + l] |= uint8_t((v & 3) << (2 * k));
        if (v & 4) hmask[l] |= uint8_t(1 << (4 * h + k));
      }
  put_f16(b + 108, d);
}

void quant_q6_k(const float* x, uint8_t* b) {
  uint8_t L[QK_K];
  int isc[16];
  float d;
  kquant_symmetric(x, 32, 128, L, isc, d);
  uint8_t* ql = b;         // [128]
  uint8_t* qh = b + 128;   // [64]
  int8_t* sc = reinterpret_cast<int8_t*>(b + 192);  // [16]
  std::memset(b, 0, 210);
  for (int j = 0; j < 16; ++j) sc[j] = int8_t(isc[j]);
  for (int n = 0; n < 2; ++n)
    for (int l = 0; l < 32; ++l) {
      const uint8_t* q = L + 128 * n;
      const uint8_t q1 = q[l], q2 = q[l + 32], q3 = q[l + 64], q4 = q[l + 96];
      ql[64 * n + l] = uint8_t((q1 & 0xF) | ((q3 & 0xF) << 4));
      ql[64 * n + l + 32] = uint8_t((q2 & 0xF) | ((q4 & 0xF) << 4));
      qh[32 * n + l] = uint8_t((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
    }
  put_f16(b + 208, d);
}

// ---- k-quant dequantizers (formats.md §7.3 and ggml-common.h layouts) ------------------------

void deq_q2_k(const uint8_t* b, float* y) {
  const uint8_t* scales = b;
  const uint8_t* qs = b + 16;
  const float d = get_f16(b + 80), dmin = get_f16(b + 82);
  int is = 0;
  for (int h = 0; h < 2; ++h) {
    const uint8_t* q = qs + 32 * h;
    for (int k = 0; k < 4; ++k)
      for (int half = 0; half < 2; ++half) {
        const uint8_t s = scales[is++];
        const float dl = d * float(s & 0xF), ml = dmin * float(s >> 4);
        for (int l = 0; l < 16; ++l) *y++ = dl * float((q[16 * half + l] >> (2 * k)) & 3) - ml;
      }
  }
}

void deq_q3_k(const uint8_t* b, float* y) {
  const uint8_t* hmask = b;
  const uint8_t* qs = b + 32;
  const uint8_t* sc = b + 96;
  const float d = get_f16(b + 108);
  int is = 0;
  for (int h = 0; h < 2; ++h) {
    const uint8_t* q = qs + 32 * h;
    for (int k = 0; k < 4; ++k)
      for (int half = 0; half < 2; ++half) {
        const int j = is++;
        const int lo = j < 8 ? (sc[j] & 0xF) : (sc[j - 8] >> 4);
        const int hi = (sc[8 + (j % 4)] >> (2 * (j / 4))) & 3;
        const float dl = d * float((lo | (hi << 4)) - 32);
        for (int l = 0; l < 16; ++l) {
          const int idx = 16 * half + l;
          const int v = ((q[idx] >> (2 * k)) & 3) - ((hmask[idx] >> (4 * h + k)) & 1 ? 0 : 4);
          *y++ = dl * float(v);
        }
      }
  }
}

void deq_q45_k(const uint8_t* b, float* y, bool five) {
  const float d = get_f16(b), dmin = get_f16(b + 2);
  const uint8_t* sc = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = five ? b + 48 : b + 16;
  for (int c = 0; c < 4; ++c) {
    uint8_t s0, m0, s1, m1;
    get_scale_min_k4(sc, 2 * c, s0, m0);
    get_scale_min_k4(sc, 2 * c + 1, s1, m1);
    for (int l = 0; l < 32; ++l) {
      int v = qs[32 * c + l] & 0xF;
      if (five && ((qh[l] >> (2 * c)) & 1)) v += 16;
      y[64 * c + l] = d * float(s0) * float(v) - dmin * float(m0);
    }
    for (int l = 0; l < 32; ++l) {
      int v = qs[32 * c + l] >> 4;
      if (five && ((qh[l] >> (2 * c + 1)) & 1)) v += 16;
      y[64 * c + 32 + l] = d * float(s1) * float(v) - dmin * float(m1);
    }
  }
}

void deq_q6_k(const uint8_t* b, float* y) {
  const float d = get_f16(b + 208);
  for (int n = 0; n < 2; ++n) {
    const uint8_t* ql = b + 64 * n;
    const uint8_t* qh = b + 128 + 32 * n;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192 + 8 * n);
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[128 * n + l] = d * float(sc[is]) * float(q1);
      y[128 * n + l + 32] = d * float(sc[is + 2]) * float(q2);
      y[128 * n + l + 64] = d * float(sc[is + 4]) * float(q3);
      y[128 * n + l + 96] = d * float(sc[is + 6]) * float(q4);
    }
  }
}

}  // namespace

// ---- public ---------------------------------------------------------------------------------

uint16_t fp32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return uint16_t(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u));  // inf / NaN
  if (ax >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to >= 65520: overflow to inf
  if (ax < 0x38800000u) {                                  // below the smallest normal half: subnormal
    if (ax < 0x33000000u) return uint16_t(sign);           // < 2^-25 rounds to zero
    const uint32_t e = ax >> 23, mant = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;                        // 14 + (113 - e)
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) ++h;
    return uint16_t(sign | h);
  }
  uint32_t h = ((ax - 0x38000000u) >> 13);  // rebias exponent 127 -> 15
  const uint32_t rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return uint16_t(sign | h);
}

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1F, m = h & 0x3FF, x;
  if (e == 0) {
    if (m == 0) x = sign;
    else {  // subnormal: normalise
      int s = -1;
      do { ++s; m <<= 1; } while (!(m & 0x400));
      x = sign | ((112 - s) << 23) | ((m & 0x3FF) << 13);
    }
  } else if (e == 31) {
    x = sign | 0x7F800000u | (m << 13);
  } else {
    x = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

uint16_t fp32_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((x >> 16) | 64);  // quiet NaN
  return uint16_t((x + (0x7FFFu + ((x >> 16) & 1))) >> 16);
}

float bf16_to_fp32(uint16_t h) {
  const uint32_t x = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

const GgmlTypeInfo& ggml_type_info(GgmlType t) {
  for (const auto& i : kTypes)
    if (i.type == t) return i;
  fail("ggml type id {} is not supported by llmtune", uint32_t(t));
}

std::optional<GgmlType> ggml_type_from_id(uint32_t id) {
  for (const auto& i : kTypes)
    if (uint32_t(i.type) == id) return i.type;
  return std::nullopt;
}

int64_t ggml_row_bytes(GgmlType t, int64_t n) {
  const auto& i = ggml_type_info(t);
  if (n % i.block != 0) fail("{} needs rows that are a multiple of {} values, got {}", i.name, i.block, n);
  return n / i.block * i.bytes;
}

void ggml_quantize(GgmlType t, const float* x, int64_t n, uint8_t* out) {
  const auto& info = ggml_type_info(t);
  if (n % info.block != 0) fail("{}: {} values is not a multiple of the block size {}", info.name, n, info.block);
  const int64_t nb = n / info.block;
  switch (t) {
    case GgmlType::F32: std::memcpy(out, x, size_t(n) * 4); return;
    case GgmlType::F16:
      for (int64_t i = 0; i < n; ++i) { const uint16_t h = fp32_to_fp16(x[i]); out[2 * i] = uint8_t(h); out[2 * i + 1] = uint8_t(h >> 8); }
      return;
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) { const uint16_t h = fp32_to_bf16(x[i]); out[2 * i] = uint8_t(h); out[2 * i + 1] = uint8_t(h >> 8); }
      return;
    default: break;
  }
  void (*fn)(const float*, uint8_t*) = nullptr;
  switch (t) {
    case GgmlType::Q8_0: fn = quant_q8_0; break;
    case GgmlType::Q4_0: fn = quant_q4_0; break;
    case GgmlType::Q4_1: fn = quant_q4_1; break;
    case GgmlType::Q5_0: fn = quant_q5_0; break;
    case GgmlType::Q5_1: fn = quant_q5_1; break;
    case GgmlType::Q2_K: fn = quant_q2_k; break;
    case GgmlType::Q3_K: fn = quant_q3_k; break;
    case GgmlType::Q4_K: fn = quant_q4_k; break;
    case GgmlType::Q5_K: fn = quant_q5_k; break;
    case GgmlType::Q6_K: fn = quant_q6_k; break;
    default: fail("cannot quantize to {}", info.name);
  }
  for (int64_t i = 0; i < nb; ++i) fn(x + i * info.block, out + i * info.bytes);
}

void ggml_dequantize(GgmlType t, const uint8_t* in, int64_t n, float* y) {
  const auto& info = ggml_type_info(t);
  if (n % info.block != 0) fail("{}: {} values is not a multiple of the block size {}", info.name, n, info.block);
  const int64_t nb = n / info.block;
  for (int64_t i = 0; i < nb; ++i) {
    const uint8_t* b = in + i * info.bytes;
    float* o = y + i * info.block;
    switch (t) {
      case GgmlType::F32: std::memcpy(o, b, 4); break;
      case GgmlType::F16: *o = fp16_to_fp32(uint16_t(b[0] | (b[1] << 8))); break;
      case GgmlType::BF16: *o = bf16_to_fp32(uint16_t(b[0] | (b[1] << 8))); break;
      case GgmlType::Q2_K: deq_q2_k(b, o); break;
      case GgmlType::Q3_K: deq_q3_k(b, o); break;
      case GgmlType::Q4_K: deq_q45_k(b, o, false); break;
      case GgmlType::Q5_K: deq_q45_k(b, o, true); break;
      case GgmlType::Q6_K: deq_q6_k(b, o); break;
      default: deq_legacy(t, b, o); break;
    }
  }
}

std::vector<uint8_t> ggml_quantize(GgmlType t, const std::vector<float>& x) {
  std::vector<uint8_t> out(size_t(ggml_row_bytes(t, int64_t(x.size()))));
  ggml_quantize(t, x.data(), int64_t(x.size()), out.data());
  return out;
}

std::vector<float> ggml_dequantize(GgmlType t, const std::vector<uint8_t>& bytes, int64_t n) {
  if (int64_t(bytes.size()) != ggml_row_bytes(t, n))
    fail("{}: {} bytes do not hold {} values (expected {})", ggml_type_info(t).name, bytes.size(), n, ggml_row_bytes(t, n));
  std::vector<float> y(static_cast<size_t>(n));
  ggml_dequantize(t, bytes.data(), n, y.data());
  return y;
}

}  // namespace llmtune::exporter
