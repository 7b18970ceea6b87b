// The Python module of our CPU kernels (built by deployments/engine/kernels/__init__.py).
#include <torch/extension.h>

#include "codes.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("q4_linear", &q4_linear, "int4 weights (GGUF Q4_1 layout) x bf16 activations as two int8 codes -> fp32");
  mod.def("q8_linear", &q8_linear, "int8 weights (per-row scale, stored + 128) x the same activation codes -> fp32");
#ifndef LLM_KERNELS_MATMUL_ONLY  // the AVX2 test build: only the matmuls have ISA-specific code
  mod.def("paged_decode_attention", &paged_decode_attention, "one query per sequence over its cache blocks, read in place");
  mod.def("lora_add", &lora_add, "each token through its own LoRA adapter, added to y in place");
  mod.def("residual_norm", &residual_norm, "x += y (or rms_norm(y) * w_y) in place; returns rms_norm(x) * w_out");
  mod.def("rope_kv", &rope_kv, "q/k norms + rotary on a fused qkv, k and v written to their cache slots; returns q");
  mod.def("rescore_top", &rescore_top, "each row's k best of the int8 ranking rescored exactly from the 8-bit table, in place");
  mod.def("argmax_rows", &argmax_rows, "first index of each row's largest value (NaN counts as largest)");
  mod.def("act_mul", &act_mul, "act(gate) * up over a fused gate_up (0 silu, 1 gelu tanh)");
#endif
  mod.attr("isa") = Q4_ISA;
  mod.attr("has_q8") = has_q8();
}
