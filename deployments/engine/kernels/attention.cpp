// Paged decode attention: one query per sequence, keys and values read in place from their blocks
// (fp32 or bf16 caches; queries fp32 or bf16). Work items are (sequence, KV head, context chunk).
// With head_dim a multiple of the vector width (up to 256), each item runs tiles of 16 keys (AVX-512) or
// 8 (AVX2): the group's scores per tile come out of one transpose-add of partial-dot vectors, the softmax
// is online (running max and sum per query head), exp is a polynomial in the vector lanes, and bf16
// tiles are widened once per tile. Elsewhere a portable loop (`chunk_partial`) computes the same partials.
#include "codes.h"

namespace {

using llm_kernels::dot;
using llm_kernels::load_f;

// Softmax partials of one (sequence, KV head) over context positions [start, stop): per query head of
// the group, the running max, the sum of exp(score - max), and the exp-weighted sum of values.
template <typename T>
void chunk_partial(const float* qf, const T* kc, const T* vc, const int64_t* table, int64_t KVH, int64_t kh, int64_t D,
                   int64_t group, int64_t block_size, int64_t start, int64_t stop, std::vector<float>& scores,
                   float* mx, float* sum, float* acc) {
  const int64_t count = stop - start;
  scores.assign(group * count, 0.f);
  for (int64_t t = start; t < stop; ++t) {
    const T* k = kc + ((table[t / block_size] * block_size + t % block_size) * KVH + kh) * D;
    for (int64_t g = 0; g < group; ++g) {
      const float v = dot(qf + g * D, k, D);
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
      for (int64_t i = 0; i < D; ++i) a[i] += p * load_f(v, i);
    }
  }
}

// The vector tile: W keys per tile, one W-lane register per vector (AVX-512: 16, AVX2: 8), and the
// operations the tile loop below needs, named alike for both.
#ifdef Q4_AVX512
using Vec = __m512;
constexpr int64_t TILE = 16;
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

inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
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

inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
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

constexpr int64_t LANES = sizeof(Vec) / sizeof(float), MAX_D = 256;

// exp of each lane (x <= 0 here: scores minus their running max), as glue.cpp's exp_approx: x = n ln2 + r,
// a degree-6 polynomial for e^r, times 2^n.
inline Vec vexp(Vec x) {
  x = vmax(x, vset(-87.f));
  const Vec n = vround(vmul(x, vset(1.44269504088896341f)));
  Vec r = vfnmadd(n, vset(0.693359375f), x);
  r = vfnmadd(n, vset(-2.12194440e-4f), r);
  Vec p = vset(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) p = vfmadd(p, r, vset(c));
  return vscale2(vfmadd(vmul(p, r), r, vadd(r, vset(1.f))), n);
}

// The rows of a tile as fp32: fp32 caches are read in place, bf16 ones widened once into `buf`.
inline const float* tile_row(const float* row, float*, int64_t) { return row; }
inline const float* tile_row(const at::BFloat16* row, float* buf, int64_t D) {
  for (int64_t c = 0; c < D; c += LANES) vstore(buf + c, vwiden(row + c));
  return buf;
}

// chunk_partial's partials for context [start, stop) of one (sequence, KV head), TILE keys at a time:
// the group's TILE scores per tile come out of one transpose-add of TILE partial-dot vectors, the softmax
// is online (running max and sum per query head), exp is a polynomial in the lanes.
template <typename T>
void tiles(const float* qf, const T* kc, const T* vc, const int64_t* table, int64_t KVH, int64_t kh, int64_t D,
           int64_t group, int64_t block_size, int64_t start, int64_t stop, float* mx, float* sum, float* acc) {
  alignas(64) float kbuf[TILE * MAX_D], vbuf[TILE * MAX_D], p[TILE];
  const float* krow[TILE];
  const float* vrow[TILE];
  Vec part[TILE];
  for (int64_t t0 = start; t0 < stop; t0 += TILE) {
    const int64_t count = std::min(TILE, stop - t0);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t t = t0 + j, at = ((table[t / block_size] * block_size + t % block_size) * KVH + kh) * D;
      krow[j] = tile_row(kc + at, kbuf + j * D, D);
      vrow[j] = tile_row(vc + at, vbuf + j * D, D);
    }
    for (int64_t j = count; j < TILE; ++j) krow[j] = krow[0], vrow[j] = vrow[0];  // a short last tile: fixed trip counts
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * D;
      for (int64_t j = 0; j < TILE; ++j) part[j] = vzero();
      for (int64_t c = 0; c < D; c += LANES) {  // the keys' partial dots are independent chains (one per key)
        const Vec qc = vload(qg + c);
        for (int64_t j = 0; j < TILE; ++j) part[j] = vfmadd(qc, vload(krow[j] + c), part[j]);  // (lanes past count are masked)
      }
      const Vec scores = first(count, reduce(part), -INFINITY);
      const float top = std::max(mx[g], hmax(scores));
      const float factor = std::exp(mx[g] - top);  // 0 on the first tile (mx = -inf)
      const Vec e = first(count, vexp(vsub(scores, vset(top))), 0.f);
      sum[g] = sum[g] * factor + hsum(e);
      mx[g] = top;
      vstore(p, e);
      float* a = acc + g * D;
      const Vec f = vset(factor);
      for (int64_t c = 0; c < D; c += LANES) {
        Vec v = vmul(vload(a + c), f);
        for (int64_t j = 0; j < TILE; ++j) v = vfmadd(vset(p[j]), vload(vrow[j] + c), v);  // p[j] = 0 past count
        vstore(a + c, v);
      }
    }
  }
}

// One output row from its chunks' partials (`splits` of them, `group` heads apart): rescaled to the
// largest max and normalised; empty chunks (sum 0) are skipped.
template <typename T>
void merge_chunks(const float* mx, const float* sum, const float* acc, int64_t splits, int64_t group, int64_t D, T* out) {
  float top = -INFINITY, total = 0;
  for (int64_t sp = 0; sp < splits; ++sp) top = std::max(top, mx[sp * group]);
  std::vector<float> merged(D, 0.f);
  for (int64_t sp = 0; sp < splits; ++sp) {
    if (sum[sp * group] == 0.f) continue;
    const float w = std::exp(mx[sp * group] - top);
    total += sum[sp * group] * w;
    for (int64_t d = 0; d < D; ++d) merged[d] += acc[sp * group * D + d] * w;
  }
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(merged[d] / total);
}

template <typename TQ, typename T>
void decode_attention(const TQ* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* ctx, TQ* out,
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
  llm_kernels::dynamic_for(0, items, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> qf(group * D), scores;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t s = w / (KVH * splits), kh = (w / splits) % KVH, sp = w % splits, len = ctx[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t chunk = (len - first + splits - 1) / splits;
      const int64_t start = first + sp * chunk, stop = std::min(len, start + chunk);
      if (stop <= start) continue;
      for (int64_t g = 0; g < group * D; ++g) qf[g] = load_f(q, (s * H + kh * group) * D + g) * scale;
      float* mx = part_max.data() + w * group;
      float* sum = part_sum.data() + w * group;
      float* acc = part_acc.data() + w * group * D;
      if (D % LANES == 0 && D <= MAX_D) {
        tiles(qf.data(), kc, vc, tables + s * max_blocks, KVH, kh, D, group, block_size, start, stop, mx, sum, acc);
        continue;
      }
      chunk_partial(qf.data(), kc, vc, tables + s * max_blocks, KVH, kh, D, group, block_size, start, stop, scores, mx, sum, acc);
    }
  });
  for (int64_t s = 0; s < n; ++s)
    for (int64_t kh = 0; kh < KVH; ++kh)
      for (int64_t g = 0; g < group; ++g) {
        const int64_t first = (s * KVH + kh) * splits * group + g;
        merge_chunks(part_max.data() + first, part_sum.data() + first, part_acc.data() + first * D, splits, group, D,
                     out + (s * H + kh * group + g) * D);
      }
}

}  // namespace

// q [n, H, D] fp32 or bf16; k_cache, v_cache [slots, KVH, D] fp32 or bf16 (the same); block_tables [n, max_blocks]
// int64; context_lens [n] int64 (each sequence attends to its positions [max(0, len - window), len); window
// 0 = all). Returns [n, H, D] in q's dtype.
at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& block_tables, const at::Tensor& context_lens,
                                     int64_t block_size, int64_t window, double scale) {
  const at::Tensor q = q_in.contiguous();
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: bad shapes");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_decode_attention: k and v caches' dtypes differ");
  for (const auto dtype : {q.scalar_type(), k_cache.scalar_type()})
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "paged_decode_attention: fp32 or bf16");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "paged_decode_attention: int64 tables");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && H % KVH == 0 && block_tables.size(0) == n && context_lens.size(0) == n, "paged_decode_attention: shapes differ");
  const at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  auto out = at::empty_like(q);
  const int64_t* tb = tables.data_ptr<int64_t>();
  const int64_t* ln = lens.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);
  auto run = [&](auto* qp, auto* op) {
    if (k_cache.scalar_type() == at::kFloat) {
      decode_attention(qp, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tb, ln, op, n, H, KVH, D, tables.size(1), block_size, window, sc);
    } else {
      decode_attention(qp, k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(), tb, ln, op, n, H, KVH, D, tables.size(1), block_size,
                       window, sc);
    }
  };
  if (q.scalar_type() == at::kFloat) {
    run(q.data_ptr<float>(), out.data_ptr<float>());
  } else {
    run(q.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  }
  return out;
}
