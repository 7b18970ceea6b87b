// Paged decode attention: one query per sequence, keys and values read in place from their blocks.
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
      const int64_t start = first + sp * chunk, stop = std::min(len, start + chunk);
      if (stop <= start) continue;
      for (int64_t g = 0; g < group * D; ++g) qf[g] = load_f(q, (s * H + kh * group) * D + g) * scale;
      chunk_partial(qf.data(), kc, vc, tables + s * max_blocks, KVH, kh, D, group, block_size, start, stop, scores,
                    part_max.data() + w * group, part_sum.data() + w * group, part_acc.data() + w * group * D);
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

// q [n, H, D]; k_cache, v_cache [slots, KVH, D] (q's dtype: fp32 or bf16); block_tables [n, max_blocks] int64;
// context_lens [n] int64 (each sequence attends to its positions [max(0, len - window), len); window 0 = all).
at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& block_tables, const at::Tensor& context_lens,
                                     int64_t block_size, int64_t window, double scale) {
  const at::Tensor q = q_in.contiguous();
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "paged_decode_attention: dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "paged_decode_attention: int64 tables");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && H % KVH == 0 && block_tables.size(0) == n && context_lens.size(0) == n, "paged_decode_attention: shapes differ");
  const at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  auto out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    decode_attention<float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tables.data_ptr<int64_t>(),
                            lens.data_ptr<int64_t>(), out.data_ptr<float>(), n, H, KVH, D, tables.size(1), block_size, window, (float)scale);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "paged_decode_attention: fp32 or bf16");
    decode_attention<at::BFloat16>(q.data_ptr<at::BFloat16>(), k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(),
                                   tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<at::BFloat16>(), n, H, KVH, D,
                                   tables.size(1), block_size, window, (float)scale);
  }
  return out;
}

