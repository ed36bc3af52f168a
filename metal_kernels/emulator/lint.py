"""A lint for kernel sources: constructs g++ accepts but the Metal compiler (or MLX's JIT)
rejects.

The emulator compiles kernels as C++, which is more permissive than the Metal Shading
Language: MSL has no `double`, no C++ standard library, no exceptions, new/delete, virtual
functions, RTTI, goto, thread_local or recursion, and MLX passes the source through
`NS::ASCIIStringEncoding`. The lint catches these before g++ would silently accept them, as
well as CUDA constructs that slip in when porting kernels. Comments and string literals are
ignored except for the ASCII check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qwen2_mlx.metal_kernels.emulator.errors import LintError


@dataclass(frozen=True)
class LintFinding:
    part: str  # "source" or "header"
    line: int  # 1-based, within that part
    column: int  # 1-based
    message: str

    def __str__(self) -> str:
        return f"{self.part} line {self.line}, column {self.column}: {self.message}"


_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\blong\s+double\b"), "`long double` does not exist in Metal"),
    (re.compile(r"\bdouble\b"), "`double` is not supported by Metal (use float)"),
    (
        re.compile(r"\bstd\s*::"),
        "the C++ standard library (std::) is not available in Metal; use metal:: functions",
    ),
    (
        re.compile(r"\b(printf|fprintf|sprintf|puts|cout|cerr)\b"),
        "console output is not available in Metal kernels",
    ),
    (
        re.compile(r"\b(malloc|calloc|realloc|free)\s*\("),
        "dynamic memory allocation is not available in Metal",
    ),
    (re.compile(r"\bnew\b|\bdelete\b"), "new/delete are not available in Metal"),
    (re.compile(r"\b(throw|try|catch)\b"), "exceptions are not available in Metal"),
    (re.compile(r"\bvirtual\b"), "virtual functions are not available in Metal"),
    (re.compile(r"\b(dynamic_cast|typeid)\b"), "RTTI is not available in Metal"),
    (re.compile(r"\bgoto\b"), "goto is not available in Metal"),
    (re.compile(r"\bthread_local\b"), "thread_local is not available in Metal"),
    (
        re.compile(
            r"\b(__syncthreads|__syncwarp|__shared__|__global__|__device__|threadIdx|blockIdx|"
            r"blockDim|gridDim|warpSize|atomicAdd|__shfl\w*)\b"
        ),
        "CUDA construct; Metal spells it differently (threadgroup_barrier, threadgroup, "
        "thread_position_in_grid, simd_shuffle, ...)",
    ),
)

_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*(\S+)", re.MULTILINE)
_METAL_INCLUDE = re.compile(r"<metal_\w+>")
_STATIC_LOCAL = re.compile(r"\bstatic\b(?!\s+(constant|constexpr|const)\b)")
_FUNCTION_DEF = re.compile(r"\b([A-Za-z_]\w*)\s*\(([^;{}()]|\([^;{}()]*\))*\)\s*(const\s*)?\{")
_NOT_FUNCTIONS = frozenset(
    {"if", "for", "while", "switch", "catch", "return", "sizeof", "alignof", "decltype"}
)


def strip_comments_and_strings(text: str) -> str:
    """Blank out comments, string and char literals, keeping every newline and column."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            if j < n and text[j] == c:
                j += 1
            j = min(j, n)
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column


def _matching_brace(text: str, open_at: int) -> int:
    depth = 0
    for k in range(open_at, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return k
    return len(text)


def _lint_part(text: str, part: str) -> list[LintFinding]:
    findings: list[LintFinding] = []
    for offset, ch in enumerate(text):
        if ord(ch) > 127:
            line, col = _position(text, offset)
            findings.append(
                LintFinding(
                    part,
                    line,
                    col,
                    f"non-ASCII character U+{ord(ch):04X}; MLX passes kernel sources through "
                    "NS::ASCIIStringEncoding",
                )
            )
            break
    code = strip_comments_and_strings(text)
    for pattern, message in _RULES:
        for m in pattern.finditer(code):
            line, col = _position(code, m.start())
            findings.append(LintFinding(part, line, col, f"{message} (`{m.group(0)}`)"))
    for m in _INCLUDE.finditer(text):
        target = m.group(1)
        in_comment = code[text.index("#", m.start())] != "#"
        if not in_comment and not _METAL_INCLUDE.fullmatch(target):
            line, col = _position(code, m.start())
            findings.append(
                LintFinding(
                    part,
                    line,
                    col,
                    f"#include {target}: MLX JIT-compiles kernels from strings; only Metal's "
                    "own <metal_*> headers can be included",
                )
            )
    if part == "source":
        for m in _STATIC_LOCAL.finditer(code):
            line, col = _position(code, m.start())
            findings.append(
                LintFinding(
                    part,
                    line,
                    col,
                    "static local variables must be `constant` in Metal",
                )
            )
    for m in _FUNCTION_DEF.finditer(code):
        fname = m.group(1)
        if fname in _NOT_FUNCTIONS:
            continue
        body_start = m.end() - 1
        body = code[body_start : _matching_brace(code, body_start) + 1]
        call = re.search(rf"(?<!::)(?<!\.)(?<!->)\b{re.escape(fname)}\s*(<[^;{{}}]*>)?\s*\(", body)
        if call:
            line, col = _position(code, body_start + call.start())
            findings.append(
                LintFinding(
                    part,
                    line,
                    col,
                    f"function '{fname}' calls itself; Metal does not support recursion",
                )
            )
    return findings


def lint_findings(source: str, header: str = "") -> list[LintFinding]:
    """Every Metal incompatibility found in `header` and `source` (the kernel body)."""
    return _lint_part(header, "header") + _lint_part(source, "source")


def lint_kernel(name: str, source: str, header: str = "") -> None:
    """Raise LintError listing every finding, if any."""
    findings = lint_findings(source, header)
    if findings:
        lines = "\n  ".join(str(f) for f in findings)
        raise LintError(f"kernel '{name}': source is not valid Metal:\n  {lines}")
