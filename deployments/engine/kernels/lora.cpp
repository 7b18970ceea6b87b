// LoRA for a mixed batch: each token through its own adapter's A and B (Punica's BGMV/SGMV).
#include "codes.h"

#include <type_traits>

namespace {

using llm_kernels::dot;
using llm_kernels::load_f;

constexpr int64_t TOKENS = 4;  // tokens of one adapter sharing each load of its A and B rows
constexpr int64_t RANKS = 4;   // rank rows of A per work item

// out[j] = scale * row . x[ts[j]] for n <= TOKENS tokens: the row is read once for all of them.
template <typename W, typename X>
void dots(const W* row, float scale, const X* x, const int64_t* ts, int64_t n, int64_t in, float* out) {
#ifdef Q4_AVX512
  if constexpr (std::is_same_v<X, float>) {
    if (in % 16 == 0) {
      __m512 acc[TOKENS];
      for (int64_t j = 0; j < n; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t k = 0; k < in; k += 16) {
        const __m512 w = llm_kernels::load16(row + k);
        for (int64_t j = 0; j < n; ++j) acc[j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + ts[j] * in + k), acc[j]);
      }
      for (int64_t j = 0; j < n; ++j) out[j] = scale * _mm512_reduce_add_ps(acc[j]);
      return;
    }
  }
#endif
  for (int64_t j = 0; j < n; ++j) out[j] = scale * dot(row, x + ts[j] * in, in);
}

// y[ts[j], lo:hi] += sum_r coef[j][r] * Bt[r, lo:hi] for n <= TOKENS tokens of one adapter (bt: its R rows).
template <typename W, typename Y>
void b_rows(Y* y, const W* bt, const float* const* coef, const int64_t* ts, int64_t n, int64_t lo, int64_t hi, int64_t out,
            int64_t R, float* scratch) {
  int64_t o = lo;
#ifdef Q4_AVX512
  if constexpr (std::is_same_v<Y, float>) {  // 16 outputs per token in a register across all R ranks
    for (; o + 16 <= hi; o += 16) {
      __m512 acc[TOKENS];
      for (int64_t j = 0; j < n; ++j) acc[j] = _mm512_loadu_ps(y + ts[j] * out + o);
      for (int64_t r = 0; r < R; ++r) {
        const __m512 b = llm_kernels::load16(bt + r * out + o);
        for (int64_t j = 0; j < n; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(coef[j][r]), b, acc[j]);
      }
      for (int64_t j = 0; j < n; ++j) _mm512_storeu_ps(y + ts[j] * out + o, acc[j]);
    }
  }
#endif
  if (o >= hi) return;
  for (int64_t j = 0; j < n; ++j) {  // the rest (bf16 outputs, a tail): a row in fp32, vectorised over outputs
    Y* dst = y + ts[j] * out + o;
#pragma omp simd
    for (int64_t i = 0; i < hi - o; ++i) scratch[i] = load_f(dst, i);
    for (int64_t r = 0; r < R; ++r) {
      const float c = coef[j][r];
      const W* src = bt + r * out + o;
#pragma omp simd
      for (int64_t i = 0; i < hi - o; ++i) scratch[i] += c * load_f(src, i);
    }
    for (int64_t i = 0; i < hi - o; ++i) dst[i] = static_cast<Y>(scratch[i]);
  }
}

// Tokens are grouped by adapter slot (as Punica's SGMV segments): each adapter's A and B rows are
// read once per step for up to TOKENS of its tokens, not once per token.
// int8 adapters (W = int8_t) come with a scale per row of A and of Bt (sa, sb); others pass null.
template <typename W, typename X, typename Y>
void lora_add_impl(Y* y, const X* x, const W* a, const W* bt, const int64_t* slots, const std::vector<int64_t>& parts,
                   int64_t T, int64_t in, int64_t out, int64_t R, int64_t S, const float* sa, const float* sb) {
  const int64_t P = static_cast<int64_t>(parts.size());
  std::vector<int64_t> starts(P + 1, 0);
  for (int64_t p = 0; p < P; ++p) starts[p + 1] = starts[p] + parts[p];
  std::vector<std::vector<int64_t>> tokens(S);  // per slot, its tokens
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slots[t] < S, "lora_add: slot ", slots[t], " of ", S);
    if (slots[t] >= 0) tokens[slots[t]].push_back(t);
  }
  std::vector<int64_t> used;  // slots with tokens in this step
  for (int64_t s = 0; s < S; ++s)
    if (!tokens[s].empty()) used.push_back(s);
  const int64_t U = static_cast<int64_t>(used.size());
  std::vector<float> h(T * P * R, 0.f);  // h[t, p, :] = A[p, slot(t)] x_t
  const int64_t RB = (R + RANKS - 1) / RANKS;  // items of RANKS rank rows: enough to balance two threads
  at::parallel_for(0, U * P * RB, 1, [&](int64_t i0, int64_t i1) {
    float part[TOKENS];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = used[i / (P * RB)], p = i / RB % P, r0 = i % RB * RANKS;
      const std::vector<int64_t>& ts = tokens[s];
      for (size_t j0 = 0; j0 < ts.size(); j0 += TOKENS) {
        const int64_t n = std::min<int64_t>(TOKENS, ts.size() - j0);
        for (int64_t r = r0; r < std::min(R, r0 + RANKS); ++r) {
          const int64_t row = (p * S + s) * R + r;
          dots(a + row * in, sa ? sa[row] : 1.f, x, ts.data() + j0, n, in, part);
          for (int64_t j = 0; j < n; ++j) h[(ts[j0 + j] * P + p) * R + r] = part[j];
        }
      }
    }
  });
  at::parallel_for(0, out, 64, [&](int64_t o0, int64_t o1) {  // y[t, o0:o1] += h[t, part] @ Bt[slot(t), o0:o1]
    const float* coef[TOKENS];
    std::vector<float> scratch(o1 - o0), scaled(sb ? TOKENS * R : 0);  // int8: h times Bt's row scales
    for (int64_t s : used) {
      const std::vector<int64_t>& ts = tokens[s];
      for (int64_t p = 0; p < P; ++p) {
        const int64_t lo = std::max(o0, starts[p]), hi = std::min(o1, starts[p + 1]);
        if (lo >= hi) continue;
        for (size_t j0 = 0; j0 < ts.size(); j0 += TOKENS) {
          const int64_t n = std::min<int64_t>(TOKENS, ts.size() - j0);
          for (int64_t j = 0; j < n; ++j) {
            coef[j] = h.data() + (ts[j0 + j] * P + p) * R;
            if (sb) {
              for (int64_t r = 0; r < R; ++r) scaled[j * R + r] = coef[j][r] * sb[s * R + r];
              coef[j] = scaled.data() + j * R;
            }
          }
          b_rows(y, bt + s * R * out, coef, ts.data() + j0, n, lo, hi, out, R, scratch.data());
        }
      }
    }
  });
}

template <typename W, typename X>
void lora_add_wx(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt, const int64_t* slots,
                 const std::vector<int64_t>& parts, int64_t R, int64_t S, const float* sa, const float* sb) {
  const int64_t T = x.size(0), in = x.size(1), out = y.size(1);
  if (y.scalar_type() == at::kFloat)
    lora_add_impl<W, X, float>(y.data_ptr<float>(), x.data_ptr<X>(), a.data_ptr<W>(), bt.data_ptr<W>(), slots, parts, T, in, out, R, S,
                               sa, sb);
  else
    lora_add_impl<W, X, at::BFloat16>(y.data_ptr<at::BFloat16>(), x.data_ptr<X>(), a.data_ptr<W>(), bt.data_ptr<W>(), slots, parts, T, in,
                                      out, R, S, sa, sb);
}

template <typename W>
void lora_add_w(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt, const int64_t* slots,
                const std::vector<int64_t>& parts, int64_t R, int64_t S, const float* sa, const float* sb) {
  if (x.scalar_type() == at::kFloat) lora_add_wx<W, float>(y, x, a, bt, slots, parts, R, S, sa, sb);
  else lora_add_wx<W, at::BFloat16>(y, x, a, bt, slots, parts, R, S, sa, sb);
}

}  // namespace

// y [T, out] += per token t with slots[t] >= 0: for each part p (output columns by `parts`),
// (A[(p * S + slots[t]) * R : +R] @ x[t]) @ Bt[slots[t] * R : +R, columns of p].
// x [T, in] fp32/bf16; a [P * S * R, in], bt [S * R, out] of one dtype: fp32, bf16, or int8 with fp32 scales
// per row (a_scale [P * S * R], b_scale [S * R]; empty for the other dtypes); y fp32/bf16, contiguous.
void lora_add(at::Tensor y, const at::Tensor& x_in, const at::Tensor& a, const at::Tensor& bt,
              const at::Tensor& slots_in, std::vector<int64_t> parts, int64_t R, int64_t S, const at::Tensor& a_scale,
              const at::Tensor& b_scale) {
  const at::Tensor slots = slots_in.to(at::kLong).contiguous();
  const at::Tensor x = x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16
                              ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  TORCH_CHECK(y.is_contiguous() && a.is_contiguous() && bt.is_contiguous() && a.scalar_type() == bt.scalar_type(), "lora_add: layout");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16, "lora_add: y must be fp32 or bf16");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0) && slots.numel() == x.size(0), "lora_add: rows differ");
  int64_t total = 0;
  for (int64_t p : parts) total += p;
  TORCH_CHECK(total == y.size(1) && bt.size(1) == total && bt.size(0) == S * R && a.size(0) == (int64_t)parts.size() * S * R &&
              a.size(1) == x.size(1), "lora_add: shapes differ");
  const int64_t* ts = slots.data_ptr<int64_t>();
  if (a.scalar_type() == at::kChar) {
    TORCH_CHECK(a_scale.scalar_type() == at::kFloat && b_scale.scalar_type() == at::kFloat && a_scale.is_contiguous() &&
                b_scale.is_contiguous() && a_scale.numel() == a.size(0) && b_scale.numel() == bt.size(0), "lora_add: int8 adapters need fp32 row scales");
    lora_add_w<int8_t>(y, x, a, bt, ts, parts, R, S, a_scale.data_ptr<float>(), b_scale.data_ptr<float>());
  } else if (a.scalar_type() == at::kFloat) {
    lora_add_w<float>(y, x, a, bt, ts, parts, R, S, nullptr, nullptr);
  } else {
    lora_add_w<at::BFloat16>(y, x, a, bt, ts, parts, R, S, nullptr, nullptr);
  }
}
