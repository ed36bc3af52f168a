"""Quantized matmul dispatch and the layers that route through it.

`quantized_matmul` is `mx.quantized_matmul` (affine, transposed weights), except for decode
shapes that MLX's fast decode kernel `qmv_fast` does not take (K % 512 != 0 at 4 bits,
K % 256 != 0 at 8 bits, or N % 8 != 0): those run our matvec kernel (quantized_matvec.py).
`quantized_swiglu` computes the MLP's silu(x @ gate.T) * (x @ up.T) in one kernel for the
same shapes. `QuantizedLinear` / `QuantizedEmbedding` are MLX's layers with their matmuls
going through the dispatch; `use_kernel_linears(model)` swaps them into any module tree.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from qwen2_mlx.metal_kernels.dispatch import (
    Backend,
    check_close,
    dtype_tolerance,
    kernels_enabled,
    select_backend,
)
from qwen2_mlx.metal_kernels.quantized_matvec import (
    matvec_supported,
    quantized_matvec,
    quantized_swiglu_matvec,
)

QuantizedWeight = tuple[mx.array, mx.array, mx.array]

MATVEC_KERNEL = "quantized_matvec"
SWIGLU_KERNEL = "quantized_swiglu"


class MatvecVariant(NamedTuple):
    """What a matvec kernel is compiled for: the dtype of x, bits, group size, rows of x."""

    dtype: mx.Dtype
    bits: int
    group_size: int
    rows: int


def qmv_fast_takes(in_features: int, out_features: int, bits: int) -> bool:
    """Whether MLX's `qmv_fast` decode kernel handles this weight (metal-kernels.md §3.2):
    N % 8 == 0 and K a multiple of 32 lanes x 2 words x (32 / bits) values."""
    return out_features % 8 == 0 and in_features % (64 * 32 // bits) == 0


def _kernel_wanted(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, *,
    group_size: int, bits: int, transpose: bool,
) -> bool:
    if not transpose or biases is None or scales.dtype != x.dtype or biases.dtype != x.dtype:
        return False
    if not matvec_supported(x, w, scales, group_size=group_size, bits=bits):
        return False
    return not qmv_fast_takes(x.shape[-1], w.shape[0], bits)


def quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    *,
    group_size: int,
    bits: int,
    transpose: bool = True,
) -> mx.array:
    """`mx.quantized_matmul(x, w, scales, biases, transpose, group_size, bits)` (affine).

    Decode-sized inputs (at most 4 rows of x) whose shape `qmv_fast` does not take run our
    matvec kernel where kernels are on.
    """
    if kernels_enabled() and _kernel_wanted(x, w, scales, biases, group_size=group_size,
                                            bits=bits, transpose=transpose):
        variant = MatvecVariant(x.dtype, bits, group_size, x.size // x.shape[-1])
        backend = select_backend(MATVEC_KERNEL, variant,
                                 lambda b: _self_check_matvec(b, variant))
        if backend is not None:
            return quantized_matvec(backend, x, w, scales, biases, group_size=group_size,
                                    bits=bits)
    return mx.quantized_matmul(x, w, scales, biases, transpose=transpose,
                               group_size=group_size, bits=bits)


def quantized_swiglu(
    x: mx.array,
    gate: QuantizedWeight,
    up: QuantizedWeight,
    *,
    group_size: int,
    bits: int,
) -> mx.array:
    """silu(x @ gate.T) * (x @ up.T) for (w, scales, biases) quantized gate and up weights.

    Runs one fused kernel (x read once) for the shapes `quantized_matmul` sends to its
    kernel; otherwise two `quantized_matmul` calls and the SiLU product.
    """
    same_shape = kernels_enabled() and all(g.shape == u.shape
                                           for g, u in zip(gate, up, strict=True))
    if same_shape and all(
        _kernel_wanted(x, g_w, g_s, g_b, group_size=group_size, bits=bits, transpose=True)
        for g_w, g_s, g_b in (gate, up)
    ):
        variant = MatvecVariant(x.dtype, bits, group_size, x.size // x.shape[-1])
        backend = select_backend(SWIGLU_KERNEL, variant,
                                 lambda b: _self_check_swiglu(b, variant))
        if backend is not None:
            return quantized_swiglu_matvec(backend, x, tuple(gate), tuple(up),
                                           group_size=group_size, bits=bits)
    g = quantized_matmul(x, *gate, group_size=group_size, bits=bits)
    u = quantized_matmul(x, *up, group_size=group_size, bits=bits)
    return nn.silu(g) * u


class QuantizedLinear(nn.QuantizedLinear):
    """`mlx.nn.QuantizedLinear` whose affine matmul goes through `quantized_matmul`."""

    def __call__(self, x: mx.array) -> mx.array:
        if getattr(self, "mode", "affine") != "affine":
            return super().__call__(x)
        y = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"),
                             group_size=self.group_size, bits=self.bits)
        if "bias" in self:
            y = y + self["bias"]
        return y

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> QuantizedLinear:
        """The same layer (same arrays, frozen state and settings) as this class."""
        return _rebrand(layer, cls)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """`mlx.nn.QuantizedEmbedding` whose `as_linear` (tied LM head) uses `quantized_matmul`."""

    def as_linear(self, x: mx.array) -> mx.array:
        if getattr(self, "mode", "affine") != "affine":
            return super().as_linear(x)
        return quantized_matmul(x, self["weight"], self["scales"], self.get("biases"),
                                group_size=self.group_size, bits=self.bits)

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedEmbedding) -> QuantizedEmbedding:
        """The same layer (same arrays, frozen state and settings) as this class."""
        return _rebrand(layer, cls)


def _rebrand(layer: nn.Module, cls: type) -> nn.Module:
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    # Plain attributes (group_size, bits, mode, frozen-parameter set) live in __dict__,
    # arrays in the module's dict items.
    for name, value in vars(layer).items():
        object.__setattr__(new, name, set(value) if isinstance(value, set) else value)
    for name, value in layer.items():
        new[name] = value
    return new


def use_kernel_linears(model: nn.Module) -> nn.Module:
    """Swap every `nn.QuantizedLinear` / `nn.QuantizedEmbedding` in `model` (exact types, not
    subclasses) for the kernel-dispatching classes above, in place; returns `model`.

    Arrays are shared, not copied, so it is cheap and can run right after loading.
    """

    def swap(_path: str, module: nn.Module) -> nn.Module:
        if type(module) is nn.QuantizedLinear:
            return QuantizedLinear.from_quantized(module)
        if type(module) is nn.QuantizedEmbedding:
            return QuantizedEmbedding.from_quantized(module)
        return module

    leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    return model


def swiglu(gate_proj: nn.Module, up_proj: nn.Module, x: mx.array) -> mx.array:
    """silu(gate_proj(x)) * up_proj(x), fused into one kernel when both projections are
    bias-free affine-quantized linears with the same settings (the Qwen2 MLP)."""
    if (
        isinstance(gate_proj, nn.QuantizedLinear)
        and isinstance(up_proj, nn.QuantizedLinear)
        and "bias" not in gate_proj
        and "bias" not in up_proj
        and getattr(gate_proj, "mode", "affine") == "affine"
        and getattr(up_proj, "mode", "affine") == "affine"
        and (gate_proj.group_size, gate_proj.bits) == (up_proj.group_size, up_proj.bits)
    ):
        return quantized_swiglu(
            x,
            (gate_proj["weight"], gate_proj["scales"], gate_proj["biases"]),
            (up_proj["weight"], up_proj["scales"], up_proj["biases"]),
            group_size=gate_proj.group_size,
            bits=gate_proj.bits,
        )
    return nn.silu(gate_proj(x)) * up_proj(x)


# ---------------------------------------------------------------------------------------------
# Self-checks: a small matrix whose K is not a multiple of a lane step, against float32 maths.
# ---------------------------------------------------------------------------------------------


def _check_operands(variant: tuple, seed: int) -> tuple[mx.array, QuantizedWeight, mx.array]:
    dtype, bits, group_size, rows = variant
    in_features, out_features = 5 * group_size, 11
    kx, kw = mx.random.split(mx.random.key(seed))
    x = mx.random.normal((rows, in_features), key=kx).astype(dtype)
    w = mx.random.normal((out_features, in_features), key=kw).astype(dtype)
    quantized = mx.quantize(w, group_size=group_size, bits=bits)
    dense = mx.dequantize(*quantized, group_size=group_size, bits=bits).astype(mx.float32)
    return x, tuple(quantized), dense


def _self_check_matvec(backend: Backend, variant: tuple) -> None:
    x, (w, scales, biases), dense = _check_operands(variant, 99)
    expected = x.astype(mx.float32) @ dense.T
    got = quantized_matvec(backend, x, w, scales, biases, group_size=variant[2], bits=variant[1])
    mx.eval(got)
    check_close(f"quantized matvec {variant}", got, expected, dtype_tolerance(variant[0]))


def _self_check_swiglu(backend: Backend, variant: tuple) -> None:
    x, gate, gate_dense = _check_operands(variant, 98)
    _, up, up_dense = _check_operands(variant, 97)
    x32 = x.astype(mx.float32)
    expected = nn.silu(x32 @ gate_dense.T) * (x32 @ up_dense.T)
    got = quantized_swiglu_matvec(backend, x, gate, up, group_size=variant[2], bits=variant[1])
    mx.eval(got)
    check_close(f"quantized swiglu {variant}", got, expected, dtype_tolerance(variant[0]))
