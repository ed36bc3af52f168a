"""A mirror of the kernel source `mx.fast.metal_kernel` generates (MLX 0.32.x).

MLX builds the Metal source in `write_signature` / `write_template`
(mlx/backend/common/metal_kernel.cpp). The rules reproduced here (see
shared/reference/metal-kernels.md, section 1):

* header, then `template <...>` (one parameter per template arg, in the given order), then
  `[[kernel]] void NAME(`, the parameters, `) {`, the body and `\\n}\\n`;
* inputs are `const constant` if they have fewer than 8 elements, else `const device`, passed
  by reference (`&`) when 0-d and by pointer otherwise;
* `x_shape` / `x_strides` / `x_ndim` buffers follow input `x` (ndim > 0 only) when that plain
  substring occurs in the body (not the header);
* attributes are detected by substring in the body and emitted in MLX's fixed order;
* the kernel name is `custom_kernel_<name>`, `_` plus the template string with `<`, `>`,
  `, ` and `-` replaced by `_` (last `_` dropped; the `-` rule is observed on 0.32.4), then
  one `_<type>[s|c]` per input and one `_<type>` per output. MLX uses no hash here, so the
  name is reproducible byte for byte;
* a templated kernel ends with an explicit `[[host_name]]` instantiation where bools print as
  1/0.

`mlx_reference_source` captures MLX's own text through the export trick (section 4c), which
works on the Linux CPU build, so tests can compare the mirror byte for byte.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

# Inputs with fewer elements go to the `constant` address space (max_constant_array_size).
MAX_CONSTANT_ARRAY_SIZE = 8

# MLX's get_type_string.
TYPE_STRINGS: dict[mx.Dtype, str] = {
    mx.bool_: "bool",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float32: "float",
    mx.float64: "double",
    mx.complex64: "complex64_t",
}

# The Metal kernel attributes MLX detects in the body, in the order it emits them.
METAL_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)
ATTRIBUTE_TYPES: dict[str, str] = dict(METAL_ATTRIBUTES)

TemplateValue = bool | int | mx.Dtype


def type_string(dtype: mx.Dtype) -> str:
    """The Metal type name MLX uses for `dtype` (e.g. float16 -> `float16_t`)."""
    try:
        return TYPE_STRINGS[dtype]
    except KeyError:
        raise ValueError(f"no Metal type for dtype {dtype}") from None


@dataclass(frozen=True)
class InputInfo:
    """What the signature depends on for one input array."""

    dtype: mx.Dtype
    ndim: int
    size: int

    @classmethod
    def of(cls, array: mx.array) -> InputInfo:
        return cls(array.dtype, array.ndim, array.size)

    @property
    def is_constant(self) -> bool:
        return self.size < MAX_CONSTANT_ARRAY_SIZE


@dataclass(frozen=True)
class ShapeInfo:
    """Which of `x_shape`, `x_strides`, `x_ndim` the body mentions for one input."""

    shape: bool
    strides: bool
    ndim: bool


@dataclass(frozen=True)
class KernelParam:
    """One parameter of the generated kernel, in order."""

    kind: str  # "input", "shape", "strides", "ndim", "output" or "attribute"
    name: str
    ctype: str  # element type (buffers) or attribute type
    by_reference: bool = False  # `constant T&` (0-d inputs and x_ndim)
    index: int = 0  # input/output position for buffers


@dataclass(frozen=True)
class GeneratedKernel:
    """The generated source and its pieces (source == header + signature + body + tail)."""

    name: str
    kernel_name: str
    template_def: str  # "<float, 4, 1>" or ""
    header: str
    signature: str
    body: str
    tail: str
    params: tuple[KernelParam, ...]
    bad_signature: bool  # MLX 0.32 trap: `) {` emitted after the first output

    @property
    def source(self) -> str:
        return self.header + self.signature + self.body + self.tail

    @property
    def buffer_params(self) -> tuple[KernelParam, ...]:
        return tuple(p for p in self.params if p.kind != "attribute")

    @property
    def attribute_params(self) -> tuple[KernelParam, ...]:
        return tuple(p for p in self.params if p.kind == "attribute")


def detect_shape_infos(input_names: Sequence[str], source: str) -> tuple[ShapeInfo, ...]:
    """MLX's substring test for `<input>_shape`, `_strides` and `_ndim` in the body."""
    return tuple(
        ShapeInfo(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source)
        for n in input_names
    )


def detect_attributes(source: str) -> tuple[str, ...]:
    """Attributes whose name occurs anywhere in the body (comments included), MLX order."""
    return tuple(name for name, _ in METAL_ATTRIBUTES if name in source)


def template_arguments(
    template: Sequence[tuple[str, TemplateValue]] | None,
) -> tuple[tuple[str, TemplateValue], ...]:
    """Validate template args as the Python binding does: bool, then int, then Dtype."""
    if not template:
        return ()
    args = []
    for item in template:
        try:
            name, value = item
        except (TypeError, ValueError):
            raise ValueError(
                f"[metal_kernel] template arguments must be (name, value) pairs, got {item!r}"
            ) from None
        if not isinstance(value, bool | int | mx.Dtype):
            raise ValueError(
                "[metal_kernel] Invalid template argument. Must be `mlx.core.Dtype`, `int` or "
                f"`bool` (got {value!r} for {name!r})."
            )
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**31) <= value < 2**31:
                raise ValueError(f"[metal_kernel] template int {name}={value} does not fit int")
        args.append((str(name), value))
    return tuple(args)


def _template_value_string(value: TemplateValue) -> str:
    if isinstance(value, bool):  # bool before int: True prints as 1, as C++'s << does
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return type_string(value)


def write_template(args: Sequence[tuple[str, TemplateValue]]) -> str:
    """`<v1, v2, ...>` as MLX's write_template prints it."""
    return "<" + ", ".join(_template_value_string(v) for _, v in args) + ">"


def _template_kind(value: TemplateValue) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return "typename"


def kernel_name(
    name: str,
    args: Sequence[tuple[str, TemplateValue]],
    inputs: Sequence[InputInfo],
    output_dtypes: Sequence[mx.Dtype],
) -> str:
    """`custom_kernel_<name>[_<template>]_<input types>_<output types>` (no hashing)."""
    out = "custom_kernel_" + name
    if args:
        mangled = write_template(args)
        for char in ("<", ">", ", ", "-"):  # 0.32.4 also turns the minus of ints into `_`
            mangled = mangled.replace(char, "_")
        out += "_" + mangled[:-1]
    for info in inputs:
        out += "_" + type_string(info.dtype)
        if info.ndim == 0:
            out += "s"
        elif info.is_constant:
            out += "c"
    for dtype in output_dtypes:
        out += "_" + type_string(dtype)
    return out


def build_kernel(
    *,
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str = "",
    atomic_outputs: bool = False,
    inputs: Sequence[InputInfo],
    output_dtypes: Sequence[mx.Dtype],
    template: Sequence[tuple[str, TemplateValue]] | None = None,
) -> GeneratedKernel:
    """Generate the kernel source exactly as MLX does, keeping its pieces apart."""
    if not output_names:
        raise ValueError("[metal_kernel] Must specify at least one output.")
    if len(inputs) != len(input_names):
        raise ValueError(
            f"[metal_kernel] Expected `inputs` to have size {len(input_names)} but got size "
            f"{len(inputs)}."
        )
    if len(output_dtypes) != len(output_names):
        raise ValueError(
            f"[metal_kernel] Expected `output_dtypes` to have size {len(output_names)} but got "
            f"size {len(output_dtypes)}."
        )
    args = template_arguments(template)
    shape_infos = detect_shape_infos(input_names, source)
    attributes = detect_attributes(source)
    kname = kernel_name(name, args, inputs, output_dtypes)

    sig = ""
    if args:
        sig += "template <" + ", ".join(f"{_template_kind(v)} {n}" for n, v in args) + ">\n"
    sig += f"[[kernel]] void {kname}(\n"
    params: list[KernelParam] = []
    index = 0
    for i, (iname, info, shp) in enumerate(zip(input_names, inputs, shape_infos, strict=True)):
        space = "constant" if info.is_constant else "device"
        ref = "&" if info.ndim == 0 else "*"
        ctype = type_string(info.dtype)
        sig += f"  const {space} {ctype}{ref} {iname} [[buffer({index})]],\n"
        params.append(KernelParam("input", iname, ctype, info.ndim == 0, i))
        index += 1
        if info.ndim > 0:
            if shp.shape:
                sig += f"  const constant int* {iname}_shape [[buffer({index})]],\n"
                params.append(KernelParam("shape", f"{iname}_shape", "int", False, i))
                index += 1
            if shp.strides:
                sig += f"  const constant int64_t* {iname}_strides [[buffer({index})]],\n"
                params.append(KernelParam("strides", f"{iname}_strides", "int64_t", False, i))
                index += 1
            if shp.ndim:
                sig += f"  const constant int& {iname}_ndim [[buffer({index})]],\n"
                params.append(KernelParam("ndim", f"{iname}_ndim", "int", True, i))
                index += 1
    bad_signature = False
    n_outputs = len(output_names)
    for j, (oname, dtype) in enumerate(zip(output_names, output_dtypes, strict=True)):
        ctype = type_string(dtype)
        full = f"atomic<{ctype}>" if atomic_outputs else ctype
        sig += f"  device {full}* {oname} [[buffer({index})]]"
        # MLX compares `index` (which also counts shape buffers) with n_inputs + n_outputs - 1.
        if index < len(inputs) + n_outputs - 1 or attributes:
            sig += ",\n"
        else:
            sig += ") {\n"
            if j < n_outputs - 1:
                bad_signature = True
        params.append(KernelParam("output", oname, full, False, j))
        index += 1
    for k, attr in enumerate(attributes):
        sig += f"  {ATTRIBUTE_TYPES[attr]} {attr} [[{attr}]]"
        sig += ",\n" if k < len(attributes) - 1 else ") {\n"
        params.append(KernelParam("attribute", attr, ATTRIBUTE_TYPES[attr]))

    template_def = write_template(args) if args else ""
    tail = "\n}\n"
    if args:
        inst = kname + template_def
        tail += f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({inst}) {inst};\n'
    return GeneratedKernel(
        name=name,
        kernel_name=kname,
        template_def=template_def,
        header=header,
        signature=sig,
        body=source,
        tail=tail,
        params=tuple(params),
        bad_signature=bad_signature,
    )


def _input_info(value: mx.array | bool | int | float) -> InputInfo:
    array = value if isinstance(value, mx.array) else mx.array(value)
    return InputInfo.of(array)


def generate_source(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str = "",
    atomic_outputs: bool = False,
    *,
    inputs: Sequence[mx.array | bool | int | float],
    output_dtypes: Sequence[mx.Dtype],
    template: Sequence[tuple[str, TemplateValue]] | None = None,
) -> str:
    """The Metal source `mx.fast.metal_kernel(...)(...)` would compile for these arguments."""
    return build_kernel(
        name=name,
        input_names=input_names,
        output_names=output_names,
        source=source,
        header=header,
        atomic_outputs=atomic_outputs,
        inputs=[_input_info(x) for x in inputs],
        output_dtypes=output_dtypes,
        template=template,
    ).source


def _capture_native_stdout(fn) -> str:
    """Run fn() with file descriptor 1 redirected; MLX prints the source from C++."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            fn()
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode("utf-8", errors="replace")


def mlx_reference_source(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str = "",
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
    *,
    inputs: Sequence[mx.array | bool | int | float],
    output_shapes: Sequence[Sequence[int]],
    output_dtypes: Sequence[mx.Dtype],
    template: Sequence[tuple[str, TemplateValue]] | None = None,
    grid: tuple[int, int, int] = (1, 1, 1),
    threadgroup: tuple[int, int, int] = (1, 1, 1),
) -> str:
    """MLX's own generated source, captured with the export trick (works without Metal).

    `mx.export_function` traces a function calling the kernel with `verbose=True`; MLX
    prints the generated source from C++, so stdout is captured at the file-descriptor level.
    """
    kernel = mx.fast.metal_kernel(
        name=name,
        input_names=list(input_names),
        output_names=list(output_names),
        source=source,
        header=header,
        ensure_row_contiguous=ensure_row_contiguous,
        atomic_outputs=atomic_outputs,
    )
    array_positions = [i for i, x in enumerate(inputs) if isinstance(x, mx.array)]

    def traced(*arrays: mx.array) -> list[mx.array]:
        values = list(inputs)
        for pos, arr in zip(array_positions, arrays, strict=True):
            values[pos] = arr
        return kernel(
            inputs=values,
            template=list(template) if template else None,
            grid=grid,
            threadgroup=threadgroup,
            output_shapes=[tuple(s) for s in output_shapes],
            output_dtypes=list(output_dtypes),
            verbose=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.mlxfn")
        text = _capture_native_stdout(
            lambda: mx.export_function(path, traced, *[inputs[i] for i in array_positions])
        )
    marker = f"Generated source code for `{name}`:\n```\n"
    start = text.find(marker)
    end = text.rfind("\n```\n")
    if start < 0 or end < start:
        raise RuntimeError(f"could not find MLX's generated source in its output: {text!r}")
    return text[start + len(marker) : end]
