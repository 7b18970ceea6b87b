// Paged decode attention: one query per sequence, keys and values read in place from their blocks
// (fp32 or bf16 caches; queries fp32 or bf16). Work items are (sequence, context chunk), every KV head.
// With head_dim a multiple of the vector width, each item runs tiles of 16 keys (AVX-512) or 8 (AVX2): the
// tile's whole cache rows are read (bf16 widened) once, one after another, then each KV head's group of
// scores comes out of one transpose-add of partial-dot vectors, the softmax is online (running max and
// sum per query head), exp is a polynomial in the vector lanes. Elsewhere a portable loop
// (`chunk_partial`) computes the same partials.
#include "codes.h"

#include <type_traits>

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

using llm_kernels::LANES;
constexpr int64_t PROMPT_ROWS = 8;  // a prompt's rows per work item (each key tile read once for them)
using llm_kernels::TILE;
using llm_kernels::Vec;
using namespace llm_kernels::vec;

// A tile's keys' and values' whole cache rows (every KV head) as fp32: fp32 caches are read in place, bf16
// ones widened into `buf` a row after another, so a block streams from memory as one contiguous run. Each
// head's slice widened where it was used (three strided passes over a block for SmolLM2's three KV heads)
// was 1.2-1.45x slower per step's attention here, its 10-stream decode step ~5-10%. A short last tile
// repeats its first row (its weights are 0): fixed trip counts.
template <typename T>
void tile_rows(const T* kc, const T* vc, const int64_t* table, int64_t block_size, int64_t row, int64_t t0, int64_t count, float* buf,
               const float** krows, const float** vrows) {
  for (int64_t j = 0; j < count; ++j) {
    const int64_t t = t0 + j, at = (table[t / block_size] * block_size + t % block_size) * row;
    if constexpr (std::is_same_v<T, float>) {
      krows[j] = kc + at, vrows[j] = vc + at;
    } else {
      float* kb = buf + j * row;
      float* vb = buf + (TILE + j) * row;
      for (int64_t c = 0; c < row; c += LANES) vstore(kb + c, vwiden(kc + at + c));
      for (int64_t c = 0; c < row; c += LANES) vstore(vb + c, vwiden(vc + at + c));
      krows[j] = kb, vrows[j] = vb;
    }
  }
  for (int64_t j = count; j < TILE; ++j) krows[j] = krows[0], vrows[j] = vrows[0];
}

// One tile of TILE keys for one KV head's group of query heads (`krow`, `vrow`: the keys' rows of this
// head; keys [skip, count) of the tile attended): the group's TILE scores come out of one transpose-add of
// TILE partial-dot vectors, the softmax is online (running max and sum per query head), exp is a
// polynomial in the lanes.
inline void tile(const float* qf, const float* const* krow, const float* const* vrow, int64_t skip, int64_t count, int64_t D, int64_t group,
                 float* mx, float* sum, float* acc) {
  alignas(64) float p[TILE];
  Vec part[TILE];
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = qf + g * D;
    for (int64_t j = 0; j < TILE; ++j) part[j] = vzero();
    for (int64_t c = 0; c < D; c += LANES) {  // the keys' partial dots are independent chains (one per key)
      const Vec qc = vload(qg + c);
      for (int64_t j = 0; j < TILE; ++j) part[j] = vfmadd(qc, vload(krow[j] + c), part[j]);  // (lanes past count are masked)
    }
    const Vec scores = between(skip, count, reduce(part), -INFINITY);
    const float top = std::max(mx[g], hmax(scores));
    const float factor = std::exp(mx[g] - top);  // 0 on the first tile (mx = -inf)
    const Vec e = between(skip, count, vexp(vsub(scores, vset(top))), 0.f);
    sum[g] = sum[g] * factor + hsum(e);
    mx[g] = top;
    vstore(p, e);
    float* a = acc + g * D;
    const Vec f = vset(factor);
    Vec pj[TILE];  // each key's weight in every lane, once per tile (not once per D / LANES columns)
    for (int64_t j = 0; j < TILE; ++j) pj[j] = vset(p[j]);  // p[j] = 0 past count
    for (int64_t c = 0; c < D; c += LANES) {
      Vec v = vmul(vload(a + c), f);
      for (int64_t j = 0; j < TILE; ++j) v = vfmadd(pj[j], vload(vrow[j] + c), v);
      vstore(a + c, v);
    }
  }
}

// `tile` for every KV head of one query row (qf, mx, sum, acc at the row's first head; `krows`, `vrows`: the
// tile's whole cache rows).
inline void tile_heads(const float* qf, const float* const* krows, const float* const* vrows, int64_t skip, int64_t count, int64_t KVH,
                       int64_t D, int64_t group, float* mx, float* sum, float* acc) {
  const float* k[TILE];
  const float* v[TILE];
  for (int64_t kh = 0; kh < KVH; ++kh) {
    for (int64_t j = 0; j < TILE; ++j) k[j] = krows[j] + kh * D, v[j] = vrows[j] + kh * D;
    tile(qf + kh * group * D, k, v, skip, count, D, group, mx + kh * group, sum + kh * group, acc + kh * group * D);
  }
}

// A tile's buffer for bf16 caches' widened rows (64-byte aligned: a vector load across two cache lines costs two).
template <typename T>
float* tile_buffer(int64_t row) {
  thread_local std::vector<float> storage;
  if constexpr (std::is_same_v<T, float>) return nullptr;
  storage.resize(2 * TILE * row + 16);
  return storage.data() + (16 - reinterpret_cast<uintptr_t>(storage.data()) / sizeof(float) % 16) % 16;
}

// chunk_partial's partials for context [start, stop) of one sequence, every KV head, TILE keys at a time.
template <typename T>
void tiles(const float* qf, const T* kc, const T* vc, const int64_t* table, int64_t KVH, int64_t D, int64_t group, int64_t block_size,
           int64_t start, int64_t stop, float* mx, float* sum, float* acc) {
  const int64_t row = KVH * D;
  float* buf = tile_buffer<T>(row);
  const float* krows[TILE];
  const float* vrows[TILE];
  for (int64_t t0 = start; t0 < stop; t0 += TILE) {
    const int64_t count = std::min(TILE, stop - t0);
    tile_rows(kc, vc, table, block_size, row, t0, count, buf, krows, vrows);
    tile_heads(qf, krows, vrows, 0, count, KVH, D, group, mx, sum, acc);
  }
}

// One output row from its chunks' partials (`splits` of them, `stride` heads apart): rescaled to the
// largest max and normalised; empty chunks (sum 0) are skipped.
template <typename T>
void merge_chunks(const float* mx, const float* sum, const float* acc, int64_t splits, int64_t stride, int64_t D, T* out) {
  float top = -INFINITY, total = 0;
  for (int64_t sp = 0; sp < splits; ++sp) top = std::max(top, mx[sp * stride]);
  std::vector<float> merged(D, 0.f);
  for (int64_t sp = 0; sp < splits; ++sp) {
    if (sum[sp * stride] == 0.f) continue;
    const float w = std::exp(mx[sp * stride] - top);
    total += sum[sp * stride] * w;
    for (int64_t d = 0; d < D; ++d) merged[d] += acc[sp * stride * D + d] * w;
  }
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(merged[d] / total);
}

// An item's whole context in one chunk: its heads' outputs are their value sums over their exp sums.
template <typename T>
void finish_heads(const float* sum, const float* acc, int64_t heads, int64_t D, T* out) {
  for (int64_t g = 0; g < heads; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(acc[g * D + d] / sum[g]);
}

// Consecutive positions of one sequence (`rows` of a prompt chunk, context lengths ctx[0] + i, causal): each
// tile of keys is read (bf16 widened) once for all of them, then every row's heads run `tile` over the keys
// of it they attend. Tiles start where the first row's context does, so a row whose context starts there
// (every row, without a window) gets the same partials, in the same order, as a decode at its position.
template <typename TQ, typename T>
void prompt_rows(const TQ* q, const T* kc, const T* vc, const int64_t* table, const int64_t* ctx, int64_t rows, int64_t H, int64_t KVH,
                 int64_t D, int64_t block_size, int64_t window, float scale, TQ* out) {
  const int64_t group = H / KVH, row = KVH * D;
  thread_local std::vector<float> qf, mx, sum, acc;
  qf.resize(rows * H * D);
  for (int64_t i = 0; i < rows * H * D; ++i) qf[i] = load_f(q, i) * scale;
  mx.assign(rows * H, -INFINITY), sum.assign(rows * H, 0.f), acc.assign(rows * H * D, 0.f);
  float* buf = tile_buffer<T>(row);
  const float* krows[TILE];
  const float* vrows[TILE];
  const int64_t lo = window > 0 ? std::max<int64_t>(0, ctx[0] - window) : 0, hi = ctx[rows - 1];
  for (int64_t t0 = lo; t0 < hi; t0 += TILE) {
    tile_rows(kc, vc, table, block_size, row, t0, std::min(TILE, hi - t0), buf, krows, vrows);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t first = window > 0 ? std::max<int64_t>(0, ctx[r] - window) : 0;
      const int64_t skip = std::max<int64_t>(0, first - t0), count = std::min(TILE, ctx[r] - t0);
      if (count > skip)
        tile_heads(qf.data() + r * H * D, krows, vrows, skip, count, KVH, D, group, mx.data() + r * H, sum.data() + r * H, acc.data() + r * H * D);
    }
  }
  for (int64_t r = 0; r < rows; ++r) finish_heads(sum.data() + r * H, acc.data() + r * H * D, H, D, out + r * H * D);
}

template <typename TQ, typename T>
void decode_attention(const TQ* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* ctx, TQ* out,
                      int64_t n, int64_t H, int64_t KVH, int64_t D, int64_t max_blocks, int64_t block_size,
                      int64_t window, float scale) {
  const int64_t group = H / KVH;
  if (D % LANES == 0) {  // runs of a prompt chunk's rows (the same table, consecutive positions) go together
    std::vector<int64_t> runs{0};
    for (int64_t s = 1; s <= n; ++s)
      if (s == n || s - runs.back() == PROMPT_ROWS || ctx[s] != ctx[s - 1] + 1 ||
          !std::equal(tables + s * max_blocks, tables + (s + 1) * max_blocks, tables + (s - 1) * max_blocks))
        runs.push_back(s);
    if (static_cast<int64_t>(runs.size()) <= n) {  // some run of several rows: one work item per run
      llm_kernels::dynamic_for(0, static_cast<int64_t>(runs.size()) - 1, 1, [&](int64_t w0, int64_t w1) {
        for (int64_t w = w0; w < w1; ++w) {
          const int64_t s = runs[w];
          prompt_rows(q + s * H * D, kc, vc, tables + s * max_blocks, ctx + s, runs[w + 1] - s, H, KVH, D, block_size, window, scale,
                      out + s * H * D);
        }
      });
      return;
    }
  }
  // Few sequences with long contexts: split each context into chunks (flash-decoding's split-K) so
  // every thread has work, then merge the chunks' softmax partials. Work items: (sequence, chunk), every
  // KV head inside, a tile at a time across the heads: each key's whole cache row is read at once.
  int64_t longest = 0;
  for (int64_t s = 0; s < n; ++s) longest = std::max(longest, ctx[s]);
  int64_t splits = 1;
  while (n * splits < 4 * at::get_num_threads() && longest / (2 * splits) >= 32) splits *= 2;
  const int64_t items = n * splits;
  std::vector<float> part_max(items * H, -INFINITY), part_sum(items * H, 0.f), part_acc(items * H * D, 0.f);
  llm_kernels::dynamic_for(0, items, 1, [&](int64_t w0, int64_t w1) {
    thread_local std::vector<float> qf, scores;  // dynamic_for calls this once per item: no allocation per call
    qf.resize(H * D);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t s = w / splits, sp = w % splits, len = ctx[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t chunk = (len - first + splits - 1) / splits;
      const int64_t start = first + sp * chunk, stop = std::min(len, start + chunk);
      if (stop <= start) continue;
      for (int64_t i = 0; i < H * D; ++i) qf[i] = load_f(q, s * H * D + i) * scale;
      float* mx = part_max.data() + w * H;
      float* sum = part_sum.data() + w * H;
      float* acc = part_acc.data() + w * H * D;
      const int64_t* table = tables + s * max_blocks;
      if (D % LANES == 0) {
        tiles(qf.data(), kc, vc, table, KVH, D, group, block_size, start, stop, mx, sum, acc);
      } else {
        for (int64_t kh = 0; kh < KVH; ++kh)
          chunk_partial(qf.data() + kh * group * D, kc, vc, table, KVH, kh, D, group, block_size, start, stop, scores, mx + kh * group,
                        sum + kh * group, acc + kh * group * D);
      }
      if (splits == 1) finish_heads(sum, acc, H, D, out + s * H * D);
    }
  });
  if (splits == 1) return;
  for (int64_t s = 0; s < n; ++s)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t first = s * splits * H + h;
      merge_chunks(part_max.data() + first, part_sum.data() + first, part_acc.data() + first * D, splits, H, D, out + (s * H + h) * D);
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
