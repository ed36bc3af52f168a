"""Run-time selection between our Metal kernels and their pure-MLX references.

`kernel_backend()` says how kernels run in this process, decided once (at the first model
built or kernel called) from `QWEN2_MLX_KERNELS` and whether Metal is available:

* ``"metal"``: `mx.fast.metal_kernel` on the GPU (Metal available, unless forced off);
* ``"emulator"``: the CPU emulator (`QWEN2_MLX_KERNELS=1` where Metal is missing); this is how
  tests run the kernel path on Linux;
* ``"reference"``: the pure-MLX fallback (no Metal, or `QWEN2_MLX_KERNELS=0`).

A bad value of the variable is a ValueError at that first use (`load()` reports it as one
line). `set_kernel_backend` changes the decision later (tests, an app's settings).

On first use of each kernel variant (its compile-time parameters and the head geometry it
runs at, e.g. the query heads per KV head G) on a GPU, the kernel is checked against its
reference on a small input of that geometry. A kernel that fails to compile or disagrees is
switched off for the rest of the process with one warning, so a bad kernel costs speed, never
wrong text. The emulator backend skips the check by default: tests want a wrong kernel to
fail. `kernel_status()` lists every variant used so far, its check and whether it is on.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.core as mx

Backend = Literal["metal", "emulator", "reference"]

ENV_VAR = "QWEN2_MLX_KERNELS"

# Backends on which a kernel verifies itself before first use (tests add "emulator").
SELF_CHECK_BACKENDS: set[str] = {"metal"}

_lock = threading.RLock()
_backend: Backend | None = None  # decided once, at the first kernel_backend() call
# (kernel name, variant) -> its self-check: "passed", "failed: ..." or "not run (...)".
_variants: dict[tuple[str, Hashable], str] = {}
_disabled: dict[str, str] = {}  # kernel name -> why


class KernelMismatchError(RuntimeError):
    """A kernel's self-check found it disagreeing with its reference."""


def metal_available() -> bool:
    """Whether MLX can run Metal kernels here."""
    try:
        return bool(mx.metal.is_available())
    except Exception:  # noqa: BLE001 - a CPU-only build may lack the Metal module entirely
        return False


def resolve_backend(setting: str | None = None) -> Backend:
    """The backend a `QWEN2_MLX_KERNELS` value selects here (None: read the variable).

    "0"/"off" (also "false", "no"): the reference; "1"/"on" ("true", "yes"): Metal, or the
    emulator without Metal; unset, "" or "auto": Metal when available, else the reference.
    """
    raw = os.environ.get(ENV_VAR, "") if setting is None else setting
    value = raw.strip().lower()
    if value in ("", "auto"):
        return "metal" if metal_available() else "reference"
    if value in ("0", "false", "off", "no"):
        return "reference"
    if value in ("1", "true", "on", "yes"):
        return "metal" if metal_available() else "emulator"
    raise ValueError(f"{ENV_VAR} must be 0, 1 or unset, got {raw!r}")


def kernel_backend() -> Backend:
    """How kernels run in this process: decided at the first call, then fixed (no environment
    read or Metal query per dispatch). Raises ValueError for a bad `QWEN2_MLX_KERNELS`."""
    global _backend
    backend = _backend
    if backend is None:
        with _lock:
            if _backend is None:
                _backend = resolve_backend()
            backend = _backend
    return backend


def kernels_enabled() -> bool:
    """Whether any kernel may run (the backend is not the reference): a global read, so the
    dispatch functions skip their shape checks entirely on the reference backend."""
    return (_backend or kernel_backend()) != "reference"


def set_kernel_backend(setting: str | None = None) -> Backend:
    """Decide the backend again: from a `QWEN2_MLX_KERNELS`-style `setting` ("0", "1",
    "auto"), a backend name ("reference", "emulator", "metal"), or None (re-read the
    variable). Returns the backend now in force."""
    global _backend
    if setting in ("reference", "emulator"):
        backend: Backend = setting
    elif setting == "metal":
        if not metal_available():
            raise ValueError("the metal kernel backend needs Metal, which is not available here")
        backend = "metal"
    else:
        backend = resolve_backend(setting)
    with _lock:
        _backend = backend
    return backend


def disabled_kernels() -> dict[str, str]:
    """Kernels switched off in this process, with the reason."""
    with _lock:
        return dict(_disabled)


def disable_kernel(name: str, reason: str = "disabled by the caller") -> None:
    """Switch a kernel off for this process (its dispatch then runs the reference)."""
    with _lock:
        _disabled.setdefault(name, reason)


def reset_kernel_state() -> None:
    """Forget the variants seen, their self-checks and disabled kernels (tests, or after a
    driver update). The backend decision stays (see `set_kernel_backend`)."""
    with _lock:
        _variants.clear()
        _disabled.clear()


def select_backend(
    name: str, variant: Hashable, self_check: Callable[[Backend], None]
) -> Backend | None:
    """The backend to run kernel `name` (`variant`) with, or None: use the reference.

    `variant` holds what the kernel is compiled for and the geometry it runs at (a
    NamedTuple, whose fields `kernel_status` shows). `self_check(backend)` runs the variant
    on a small input of that geometry and raises if it disagrees with the reference; it runs
    once per variant on the backends in SELF_CHECK_BACKENDS. Any exception disables the
    kernel (all its variants) with one warning. After the first call of a variant this is a
    lookup, without the lock.
    """
    backend = kernel_backend()
    if backend == "reference":
        return None
    key = (name, variant)
    if key in _variants and name not in _disabled:
        return backend
    with _lock:
        if name in _disabled:
            _variants.setdefault(key, "not run (the kernel is disabled)")
            return None
        if key in _variants:
            return backend
        if backend not in SELF_CHECK_BACKENDS:
            _variants[key] = f"not run (no self-check on the {backend} backend)"
            return backend
        try:
            self_check(backend)
        except Exception as exc:  # noqa: BLE001 - compile errors, mismatches, anything
            reason = f"{type(exc).__name__}: {exc}"
            _variants[key] = f"failed: {reason}"
            _disabled[name] = reason
            warnings.warn(
                f"qwen2-mlx: the {name!r} Metal kernel failed its self-check for variant "
                f"{variant!r} and is disabled; using the pure-MLX reference instead "
                f"({type(exc).__name__}: {str(exc)[:300]})",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        _variants[key] = "passed"
        return backend


@dataclass(frozen=True)
class VariantStatus:
    """One kernel variant this process has used: `shape` holds its parameters (dtypes,
    head_dim, query and KV heads, the group G = query heads per KV head, bits...)."""

    kernel: str
    shape: dict[str, Any]
    self_check: str  # "passed", "failed: <why>" or "not run (<why>)"
    enabled: bool


@dataclass(frozen=True)
class KernelStatus:
    """What `kernel_status()` reports; `str()` gives a few lines for a bug report."""

    backend: Backend
    variants: list[VariantStatus] = field(default_factory=list)
    disabled: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"kernel backend: {self.backend}"]
        if not self.variants:
            lines.append("  no kernel variant used yet")
        for v in self.variants:
            shape = ", ".join(f"{k}={_plain(x)}" for k, x in v.shape.items())
            state = "on" if v.enabled else "off"
            lines.append(f"  {v.kernel} [{shape}]: self-check {v.self_check}; {state}")
        return "\n".join(lines)


def _plain(value: object) -> object:
    return str(value).removeprefix("mlx.core.") if isinstance(value, mx.Dtype) else value


def kernel_status() -> KernelStatus:
    """The kernel backend, and every kernel variant used so far in this process with its
    shape parameters (G included), whether its self-check ran and passed, and whether it is
    enabled. Nothing is listed on the reference backend (no kernel runs)."""
    backend = kernel_backend()
    with _lock:
        items = list(_variants.items())
        disabled = dict(_disabled)
    variants = []
    for (name, variant), check in items:
        asdict = getattr(variant, "_asdict", None)
        shape = {k: _plain(v) for k, v in asdict().items()} if asdict else {"variant": variant}
        if "q_heads" in shape and "kv_heads" in shape:
            shape["group"] = shape["q_heads"] // max(shape["kv_heads"], 1)
        variants.append(VariantStatus(name, shape, check,
                                      name not in disabled and not check.startswith("failed")))
    return KernelStatus(backend, variants, disabled)


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
