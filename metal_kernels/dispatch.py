"""Run-time selection between our Metal kernels and their pure-MLX references.

`kernel_backend()` says how a kernel runs in this process:

* ``"metal"``: `mx.fast.metal_kernel` on the GPU (Metal available, unless forced off);
* ``"emulator"``: the CPU emulator (`QWEN2_MLX_KERNELS=1` where Metal is missing); this is how
  tests run the kernel path on Linux;
* ``"reference"``: the pure-MLX fallback (no Metal, or `QWEN2_MLX_KERNELS=0`).

On first use of each kernel variant (its compile-time parameters) on a GPU, the kernel is
checked against its reference on a small input. A kernel that fails to compile or disagrees
is switched off for the rest of the process with one warning, so a bad kernel costs speed,
never wrong text. The emulator backend skips the check: tests want a wrong kernel to fail.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Literal

import mlx.core as mx

Backend = Literal["metal", "emulator", "reference"]

ENV_VAR = "QWEN2_MLX_KERNELS"

# Backends on which a kernel verifies itself before first use (tests add "emulator").
SELF_CHECK_BACKENDS: set[str] = {"metal"}

_lock = threading.RLock()
_verified: set[tuple[str, Hashable]] = set()
_disabled: dict[str, str] = {}  # kernel name -> why


class KernelMismatchError(RuntimeError):
    """A kernel's self-check found it disagreeing with its reference."""


def metal_available() -> bool:
    """Whether MLX can run Metal kernels here."""
    try:
        return bool(mx.metal.is_available())
    except Exception:  # noqa: BLE001 - a CPU-only build may lack the Metal module entirely
        return False


def kernel_backend() -> Backend:
    """How kernels run now: read from `QWEN2_MLX_KERNELS` (0/1, unset: auto) on every call."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return "metal" if metal_available() else "reference"
    if value in ("0", "false", "off", "no"):
        return "reference"
    if value in ("1", "true", "on", "yes"):
        return "metal" if metal_available() else "emulator"
    raise ValueError(f"{ENV_VAR} must be 0, 1 or unset, got {os.environ[ENV_VAR]!r}")


def disabled_kernels() -> dict[str, str]:
    """Kernels switched off in this process, with the reason."""
    with _lock:
        return dict(_disabled)


def disable_kernel(name: str, reason: str = "disabled by the caller") -> None:
    """Switch a kernel off for this process (its dispatch then runs the reference)."""
    with _lock:
        _disabled.setdefault(name, reason)


def reset_kernel_state() -> None:
    """Forget self-check results and disabled kernels (tests, or after a driver update)."""
    with _lock:
        _verified.clear()
        _disabled.clear()


def select_backend(
    name: str, variant: Hashable, self_check: Callable[[Backend], None]
) -> Backend | None:
    """The backend to run kernel `name` (compile-time `variant`) with, or None: use the reference.

    `self_check(backend)` runs the variant on a small input and raises if it disagrees with
    the reference; it runs once per variant on the backends in SELF_CHECK_BACKENDS. Any
    exception disables the kernel (all its variants) with one warning.
    """
    backend = kernel_backend()
    if backend == "reference":
        return None
    with _lock:
        if name in _disabled:
            return None
        if backend not in SELF_CHECK_BACKENDS or (name, variant) in _verified:
            return backend
        try:
            self_check(backend)
        except Exception as exc:  # noqa: BLE001 - compile errors, mismatches, anything
            _disabled[name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"qwen2-mlx: the {name!r} Metal kernel failed its self-check for variant "
                f"{variant!r} and is disabled; using the pure-MLX reference instead "
                f"({type(exc).__name__}: {str(exc)[:300]})",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        _verified.add((name, variant))
        return backend


def check_close(name: str, got: mx.array, expected: mx.array, tolerance: float) -> None:
    """Raise KernelMismatchError unless max|got - expected| <= tolerance * max(1, max|expected|)."""
    got32, exp32 = got.astype(mx.float32), expected.astype(mx.float32)
    if got32.shape != exp32.shape:
        raise KernelMismatchError(f"{name}: shape {got32.shape} != reference {exp32.shape}")
    err = mx.max(mx.abs(got32 - exp32)).item()
    bound = tolerance * max(1.0, mx.max(mx.abs(exp32)).item())
    if not err <= bound:  # also catches NaN
        raise KernelMismatchError(f"{name}: max error {err:.3g} exceeds {bound:.3g}")


def dtype_tolerance(dtype: mx.Dtype) -> float:
    """Self-check tolerance (relative to the output scale) for a kernel computing in `dtype`."""
    return {mx.float32: 1e-4, mx.float16: 5e-3, mx.bfloat16: 3e-2}.get(dtype, 1e-4)


class KernelProgram:
    """One Metal kernel source, built lazily per backend with `mx.fast.metal_kernel` or the
    emulator (same arguments, same generated source)."""

    def __init__(
        self,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
    ) -> None:
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        # Emulator only: a seed shuffles the thread schedule so that a missing barrier shows
        # up as a wrong result (tests set it; None runs threads in index order).
        self.emulator_seed: int | None = None
        self._built: dict[str, Callable[..., list[mx.array]]] = {}

    def build(self, backend: Backend) -> Callable[..., list[mx.array]]:
        """The callable for `backend` ("metal" or "emulator"), cached."""
        with _lock:
            if backend not in self._built:
                if backend == "metal":
                    factory = mx.fast.metal_kernel
                elif backend == "emulator":
                    from qwen2_mlx.metal_kernels.emulator import emulated_metal_kernel

                    factory = emulated_metal_kernel
                else:
                    raise ValueError(f"kernel {self.name!r} cannot run on backend {backend!r}")
                self._built[backend] = factory(
                    name=self.name,
                    input_names=self.input_names,
                    output_names=self.output_names,
                    source=self.source,
                    header=self.header,
                    ensure_row_contiguous=self.ensure_row_contiguous,
                )
            return self._built[backend]

    def __call__(self, backend: Backend, **kwargs) -> list[mx.array]:
        if backend == "emulator" and self.emulator_seed is not None:
            kwargs["seed"] = self.emulator_seed
        return self.build(backend)(**kwargs)
