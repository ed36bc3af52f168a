"""Errors raised by the Metal-kernel emulator.

Every message names the kernel and, where the emulator can tell, the line of the kernel
source (or header) and the buffer involved.
"""

from __future__ import annotations


class EmulatorError(RuntimeError):
    """Base class: the kernel cannot be emulated, or the emulator found a bug in it."""


class LintError(EmulatorError):
    """The source uses a construct the Metal compiler (or MLX's JIT) does not accept."""


class CompileError(EmulatorError):
    """g++ rejected the generated source (message holds its diagnostics)."""


class BarrierDivergenceError(EmulatorError):
    """A barrier or simdgroup collective was not reached uniformly (or deadlocked)."""


class OutOfBoundsError(EmulatorError):
    """A read or write outside a buffer, threadgroup array or fiber stack."""


class ArithmeticTrapError(EmulatorError):
    """The kernel trapped on arithmetic (integer division by zero): a trap on the CPU, an
    undefined result on a GPU."""


class ResourceLimitError(EmulatorError):
    """A Metal resource limit is exceeded (threadgroup size, threadgroup memory)."""
