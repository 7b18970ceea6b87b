// A decode step's layers in one call, for every native family (Llama: models/llama.py; Gemma 3:
// models/gemma3.py): what CausalLM._fused_layers does per layer (norms, int4 or group-wise int8
// projections, q/k norms + rotary + cache write, paged attention, gated MLP), looped here so a step
// makes one call from Python instead of ~9 per layer (their Python and argument conversion were a
// fifth of a 1-stream step, and each call a GIL release and reacquire the replica's serving threads
// contend for). Only for steps of decodes alone, every projection one of our kernels' without bias;
// anything else takes the Python loop over the same kernels.
#include "codes.h"

namespace {
// A projection by its packed layout: int4 ([N/16, K/4, 32]) or group-wise int8 ([N/16, K/4, 64]).
at::Tensor project(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  return packed.size(2) == 32 ? q4_linear(x, packed, scales) : q8_linear(x, packed, scales);
}
// An optional tensor of the per-layer list: an empty one stands for none.
std::optional<at::Tensor> given(const at::Tensor& t) {
  if (t.numel() == 0) return std::nullopt;
  return t;
}
}  // namespace

// x [n, hidden] fp32 (the residual stream, updated in place: on return it is the last layer's output).
// layers: per layer, in order (PER_LAYER = 15 tensors; int4 or int8g layouts; an empty tensor where the
// family has no such norm): input norm, qkv packed + scales, o packed + scales, attention output norm,
// MLP input norm, gate_up packed + scales, down packed + scales, MLP output norm, q/k head norms
// ([H + KVH, D]), rotary cos and sin tables. windows: per layer, the sliding window (0: global).
// caches: per layer k, v. positions, slots [n] int64; tables [n, max_blocks], context_lens [n] int64.
// LoRA (issue 11): with lora_slots (each token's adapter slot, -1 none), `lora` holds per layer the A,
// B^T and their row scales (empty unless int8) of qkv, o, gate_up, down (16 tensors, LoRALinear's
// layout) and lora_parts the output parts of
// those four ([q, k, v], [o], [gate, up], [down] sizes): each projection then adds its tokens' adapters.
void decode_layers(at::Tensor x, const std::vector<at::Tensor>& layers, const std::vector<at::Tensor>& caches,
                   const std::vector<int64_t>& windows, const at::Tensor& positions, const at::Tensor& slots,
                   const at::Tensor& tables, const at::Tensor& context_lens, int64_t H, int64_t KVH, int64_t block_size,
                   double scale, double eps, int64_t act, const std::vector<at::Tensor>& lora,
                   const std::optional<at::Tensor>& lora_slots, const std::vector<int64_t>& lora_parts, int64_t rank,
                   int64_t num_slots) {
  constexpr size_t PER_LAYER = 15, LORA_PER_LAYER = 16;
  const size_t L = caches.size() / 2;
  TORCH_CHECK(L > 0 && caches.size() == 2 * L && layers.size() == PER_LAYER * L && windows.size() == L,
              "decode_layers: ", PER_LAYER, " tensors, 2 caches and a window per layer");
  TORCH_CHECK(!lora_slots || (lora.size() == LORA_PER_LAYER * L && lora_parts.size() == 7), "decode_layers: LoRA tensors or parts missing");
  const std::vector<std::vector<int64_t>> parts = lora_slots ? std::vector<std::vector<int64_t>>{
      {lora_parts[0], lora_parts[1], lora_parts[2]}, {lora_parts[3]}, {lora_parts[4], lora_parts[5]}, {lora_parts[6]}}
      : std::vector<std::vector<int64_t>>{};
  const int64_t n = x.size(0);
  // projection `p` (0 qkv, 1 o, 2 gate_up, 3 down) of layer i, plus its tokens' adapters
  auto projection = [&](size_t i, int p, const at::Tensor& in, const at::Tensor& packed, const at::Tensor& scales) {
    at::Tensor y = project(in, packed, scales);
    if (lora_slots) {
      const at::Tensor* t = lora.data() + LORA_PER_LAYER * i + 4 * p;  // A, B^T, their row scales (int8) or empty
      lora_add(y, in, t[0], t[1], *lora_slots, parts[p], rank, num_slots, t[2], t[3]);
    }
    return y;
  };
  at::Tensor h = residual_norm(x, std::nullopt, std::nullopt, layers[0], eps);
  for (size_t i = 0; i < L; ++i) {
    const at::Tensor* w = layers.data() + PER_LAYER * i;
    const at::Tensor &k_cache = caches[2 * i], &v_cache = caches[2 * i + 1];
    const at::Tensor qkv = projection(i, 0, h, w[1], w[2]);
    const at::Tensor q = rope_kv(qkv, positions, w[13], w[14], given(w[12]), eps, k_cache, v_cache, slots, H, KVH);
    const at::Tensor attn = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, block_size, windows[i], scale).view({n, -1});
    const at::Tensor o = projection(i, 1, attn, w[3], w[4]);
    const std::optional<at::Tensor> o_norm = given(w[5]);
    h = residual_norm(x, o, o_norm, w[6], eps);
    const at::Tensor gated = act_mul(projection(i, 2, h, w[7], w[8]), act);
    std::optional<at::Tensor> next;
    if (i + 1 < L) next = layers[PER_LAYER * (i + 1)];
    const at::Tensor down = projection(i, 3, gated, w[9], w[10]);
    const std::optional<at::Tensor> down_norm = given(w[11]);
    h = residual_norm(x, down, down_norm, next, eps);
  }
}
