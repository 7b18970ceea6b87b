// The vocabulary's last steps per decode step (layers/vocab.py, sampler.py): pick each row's top
// candidates of the int8 ranking and rescore them exactly from the 8-bit table, and greedy argmax.
// torch's topk and argmax over a [rows, 49k] row block took 0.2-0.7 ms and 0.5 ms at 10 rows here;
// one pass per row that skips 64-value blocks below the current k-th best is a few microseconds.
#include "codes.h"

namespace {

constexpr int64_t BLOCK = 64;

// The k largest values of row[0, n) by index into `top` (unordered); k <= n.
void top_k(const float* row, int64_t n, int64_t k, std::vector<int64_t>& top) {
  std::vector<std::pair<float, int64_t>> best;  // a min-heap of the k best so far
  best.reserve(k + 1);
  auto worse = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) { return a.first > b.first; };
  for (int64_t i = 0; i < k; ++i) best.emplace_back(row[i], i);
  std::make_heap(best.begin(), best.end(), worse);
  for (int64_t b = k; b < n; b += BLOCK) {
    const int64_t end = std::min(n, b + BLOCK);
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t i = b; i < end; ++i) m = std::max(m, row[i]);
    if (!(m > best.front().first)) continue;
    for (int64_t i = b; i < end; ++i) {
      if (row[i] > best.front().first) {
        std::pop_heap(best.begin(), best.end(), worse);
        best.back() = {row[i], i};
        std::push_heap(best.begin(), best.end(), worse);
      }
    }
  }
  top.clear();
  for (const auto& e : best) top.push_back(e.second);
}

}  // namespace

// logits [n, V] fp32 contiguous (the int8 ranking), updated in place: each row's `k` best are
// replaced by their exact scores x[r] . (codes[v] * scales[v] per group of 32). x [n, H] fp32,
// codes [V', H] int8 and scales [V', H / 32] fp32 with V' >= V.
void rescore_top(at::Tensor logits, const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales, int64_t k) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous(), "rescore_top: logits fp32 [n, V]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) == logits.size(0), "rescore_top: x fp32 [n, H]");
  const int64_t n = logits.size(0), V = logits.size(1), H = x.size(1), G = H / llm_kernels::GROUP;
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous() && codes.size(1) == H && codes.size(0) >= V,
              "rescore_top: codes int8 [V, H]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.size(0) == codes.size(0) && scales.size(1) == G &&
              H % llm_kernels::GROUP == 0, "rescore_top: scales fp32 [V, H / 32]");
  TORCH_CHECK(k >= 1 && k <= V, "rescore_top: k out of range");
  float* L = logits.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  const int8_t* C = codes.data_ptr<int8_t>();
  const float* S = scales.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> top;
    for (int64_t r = r0; r < r1; ++r) {
      float* row = L + r * V;
      const float* xr = X + r * H;
      top_k(row, V, k, top);
      for (int64_t v : top) {
        const int8_t* c = C + v * H;
        float total = 0;
        for (int64_t g = 0; g < G; ++g) {
          float s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < llm_kernels::GROUP; ++i) s += static_cast<float>(c[g * llm_kernels::GROUP + i]) * xr[g * llm_kernels::GROUP + i];
          total += s * S[v * G + g];
        }
        row[v] = total;
      }
    }
  });
}

// The first index of each row's largest value (torch.argmax's tie rule): logits [n, V] fp32 -> int64 [n].
at::Tensor argmax_rows(const at::Tensor& logits_in) {
  const at::Tensor logits = logits_in.contiguous();
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.size(1) > 0, "argmax_rows: logits fp32 [n, V]");
  const int64_t n = logits.size(0), V = logits.size(1);
  auto out = at::empty({n}, at::kLong);
  const float* L = logits.data_ptr<float>();
  int64_t* O = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = L + r * V;
      float best = row[0];
      int64_t at = 0;
      for (int64_t b = 0; b < V; b += BLOCK) {
        const int64_t end = std::min(V, b + BLOCK);
        float m = -INFINITY;
        int nans = 0;
#pragma omp simd reduction(max : m) reduction(+ : nans)
        for (int64_t i = b; i < end; ++i) { m = std::max(m, row[i]); nans += row[i] != row[i]; }
        if (nans) {  // torch counts NaN as the largest: the first one wins
          at = b;
          while (row[at] == row[at]) ++at;
          break;
        }
        if (m > best)
          for (int64_t i = b; i < end; ++i)
            if (row[i] > best) { best = row[i]; at = i; }
      }
      O[r] = at;
    }
  });
  return out;
}
