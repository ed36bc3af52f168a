"""`emulated_metal_kernel`: a drop-in for `mx.fast.metal_kernel` that runs on the CPU.

The returned callable takes MLX's call arguments, generates the same source MLX would
(signature.py), compiles it once against the shim (compiler.py) and launches it with MLX's
dispatch rule: `grid` counts threads, the threadgroup is `min(threadgroup, grid)` per
dimension and edge threadgroups are partial. Each threadgroup's threads run as fibers
(mtl_runtime.cpp) so barriers and simdgroup collectives keep Metal's semantics.

To find bugs rather than merely run code:
* outputs (unless `init_value`) and threadgroup memory start as 0xFF bytes (NaN, -1);
* every buffer sits between guard pages, inputs are read-only, and out-of-bounds accesses
  raise OutOfBoundsError naming the buffer, element, thread and source line;
* a barrier not reached by all threads, or divergent collectives, raise
  BarrierDivergenceError naming the lines;
* `seed=` shuffles the order of threadgroups and of runnable threads at every scheduling
  step, so a missing barrier shows up as a wrong (poisoned) result.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from qwen2_mlx.metal_kernels.emulator.compiler import (
    CompiledKernel,
    LaunchStruct,
    load_kernel,
    source_location,
)
from qwen2_mlx.metal_kernels.emulator.errors import (
    ArithmeticTrapError,
    BarrierDivergenceError,
    EmulatorError,
    LintError,
    OutOfBoundsError,
    ResourceLimitError,
)
from qwen2_mlx.metal_kernels.emulator.lint import lint_kernel
from qwen2_mlx.metal_kernels.emulator.signature import (
    GeneratedKernel,
    InputInfo,
    build_kernel,
)

MAX_THREADS_PER_THREADGROUP = 1024  # Apple GPUs; kernels with many registers get less
MAX_THREADGROUP_MEMORY = 32768  # bytes
FIBER_STACK_BYTES = 64 * 1024

_ERR_BARRIER, _ERR_FAULT, _ERR_LIMIT = 1, 2, 3
_SIGNAL_NAMES = {7: "SIGBUS", 8: "SIGFPE", 4: "SIGILL", 11: "SIGSEGV"}

_NUMPY_DTYPES: dict[mx.Dtype, type] = {
    mx.bool_: np.bool_,
    mx.uint8: np.uint8,
    mx.uint16: np.uint16,
    mx.uint32: np.uint32,
    mx.uint64: np.uint64,
    mx.int8: np.int8,
    mx.int16: np.int16,
    mx.int32: np.int32,
    mx.int64: np.int64,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,  # raw bits; numpy has no bfloat16
    mx.float32: np.float32,
    mx.float64: np.float64,
    mx.complex64: np.complex64,
}

# One launch at a time per process: the runtime's scheduler state is global.
_launch_lock = threading.Lock()


@dataclass(frozen=True)
class _Region:
    """A kernel buffer: `pointer` is what the kernel sees, [start, start + nbytes) is mapped."""

    name: str
    pointer: int
    start: int
    nbytes: int
    itemsize: int


@dataclass
class _Input:
    array: mx.array
    values: np.ndarray  # same shape; raw bits for bfloat16

    @property
    def info(self) -> InputInfo:
        return InputInfo.of(self.array)


def _to_input(value: object, position: int) -> _Input:
    if isinstance(value, mx.array):
        array = value
    elif isinstance(value, bool | int | float | np.ndarray | np.generic):
        array = mx.array(value)  # Python scalars become 0-d arrays, as MLX's to_array does
    else:
        raise TypeError(
            f"[metal_kernel] input {position} must be an mx.array or a Python scalar, "
            f"got {type(value).__name__}"
        )
    if array.dtype not in _NUMPY_DTYPES:
        raise ValueError(f"[metal_kernel] unsupported input dtype {array.dtype}")
    raw = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array
    return _Input(array, np.asarray(raw))


def _triple(value: Sequence[int], what: str) -> tuple[int, int, int]:
    try:
        t = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(
            f"[metal_kernel] {what} must be a tuple of 3 ints, got {value!r}"
        ) from None
    if len(t) != 3 or any(v <= 0 for v in t):
        raise ValueError(f"[metal_kernel] {what} must be 3 positive ints, got {value!r}")
    return t  # type: ignore[return-value]


class _Buffers:
    """Guarded buffers allocated through one kernel library, freed together."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.pointers: list[int] = []  # data pointer per kernel buffer (what the kernel sees)
        self.allocations: list[int] = []  # allocation handles (data start of the mapping)
        self.regions: list[_Region] = []

    def allocate(self, nbytes: int) -> int:
        ptr = self.lib.mtl_rt_buffer_alloc(nbytes, -1)
        if not ptr:
            raise EmulatorError(f"could not map a {nbytes}-byte buffer")
        self.allocations.append(ptr)
        return ptr

    def add_array(self, name: str, values: np.ndarray, *, contiguous: bool) -> int:
        """Copy `values` into a read-only guarded buffer; returns the pointer the kernel gets.

        With `contiguous=False` the array's own strides are reproduced (MLX passes the
        original layout when ensure_row_contiguous=False); gaps stay poisoned.
        """
        itemsize = values.dtype.itemsize
        if contiguous or values.size == 0:
            data = np.ascontiguousarray(values)
            ptr = self.allocate(data.nbytes)
            ctypes.memmove(ptr, data.ctypes.data, data.nbytes)
            base, span = ptr, data.nbytes
        else:
            strides = [s // itemsize for s in values.strides]
            lo = sum(min(0, (n - 1) * s) for n, s in zip(values.shape, strides, strict=True))
            hi = sum(max(0, (n - 1) * s) for n, s in zip(values.shape, strides, strict=True))
            span = (hi - lo + 1) * itemsize
            alloc = self.allocate(span)
            flat = np.ctypeslib.as_array((ctypes.c_ubyte * span).from_address(alloc))
            flat = flat.view(values.dtype)
            ptr = alloc - lo * itemsize
            view = np.lib.stride_tricks.as_strided(
                flat[-lo:], shape=values.shape, strides=values.strides
            )
            view[...] = values
            base = alloc
        self.lib.mtl_rt_buffer_protect_readonly(base)
        self.regions.append(_Region(name, ptr, base, span, itemsize))
        self.pointers.append(ptr)
        return ptr

    def add_output(self, name: str, nbytes: int, itemsize: int) -> int:
        ptr = self.allocate(nbytes)  # poisoned with 0xFF by the runtime
        self.regions.append(_Region(name, ptr, ptr, nbytes, itemsize))
        self.pointers.append(ptr)
        return ptr

    def free(self) -> None:
        for ptr in self.allocations:
            self.lib.mtl_rt_buffer_free(ptr)
        self.allocations.clear()


def _strides_of(values: np.ndarray, contiguous: bool) -> list[int]:
    if contiguous:
        strides, acc = [], 1
        for n in reversed(values.shape):
            strides.append(acc)
            acc *= n
        return list(reversed(strides))
    return [s // values.dtype.itemsize for s in values.strides]


def _describe_address(regions: list[_Region], addr: int) -> str | None:
    """Name the buffer whose guard region holds `addr` (the closest one)."""
    best = None
    for r in regions:
        # Guard regions: 16 pages before each buffer, at least 1 MiB after it.
        if r.start - 65536 <= addr < r.start + r.nbytes + (1 << 20):
            below, above = r.start - addr, addr - (r.start + r.nbytes)
            dist = max(below, above, 0)
            if best is None or dist < best[0]:
                element = (addr - r.pointer) // r.itemsize
                count = r.nbytes // r.itemsize
                best = (
                    dist,
                    f"buffer '{r.name}' at element {element} (it has {count} elements of "
                    f"{r.itemsize} bytes)",
                )
    return best[1] if best else None


class EmulatedKernel:
    """The callable returned by `emulated_metal_kernel` (see its docstring)."""

    def __init__(
        self,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
        compile_options: dict | None = None,
        lint: bool = True,
    ) -> None:
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if compile_options is not None:
            if not isinstance(compile_options, dict):
                raise ValueError("[metal_kernel] Expected `compile_options` to be a dict.")
            for key, value in compile_options.items():
                if key != "math_mode":
                    raise ValueError(f"[metal_kernel] Unknown compile option `{key}`.")
                if value not in ("safe", "relaxed", "fast"):
                    raise ValueError(
                        "[metal_kernel] Expected math_mode to be 'safe', 'relaxed', or 'fast'."
                    )
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        if lint:
            lint_kernel(name, source, header)
        self.last_compiled: CompiledKernel | None = None

    def generate(
        self,
        inputs: Sequence[InputInfo],
        output_dtypes: Sequence[mx.Dtype],
        template: Sequence[tuple[str, bool | int | mx.Dtype]] | None,
    ) -> GeneratedKernel:
        return build_kernel(
            name=self.name,
            input_names=self.input_names,
            output_names=self.output_names,
            source=self.source,
            header=self.header,
            atomic_outputs=self.atomic_outputs,
            inputs=inputs,
            output_dtypes=output_dtypes,
            template=template,
        )

    def __call__(
        self,
        *,
        inputs: Sequence[mx.array | bool | int | float],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[mx.Dtype],
        grid: Sequence[int],
        threadgroup: Sequence[int],
        template: Sequence[tuple[str, bool | int | mx.Dtype]] | None = None,
        init_value: float | None = None,
        verbose: bool = False,
        stream: object = None,
        seed: int | None = None,
    ) -> list[mx.array]:
        """Run the kernel; `seed` (emulator only) randomises the thread schedule."""
        del stream  # the emulator always runs on the CPU
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} but got "
                f"size {len(inputs)}."
            )
        if len(output_shapes) != len(self.output_names):
            raise ValueError(
                f"[metal_kernel] Expected `output_shapes` to have size {len(self.output_names)} "
                f"but got size {len(output_shapes)}."
            )
        if len(output_dtypes) != len(self.output_names):
            raise ValueError(
                f"[metal_kernel] Expected `output_dtypes` to have size {len(self.output_names)} "
                f"but got size {len(output_dtypes)}."
            )
        grid_t = _triple(grid, "grid")
        tg_t = _triple(threadgroup, "threadgroup")
        tg_size = tg_t[0] * tg_t[1] * tg_t[2]
        if tg_size > MAX_THREADS_PER_THREADGROUP:
            raise ResourceLimitError(
                f"kernel '{self.name}': Thread group size ({tg_size}) is greater than the "
                f"maximum allowed threads per threadgroup ({MAX_THREADS_PER_THREADGROUP})."
            )
        ins = [_to_input(x, i) for i, x in enumerate(inputs)]
        for name, inp in zip(self.input_names, ins, strict=True):
            if inp.array.dtype == mx.float64:
                raise LintError(
                    f"kernel '{self.name}': input '{name}' is float64; Metal has no double"
                )
        shapes = [tuple(int(n) for n in s) for s in output_shapes]
        for oname, dtype in zip(self.output_names, output_dtypes, strict=True):
            if dtype == mx.float64:
                raise LintError(
                    f"kernel '{self.name}': output '{oname}' is float64; Metal has no double"
                )
            if dtype not in _NUMPY_DTYPES:
                raise ValueError(f"[metal_kernel] unsupported output dtype {dtype}")
        if template:
            for tname, value in template:
                if isinstance(value, mx.Dtype) and value == mx.float64:
                    raise LintError(
                        f"kernel '{self.name}': template argument {tname} is float64; Metal "
                        "has no double"
                    )
        kernel = self.generate([i.info for i in ins], output_dtypes, template)
        if verbose:
            print(
                f"Generated source code for `{self.name}`:\n```\n{kernel.source}\n```", flush=True
            )
        if kernel.bad_signature:
            raise EmulatorError(
                f"kernel '{self.name}': MLX 0.32 generates an invalid signature here (`) {{` "
                "after the first output) because the kernel has two or more outputs, uses "
                "x_shape/x_strides/x_ndim and references no thread attribute; reference an "
                "attribute such as thread_position_in_grid in the body"
            )
        compiled = load_kernel(kernel)
        self.last_compiled = compiled
        with _launch_lock:
            return self._launch(
                compiled, kernel, ins, shapes, output_dtypes, grid_t, tg_t, init_value, seed
            )

    def _launch(
        self,
        compiled: CompiledKernel,
        kernel: GeneratedKernel,
        ins: list[_Input],
        shapes: list[tuple[int, ...]],
        output_dtypes: Sequence[mx.Dtype],
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        init_value: float | None,
        seed: int | None,
    ) -> list[mx.array]:
        lib = compiled.lib
        bufs = _Buffers(lib)
        try:
            outputs: list[tuple[str, int, int, mx.Dtype, tuple[int, ...]]] = []
            for p in kernel.buffer_params:
                if p.kind == "input":
                    inp = ins[p.index]
                    contiguous = self.ensure_row_contiguous or inp.values.flags.c_contiguous
                    bufs.add_array(p.name, inp.values, contiguous=contiguous)
                elif p.kind in ("shape", "strides", "ndim"):
                    inp = ins[p.index]
                    contiguous = self.ensure_row_contiguous or inp.values.flags.c_contiguous
                    if p.kind == "shape":
                        meta = np.array(inp.values.shape, dtype=np.int32)
                    elif p.kind == "strides":
                        meta = np.array(_strides_of(inp.values, contiguous), dtype=np.int64)
                    else:
                        meta = np.array(inp.values.ndim, dtype=np.int32)
                    bufs.add_array(p.name, meta, contiguous=True)
                else:
                    dtype = output_dtypes[p.index]
                    shape = shapes[p.index]
                    itemsize = dtype.size
                    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
                    ptr = bufs.add_output(p.name, nbytes, itemsize)
                    if init_value is not None:
                        fill = np.full(shape, init_value, dtype=np.float32)
                        if dtype == mx.bfloat16:
                            fill_arr = np.asarray(
                                mx.array(fill).astype(mx.bfloat16).view(mx.uint16)
                            )
                        else:
                            fill_arr = fill.astype(_NUMPY_DTYPES[dtype])
                        fill_arr = np.ascontiguousarray(fill_arr)
                        ctypes.memmove(ptr, fill_arr.ctypes.data, nbytes)
                    outputs.append((p.name, ptr, nbytes, dtype, shape))
            table = (ctypes.c_void_p * max(1, len(bufs.pointers)))(*bufs.pointers)
            launch = LaunchStruct()
            launch.buffers = ctypes.cast(table, ctypes.POINTER(ctypes.c_void_p))
            launch.n_buffers = len(bufs.pointers)
            for d in range(3):
                launch.grid[d] = grid[d]
                launch.threadgroup[d] = min(threadgroup[d], grid[d])
            launch.seed = 0 if seed is None else (int(seed) & 0xFFFFFFFFFFFFFFFF)
            launch.randomize = 0 if seed is None else 1
            launch.stack_bytes = FIBER_STACK_BYTES
            launch.max_threadgroup_memory = MAX_THREADGROUP_MEMORY
            lib.mtl_kernel_launch(ctypes.byref(launch))
            if launch.error:
                raise self._error(compiled, kernel, launch, bufs)
            for name, ptr, nbytes, itemsize in [(o[0], o[1], o[2], o[3].size) for o in outputs]:
                off = lib.mtl_rt_buffer_check_slack(ptr)
                if off != -(2**63):
                    element = off // itemsize
                    raise OutOfBoundsError(
                        f"kernel '{self.name}': out-of-bounds write to buffer '{name}' at element "
                        f"{element} (it has {nbytes // itemsize} elements); found after the run "
                        "in the padding next to the buffer, so the thread and line are unknown"
                    )
            results = []
            for _name, ptr, nbytes, dtype, shape in outputs:
                raw = (ctypes.c_ubyte * nbytes).from_address(ptr) if nbytes else b""
                host = np.frombuffer(bytes(raw), dtype=_NUMPY_DTYPES[dtype]).reshape(shape)
                arr = mx.array(host)
                results.append(arr.view(mx.bfloat16) if dtype == mx.bfloat16 else arr)
            return results
        finally:
            bufs.free()

    def _error(
        self,
        compiled: CompiledKernel,
        kernel: GeneratedKernel,
        launch: LaunchStruct,
        bufs: _Buffers,
    ) -> EmulatorError:
        message = launch.message.decode(errors="replace")
        thread = tuple(launch.err_thread)
        group = tuple(launch.err_threadgroup)
        prefix = f"kernel '{self.name}'"
        if launch.error == _ERR_FAULT:
            kind = {1: "write", 0: "read"}.get(launch.fault_write, "access")
            signal = _SIGNAL_NAMES.get(launch.fault_signal, str(launch.fault_signal))
            where = message or _describe_address(bufs.regions, launch.fault_addr)
            loc = source_location(compiled.path, launch.fault_pc_offset)
            at_line = f" at {loc[0]}:{loc[1]}" if loc else ""
            if launch.fault_signal == 8:
                text = (
                    f"{prefix}: arithmetic trap (integer division by zero?) in thread "
                    f"{thread} (threadgroup {group}){at_line}"
                )
                return self._with_source_lines(ArithmeticTrapError, text)
            if message.startswith("stack overflow"):
                text = f"{prefix}: {message} in thread {thread} (threadgroup {group}){at_line}"
            elif where:
                text = (
                    f"{prefix}: out-of-bounds {kind} of {where} by thread {thread} "
                    f"(threadgroup {group}){at_line}"
                )
            else:
                text = (
                    f"{prefix}: invalid memory {kind} at address {launch.fault_addr:#x} "
                    f"({signal}) by thread {thread} (threadgroup {group}){at_line}"
                )
            return self._with_source_lines(OutOfBoundsError, text)
        if launch.error == _ERR_BARRIER:
            text = f"{prefix}: {message} (threadgroup {group})"
            return self._with_source_lines(BarrierDivergenceError, text)
        if launch.error == _ERR_LIMIT:
            return self._with_source_lines(ResourceLimitError, f"{prefix}: {message}")
        return EmulatorError(f"{prefix}: {message}")

    def _with_source_lines(self, cls: type[EmulatorError], text: str) -> EmulatorError:
        """Append the quoted source lines that `text` refers to."""
        quoted = []
        for part, line in dict.fromkeys(re.findall(r"\.(source|header)\.metal:(\d+)", text)):
            lines = (self.source if part == "source" else self.header).splitlines()
            n = int(line)
            if 1 <= n <= len(lines):
                quoted.append(f"  {part} line {n}: {lines[n - 1].strip()}")
        if quoted:
            text += "\n" + "\n".join(quoted)
        return cls(text)


def emulated_metal_kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str = "",
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
    compile_options: dict | None = None,
    *,
    lint: bool = True,
) -> EmulatedKernel:
    """CPU stand-in for `mx.fast.metal_kernel` with the same arguments.

    Returns a callable taking `inputs=, output_shapes=, output_dtypes=, grid=, threadgroup=,
    template=None, init_value=None, verbose=False, stream=None` like MLX's, plus `seed=`
    (None: threads and threadgroups run in index order; an int: seeded random schedule).
    Outputs are mx.arrays. `compile_options` is validated but math modes are not emulated.
    Errors: LintError (non-Metal constructs, at construction), CompileError,
    BarrierDivergenceError, OutOfBoundsError, ResourceLimitError, all EmulatorError.
    """
    return EmulatedKernel(
        name,
        input_names,
        output_names,
        source,
        header,
        ensure_row_contiguous,
        atomic_outputs,
        compile_options,
        lint,
    )
