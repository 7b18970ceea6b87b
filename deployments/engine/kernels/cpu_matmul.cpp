// int4 weights x int8 activations on x86 CPUs: the decode-shaped matmul of our int4 layers.
//
// y[M, N] = x[M, K] @ W.T with W = d * q + m per group of 32 input columns (q in 0..15, d and m fp16),
// the layout of GGUF Q4_1/Q4_0 blocks. Each call writes x per group of 32 as two int8 codes,
// x ~ da * (q1 + q2 / 256) (absmax, q2 the rounded residual: about 16 bits, finer than bf16's 8; one
// int8 code alone, as llama.cpp's Q8_1 activations, cost SmolLM2 3 points of greedy agreement), and
// sums q * q1 and q * q2 in int32 with VNNI (vpdpbusd; AVX2: maddubs + madd), one instruction per
// 64 multiply-adds; the scales enter once per group:
//   y = sum_g d_g * (da_g / 256) * (256 * sum(q * q1) + sum(q * q2)) + m_g * sa_g,  sa_g = sum of x's codes * scale.
// Output rows come 16 at a time in a vector's lanes (no horizontal sums), activation rows up to 8
// at a time share each weight load. torch's _weight_int4pack_mm_for_cpu dequantizes to fp32 and
// pays one FMA per 16 weights per row; this pays about one instruction per 64 (perf/README.md).
//
// Packed layout: [N/16, K/4, 32] uint8. In the entry for output rows n0..n0+15 and inputs k..k+3,
// byte 4i+j = q[n0+i][k+j] | q[n0+8+i][k+j] << 4 (i < 8, j < 4): masking the low nibbles gives
// rows n0..n0+7 with 4 codes per 32-bit lane, the high nibbles rows n0+8..n0+15.
// Scales: d, m [N/16, K/32, 16] fp16, lane i = output row n0+i.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define Q4_ISA "avx512-vnni"
#define Q4_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#if defined(__AVXVNNI__)
#define Q4_ISA "avx2-vnni"
#else
#define Q4_ISA "avx2"
#endif
#else
#error "the int4 CPU kernel needs AVX2 + FMA + F16C"
#endif

namespace {

constexpr int64_t GROUP = 32;

inline int32_t load4(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return v; }

#ifdef Q4_AVX512
#ifndef Q4_MAX_ROWS
#define Q4_MAX_ROWS 6  // rows per weight load; 4..8 measured within 7% (perf/README.md)
#endif
constexpr int MAX_ROWS = Q4_MAX_ROWS;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// One group of 32 bf16 values -> codes q1, q2 (x ~ d * (q1 + q2 / 256)); returns d / 256 and writes
// the group's sum as the codes give it to *s.
template <typename T>
inline float quantize_group(const T* x, int8_t* q1, int8_t* q2, float* s, int32_t* c) {
  __m512 v[2] = {load16(x), load16(x + 16)};
  float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
  float d = amax / 127.f, id = amax > 0 ? 127.f / amax : 0.f;
  __m512i total = _mm512_setzero_si512();
  for (int h = 0; h < 2; ++h) {
    __m512 scaled = _mm512_mul_ps(v[h], _mm512_set1_ps(id));
    __m512i c1 = _mm512_cvtps_epi32(scaled);
    __m512i c2 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(scaled, _mm512_cvtepi32_ps(c1)), _mm512_set1_ps(256.f)));
    c2 = _mm512_max_epi32(_mm512_min_epi32(c2, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    _mm_storeu_si128((__m128i*)(q1 + 16 * h), _mm512_cvtsepi32_epi8(c1));
    _mm_storeu_si128((__m128i*)(q2 + 16 * h), _mm512_cvtsepi32_epi8(c2));
    total = _mm512_add_epi32(total, _mm512_add_epi32(_mm512_slli_epi32(c1, 8), c2));
  }
  *c = _mm512_reduce_add_epi32(total);
  *s = d / 256.f * (float)*c;
  return d / 256.f;
}

template <int R>
void tile(const uint8_t* wb, const at::Half* db, const at::Half* mb, int64_t K, const int8_t* q1, const int8_t* q2,
          const float* da, const float* sa, int64_t r0, float* y, int64_t N, int64_t n0) {
  const int64_t G = K / GROUP;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i hi[R], lo[R];
    for (int r = 0; r < R; ++r) hi[r] = lo[r] = _mm512_setzero_si512();
    const uint8_t* wg = wb + g * 8 * 32;
    const int64_t at = r0 * K + g * GROUP;
    for (int k4 = 0; k4 < 8; ++k4) {
      __m256i pk = _mm256_loadu_si256((const __m256i*)(wg + k4 * 32));
      __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(pk, mask)),
                                     _mm256_and_si256(_mm256_srli_epi16(pk, 4), mask), 1);
      for (int r = 0; r < R; ++r) {
        hi[r] = _mm512_dpbusd_epi32(hi[r], w, _mm512_set1_epi32(load4(q1 + at + r * K + k4 * 4)));
        lo[r] = _mm512_dpbusd_epi32(lo[r], w, _mm512_set1_epi32(load4(q2 + at + r * K + k4 * 4)));
      }
    }
    __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(db + g * 16)));
    __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mb + g * 16)));
    for (int r = 0; r < R; ++r) {
      const int64_t i = (r0 + r) * G + g;
      __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(hi[r], 8), lo[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dv, _mm512_set1_ps(da[i])), acc[r]);
      acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sa[i]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (r0 + r) * N + n0, acc[r]);
}


// int8 weights (per-row scale s, stored as u = w + 128 so vpdpbusd takes them unsigned; no saturation),
// for ranking a vocabulary: y[r][n] = s[n] * sum_g (da_g / 256) * (sum(u * (256 q1 + q2)) - 128 * sum(256 q1 + q2)).
// Layout [N/16, K/4, 64] uint8: byte 4l + j of entry (b, c) = u[16b + l][4c + j].
constexpr bool HAS_Q8 = true;

template <int R>
void tile8(const uint8_t* wb, const float* sb, int64_t K, const int8_t* q1, const int8_t* q2,
           const float* da, const int32_t* cs, int64_t r0, float* y, int64_t N, int64_t n0) {
  const int64_t G = K / GROUP;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i hi[R], lo[R];
    for (int r = 0; r < R; ++r) hi[r] = lo[r] = _mm512_setzero_si512();
    const uint8_t* wg = wb + g * 8 * 64;
    const int64_t at = r0 * K + g * GROUP;
    for (int k4 = 0; k4 < 8; ++k4) {
      __m512i w = _mm512_loadu_si512((const void*)(wg + k4 * 64));
      for (int r = 0; r < R; ++r) {
        hi[r] = _mm512_dpbusd_epi32(hi[r], w, _mm512_set1_epi32(load4(q1 + at + r * K + k4 * 4)));
        lo[r] = _mm512_dpbusd_epi32(lo[r], w, _mm512_set1_epi32(load4(q2 + at + r * K + k4 * 4)));
      }
    }
    for (int r = 0; r < R; ++r) {  // the + 128 comes off in int32, exactly (in fp32 it would cancel ~3 digits)
      const int64_t i = (r0 + r) * G + g;
      __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(hi[r], 8), lo[r]), _mm512_set1_epi32(128 * cs[i]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(da[i]), acc[r]);
    }
  }
  const __m512 sv = _mm512_loadu_ps(sb);
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (r0 + r) * N + n0, _mm512_mul_ps(sv, acc[r]));
}

#else  // AVX2: two 8-lane halves per 16 output rows
constexpr int MAX_ROWS = 2;  // 16 ymm registers: 6 accumulators per row
constexpr bool HAS_Q8 = false;  // maddubs would saturate on u8 x s8; torch's int8 kernel ranks instead
template <int R>
void tile8(const uint8_t*, const float*, int64_t, const int8_t*, const int8_t*, const float*, const int32_t*, int64_t, float*, int64_t, int64_t) {}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <typename T>
inline float quantize_group(const T* x, int8_t* q1, int8_t* q2, float* s, int32_t* c) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256 v[4];
  __m256 a = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) { v[i] = load8(x + 8 * i); a = _mm256_max_ps(a, _mm256_andnot_ps(sign, v[i])); }
  float amax = hmax(a);
  float d = amax / 127.f, id = amax > 0 ? 127.f / amax : 0.f;
  __m256i c1[4], c2[4];
  __m256i total = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    __m256 scaled = _mm256_mul_ps(v[i], _mm256_set1_ps(id));
    c1[i] = _mm256_cvtps_epi32(scaled);
    c2[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(scaled, _mm256_cvtepi32_ps(c1[i])), _mm256_set1_ps(256.f)));
    c2[i] = _mm256_max_epi32(_mm256_min_epi32(c2[i], _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
    total = _mm256_add_epi32(total, _mm256_add_epi32(_mm256_slli_epi32(c1[i], 8), c2[i]));
  }
  __m256i p1 = _mm256_packs_epi16(_mm256_packs_epi32(c1[0], c1[1]), _mm256_packs_epi32(c1[2], c1[3]));
  __m256i p2 = _mm256_packs_epi16(_mm256_packs_epi32(c2[0], c2[1]), _mm256_packs_epi32(c2[2], c2[3]));
  _mm256_storeu_si256((__m256i*)q1, _mm256_permutevar8x32_epi32(p1, order));
  _mm256_storeu_si256((__m256i*)q2, _mm256_permutevar8x32_epi32(p2, order));
  *c = hsum(total);
  *s = d / 256.f * (float)*c;
  return d / 256.f;
}

inline __m256i dot4(__m256i acc, __m256i w, __m256i a) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, w, a);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1)));
#endif
}

template <int R>
void tile(const uint8_t* wb, const at::Half* db, const at::Half* mb, int64_t K, const int8_t* q1, const int8_t* q2,
          const float* da, const float* sa, int64_t r0, float* y, int64_t N, int64_t n0) {
  const int64_t G = K / GROUP;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256 lo[R], hi[R];  // output rows n0..n0+7 and n0+8..n0+15
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i lo1[R], lo2[R], hi1[R], hi2[R];
    for (int r = 0; r < R; ++r) lo1[r] = lo2[r] = hi1[r] = hi2[r] = _mm256_setzero_si256();
    const uint8_t* wg = wb + g * 8 * 32;
    const int64_t at = r0 * K + g * GROUP;
    for (int k4 = 0; k4 < 8; ++k4) {
      __m256i pk = _mm256_loadu_si256((const __m256i*)(wg + k4 * 32));
      __m256i wl = _mm256_and_si256(pk, mask), wh = _mm256_and_si256(_mm256_srli_epi16(pk, 4), mask);
      for (int r = 0; r < R; ++r) {
        __m256i a1 = _mm256_set1_epi32(load4(q1 + at + r * K + k4 * 4));
        __m256i a2 = _mm256_set1_epi32(load4(q2 + at + r * K + k4 * 4));
        lo1[r] = dot4(lo1[r], wl, a1);
        lo2[r] = dot4(lo2[r], wl, a2);
        hi1[r] = dot4(hi1[r], wh, a1);
        hi2[r] = dot4(hi2[r], wh, a2);
      }
    }
    __m256 dl = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(db + g * 16)));
    __m256 dh = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(db + g * 16 + 8)));
    __m256 ml = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mb + g * 16)));
    __m256 mh = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mb + g * 16 + 8)));
    for (int r = 0; r < R; ++r) {
      const int64_t i = (r0 + r) * G + g;
      const __m256 a = _mm256_set1_ps(da[i]), s = _mm256_set1_ps(sa[i]);
      __m256i dotl = _mm256_add_epi32(_mm256_slli_epi32(lo1[r], 8), lo2[r]);
      __m256i doth = _mm256_add_epi32(_mm256_slli_epi32(hi1[r], 8), hi2[r]);
      lo[r] = _mm256_fmadd_ps(ml, s, _mm256_fmadd_ps(_mm256_cvtepi32_ps(dotl), _mm256_mul_ps(dl, a), lo[r]));
      hi[r] = _mm256_fmadd_ps(mh, s, _mm256_fmadd_ps(_mm256_cvtepi32_ps(doth), _mm256_mul_ps(dh, a), hi[r]));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + (r0 + r) * N + n0, lo[r]);
    _mm256_storeu_ps(y + (r0 + r) * N + n0 + 8, hi[r]);
  }
}
#endif

template <int R>
void rows(const uint8_t* wb, const at::Half* db, const at::Half* mb, int64_t K, const int8_t* q1, const int8_t* q2,
          const float* da, const float* sa, int64_t r0, int64_t count, float* y, int64_t N, int64_t n0) {
  if constexpr (R > 0) {
    if (count == R) tile<R>(wb, db, mb, K, q1, q2, da, sa, r0, y, N, n0);
    else rows<R - 1>(wb, db, mb, K, q1, q2, da, sa, r0, count, y, N, n0);
  }
}

template <int R>
void rows8(const uint8_t* wb, const float* sb, int64_t K, const int8_t* q1, const int8_t* q2,
           const float* da, const int32_t* cs, int64_t r0, int64_t count, float* y, int64_t N, int64_t n0) {
  if constexpr (R > 0) {
    if (count == R) tile8<R>(wb, sb, K, q1, q2, da, cs, r0, y, N, n0);
    else rows8<R - 1>(wb, sb, K, q1, q2, da, cs, r0, count, y, N, n0);
  }
}

// x as two int8 codes per value, and per group of 32 its scale / 256, its sum as coded (fp32), and the
// sum of its codes 256 q1 + q2 (int32); one scratch buffer.
struct Codes {
  torch::Tensor x, scratch;
  const int8_t *q1, *q2;
  const float *da, *sa;
  const int32_t* cs;
  int64_t M, K, G;
  // fp32 inputs are coded as they are (the residual stream's precision); other dtypes go through bf16.
  explicit Codes(const torch::Tensor& x_in)
      : x(x_in.scalar_type() == torch::kFloat ? x_in.contiguous() : x_in.to(torch::kBFloat16).contiguous()) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) % GROUP == 0, "the input's last dimension must be a multiple of 32");
    M = x.size(0), K = x.size(1), G = K / GROUP;
    scratch = torch::empty({2 * M * K + 12 * M * G}, torch::kInt8);
    int8_t* c1 = scratch.data_ptr<int8_t>();
    int8_t* c2 = c1 + M * K;
    float* d = reinterpret_cast<float*>(c2 + M * K);  // 2 * M * K is a multiple of 4 (K % 32 == 0)
    float* s = d + M * G;
    int32_t* c = reinterpret_cast<int32_t*>(s + M * G);
    if (x.scalar_type() == torch::kFloat) {
      const float* X = x.data_ptr<float>();
      for (int64_t i = 0; i < M * G; ++i) d[i] = quantize_group(X + i * GROUP, c1 + i * GROUP, c2 + i * GROUP, s + i, c + i);
    } else {
      const at::BFloat16* X = x.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < M * G; ++i) d[i] = quantize_group(X + i * GROUP, c1 + i * GROUP, c2 + i * GROUP, s + i, c + i);
    }
    q1 = c1, q2 = c2, da = d, sa = s, cs = c;
  }
};

}  // namespace

// x [M, K] (fp32 or bf16; other dtypes through bf16); packed [N/16, K/4, 32] uint8; scales [2, N/16, K/32, 16]
// fp16 (d, then m). Returns y [M, N] fp32.
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "q4_linear: bad weight");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous(), "q4_linear: scales must be contiguous fp16");
  const Codes c(x);
  const int64_t M = c.M, K = c.K, G = c.G, NB = packed.size(0), N = NB * 16;
  TORCH_CHECK(packed.size(1) * 4 == K && packed.size(2) == 32, "q4_linear: K does not match the weight");
  TORCH_CHECK(scales.numel() == 2 * NB * G * 16, "q4_linear: scales do not match the weight");
  auto y = torch::empty({M, N}, torch::kFloat);
  if (M == 0) return y;
  const uint8_t* W = packed.data_ptr<uint8_t>();
  const at::Half* D = scales.data_ptr<at::Half>();
  const at::Half* MN = D + NB * G * 16;
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t r = 0; r < M; r += MAX_ROWS)
        rows<MAX_ROWS>(W + b * (K / 4) * 32, D + b * G * 16, MN + b * G * 16, K, c.q1, c.q2, c.da, c.sa, r,
                       std::min<int64_t>(MAX_ROWS, M - r), Y, N, b * 16);
  });
  return y;
}

// x [M, K]; packed [N/16, K/4, 64] uint8 (w + 128); scales [N] fp32 (N a multiple of 16). Returns y [M, N] fp32.
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales) {
  TORCH_CHECK(HAS_Q8, "q8_linear needs AVX-512 VNNI");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "q8_linear: bad weight");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous(), "q8_linear: scales must be contiguous fp32");
  const Codes c(x);
  const int64_t M = c.M, K = c.K, NB = packed.size(0), N = NB * 16;
  TORCH_CHECK(packed.size(1) * 4 == K && packed.size(2) == 64 && scales.numel() == N, "q8_linear: shapes do not match");
  auto y = torch::empty({M, N}, torch::kFloat);
  if (M == 0) return y;
  const uint8_t* W = packed.data_ptr<uint8_t>();
  const float* S = scales.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, NB, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t r = 0; r < M; r += MAX_ROWS)
        rows8<MAX_ROWS>(W + b * (K / 4) * 64, S + b * 16, K, c.q1, c.q2, c.da, c.cs, r, std::min<int64_t>(MAX_ROWS, M - r), Y, N, b * 16);
  });
  return y;
}


// ---- paged decode attention: one query per sequence, keys and values read in place from their blocks ----
namespace {

inline float to_f(float v) { return v; }
inline float to_f(at::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < D; ++i) s += q[i] * to_f(k[i]);
  return s;
}

template <typename T>
void decode_attention(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* ctx, T* out,
                      int64_t n, int64_t H, int64_t KVH, int64_t D, int64_t max_blocks, int64_t block_size,
                      int64_t window, float scale) {
  const int64_t group = H / KVH;
  // Few sequences with long contexts: split each context into chunks (flash-decoding's split-K) so
  // every thread has work, then merge the chunks' softmax partials. One sequence has only KVH items.
  int64_t longest = 0;
  for (int64_t s = 0; s < n; ++s) longest = std::max(longest, ctx[s]);
  int64_t splits = 1;
  while (n * KVH * splits < 4 * at::get_num_threads() && longest / (2 * splits) >= 64) splits *= 2;
  const int64_t items = n * KVH * splits;
  std::vector<float> part_max(items * group, -INFINITY), part_sum(items * group, 0.f), part_acc(items * group * D, 0.f);
  at::parallel_for(0, items, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> qf(group * D), scores;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t s = w / (KVH * splits), kh = (w / splits) % KVH, sp = w % splits, len = ctx[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t chunk = (len - first + splits - 1) / splits;
      const int64_t start = first + sp * chunk, stop = std::min(len, start + chunk), count = stop - start;
      if (count <= 0) continue;
      const int64_t* table = tables + s * max_blocks;
      for (int64_t g = 0; g < group * D; ++g) qf[g] = to_f(q[(s * H + kh * group) * D + g]) * scale;
      scores.assign(group * count, 0.f);
      float* mx = part_max.data() + w * group;
      float* sum = part_sum.data() + w * group;
      float* acc = part_acc.data() + w * group * D;
      for (int64_t t = start; t < stop; ++t) {
        const T* k = kc + ((table[t / block_size] * block_size + t % block_size) * KVH + kh) * D;
        for (int64_t g = 0; g < group; ++g) {
          const float v = dot(qf.data() + g * D, k, D);
          scores[g * count + t - start] = v;
          mx[g] = std::max(mx[g], v);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sc = scores.data() + g * count;
        for (int64_t t = 0; t < count; ++t) { sc[t] = std::exp(sc[t] - mx[g]); sum[g] += sc[t]; }
      }
      for (int64_t t = start; t < stop; ++t) {
        const T* v = vc + ((table[t / block_size] * block_size + t % block_size) * KVH + kh) * D;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * count + t - start];
          float* a = acc + g * D;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) a[i] += p * to_f(v[i]);
        }
      }
    }
  });
  std::vector<float> merged(D);
  for (int64_t s = 0; s < n; ++s)
    for (int64_t kh = 0; kh < KVH; ++kh)
      for (int64_t g = 0; g < group; ++g) {
        const int64_t base = (s * KVH + kh) * splits;
        float top = -INFINITY;
        for (int64_t sp = 0; sp < splits; ++sp) top = std::max(top, part_max[(base + sp) * group + g]);
        float total = 0;
        std::fill(merged.begin(), merged.end(), 0.f);
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int64_t i = (base + sp) * group + g;
          if (part_sum[i] == 0.f) continue;  // an empty chunk
          const float w = std::exp(part_max[i] - top);
          total += part_sum[i] * w;
          for (int64_t d = 0; d < D; ++d) merged[d] += part_acc[i * D + d] * w;
        }
        for (int64_t d = 0; d < D; ++d) out[(s * H + kh * group + g) * D + d] = static_cast<T>(merged[d] / total);
      }
}

}  // namespace

// q [n, H, D]; k_cache, v_cache [slots, KVH, D] (q's dtype: fp32 or bf16); block_tables [n, max_blocks] int64;
// context_lens [n] int64 (each sequence attends to its positions [max(0, len - window), len); window 0 = all).
torch::Tensor paged_decode_attention(const torch::Tensor& q_in, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                     const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                                     int64_t block_size, int64_t window, double scale) {
  const torch::Tensor q = q_in.contiguous();
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "paged_decode_attention: dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong, "paged_decode_attention: int64 tables");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && H % KVH == 0 && block_tables.size(0) == n && context_lens.size(0) == n, "paged_decode_attention: shapes differ");
  const torch::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  auto out = torch::empty_like(q);
  if (q.scalar_type() == torch::kFloat) {
    decode_attention<float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tables.data_ptr<int64_t>(),
                            lens.data_ptr<int64_t>(), out.data_ptr<float>(), n, H, KVH, D, tables.size(1), block_size, window, (float)scale);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "paged_decode_attention: fp32 or bf16");
    decode_attention<at::BFloat16>(q.data_ptr<at::BFloat16>(), k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(),
                                   tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<at::BFloat16>(), n, H, KVH, D,
                                   tables.size(1), block_size, window, (float)scale);
  }
  return out;
}


// ---- LoRA for a mixed batch: each token through its own adapter's A and B (a BGMV, as Punica's) ----
namespace {

inline float bf(uint16_t v) { uint32_t u = static_cast<uint32_t>(v) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline float load_f(const float* p, int64_t i) { return p[i]; }
inline float load_f(const at::BFloat16* p, int64_t i) { return bf(reinterpret_cast<const uint16_t*>(p)[i]); }

template <typename W, typename X>
inline float dot_wx(const W* w, const X* x, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += load_f(w, i) * load_f(x, i);
  return s;
}

template <typename W, typename X, typename Y>
void lora_add_impl(Y* y, const X* x, const W* a, const W* bt, const int64_t* slots, const std::vector<int64_t>& parts,
                   int64_t T, int64_t in, int64_t out, int64_t R, int64_t S) {
  const int64_t P = static_cast<int64_t>(parts.size());
  std::vector<int64_t> starts(P + 1, 0);
  for (int64_t p = 0; p < P; ++p) starts[p + 1] = starts[p] + parts[p];
  std::vector<float> h(T * P * R, 0.f);
  at::parallel_for(0, T * P, 1, [&](int64_t i0, int64_t i1) {  // h[t, p, :] = A[p, slot(t)] x_t
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / P, p = i % P, s = slots[t];
      if (s < 0) continue;
      for (int64_t r = 0; r < R; ++r) h[i * R + r] = dot_wx(a + ((p * S + s) * R + r) * in, x + t * in, in);
    }
  });
  at::parallel_for(0, out, 256, [&](int64_t o0, int64_t o1) {  // y[t, o0:o1] += sum_r h[t, part, r] Bt[slot(t) R + r, o0:o1]
    std::vector<float> row(o1 - o0);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = slots[t];
      if (s < 0) continue;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t lo = std::max(o0, starts[p]), hi = std::min(o1, starts[p + 1]);
        if (lo >= hi) continue;
        float* acc = row.data() + (lo - o0);
#pragma omp simd
        for (int64_t o = 0; o < hi - lo; ++o) acc[o] = load_f(y + t * out, lo + o);
        for (int64_t r = 0; r < R; ++r) {
          const float c = h[(t * P + p) * R + r];
          const W* src = bt + (s * R + r) * out + lo;
#pragma omp simd
          for (int64_t o = 0; o < hi - lo; ++o) acc[o] += c * load_f(src, o);
        }
        for (int64_t o = 0; o < hi - lo; ++o) y[t * out + lo + o] = static_cast<Y>(acc[o]);
      }
    }
  });
}

template <typename W, typename X>
void lora_add_wx(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& bt, const int64_t* slots,
                 const std::vector<int64_t>& parts, int64_t R, int64_t S) {
  const int64_t T = x.size(0), in = x.size(1), out = y.size(1);
  if (y.scalar_type() == torch::kFloat)
    lora_add_impl<W, X, float>(y.data_ptr<float>(), x.data_ptr<X>(), a.data_ptr<W>(), bt.data_ptr<W>(), slots, parts, T, in, out, R, S);
  else
    lora_add_impl<W, X, at::BFloat16>(y.data_ptr<at::BFloat16>(), x.data_ptr<X>(), a.data_ptr<W>(), bt.data_ptr<W>(), slots, parts, T, in,
                                      out, R, S);
}

template <typename W>
void lora_add_w(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& bt, const int64_t* slots,
                const std::vector<int64_t>& parts, int64_t R, int64_t S) {
  if (x.scalar_type() == torch::kFloat) lora_add_wx<W, float>(y, x, a, bt, slots, parts, R, S);
  else lora_add_wx<W, at::BFloat16>(y, x, a, bt, slots, parts, R, S);
}

}  // namespace

// y [T, out] += per token t with slots[t] >= 0: for each part p (output columns by `parts`),
// (A[(p * S + slots[t]) * R : +R] @ x[t]) @ Bt[slots[t] * R : +R, columns of p].
// x [T, in] fp32/bf16; a [P * S * R, in], bt [S * R, out] of one dtype (fp32/bf16); y fp32/bf16, contiguous.
void lora_add(torch::Tensor y, const torch::Tensor& x_in, const torch::Tensor& a, const torch::Tensor& bt,
              const torch::Tensor& slots_in, std::vector<int64_t> parts, int64_t R, int64_t S) {
  const torch::Tensor slots = slots_in.to(torch::kLong).contiguous();
  const torch::Tensor x = x_in.scalar_type() == torch::kFloat || x_in.scalar_type() == torch::kBFloat16
                              ? x_in.contiguous() : x_in.to(torch::kFloat).contiguous();
  TORCH_CHECK(y.is_contiguous() && a.is_contiguous() && bt.is_contiguous() && a.scalar_type() == bt.scalar_type(), "lora_add: layout");
  TORCH_CHECK(y.scalar_type() == torch::kFloat || y.scalar_type() == torch::kBFloat16, "lora_add: y must be fp32 or bf16");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0) && slots.numel() == x.size(0), "lora_add: rows differ");
  int64_t total = 0;
  for (int64_t p : parts) total += p;
  TORCH_CHECK(total == y.size(1) && bt.size(1) == total && bt.size(0) == S * R && a.size(0) == (int64_t)parts.size() * S * R &&
              a.size(1) == x.size(1), "lora_add: shapes differ");
  if (a.scalar_type() == torch::kFloat) lora_add_w<float>(y, x, a, bt, slots.data_ptr<int64_t>(), parts, R, S);
  else lora_add_w<at::BFloat16>(y, x, a, bt, slots.data_ptr<int64_t>(), parts, R, S);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("q4_linear", &q4_linear, "int4 weights (GGUF Q4_1 layout) x bf16 activations as two int8 codes -> fp32");
  mod.def("q8_linear", &q8_linear, "int8 weights (per-row scale, stored + 128) x the same activation codes -> fp32");
  mod.def("paged_decode_attention", &paged_decode_attention, "one query per sequence over its cache blocks, read in place");
  mod.def("lora_add", &lora_add, "each token through its own LoRA adapter, added to y in place");
  mod.attr("isa") = Q4_ISA;
  mod.attr("has_q8") = HAS_Q8;
}
