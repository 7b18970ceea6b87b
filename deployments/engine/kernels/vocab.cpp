// The vocabulary's last steps per decode step (layers/vocab.py, sampler.py): pick each row's top
// candidates of the int8 ranking and rescore them exactly from the 8-bit table, and greedy argmax.
// torch's topk and argmax over a [rows, 49k] row block took 0.2-0.7 ms and 0.5 ms at 10 rows here;
// one pass per row that skips 64-value blocks below the current k-th best is a few microseconds.
#include "codes.h"

namespace {

constexpr int64_t BLOCK = 64;  // a multiple of the vector width

using namespace llm_kernels::vec;
using llm_kernels::LANES;
using llm_kernels::Vec;

// The largest of p[0, count) ignoring NaNs (-inf if none), and in *nan (when given) whether there was one:
// gcc does not vectorise std::max's compare-and-select in a reduction, so full blocks take the vector path.
inline float block_max(const float* p, int64_t count, bool* nan = nullptr) {
  if (count == BLOCK) {
    Vec m = vset(-INFINITY), seen = vzero();
    for (int64_t i = 0; i < BLOCK; i += LANES) {
      const Vec x = vload(p + i);
      m = vmax(x, m);  // max_ps returns its second operand where either is NaN: NaNs are skipped
      if (nan) seen = vadd(seen, vsub(x, x));  // NaN where x was NaN or +-inf, else 0
    }
    if (nan) *nan = any_nan(seen) && std::any_of(p, p + BLOCK, [](float x) { return x != x; });
    return hmax(m);
  }
  float m = -INFINITY;
  for (int64_t i = 0; i < count; ++i) m = std::max(m, p[i]);
  if (nan) *nan = std::any_of(p, p + count, [](float x) { return x != x; });
  return m;
}

// The k largest values of row[0, n) by index into `top` (unordered); k <= n.
void top_k(const float* row, int64_t n, int64_t k, std::vector<int64_t>& top) {
  std::vector<std::pair<float, int64_t>> best;  // a min-heap of the k best so far
  best.reserve(k + 1);
  auto worse = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) { return a.first > b.first; };
  for (int64_t i = 0; i < k; ++i) best.emplace_back(row[i], i);
  std::make_heap(best.begin(), best.end(), worse);
  for (int64_t b = k; b < n; b += BLOCK) {
    const int64_t end = std::min(n, b + BLOCK);
    if (!(block_max(row + b, end - b) > best.front().first)) continue;
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

// Row v of the packed 8-bit table (codes + 128 as uint8 [V'/16, H/4, 64], scales fp32 [V'/16, H/32, 16];
// layers/int8.py): block v / 16, lane v % 16, 4 consecutive inputs per 32-bit word.
struct PackedRow {
  const uint8_t* blk;
  const float* sc;
  PackedRow(const uint8_t* codes, const float* scales, int64_t v, int64_t H)
      : blk(codes + (v / 16) * (H / 4) * 64 + 4 * (v % 16)), sc(scales + (v / 16) * (H / llm_kernels::GROUP) * 16 + v % 16) {}
  float code(int64_t k) const { return static_cast<float>(blk[(k / 4) * 64 + k % 4]) - 128.f; }  // input k's int8 code
  float scale(int64_t k) const { return sc[(k / llm_kernels::GROUP) * 16]; }  // its group's scale
};

}  // namespace

// logits [n, V] fp32 contiguous (the int8 ranking), updated in place: each row's `k` best are
// replaced by their exact scores x[r] . (codes[v] * scales[v] per group of 32). x [n, H] fp32. The table:
// row-major codes [V', H] int8 with scales [V', H / 32] fp32, or the q8 kernel's packed layout (codes + 128
// as uint8 [V'/16, H/4, 64], scales [V'/16, H/32, 16] fp32: layers/int8.py); V' >= V.
void rescore_top(at::Tensor logits, const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales, int64_t k) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous(), "rescore_top: logits fp32 [n, V]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) == logits.size(0), "rescore_top: x fp32 [n, H]");
  const int64_t n = logits.size(0), V = logits.size(1), H = x.size(1), G = H / llm_kernels::GROUP;
  const bool packed = codes.dim() == 3;
  TORCH_CHECK(H % llm_kernels::GROUP == 0 && codes.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kFloat,
              "rescore_top: contiguous codes, fp32 scales");
  if (packed) {
    TORCH_CHECK(codes.scalar_type() == at::kByte && codes.size(1) * 4 == H && codes.size(2) == 64 && codes.size(0) * 16 >= V &&
                scales.dim() == 3 && scales.size(0) == codes.size(0) && scales.size(1) == G && scales.size(2) == 16, "rescore_top: packed table");
  } else {
    TORCH_CHECK(codes.scalar_type() == at::kChar && codes.size(1) == H && codes.size(0) >= V && scales.size(0) == codes.size(0) &&
                scales.size(1) == G, "rescore_top: codes int8 [V, H], scales fp32 [V, H / 32]");
  }
  TORCH_CHECK(k >= 1 && k <= V, "rescore_top: k out of range");
  float* L = logits.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  const float* S = scales.data_ptr<float>();
  auto exact = [&](int64_t v, const float* xr) {
    float total = 0;
    if (packed) {
      const PackedRow row(codes.data_ptr<uint8_t>(), S, v, H);
      for (int64_t g = 0; g < G; ++g) {
        float s = 0;
        for (int64_t k = g * llm_kernels::GROUP; k < (g + 1) * llm_kernels::GROUP; ++k) s += row.code(k) * xr[k];
        total += s * row.scale(g * llm_kernels::GROUP);
      }
    } else {
      const int8_t* c = codes.data_ptr<int8_t>() + v * H;
      for (int64_t g = 0; g < G; ++g) {
        float s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < llm_kernels::GROUP; ++i) s += static_cast<float>(c[g * llm_kernels::GROUP + i]) * xr[g * llm_kernels::GROUP + i];
        total += s * S[v * G + g];
      }
    }
    return total;
  };
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> top;
    for (int64_t r = r0; r < r1; ++r) {
      float* row = L + r * V;
      top_k(row, V, k, top);
      for (int64_t v : top) row[v] = exact(v, X + r * H);
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
        bool nans;
        const float m = block_max(row + b, end - b, &nans);
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

// Rows `ids` (int64, any shape) of the packed 8-bit table (PackedRow's layout) as fp32 [*ids.shape, H]: the embedding lookup. In
// torch it was five indexing and arithmetic ops, 65 us per decode step at one sequence; this is a few.
at::Tensor table_rows(const at::Tensor& ids_in, const at::Tensor& codes, const at::Tensor& scales) {
  const at::Tensor ids = ids_in.contiguous();
  TORCH_CHECK(ids.scalar_type() == at::kLong, "table_rows: int64 ids");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 3 && codes.size(2) == 64 && codes.is_contiguous(), "table_rows: packed codes");
  const int64_t H = codes.size(1) * 4, G = H / llm_kernels::GROUP, rows = codes.size(0) * 16, n = ids.numel();
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == codes.size(0) * G * 16, "table_rows: scales");
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(H);
  auto out = at::empty(shape, at::kFloat);
  const int64_t* I = ids.data_ptr<int64_t>();
  const uint8_t* C = codes.data_ptr<uint8_t>();
  const float* S = scales.data_ptr<float>();
  float* O = out.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    const int64_t v = I[r];
    TORCH_CHECK(v >= 0 && v < rows, "table_rows: id ", v, " out of range");
    const PackedRow row(C, S, v, H);
    float* o = O + r * H;
    for (int64_t k = 0; k < H; ++k) o[k] = row.code(k) * row.scale(k);
  }
  return out;
}
