// LoRA for a mixed batch: each token through its own adapter's A and B (a BGMV, as Punica's).
#include "codes.h"

#include <type_traits>

namespace {

using llm_kernels::dot;
using llm_kernels::load_f;

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
      for (int64_t r = 0; r < R; ++r) h[i * R + r] = dot(a + ((p * S + s) * R + r) * in, x + t * in, in);
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
        const float* coef = h.data() + (t * P + p) * R;
#ifdef Q4_AVX512
        if constexpr (std::is_same_v<Y, float>) {  // 16 outputs in a register across all R ranks
          int64_t o = lo;
          for (; o + 16 <= hi; o += 16) {
            __m512 v = _mm512_loadu_ps(y + t * out + o);
            for (int64_t r = 0; r < R; ++r) v = _mm512_fmadd_ps(_mm512_set1_ps(coef[r]), llm_kernels::load16(bt + (s * R + r) * out + o), v);
            _mm512_storeu_ps(y + t * out + o, v);
          }
          for (; o < hi; ++o) {
            float v = y[t * out + o];
            for (int64_t r = 0; r < R; ++r) v += coef[r] * load_f(bt + (s * R + r) * out, o);
            y[t * out + o] = v;
          }
          continue;
        }
#endif
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
void lora_add_wx(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt, const int64_t* slots,
                 const std::vector<int64_t>& parts, int64_t R, int64_t S) {
  const int64_t T = x.size(0), in = x.size(1), out = y.size(1);
  if (y.scalar_type() == at::kFloat)
    lora_add_impl<W, X, float>(y.data_ptr<float>(), x.data_ptr<X>(), a.data_ptr<W>(), bt.data_ptr<W>(), slots, parts, T, in, out, R, S);
  else
    lora_add_impl<W, X, at::BFloat16>(y.data_ptr<at::BFloat16>(), x.data_ptr<X>(), a.data_ptr<W>(), bt.data_ptr<W>(), slots, parts, T, in,
                                      out, R, S);
}

template <typename W>
void lora_add_w(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt, const int64_t* slots,
                const std::vector<int64_t>& parts, int64_t R, int64_t S) {
  if (x.scalar_type() == at::kFloat) lora_add_wx<W, float>(y, x, a, bt, slots, parts, R, S);
  else lora_add_wx<W, at::BFloat16>(y, x, a, bt, slots, parts, R, S);
}

}  // namespace

// y [T, out] += per token t with slots[t] >= 0: for each part p (output columns by `parts`),
// (A[(p * S + slots[t]) * R : +R] @ x[t]) @ Bt[slots[t] * R : +R, columns of p].
// x [T, in] fp32/bf16; a [P * S * R, in], bt [S * R, out] of one dtype (fp32/bf16); y fp32/bf16, contiguous.
void lora_add(at::Tensor y, const at::Tensor& x_in, const at::Tensor& a, const at::Tensor& bt,
              const at::Tensor& slots_in, std::vector<int64_t> parts, int64_t R, int64_t S) {
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
  if (a.scalar_type() == at::kFloat) lora_add_w<float>(y, x, a, bt, slots.data_ptr<int64_t>(), parts, R, S);
  else lora_add_w<at::BFloat16>(y, x, a, bt, slots.data_ptr<int64_t>(), parts, R, S);
}
