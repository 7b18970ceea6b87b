// A decoder layer's glue, fused: the residual adds and RMS norms, q/k norms + rotary + the KV-cache
// write, and the gated activation. In torch these were ~30 small operators per layer (and their
// Python), most of a 1-stream decode step's time (perf/README.md). Plain C++ loops under
// `#pragma omp simd`, so they vectorise for whatever ISA the module is built for; rows run in
// parallel only when a step has enough of them (prefill chunks) to pay for waking the team.
#include "codes.h"

namespace {

// exp(x), about 2 ulp over fp32's range (Cephes' expf: round to n = x / ln 2, a degree-6 polynomial on
// the remainder, times 2^n built in the exponent bits): act_mul's tail lanes; its vector form is vexp (codes.h).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return e * __builtin_bit_cast(float, bits);
}

using namespace llm_kernels::vec;
using llm_kernels::LANES;
using llm_kernels::Vec;

// silu(g) * u and gelu_tanh(g) * u (1 + tanh(y) = 2 - 2 / (e^2y + 1)) per lane: written with the vector
// operations because gcc leaves the scalar loop's clamp as a branch and would not vectorise it (it ran
// scalar: 6.6 us per 1536-wide row).
inline Vec silu_mul(Vec g, Vec u) { return vdiv(vmul(g, u), vadd(vset(1.f), vexp(vsub(vzero(), g)))); }
inline Vec gelu_mul(Vec x, Vec u) {
  const Vec y2 = vmul(vset(2.f * 0.7978845608028654f), vfmadd(vmul(vset(0.044715f), vmul(x, x)), x, x));
  const Vec one_plus_tanh = vsub(vset(2.f), vdiv(vset(2.f), vadd(vexp(y2), vset(1.f))));
  return vmul(vmul(vset(0.5f), x), vmul(one_plus_tanh, u));
}

constexpr int64_t PARALLEL_ELEMENTS = 1 << 15;  // below this a step's rows run on the calling thread

template <typename F>
void for_rows(int64_t rows, int64_t per_row, const F& fn) {
  if (rows * per_row < PARALLEL_ELEMENTS) {
    fn(0, rows);
  } else {
    at::parallel_for(0, rows, std::max<int64_t>(1, PARALLEL_ELEMENTS / per_row / 4), fn);
  }
}

inline float inv_rms(const float* x, int64_t n, float eps) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return 1.f / std::sqrt(s / static_cast<float>(n) + eps);
}

void check_f32_rows(const at::Tensor& t, int64_t cols, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(1) == cols && t.stride(1) == 1, what, ": fp32 [rows, ", cols, "] with unit column stride");
}

}  // namespace

// x [T, Hd] fp32 contiguous, updated in place: x += y (y fp32 [T, Hd], any row stride), or, with w_y,
// x += rms_norm(y) * w_y (Gemma's sandwich norms). Returns rms_norm(x) * w_out, or an empty tensor
// without w_out. Norm weights are fp32 [Hd] (Gemma's stored as 1 + w).
at::Tensor residual_norm(at::Tensor x, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& w_y,
                         const std::optional<at::Tensor>& w_out, double eps_in) {
  TORCH_CHECK(x.is_contiguous(), "residual_norm: x must be contiguous");
  const int64_t T = x.size(0), Hd = x.size(1);
  check_f32_rows(x, Hd, "residual_norm: x");
  if (y) check_f32_rows(*y, Hd, "residual_norm: y");
  TORCH_CHECK(!w_y || y, "residual_norm: w_y without y");
  for (const auto* w : {&w_y, &w_out})
    if (*w) TORCH_CHECK((*w)->scalar_type() == at::kFloat && (*w)->is_contiguous() && (*w)->numel() == Hd, "residual_norm: norm weights fp32 [", Hd, "]");
  at::Tensor out = w_out ? at::empty({T, Hd}, at::kFloat) : at::empty({0}, at::kFloat);
  float* X = x.data_ptr<float>();
  const float* Y = y ? y->data_ptr<float>() : nullptr;
  const int64_t ys = y ? y->stride(0) : 0;
  const float* WY = w_y ? w_y->data_ptr<float>() : nullptr;
  const float* WO = w_out ? w_out->data_ptr<float>() : nullptr;
  float* O = w_out ? out.data_ptr<float>() : nullptr;
  const float eps = static_cast<float>(eps_in);
  for_rows(T, Hd, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* xr = X + t * Hd;
      if (Y) {
        const float* yr = Y + t * ys;
        if (WY) {
          const float inv = inv_rms(yr, Hd, eps);
#pragma omp simd
          for (int64_t i = 0; i < Hd; ++i) xr[i] += yr[i] * inv * WY[i];
        } else {
#pragma omp simd
          for (int64_t i = 0; i < Hd; ++i) xr[i] += yr[i];
        }
      }
      if (O) {
        const float inv = inv_rms(xr, Hd, eps);
        float* o = O + t * Hd;
#pragma omp simd
        for (int64_t i = 0; i < Hd; ++i) o[i] = WO[i] * (xr[i] * inv);
      }
    }
  });
  return out;
}

namespace {

// One head of D values: optional RMS norm (weight w), then rotate-half rotary with cos/sin rows c, s.
inline void norm_rotate(const float* in, float* out, const float* w, float eps, const float* c, const float* s, int64_t D) {
  float buf[512];
  const float* h = in;
  if (w) {
    const float inv = inv_rms(in, D, eps);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) buf[i] = in[i] * inv * w[i];
    h = buf;
  }
  const int64_t half = D / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    out[i] = h[i] * c[i] - h[i + half] * s[i];
    out[i + half] = h[i + half] * c[i + half] + h[i] * s[i + half];
  }
}

template <typename C>
void store_row(const float* src, C* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<C>(src[i]);
}

template <typename C>
void rope_kv_impl(const float* QKV, int64_t qs, const int64_t* pos, const float* COS, const float* SIN, const float* QKN, float eps,
                  C* KC, C* VC, const int64_t* slots, int64_t T, int64_t H, int64_t KVH, int64_t D, float* Q) {
  for_rows(T, (H + 2 * KVH) * D, [&](int64_t t0, int64_t t1) {
    float kbuf[512];
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = QKV + t * qs;
      const float* c = COS + pos[t] * D;
      const float* s = SIN + pos[t] * D;
      for (int64_t h = 0; h < H; ++h) norm_rotate(row + h * D, Q + (t * H + h) * D, QKN ? QKN + h * D : nullptr, eps, c, s, D);
      C* kd = KC + slots[t] * KVH * D;
      C* vd = VC + slots[t] * KVH * D;
      for (int64_t h = 0; h < KVH; ++h) {
        norm_rotate(row + (H + h) * D, kbuf, QKN ? QKN + (H + h) * D : nullptr, eps, c, s, D);
        store_row(kbuf, kd + h * D, D);
        store_row(row + (H + KVH + h) * D, vd + h * D, D);
      }
    }
  });
}

}  // namespace

// qkv [T, (H + 2 KVH) * D] fp32 (any row stride); positions [T] int64; cos, sin [P, D] fp32 tables (rows by
// position); qk_norm fp32 [H + KVH, D] or None (Gemma: each q and k head RMS-normed first); k_cache,
// v_cache [slots, KVH, D] fp32 or bf16; slots [T] int64. Writes each token's rotated k and its v into
// its slot; returns q [T, H, D] fp32, normed and rotated.
at::Tensor rope_kv(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                   const std::optional<at::Tensor>& qk_norm, double eps, at::Tensor k_cache, at::Tensor v_cache,
                   const at::Tensor& slots, int64_t H, int64_t KVH) {
  const int64_t T = qkv.size(0), D = cos.size(1);
  TORCH_CHECK(D % 2 == 0 && D <= 512, "rope_kv: head_dim must be even and at most 512");
  check_f32_rows(qkv, (H + 2 * KVH) * D, "rope_kv: qkv");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
              sin.sizes() == cos.sizes(), "rope_kv: cos/sin fp32 [positions, head_dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && positions.is_contiguous() &&
              slots.is_contiguous() && positions.numel() == T && slots.numel() == T, "rope_kv: positions and slots int64 [T]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3 && k_cache.size(1) == KVH &&
              k_cache.size(2) == D && v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "rope_kv: caches [slots, kv_heads, head_dim]");
  if (qk_norm) TORCH_CHECK(qk_norm->scalar_type() == at::kFloat && qk_norm->is_contiguous() && qk_norm->numel() == (H + KVH) * D, "rope_kv: qk_norm fp32 [H + KVH, D]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0) && sl[t] >= 0 && sl[t] < k_cache.size(0), "rope_kv: position or slot out of range");
  auto q = at::empty({T, H, D}, at::kFloat);
  const float* qkn = qk_norm ? qk_norm->data_ptr<float>() : nullptr;
  if (k_cache.scalar_type() == at::kFloat) {
    rope_kv_impl<float>(qkv.data_ptr<float>(), qkv.stride(0), pos, cos.data_ptr<float>(), sin.data_ptr<float>(), qkn, (float)eps,
                        k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), sl, T, H, KVH, D, q.data_ptr<float>());
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16, "rope_kv: caches fp32 or bf16");
    rope_kv_impl<at::BFloat16>(qkv.data_ptr<float>(), qkv.stride(0), pos, cos.data_ptr<float>(), sin.data_ptr<float>(), qkn, (float)eps,
                               k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(), sl, T, H, KVH, D, q.data_ptr<float>());
  }
  return q;
}

// gate_up [T, 2I] fp32 (any row stride): act(gate) * up -> [T, I] fp32; act 0 = SiLU, 1 = GELU (tanh
// approximation, transformers' gelu_pytorch_tanh).
at::Tensor act_mul(const at::Tensor& gate_up, int64_t act) {
  TORCH_CHECK(act == 0 || act == 1, "act_mul: act 0 (silu) or 1 (gelu_tanh)");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "act_mul: gate_up [T, 2I]");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  check_f32_rows(gate_up, 2 * I, "act_mul: gate_up");
  auto out = at::empty({T, I}, at::kFloat);
  const float* G = gate_up.data_ptr<float>();
  const int64_t gs = gate_up.stride(0);
  float* O = out.data_ptr<float>();
  const int64_t vec_end = I - I % LANES;
  for_rows(T, I, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* g = G + t * gs;
      const float* u = g + I;
      float* o = O + t * I;
      for (int64_t i = 0; i < vec_end; i += LANES) vstore(o + i, act == 0 ? silu_mul(vload(g + i), vload(u + i)) : gelu_mul(vload(g + i), vload(u + i)));
      for (int64_t i = vec_end; i < I; ++i) {
        const float x = g[i];
        o[i] = act == 0 ? x / (1.f + exp_approx(-x)) * u[i]
                        : 0.5f * x * (2.f - 2.f / (exp_approx(2.f * 0.7978845608028654f * (x + 0.044715f * x * x * x)) + 1.f)) * u[i];
      }
    }
  });
  return out;
}
