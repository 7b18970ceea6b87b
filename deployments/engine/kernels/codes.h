// Shared by our CPU kernels: the instruction set, and activations coded as int8 per group of 32:
// x ~ d * (q1 + q2 / 256) (absmax; q2 the rounded residual: about 16 bits, finer than bf16's 8) for a
// group that holds an outlier of its row, x ~ d * q1 (one code, as llama.cpp's Q8_1) for the rest
// (`Codes`, OUTLIER).
#pragma once
#include <ATen/ATen.h>  // not torch/extension.h: only module.cpp needs pybind11 and torch's C++ API
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
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

namespace llm_kernels {

constexpr int64_t GROUP = 32;

inline int32_t load4(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return v; }

#ifdef Q4_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// One group of 32 values with absolute maximum `amax` -> codes q1, q2 (x ~ d * (q1 + q2 / 256); q2 = 0
// unless `second`); returns d / 256 and writes the group's sum as the codes give it to *s.
template <typename T>
inline float quantize_group(const T* x, float amax, bool second, int8_t* q1, int8_t* q2, float* s, int32_t* c) {
  __m512 v[2] = {load16(x), load16(x + 16)};
  float d = amax / 127.f, id = amax > 0 ? 127.f / amax : 0.f;
  const __m512i keep = _mm512_set1_epi32(second ? -1 : 0);
  __m512i total = _mm512_setzero_si512();
  for (int h = 0; h < 2; ++h) {
    __m512 scaled = _mm512_mul_ps(v[h], _mm512_set1_ps(id));
    __m512i c1 = _mm512_cvtps_epi32(scaled);
    __m512i c2 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(scaled, _mm512_cvtepi32_ps(c1)), _mm512_set1_ps(256.f)));
    c2 = _mm512_and_si512(_mm512_max_epi32(_mm512_min_epi32(c2, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127)), keep);
    _mm_storeu_si128((__m128i*)(q1 + 16 * h), _mm512_cvtsepi32_epi8(c1));
    _mm_storeu_si128((__m128i*)(q2 + 16 * h), _mm512_cvtsepi32_epi8(c2));
    total = _mm512_add_epi32(total, _mm512_add_epi32(_mm512_slli_epi32(c1, 8), c2));
  }
  *c = _mm512_reduce_add_epi32(total);
  *s = d / 256.f * (float)*c;
  return d / 256.f;
}

#else  // AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <typename T>
inline float quantize_group(const T* x, float amax, bool second, int8_t* q1, int8_t* q2, float* s, int32_t* c) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i keep = _mm256_set1_epi32(second ? -1 : 0);
  __m256 v[4];
  for (int i = 0; i < 4; ++i) v[i] = load8(x + 8 * i);
  float d = amax / 127.f, id = amax > 0 ? 127.f / amax : 0.f;
  __m256i c1[4], c2[4];
  __m256i total = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    __m256 scaled = _mm256_mul_ps(v[i], _mm256_set1_ps(id));
    c1[i] = _mm256_cvtps_epi32(scaled);
    c2[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(scaled, _mm256_cvtepi32_ps(c1[i])), _mm256_set1_ps(256.f)));
    c2[i] = _mm256_and_si256(_mm256_max_epi32(_mm256_min_epi32(c2[i], _mm256_set1_epi32(127)), _mm256_set1_epi32(-127)), keep);
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
#endif

namespace vec {
// One register of fp32 lanes (AVX-512: 16, AVX2: 8) and the operations on it, named alike for both ISAs
// (attention's tiles of TILE keys, the activation, the vocabulary's scans). In `vec` so callers can take
// them all with one using-directive.
#ifdef Q4_AVX512
using Vec = __m512;
constexpr int64_t TILE = 16;  // attention's keys per tile: one per lane
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset(float f) { return _mm512_set1_ps(f); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vwiden(const at::BFloat16* p) { return llm_kernels::load16(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vfmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline float hmax(Vec v) { return _mm512_reduce_max_ps(v); }
inline float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
// lanes [0, count) of v, the rest `fill`
inline Vec first(int64_t count, Vec v, float fill) { return _mm512_mask_blend_ps(static_cast<__mmask16>((1u << count) - 1), vset(fill), v); }
// lanes [skip, count) of v, the rest `fill`
inline Vec between(int64_t skip, int64_t count, Vec v, float fill) {
  return _mm512_mask_blend_ps(static_cast<__mmask16>(((1u << count) - 1) & ~((1u << skip) - 1)), vset(fill), v);
}

inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline bool any_nan(Vec v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
inline Vec vdiv(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vfnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
inline Vec vround(Vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec vscale2(Vec y, Vec n) { return _mm512_scalef_ps(y, n); }  // y * 2^n

// Lane j = the sum of v[j]'s lanes, for 16 vectors (a transpose-add: 45 operations instead of 16 reductions).
inline Vec reduce(const Vec* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i) a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
}

#else  // AVX2
using Vec = __m256;
constexpr int64_t TILE = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset(float f) { return _mm256_set1_ps(f); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vwiden(const at::BFloat16* p) { return llm_kernels::load8(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vfmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline float hmax(Vec v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline float hsum(Vec v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}
inline Vec first(int64_t count, Vec v, float fill) {
  const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  return _mm256_blendv_ps(vset(fill), v, keep);
}
inline Vec between(int64_t skip, int64_t count, Vec v, float fill) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i keep = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(skip)), lane),
                                           _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lane));
  return _mm256_blendv_ps(vset(fill), v, _mm256_castsi256_ps(keep));
}

inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline bool any_nan(Vec v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
inline Vec vdiv(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vfnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
inline Vec vround(Vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// y * 2^n without scalef: 2^n built in the exponent bits (n >= -126 here: vexp clamps x at -87)
inline Vec vscale2(Vec y, Vec n) {
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)));
}

// Lane j = the sum of v[j]'s lanes, for 8 vectors (a transpose-add).
inline Vec reduce(const Vec* v) {
  __m256 a[4], b[2];
  for (int i = 0; i < 4; ++i) a[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 2; ++i) b[i] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  return _mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20), _mm256_permute2f128_ps(b[0], b[1], 0x31));
}
#endif

constexpr int64_t LANES = sizeof(Vec) / sizeof(float);

// exp of each lane, about 2 ulp over fp32's range (Cephes' expf, x clamped to [-87, 88]): x = n ln2 + r,
// a degree-6 polynomial for e^r, times 2^n.
inline Vec vexp(Vec x) {
  x = vmin(vmax(x, vset(-87.f)), vset(88.f));
  const Vec n = vround(vmul(x, vset(1.44269504088896341f)));
  Vec r = vfnmadd(n, vset(0.693359375f), x);
  r = vfnmadd(n, vset(-2.12194440e-4f), r);
  Vec p = vset(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) p = vfmadd(p, r, vset(c));
  return vscale2(vfmadd(vmul(p, r), r, vadd(r, vset(1.f))), n);
}
}  // namespace vec
using vec::LANES;
using vec::TILE;
using vec::Vec;

// f(b, e) over [begin, end) in chunks of `chunk`, handed out one at a time to torch's OpenMP team (it is
// the same libgomp team at::parallel_for uses). at::parallel_for splits the range into one static share
// per thread: when a thread is descheduled (the serving processes share these cores) the other finishes
// its share and waits. Here it takes the next chunk instead.
template <typename F>
inline void dynamic_for(int64_t begin, int64_t end, int64_t chunk, const F& f) {
  const int64_t threads = at::get_num_threads();
  if (end - begin <= chunk || threads == 1 || at::in_parallel_region()) {
    if (begin < end) f(begin, end);
    return;
  }
  std::atomic<int64_t> next{begin};
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(threads, (end - begin + chunk - 1) / chunk)))
  for (int64_t b = next.fetch_add(chunk); b < end; b = next.fetch_add(chunk)) f(b, std::min(end, b + chunk));
}

// A chunk size giving each of torch's threads about `per_thread` chunks of [0, n).
inline int64_t chunk_for(int64_t n, int64_t per_thread = 4) {
  return std::max<int64_t>(1, n / (per_thread * at::get_num_threads()));
}

// fp32 or bf16 element i as a float (bf16: its bits shifted into the top half, which vectorises).
inline float load_f(const float* p, int64_t i) { return p[i]; }
inline float load_f(const int8_t* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load_f(const at::BFloat16* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += load_f(a, i) * load_f(b, i);
  return s;
}

template <typename T>
inline float group_absmax(const T* x) {
  float m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < GROUP; ++i) m = std::max(m, std::fabs(load_f(x, i)));
  return m;
}

// A group keeps its second code only when its absolute maximum is over OUTLIER times the median of its
// row's groups' (perf/README.md, session 9): one code is ~8 bits of the group's range, fine where values
// are alike, coarse for the small values of a group that holds an outlier. With one code everywhere
// SmolLM2's int4 greedy agreement was 96.3% (the gate is 97%), with two everywhere 99.6%; with this rule
// 98.4% (perplexity -0.1%), and ~13% of its groups keep two codes.
constexpr float OUTLIER = 2.f;

// x as int8 codes per value, and per group of 32 its scale / 256, its sum as coded (fp32), the sum of
// its codes 256 q1 + q2 (int32) and whether it has a second code (q2 is zero where it has not); one
// scratch buffer.
struct Codes {
  at::Tensor x, scratch;
  const int8_t *q1, *q2;
  const float *da, *sa;
  const int32_t* cs;
  const uint8_t* two;
  int64_t M, K, G;
  // fp32 inputs are coded as they are (the residual stream's precision); other dtypes go through bf16.
  // `outlier` 0: every group keeps two codes (perf/bench_codes.py's baseline).
  explicit Codes(const at::Tensor& x_in, double outlier = OUTLIER)
      : x(x_in.scalar_type() == at::kFloat ? x_in.contiguous() : x_in.to(at::kBFloat16).contiguous()) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) % GROUP == 0, "the input's last dimension must be a multiple of 32");
    M = x.size(0), K = x.size(1), G = K / GROUP;
    scratch = at::empty({2 * M * K + 13 * M * G}, at::kChar);
    int8_t* c1 = scratch.data_ptr<int8_t>();
    int8_t* c2 = c1 + M * K;
    float* d = reinterpret_cast<float*>(c2 + M * K);  // 2 * M * K is a multiple of 4 (K % 32 == 0)
    float* s = d + M * G;
    int32_t* c = reinterpret_cast<int32_t*>(s + M * G);
    uint8_t* t = reinterpret_cast<uint8_t*>(c + M * G);
    const float o = static_cast<float>(outlier);
    if (x.scalar_type() == at::kFloat) code(x.data_ptr<float>(), o, c1, c2, d, s, c, t);
    else code(x.data_ptr<at::BFloat16>(), o, c1, c2, d, s, c, t);
    q1 = c1, q2 = c2, da = d, sa = s, cs = c, two = t;
  }

 private:
  template <typename T>
  void code(const T* X, float outlier, int8_t* c1, int8_t* c2, float* d, float* s, int32_t* c, uint8_t* t) const {
    // rows in parallel once there are a few thousand values per thread (a prefill's were ~10% of its matmuls' time)
    dynamic_for(0, M, std::max<int64_t>(1, 4096 / K), [&](int64_t r0, int64_t r1) {
      std::vector<float> amax(G), order(G);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t g = 0; g < G; ++g) order[g] = amax[g] = group_absmax(X + (r * G + g) * GROUP);
        std::nth_element(order.begin(), order.begin() + G / 2, order.end());
        const float limit = outlier * order[G / 2];
        for (int64_t g = 0; g < G; ++g) {
          const int64_t i = r * G + g;
          t[i] = amax[g] > limit;
          d[i] = quantize_group(X + i * GROUP, amax[g], t[i], c1 + i * GROUP, c2 + i * GROUP, s + i, c + i);
        }
      }
    });
  }
};

}  // namespace llm_kernels

// The functions the module exports (matmul.cpp, attention.cpp, lora.cpp, glue.cpp, vocab.cpp, decode.cpp).
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, double outlier = llm_kernels::OUTLIER);
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales);
at::Tensor q8_rank(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales);
at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, bool one_code);
bool has_q8();
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& block_tables, const at::Tensor& context_lens,
                                     int64_t block_size, int64_t window, double scale);
void lora_add(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
              const at::Tensor& slots, std::vector<int64_t> parts, int64_t R, int64_t S, const at::Tensor& a_scale,
              const at::Tensor& b_scale);
at::Tensor residual_norm(at::Tensor x, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& w_y,
                         const std::optional<at::Tensor>& w_out, double eps);
at::Tensor rope_kv(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                   const std::optional<at::Tensor>& qk_norm, double eps, at::Tensor k_cache, at::Tensor v_cache,
                   const at::Tensor& slots, int64_t H, int64_t KVH);
at::Tensor act_mul(const at::Tensor& gate_up, int64_t act);
void rescore_top(at::Tensor logits, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t k);
at::Tensor argmax_rows(const at::Tensor& logits);
at::Tensor table_rows(const at::Tensor& ids, const at::Tensor& codes, const at::Tensor& scales);
void decode_layers(at::Tensor x, const std::vector<at::Tensor>& layers, const std::vector<at::Tensor>& caches,
                   const std::vector<int64_t>& windows, const at::Tensor& positions, const at::Tensor& slots,
                   const at::Tensor& tables, const at::Tensor& context_lens, int64_t H, int64_t KVH, int64_t block_size,
                   double scale, double eps, int64_t act, const std::vector<at::Tensor>& lora,
                   const std::optional<at::Tensor>& lora_slots, const std::vector<int64_t>& lora_parts, int64_t rank,
                   int64_t num_slots);
