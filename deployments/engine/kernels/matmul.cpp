// int4 weights x int8 activations on x86 CPUs: the decode-shaped matmul of our int4 layers.
//
// y[M, N] = x[M, K] @ W.T with W = d * q + m per group of 32 input columns (q in 0..15, d and m fp16),
// the layout of GGUF Q4_1/Q4_0 blocks. Each call codes x per group of 32 as int8 (codes.h): one code
// x ~ 256 da * q1 for most groups, two, x ~ da * (256 q1 + q2) (about 16 bits), for a group holding an
// outlier of its row. It sums q * q1 (and q * q2 where there is one) in int32 with VNNI (vpdpbusd;
// AVX2: maddubs summed in int16 over a group, one madd per group), one instruction per 64 multiply-adds
// (AVX2: two per 32); the scales enter once per group:
//   y = sum_g d_g * (da_g / 256) * (256 * sum(q * q1) + sum(q * q2)) + m_g * sa_g,  sa_g = sum of x's codes * scale.
// Output rows come 16 at a time in a vector's lanes (no horizontal sums), activation rows up to 8
// at a time share each weight load. torch's _weight_int4pack_mm_for_cpu dequantizes to fp32 and
// pays one FMA per 16 weights per row; this pays about one instruction per 64 (perf/README.md).
//
// Packed layout: [N/16, K/4, 32] uint8. In the entry for output rows n0..n0+15 and inputs k..k+3,
// byte 4i+j = q[n0+i][k+j] | q[n0+8+i][k+j] << 4 (i < 8, j < 4): masking the low nibbles gives
// rows n0..n0+7 with 4 codes per 32-bit lane, the high nibbles rows n0+8..n0+15.
// Scales: d, m [N/16, K/32, 16] fp16, lane i = output row n0+i.
#include "codes.h"

namespace llm_kernels {
namespace {

#ifndef Q4_SCRATCH_MIN_ROWS
#define Q4_SCRATCH_MIN_ROWS 12
#endif
// More rows than this (a prefill): a block's weights are unpacked once for all its row tiles (tile<R, true>).
// Not at decode batch sizes: from 5 rows, 10 streams' decode steps were 6.2-6.5 against 4.6-5.8 ms (session 26).
constexpr int64_t SCRATCH_MIN_ROWS = Q4_SCRATCH_MIN_ROWS;

struct alignas(64) Line { uint8_t bytes[64]; };  // a vector's worth of unpacked codes, aligned for its load

// The next 16-row block's bytes for this group, asked for while this block is computed (by its first row
// tile only). Left to the hardware prefetchers, one core streaming weights from memory ran at ~75% of its
// speed on the same weights in cache; with this, 10 rows on one core 12.1-13.7 -> 10.2 ms for SmolLM2's 120
// projections (perf/README.md, session 19). A prefetch past the last block is harmless: prefetches never fault.
inline void prefetch_lines(const void* p, int lines) {
  for (int l = 0; l < lines; ++l) _mm_prefetch(static_cast<const char*>(p) + l * 64, _MM_HINT_T0);
}

// Group g of the next block, int4 layout ([N/16, K/4, 32] codes, d and m [N/16, K/32, 16]): 4 lines of codes,
// its d and m lanes.
inline void prefetch_next_q4(const uint8_t* wg, const at::Half* db, const at::Half* mb, int64_t K, int64_t G, int64_t g) {
  prefetch_lines(wg + (K / 4) * 32, 4);
  prefetch_lines(db + (G + g) * 16, 1);
  prefetch_lines(mb + (G + g) * 16, 1);
}

// Group g of the next block, int8 layout ([N/16, K/4, 64] codes; group-wise scales [N/16, K/32, 16]): 8 lines
// of codes and, when grouped, its scales.
inline void prefetch_next_q8(const uint8_t* wg, const float* sb, int64_t K, int64_t G, int64_t g, bool grouped) {
  prefetch_lines(wg + (K / 4) * 64, 8);
  if (grouped) prefetch_lines(sb + (G + g) * 16, 1);
}

#ifdef Q4_AVX512
#ifndef Q4_MAX_ROWS
#define Q4_MAX_ROWS 6  // rows per weight load; 4..8 measured within 7% (perf/README.md)
#endif
constexpr int MAX_ROWS = Q4_MAX_ROWS;

// acc += w . (4 codes at p, broadcast to every lane) with the broadcast inside vpdpbusd ({1to16} memory
// operand): gcc emits a separate vpbroadcastd for _mm512_set1_epi32(load4(p)). The same integer sums, 10-12%
// less time per row at 4-12 rows on Zen 4 (perf/README.md, session 19).
inline __m512i dp_bcst(__m512i acc, __m512i w, const int8_t* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(p)));
  return acc;
}

// UNPACKED (many rows, a prefill): `wb` is the block's weights unpacked once by `unpack_block` ([K/32, 8, 64]
// bytes, one code per byte), which every row tile then reads with one load per 4 inputs instead of unpacking
// them again (a load-broadcast, a shift and a mask). The same integer sums and fp32 order either way.
template <int R, bool UNPACKED = false>
void tile(const uint8_t* wb, const at::Half* db, const at::Half* mb, int64_t K, const Codes& c, int64_t r0, float* y,
          int64_t N, int64_t n0) {
  const int64_t G = K / GROUP;
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const __m512i nibble = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);  // the upper 256 bits take the high nibbles
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i w[8], hi[R];  // the group's weights stay in registers for the second codes
    for (int r = 0; r < R; ++r) hi[r] = _mm512_setzero_si512();
    const uint8_t* wg = wb + g * 8 * (UNPACKED ? 64 : 32);
    const int64_t at = r0 * K + g * GROUP;
    if (!UNPACKED && r0 == 0) prefetch_next_q4(wg, db, mb, K, G, g);
    for (int k4 = 0; k4 < 8; ++k4) {  // packed: 32 bytes in both halves, shifted per half, masked
      w[k4] = UNPACKED ? _mm512_load_si512((const void*)(wg + k4 * 64))
                       : _mm512_and_si512(_mm512_srlv_epi64(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(wg + k4 * 32))), nibble), mask);
      for (int r = 0; r < R; ++r) hi[r] = dp_bcst(hi[r], w[k4], c.q1 + at + r * K + k4 * 4);
    }
    __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(db + g * 16)));
    __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mb + g * 16)));
    for (int r = 0; r < R; ++r) {
      const int64_t i = (r0 + r) * G + g;
      __m512 dot;
      float scale = c.da[i];
      if (c.two[i]) {
        __m512i lo = _mm512_setzero_si512();
        for (int k4 = 0; k4 < 8; ++k4) lo = dp_bcst(lo, w[k4], c.q2 + at + r * K + k4 * 4);
        dot = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hi[r], 8), lo));
      } else {  // one code: 256 q1 * da, the shift folded into the scale
        dot = _mm512_cvtepi32_ps(hi[r]);
        scale *= 256.f;
      }
      acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dv, _mm512_set1_ps(scale)), acc[r]);
      acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(c.sa[i]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (r0 + r) * N + n0, acc[r]);
}

// The block's weights as tile<R, true> reads them; also asks for the next block's lines.
inline void unpack_block(const uint8_t* wb, int64_t K, uint8_t* wu) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const __m512i nibble = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
  for (int64_t e = 0; e < K / 4; ++e) {
    if ((e & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(wb + (K / 4) * 32 + e * 32), _MM_HINT_T0);
    _mm512_store_si512((void*)(wu + e * 64), _mm512_and_si512(_mm512_srlv_epi64(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(wb + e * 32))), nibble), mask));
  }
}

#ifndef Q4_SCRATCH_ROWS
#define Q4_SCRATCH_ROWS 4  // rows per tile over unpacked weights: 2-5 measured within noise, 6 slower, 7+ spill (session 26)
#endif
constexpr int SCRATCH_ROWS = Q4_SCRATCH_ROWS;


// int8 weights (per-row scale s, stored as u = w + 128 so vpdpbusd takes them unsigned; no saturation),
// for ranking a vocabulary: y[r][n] = s[n] * sum_g (da_g / 256) * (sum(u * (256 q1 + q2)) - 128 * sum(256 q1 + q2)).
// Layout [N/16, K/4, 64] uint8: byte 4l + j of entry (b, c) = u[16b + l][4c + j].
constexpr bool HAS_Q8 = true;

// GROUPED: one scale per output row per group of 32 inputs (`sb` [K/32, 16] for these 16 rows: GGUF
// Q8_0/Q5_0 blocks, exactly), instead of one per row.
// ONE_CODE: the activations' first code only (half the dot products; `cs` then holds each group's sum
// of first codes): the vocabulary's ranking, whose best candidates are rescored exactly afterwards.
template <int R, bool GROUPED, bool ONE_CODE = false>
void tile8(const uint8_t* wb, const float* sb, int64_t K, const Codes& c, const int32_t* cs, int64_t r0, float* y,
           int64_t N, int64_t n0) {
  const int64_t G = K / GROUP;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i hi[R];
    for (int r = 0; r < R; ++r) hi[r] = _mm512_setzero_si512();
    const uint8_t* wg = wb + g * 8 * 64;
    const int64_t at = r0 * K + g * GROUP;
    if (r0 == 0) prefetch_next_q8(wg, sb, K, G, g, GROUPED);
    for (int k4 = 0; k4 < 8; ++k4) {
      __m512i w = _mm512_loadu_si512((const void*)(wg + k4 * 64));
      for (int r = 0; r < R; ++r) hi[r] = dp_bcst(hi[r], w, c.q1 + at + r * K + k4 * 4);
    }
    for (int r = 0; r < R; ++r) {  // the + 128 comes off in int32, exactly (in fp32 it would cancel ~3 digits)
      const int64_t i = (r0 + r) * G + g;
      __m512i dot = _mm512_slli_epi32(hi[r], 8);
      if (!ONE_CODE && c.two[i]) {
        __m512i lo = _mm512_setzero_si512();
        for (int k4 = 0; k4 < 8; ++k4)
          lo = dp_bcst(lo, _mm512_loadu_si512((const void*)(wg + k4 * 64)), c.q2 + at + r * K + k4 * 4);
        dot = _mm512_add_epi32(dot, lo);
      }
      dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(ONE_CODE ? 256 * 128 * cs[i] : 128 * cs[i]));
      const __m512 scale = GROUPED ? _mm512_mul_ps(_mm512_loadu_ps(sb + g * 16), _mm512_set1_ps(c.da[i])) : _mm512_set1_ps(c.da[i]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
    }
  }
  const __m512 sv = GROUPED ? _mm512_set1_ps(1.f) : _mm512_loadu_ps(sb);
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (r0 + r) * N + n0, _mm512_mul_ps(sv, acc[r]));
}

#else  // AVX2: two 8-lane halves per 16 output rows
#ifndef Q4_MAX_ROWS
#define Q4_MAX_ROWS 4  // 2, 3, 4, 5, 6, 8 measured (session 10, perf/README.md): 4 best, though its accumulators spill
#endif
constexpr int MAX_ROWS = Q4_MAX_ROWS;
constexpr bool HAS_Q8 = true;

// Sums of 4 products u8 x s8 per int32 lane: vpdpbusd where AVX-VNNI exists; else maddubs, whose int16
// pair sums (|w a + w' a'| <= 2 * 15 * 127 = 3810 for int4 weights) add up in int16 over a whole group
// of 32 (8 x 3810 < 32767) and widen to int32 once per group (madd): 2 operations per 32 products, not 4.
#if defined(__AVXVNNI__)
inline __m256i step4(__m256i acc, __m256i w, __m256i a) { return _mm256_dpbusd_avx_epi32(acc, w, a); }
inline __m256i widen(__m256i acc) { return acc; }
#else
inline __m256i step4(__m256i acc, __m256i w, __m256i a) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, a)); }
inline __m256i widen(__m256i acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
#endif

// int8 weights (vocabulary ranking, int8 layers), the layout tile8 reads above: u = w + 128 turns back
// into w by flipping the top bit; maddubs takes |w| (unsigned) and a with w's sign, |2 * 127 * 127| <
// 32767, so nothing saturates (llama.cpp's AVX2 Q8_0 trick), and products widen to int32 at once.
inline __m256i dot8(__m256i acc, __m256i wabs, __m256i w, __m256i a) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(a, w)), _mm256_set1_epi16(1)));
}

template <int R, bool GROUPED, bool ONE_CODE = false>
void tile8(const uint8_t* wb, const float* sb, int64_t K, const Codes& c, const int32_t*, int64_t r0, float* y,
           int64_t N, int64_t n0) {
  const int64_t G = K / GROUP;
  const __m256i top = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 lo[R], hi[R];  // output rows n0..n0+7 and n0+8..n0+15
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = wb + g * 8 * 64;
    const int64_t at = r0 * K + g * GROUP;
    if (r0 == 0) prefetch_next_q8(wg, sb, K, G, g, GROUPED);
    for (int pass = 0; pass < (ONE_CODE ? 1 : 2); ++pass) {  // pass 1: the second codes, where a row's group has them
      bool any = pass == 0;
      for (int r = 0; r < R && !any; ++r) any = c.two[(r0 + r) * G + g];
      if (!any) break;
      const int8_t* q = pass == 0 ? c.q1 : c.q2;
      __m256i il[R], ih[R];
      for (int r = 0; r < R; ++r) il[r] = ih[r] = _mm256_setzero_si256();
      for (int k4 = 0; k4 < 8; ++k4) {
        const __m256i wl = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(wg + k4 * 64)), top);
        const __m256i wh = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(wg + k4 * 64 + 32)), top);
        const __m256i al = _mm256_abs_epi8(wl), ah = _mm256_abs_epi8(wh);
        for (int r = 0; r < R; ++r) {
          const __m256i a = _mm256_set1_epi32(load4(q + at + r * K + k4 * 4));
          il[r] = dot8(il[r], al, wl, a);
          ih[r] = dot8(ih[r], ah, wh, a);
        }
      }
      const __m256 sl = GROUPED ? _mm256_loadu_ps(sb + g * 16) : _mm256_set1_ps(1.f);
      const __m256 sh = GROUPED ? _mm256_loadu_ps(sb + g * 16 + 8) : _mm256_set1_ps(1.f);
      for (int r = 0; r < R; ++r) {
        const int64_t i = (r0 + r) * G + g;
        if (pass == 1 && !c.two[i]) continue;
        const __m256 a = _mm256_set1_ps(pass == 0 ? 256.f * c.da[i] : c.da[i]);
        lo[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(il[r]), _mm256_mul_ps(sl, a), lo[r]);
        hi[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ih[r]), _mm256_mul_ps(sh, a), hi[r]);
      }
    }
  }
  const __m256 svl = GROUPED ? _mm256_set1_ps(1.f) : _mm256_loadu_ps(sb);
  const __m256 svh = GROUPED ? _mm256_set1_ps(1.f) : _mm256_loadu_ps(sb + 8);
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + (r0 + r) * N + n0, _mm256_mul_ps(svl, lo[r]));
    _mm256_storeu_ps(y + (r0 + r) * N + n0 + 8, _mm256_mul_ps(svh, hi[r]));
  }
}

// UNPACKED (many rows, a prefill), as on AVX-512: `wb` is the block's weights unpacked once ([K/32, 8, 64] bytes:
// per 4 inputs, rows n0..n0+7 then n0+8..n0+15, one code per byte), two loads per 4 inputs instead of a load, a
// shift and two masks. The same sums and fp32 order either way.
template <int R, bool UNPACKED = false>
void tile(const uint8_t* wb, const at::Half* db, const at::Half* mb, int64_t K, const Codes& c, int64_t r0, float* y,
          int64_t N, int64_t n0) {
  const int64_t G = K / GROUP;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256 lo[R], hi[R];  // output rows n0..n0+7 and n0+8..n0+15
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i lo1[R], lo2[R], hi1[R], hi2[R];
    bool second[R], any = false;
    for (int r = 0; r < R; ++r) {
      lo1[r] = lo2[r] = hi1[r] = hi2[r] = _mm256_setzero_si256();
      any |= second[r] = c.two[(r0 + r) * G + g];
    }
    const uint8_t* wg = wb + g * 8 * (UNPACKED ? 64 : 32);
    const int64_t at = r0 * K + g * GROUP;
    if (!UNPACKED && r0 == 0) prefetch_next_q4(wg, db, mb, K, G, g);
    auto weights = [&](int k4, __m256i& wl, __m256i& wh) {  // 4 inputs' codes for rows n0..n0+7 and n0+8..n0+15
      if constexpr (UNPACKED) {
        wl = _mm256_load_si256((const __m256i*)(wg + k4 * 64));
        wh = _mm256_load_si256((const __m256i*)(wg + k4 * 64 + 32));
      } else {
        const __m256i pk = _mm256_loadu_si256((const __m256i*)(wg + k4 * 32));
        wl = _mm256_and_si256(pk, mask), wh = _mm256_and_si256(_mm256_srli_epi16(pk, 4), mask);
      }
    };
    for (int k4 = 0; k4 < 8; ++k4) {
      __m256i wl, wh;
      weights(k4, wl, wh);
      for (int r = 0; r < R; ++r) {
        __m256i a1 = _mm256_set1_epi32(load4(c.q1 + at + r * K + k4 * 4));
        lo1[r] = step4(lo1[r], wl, a1);
        hi1[r] = step4(hi1[r], wh, a1);
      }
    }
    for (int k4 = 0; any && k4 < 8; ++k4) {  // the second codes, for the rows whose group has them
      __m256i wl, wh;
      weights(k4, wl, wh);
      for (int r = 0; r < R; ++r) {
        if (!second[r]) continue;
        __m256i a2 = _mm256_set1_epi32(load4(c.q2 + at + r * K + k4 * 4));
        lo2[r] = step4(lo2[r], wl, a2);
        hi2[r] = step4(hi2[r], wh, a2);
      }
    }
    __m256 dl = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(db + g * 16)));
    __m256 dh = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(db + g * 16 + 8)));
    __m256 ml = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mb + g * 16)));
    __m256 mh = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mb + g * 16 + 8)));
    for (int r = 0; r < R; ++r) {
      const int64_t i = (r0 + r) * G + g;
      const __m256 s = _mm256_set1_ps(c.sa[i]);
      __m256i dotl = widen(lo1[r]), doth = widen(hi1[r]);
      float scale = c.da[i];
      if (second[r]) {
        dotl = _mm256_add_epi32(_mm256_slli_epi32(dotl, 8), widen(lo2[r]));
        doth = _mm256_add_epi32(_mm256_slli_epi32(doth, 8), widen(hi2[r]));
      } else {  // one code: the x256 folded into the scale
        scale *= 256.f;
      }
      const __m256 a = _mm256_set1_ps(scale);
      lo[r] = _mm256_fmadd_ps(ml, s, _mm256_fmadd_ps(_mm256_cvtepi32_ps(dotl), _mm256_mul_ps(dl, a), lo[r]));
      hi[r] = _mm256_fmadd_ps(mh, s, _mm256_fmadd_ps(_mm256_cvtepi32_ps(doth), _mm256_mul_ps(dh, a), hi[r]));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + (r0 + r) * N + n0, lo[r]);
    _mm256_storeu_ps(y + (r0 + r) * N + n0 + 8, hi[r]);
  }
}

#ifndef Q4_SCRATCH_ROWS
#define Q4_SCRATCH_ROWS 3  // 2, 3, 4, 6 measured: 3 best (0.72-0.83 of the old tile's time past 16 rows; 4 spills, 0.94-0.97; session 26)
#endif
constexpr int SCRATCH_ROWS = Q4_SCRATCH_ROWS;

// The block's weights as tile<R, true> reads them; also asks for the next block's lines.
inline void unpack_block(const uint8_t* wb, int64_t K, uint8_t* wu) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int64_t e = 0; e < K / 4; ++e) {
    if ((e & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(wb + (K / 4) * 32 + e * 32), _MM_HINT_T0);
    const __m256i pk = _mm256_loadu_si256((const __m256i*)(wb + e * 32));
    _mm256_store_si256((__m256i*)(wu + e * 64), _mm256_and_si256(pk, mask));
    _mm256_store_si256((__m256i*)(wu + e * 64 + 32), _mm256_and_si256(_mm256_srli_epi16(pk, 4), mask));
  }
}
#endif

template <int R, bool UNPACKED = false>
void rows(const uint8_t* wb, const at::Half* db, const at::Half* mb, int64_t K, const Codes& c, int64_t r0, int64_t count,
          float* y, int64_t N, int64_t n0) {
  if constexpr (R > 0) {
    if (count == R) tile<R, UNPACKED>(wb, db, mb, K, c, r0, y, N, n0);
    else rows<R - 1, UNPACKED>(wb, db, mb, K, c, r0, count, y, N, n0);
  }
}

template <int R, bool GROUPED, bool ONE_CODE = false>
void rows8(const uint8_t* wb, const float* sb, int64_t K, const Codes& c, const int32_t* cs, int64_t r0, int64_t count,
           float* y, int64_t N, int64_t n0) {
  if constexpr (R > 0) {
    if (count == R) tile8<R, GROUPED, ONE_CODE>(wb, sb, K, c, cs, r0, y, N, n0);
    else rows8<R - 1, GROUPED, ONE_CODE>(wb, sb, K, c, cs, r0, count, y, N, n0);
  }
}
}  // namespace
}  // namespace llm_kernels

using namespace llm_kernels;

bool has_q8() { return HAS_Q8; }

// x [M, K] (fp32 or bf16; other dtypes through bf16); packed [N/16, K/4, 32] uint8; scales [2, N/16, K/32, 16]
// fp16 (d, then m); outlier: codes.h's rule (0: two codes everywhere). Returns y [M, N] fp32.
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, double outlier) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous(), "q4_linear: bad weight");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "q4_linear: scales must be contiguous fp16");
  const Codes c(x, outlier);
  const int64_t M = c.M, K = c.K, G = c.G, NB = packed.size(0), N = NB * 16;
  TORCH_CHECK(packed.size(1) * 4 == K && packed.size(2) == 32, "q4_linear: K does not match the weight");
  TORCH_CHECK(scales.numel() == 2 * NB * G * 16, "q4_linear: scales do not match the weight");
  auto y = at::empty({M, N}, at::kFloat);
  if (M == 0) return y;
  const uint8_t* W = packed.data_ptr<uint8_t>();
  const at::Half* D = scales.data_ptr<at::Half>();
  const at::Half* MN = D + NB * G * 16;
  float* Y = y.data_ptr<float>();
  // Two chunks per thread: every chunk restarts the weights' stream (4 per thread were 4-6% slower at 1
  // and 10 rows, 16 were 25% slower; session 13), and more than one keeps a preempted thread's share small.
  // (Past SCRATCH_MIN_ROWS, 8 per thread measured no better: session 26.)
  const bool scratch = M > SCRATCH_MIN_ROWS;
  dynamic_for(0, NB, chunk_for(NB, 2), [&](int64_t b0, int64_t b1) {
    std::vector<Line> lines(scratch ? K / 4 : 0);
    uint8_t* wu = reinterpret_cast<uint8_t*>(lines.data());
    for (int64_t b = b0; b < b1; ++b) {
      if (scratch) {
        unpack_block(W + b * (K / 4) * 32, K, wu);
        for (int64_t r = 0; r < M; r += SCRATCH_ROWS)
          rows<SCRATCH_ROWS, true>(wu, D + b * G * 16, MN + b * G * 16, K, c, r, std::min<int64_t>(SCRATCH_ROWS, M - r), Y, N, b * 16);
        continue;
      }
      for (int64_t r = 0; r < M; r += MAX_ROWS)
        rows<MAX_ROWS>(W + b * (K / 4) * 32, D + b * G * 16, MN + b * G * 16, K, c, r, std::min<int64_t>(MAX_ROWS, M - r), Y, N, b * 16);
    }
  });
  return y;
}

// x [M, K]; packed [N/16, K/4, 64] uint8 (w + 128); scales fp32 [N] (one per row: the vocabulary ranking)
// or [N/16, K/32, 16] (one per row per group of 32: int8 layers). N a multiple of 16. Returns y [M, N] fp32.
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) { return q8_matmul(x, packed, scales, false); }

// q8_linear from the activations' first code alone (~8 bits: x ~ 256 (d / 256) q1): for
// ranking a vocabulary, whose top candidates are rescored exactly (layers/vocab.py). Half the work.
at::Tensor q8_rank(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) { return q8_matmul(x, packed, scales, true); }

at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, bool one_code) {
  TORCH_CHECK(HAS_Q8, "q8_linear is not built for this instruction set");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous(), "q8_linear: bad weight");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "q8_linear: scales must be contiguous fp32");
  const Codes c(x);
  const int64_t M = c.M, K = c.K, G = c.G, NB = packed.size(0), N = NB * 16;
  const bool grouped = scales.dim() == 3;
  std::vector<int32_t> first_sums;
  if (one_code) {  // each group's sum of first codes (the + 128 correction of the dot products)
    first_sums.resize(M * G);
    for (int64_t i = 0; i < M * G; ++i) {
      int32_t total = 0;
      for (int64_t k = 0; k < GROUP; ++k) total += c.q1[i * GROUP + k];
      first_sums[i] = total;
    }
  }
  TORCH_CHECK(packed.size(1) * 4 == K && packed.size(2) == 64 && scales.numel() == (grouped ? N * G : N), "q8_linear: shapes do not match");
  auto y = at::empty({M, N}, at::kFloat);
  if (M == 0) return y;
  const uint8_t* W = packed.data_ptr<uint8_t>();
  const float* S = scales.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  // Row blocks per chunk: at least 16 for the vocabulary's tens of thousands of rows (its K is small).
  dynamic_for(0, NB, std::max<int64_t>(grouped ? 1 : 16, chunk_for(NB)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t r = 0; r < M; r += MAX_ROWS) {
        const int64_t count = std::min<int64_t>(MAX_ROWS, M - r);
        if (grouped && one_code) rows8<MAX_ROWS, true, true>(W + b * (K / 4) * 64, S + b * G * 16, K, c, first_sums.data(), r, count, Y, N, b * 16);
        else if (grouped) rows8<MAX_ROWS, true>(W + b * (K / 4) * 64, S + b * G * 16, K, c, c.cs, r, count, Y, N, b * 16);
        else if (one_code) rows8<MAX_ROWS, false, true>(W + b * (K / 4) * 64, S + b * 16, K, c, first_sums.data(), r, count, Y, N, b * 16);
        else rows8<MAX_ROWS, false>(W + b * (K / 4) * 64, S + b * 16, K, c, c.cs, r, count, Y, N, b * 16);
      }
  });
  return y;
}
