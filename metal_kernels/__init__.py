"""Attention and matmul kernels for qwen2-mlx.

Each kernel sits beside its pure-MLX reference behind one dispatch function that the model
calls; the reference runs wherever Metal does not (Linux, CI). Nothing here imports the model,
its configuration or its position arithmetic: functions take plain parameters (arrays, ints,
and for DCA a rotation function the model supplies).

* attention.py: `scaled_dot_product_attention`, `quantized_scaled_dot_product_attention`
  (GQA decode kernel in gqa_decode.py);
* quantized.py: `quantized_matmul`, `quantized_swiglu`, `QuantizedLinear`,
  `QuantizedEmbedding`, `use_kernel_linears`, `swiglu` (kernels in quantized_matvec.py);
* dual_chunk_attention.py: Dual Chunk Attention's pure-MLX reference and the dispatch
  `dual_chunk_attention` / `quantized_dual_chunk_attention` (decode via gqa_decode.py, prefill
  tiles in dca_prefill.py); DCA's config and positions are `qwen2_mlx.dca`;
* dispatch.py: which backend runs (Metal, the CPU emulator, or the reference;
  `QWEN2_MLX_KERNELS=0/1`) and the per-kernel self-check;
* emulator/: the CPU emulator of `mx.fast.metal_kernel` that tests the kernels on Linux.

`kernel_status()` reports the backend and every kernel variant used so far (shape, G, whether
its self-check ran and passed, whether it is on), for a Mac user or a bug report:

    >>> from qwen2_mlx.metal_kernels import kernel_status
    >>> print(kernel_status())
"""

from qwen2_mlx.metal_kernels.dispatch import (
    KernelStatus,
    VariantStatus,
    kernel_backend,
    kernel_status,
    set_kernel_backend,
)

__all__ = ["KernelStatus", "VariantStatus", "kernel_backend", "kernel_status",
           "set_kernel_backend"]
