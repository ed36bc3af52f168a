"""CPU emulator for `mx.fast.metal_kernel` kernels: the CI gate for Metal kernels on Linux.

`emulated_metal_kernel(...)` takes the same arguments as `mx.fast.metal_kernel` and returns a
callable with the same call arguments (plus `seed=` for randomised schedules). It generates
the exact source MLX would (`generate_source`, checked byte for byte against MLX through
`mlx_reference_source`), compiles it with g++ against a Metal shim header and runs every
threadgroup's threads as fibers, with poisoned memory, guard pages and barrier checks.
See shared/reference/metal-kernels.md, sections 1 and 4b.
"""

from qwen2_mlx.metal_kernels.emulator.errors import (
    ArithmeticTrapError,
    BarrierDivergenceError,
    CompileError,
    EmulatorError,
    LintError,
    OutOfBoundsError,
    ResourceLimitError,
)
from qwen2_mlx.metal_kernels.emulator.lint import lint_findings, lint_kernel
from qwen2_mlx.metal_kernels.emulator.runner import EmulatedKernel, emulated_metal_kernel
from qwen2_mlx.metal_kernels.emulator.signature import generate_source, mlx_reference_source

__all__ = [
    "ArithmeticTrapError",
    "BarrierDivergenceError",
    "CompileError",
    "EmulatedKernel",
    "EmulatorError",
    "LintError",
    "OutOfBoundsError",
    "ResourceLimitError",
    "emulated_metal_kernel",
    "generate_source",
    "lint_findings",
    "lint_kernel",
    "mlx_reference_source",
]
