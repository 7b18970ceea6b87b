// The Python module of our CPU kernels (built by deployments/engine/kernels/__init__.py).
#include <torch/extension.h>

#include "codes.h"

// Every kernel releases the GIL while it runs (arguments are converted before): the engine thread spends
// most of a step in them, and the replica's event loop (Ray's streaming of each token, serialization,
// metrics) needs the GIL meanwhile. Holding it made the two take turns.
using nogil = py::call_guard<py::gil_scoped_release>;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("q4_linear", &q4_linear, nogil(), "int4 weights (GGUF Q4_1 layout) x activations as int8 codes (two for outlier groups) -> fp32",
          py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("outlier") = llm_kernels::OUTLIER);
  mod.def("q8_linear", &q8_linear, nogil(), "int8 weights (per-row or per-32 scales, stored + 128) x the same activation codes -> fp32");
  mod.def("q8_rank", &q8_rank, nogil(), "q8_linear (per-row scales) from the activations' first code alone: vocabulary ranking");
  mod.def("paged_decode_attention", &paged_decode_attention, nogil(), "one query per sequence over its cache blocks, read in place");
#ifndef LLM_KERNELS_MATMUL_ONLY  // the AVX2 test build: only the matmuls and attention have ISA-specific code
  mod.def("lora_add", &lora_add, nogil(), "each token through its own LoRA adapter, added to y in place");
  mod.def("residual_norm", &residual_norm, nogil(), "x += y (or rms_norm(y) * w_y) in place; returns rms_norm(x) * w_out");
  mod.def("rope_kv", &rope_kv, nogil(), "q/k norms + rotary on a fused qkv, k and v written to their cache slots; returns q");
  mod.def("rescore_top", &rescore_top, nogil(), "each row's k best of the int8 ranking rescored exactly from the 8-bit table, in place");
  mod.def("table_rows", &table_rows, nogil(), "rows of the packed 8-bit vocabulary table as fp32 (embedding lookups)");
  mod.def("argmax_rows", &argmax_rows, nogil(), "first index of each row's largest value (NaN counts as largest)");
  mod.def("decode_layers", &decode_layers, nogil(), "a decode step's layers (Llama family, Gemma 3), int4 or int8 projections, in one call");
  mod.def("act_mul", &act_mul, nogil(), "act(gate) * up over a fused gate_up (0 silu, 1 gelu tanh)");
#endif
  mod.attr("isa") = Q4_ISA;
  mod.attr("has_q8") = has_q8();
  mod.attr("OUTLIER") = llm_kernels::OUTLIER;  // a group whose absmax is over this x its row's median keeps two codes
}
