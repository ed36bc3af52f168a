"""Turn a generated Metal kernel into a loaded C++ shared library (cached on disk and in memory).

The compile unit is MLX's generated source with four changes, all line-preserving:
threadgroup declarations become per-threadgroup shared, poisoned storage
(`mtl_rt_tg_alloc`), read-only swizzles (`v.xy`) become member calls, `#include <metal_*>`
lines are blanked (the shim provides them), and
`#line` directives name the parts (`<name>.header.metal`, `<name>.source.metal`, ...) so that
compiler diagnostics, barrier errors and faults point at lines of the user's own strings.
An `extern "C"` entry point unpacks the buffer table and the per-thread attributes and calls
the kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from qwen2_mlx.metal_kernels.emulator.errors import CompileError, EmulatorError
from qwen2_mlx.metal_kernels.emulator.lint import strip_comments_and_strings
from qwen2_mlx.metal_kernels.emulator.signature import GeneratedKernel, KernelParam

SHIM_DIR = Path(__file__).parent / "shim"
SHIM_HEADER = SHIM_DIR / "mtl_shim.h"
RUNTIME_SOURCE = SHIM_DIR / "mtl_runtime.cpp"

# -fwrapv/-fno-strict-aliasing: Metal integers wrap and kernels reinterpret device pointers.
# -Werror=vla: Metal has no variable-length arrays (g++ would accept them as an extension).
COMMON_FLAGS = (
    "-std=c++20",
    "-fPIC",
    "-fwrapv",
    "-fno-strict-aliasing",
    "-fno-exceptions",
    "-fno-rtti",
    "-Wno-attributes",
    "-Wno-literal-suffix",
    "-Werror=vla",
)
KERNEL_FLAGS = ("-O1", "-g1")
RUNTIME_FLAGS = ("-O2",)


def extra_flags() -> tuple[str, ...]:
    """$QWEN2_MLX_EMULATOR_CXXFLAGS, appended to every compile (e.g. -DMTL_RT_USE_UCONTEXT to
    use the portable ucontext fibers instead of the x86-64 context switch)."""
    return tuple(os.environ.get("QWEN2_MLX_EMULATOR_CXXFLAGS", "").split())


_TG_DECL = re.compile(
    r"\bthreadgroup\s+(?P<type>(?:const\s+)?[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s+"
    r"(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\];]+\]\s*)*);"
)
_TG_LEFTOVER = re.compile(r"\bthreadgroup\s+[^;()*&]*;")
_METAL_INCLUDE_LINE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<metal_\w+>[^\n]*$", re.MULTILINE)


def _part_name(kernel: GeneratedKernel, part: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_]", "_", kernel.name) or "kernel"
    return f"{safe}.{part}.metal"


def rewrite_threadgroup_declarations(text: str, first_site: int = 0) -> tuple[str, int]:
    """Replace `threadgroup T name[N]...;` by a reference to per-threadgroup storage.

    Returns the new text and the next free site id. Newlines inside a declaration are kept
    (appended after it) so line numbers do not move.
    """
    site = first_site

    def replace(m: re.Match[str]) -> str:
        nonlocal site
        alias = f"mtl_tg_type_{site}"
        name = m.group("name")
        dims = re.sub(r"\s+", "", m.group("dims"))
        code = (
            f"using {alias} = {m.group('type')}{dims}; "
            f"{alias}& {name} = *static_cast<{alias}*>(mtl_rt_tg_alloc({site}, sizeof({alias}), "
            f'alignof({alias}), "{name}", __LINE__, __FILE__));'
        )
        site += 1
        return code + "\n" * m.group(0).count("\n")

    # Match on the text with comments and strings blanked (same offsets), edit the original.
    code = strip_comments_and_strings(text)
    pieces, last = [], 0
    for m in _TG_DECL.finditer(code):
        pieces.append(text[last : m.start()])
        pieces.append(replace(m))
        last = m.end()
    pieces.append(text[last:])
    return "".join(pieces), site


def _check_leftover_threadgroup(kernel: GeneratedKernel, text: str, part: str) -> None:
    m = _TG_LEFTOVER.search(strip_comments_and_strings(text))
    if m:
        line = text.count("\n", 0, m.start()) + 1
        raise EmulatorError(
            f"kernel '{kernel.name}': {part} line {line}: unsupported threadgroup declaration "
            f"`{m.group(0).strip()}`; declare one threadgroup array per statement"
        )


_SWIZZLE = re.compile(r"(?<=[\w)\]])\.([xyzw]{2,4}|[rgba]{2,4})\b(?!\s*\()")
_SWIZZLE_INDEX = {"x": 0, "y": 1, "z": 2, "w": 3, "r": 0, "g": 1, "b": 2, "a": 3}


def rewrite_swizzles(text: str) -> str:
    """`v.xy` -> `v.template swz<0, 1>()` (read-only swizzles; C++ has no swizzle members).

    Assigning to a swizzle is left alone and fails to compile. A user struct with a member
    named like a swizzle (e.g. `xy`) would be rewritten too.
    """
    code = strip_comments_and_strings(text)
    pieces, last = [], 0
    for m in _SWIZZLE.finditer(code):
        indices = ", ".join(str(_SWIZZLE_INDEX[c]) for c in m.group(1))
        pieces.append(text[last : m.start()])
        pieces.append(f".template swz<{indices}>()")
        last = m.end()
    pieces.append(text[last:])
    return "".join(pieces)


def _blank_metal_includes(text: str) -> str:
    return _METAL_INCLUDE_LINE.sub("", text)


def _entry_argument(p: KernelParam, buffer_index: int) -> str:
    if p.kind == "attribute":
        if p.ctype == "uint3":
            return f"uint3(mtl_a->{p.name}.x, mtl_a->{p.name}.y, mtl_a->{p.name}.z)"
        return f"mtl_a->{p.name}"
    const = "" if p.kind == "output" else "const "
    if p.by_reference:
        return f"*({const}{p.ctype}*)mtl_b[{buffer_index}]"
    return f"({const}{p.ctype}*)mtl_b[{buffer_index}]"


def compile_unit(kernel: GeneratedKernel) -> str:
    """The C++ translation unit for `kernel` (see the module docstring)."""
    header, site = rewrite_threadgroup_declarations(_blank_metal_includes(kernel.header))
    body, _ = rewrite_threadgroup_declarations(_blank_metal_includes(kernel.body), site)
    header, body = rewrite_swizzles(header), rewrite_swizzles(body)
    _check_leftover_threadgroup(kernel, body, "source")
    parts = ['#include "mtl_shim.h"\n', f'#line 1 "{_part_name(kernel, "header")}"\n', header]
    # A #line directive needs its own line; MLX glues the template line to an unterminated
    # header, so only mark the signature when the header ends a line.
    if header == "" or header.endswith("\n"):
        parts.append(f'#line 1 "{_part_name(kernel, "signature")}"\n')
    parts.append(kernel.signature)
    parts.append(f'#line 1 "{_part_name(kernel, "source")}"\n')
    parts.append(body)
    parts.append("\n}\n")
    parts.append(f'#line 1 "{_part_name(kernel, "generated")}"\n')
    parts.append(kernel.tail[len("\n}\n") :])
    args = []
    buffer_index = 0
    for p in kernel.params:
        args.append(_entry_argument(p, buffer_index))
        if p.kind != "attribute":
            buffer_index += 1
    call = kernel.kernel_name + kernel.template_def
    joined = ",\n      ".join(args)
    parts.append(
        '\nextern "C" __attribute__((visibility("default"))) void mtl_kernel_entry(\n'
        "    void* const* mtl_b, const mtl_rt_thread_attrs* mtl_a) {\n"
        f"  (void)mtl_a;\n  {call}(\n      {joined});\n"
        "}\n"
        'extern "C" __attribute__((visibility("default"))) int mtl_kernel_launch('
        "mtl_rt_launch* launch) {\n"
        "  return mtl_rt_launch_kernel(launch, &mtl_kernel_entry);\n"
        "}\n"
    )
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Compiler, cache and loading.
# ---------------------------------------------------------------------------------------------


class LaunchStruct(ctypes.Structure):
    """Mirror of `struct mtl_rt_launch` in mtl_shim.h."""

    _fields_ = [
        ("buffers", ctypes.POINTER(ctypes.c_void_p)),
        ("n_buffers", ctypes.c_uint32),
        ("grid", ctypes.c_uint32 * 3),
        ("threadgroup", ctypes.c_uint32 * 3),
        ("seed", ctypes.c_uint64),
        ("randomize", ctypes.c_int32),
        ("stack_bytes", ctypes.c_uint32),
        ("max_threadgroup_memory", ctypes.c_uint32),
        ("error", ctypes.c_int32),
        ("fault_signal", ctypes.c_int32),
        ("fault_write", ctypes.c_int32),
        ("fault_addr", ctypes.c_uint64),
        ("fault_pc_offset", ctypes.c_uint64),
        ("err_thread", ctypes.c_uint32 * 3),
        ("err_threadgroup", ctypes.c_uint32 * 3),
        ("err_line", ctypes.c_int32),
        ("err_file", ctypes.c_char * 256),
        ("message", ctypes.c_char * 2048),
    ]


@dataclass
class CompiledKernel:
    """A loaded kernel library."""

    path: Path
    lib: ctypes.CDLL
    compile_seconds: float  # 0.0 when it came from the on-disk cache


def cache_dir() -> Path:
    """$QWEN2_MLX_EMULATOR_CACHE, else $XDG_CACHE_HOME/qwen2_mlx/emulator (~/.cache if unset),
    else a per-user directory under the system temp dir."""
    env = os.environ.get("QWEN2_MLX_EMULATOR_CACHE")
    candidates = []
    if env:
        candidates.append(Path(env))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    candidates.append(Path(xdg) / "qwen2_mlx" / "emulator")
    candidates.append(Path(tempfile.gettempdir()) / f"qwen2_mlx_emulator_{os.getuid()}")
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    raise EmulatorError(f"no writable cache directory among {[str(p) for p in candidates]}")


def find_compiler() -> str:
    """$CXX if set, else g++ on PATH."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        raise EmulatorError("the Metal-kernel emulator needs a C++20 compiler (g++) on PATH")
    return cxx


_lock = threading.Lock()
_loaded: dict[str, CompiledKernel] = {}
_runtime_objects: dict[str, Path] = {}


def _compiler_identity(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else cxx


def _run_compiler(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CompileError(f"{what}: g++ failed:\n{proc.stderr.strip()}")


def _atomic_output(final: Path, build) -> None:
    tmp = final.with_name(f"{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        build(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _runtime_object(cxx: str, directory: Path) -> tuple[Path, str]:
    ident = _compiler_identity(cxx)
    key_src = "\0".join(
        [
            ident,
            " ".join(COMMON_FLAGS + RUNTIME_FLAGS + extra_flags()),
            SHIM_HEADER.read_text(),
            RUNTIME_SOURCE.read_text(),
        ]
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    if key in _runtime_objects:
        return _runtime_objects[key], key
    obj = directory / f"mtl_runtime-{key}.o"
    if not obj.exists():
        _atomic_output(
            obj,
            lambda tmp: _run_compiler(
                [
                    cxx,
                    *COMMON_FLAGS,
                    *RUNTIME_FLAGS,
                    *extra_flags(),
                    "-c",
                    str(RUNTIME_SOURCE),
                    "-o",
                    str(tmp),
                ],
                "emulator runtime",
            ),
        )
    _runtime_objects[key] = obj
    return obj, key


def load_kernel(kernel: GeneratedKernel) -> CompiledKernel:
    """Compile (or fetch from cache) and load the library for `kernel`."""
    unit = compile_unit(kernel)
    with _lock:
        cxx = find_compiler()
        directory = cache_dir()
        runtime, runtime_key = _runtime_object(cxx, directory)
        key = hashlib.sha256(
            "\0".join([runtime_key, " ".join(KERNEL_FLAGS + extra_flags()), unit]).encode()
        ).hexdigest()[:24]
        if key in _loaded:
            return _loaded[key]
        so = directory / f"kernel-{key}.so"
        seconds = 0.0
        if not so.exists():
            src = directory / f"kernel-{key}.cpp"
            src.write_text(unit)
            start = time.perf_counter()
            _atomic_output(
                so,
                lambda tmp: _run_compiler(
                    [
                        cxx,
                        *COMMON_FLAGS,
                        *KERNEL_FLAGS,
                        *extra_flags(),
                        "-shared",
                        "-Wl,-Bsymbolic",
                        "-I",
                        str(SHIM_DIR),
                        str(src),
                        str(runtime),
                        "-o",
                        str(tmp),
                    ],
                    f"kernel '{kernel.name}' ({src})",
                ),
            )
            seconds = time.perf_counter() - start
        lib = ctypes.CDLL(str(so))
        lib.mtl_kernel_launch.argtypes = [ctypes.POINTER(LaunchStruct)]
        lib.mtl_kernel_launch.restype = ctypes.c_int
        lib.mtl_rt_buffer_alloc.argtypes = [ctypes.c_size_t, ctypes.c_int]
        lib.mtl_rt_buffer_alloc.restype = ctypes.c_void_p
        lib.mtl_rt_buffer_protect_readonly.argtypes = [ctypes.c_void_p]
        lib.mtl_rt_buffer_protect_readonly.restype = ctypes.c_int
        lib.mtl_rt_buffer_check_slack.argtypes = [ctypes.c_void_p]
        lib.mtl_rt_buffer_check_slack.restype = ctypes.c_longlong
        lib.mtl_rt_buffer_free.argtypes = [ctypes.c_void_p]
        lib.mtl_rt_buffer_free.restype = None
        compiled = CompiledKernel(so, lib, seconds)
        _loaded[key] = compiled
        return compiled


def source_location(library: Path, pc_offset: int) -> tuple[str, int] | None:
    """(file, line) of a program counter in a kernel library, preferring the user's parts."""
    addr2line = shutil.which("addr2line")
    if not addr2line or not pc_offset:
        return None
    proc = subprocess.run(
        [addr2line, "-i", "-e", str(library), hex(pc_offset)],
        capture_output=True,
        text=True,
        check=False,
    )
    fallback = None
    for raw in proc.stdout.splitlines():
        loc = raw.split(" (discriminator")[0].strip()
        file, _, line = loc.rpartition(":")
        if not line.isdigit() or file in ("", "??"):
            continue
        base = os.path.basename(file)
        if base.endswith((".source.metal", ".header.metal")):
            return base, int(line)
        fallback = fallback or (base, int(line))
    return fallback
