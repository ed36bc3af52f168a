"""Writing a converted model: atomically, in safetensors shards of bounded size, with an index.

Everything is written into a hidden temporary directory next to the output and renamed into
place only once complete, so an interrupted or failed conversion never leaves a partial model
under the output name. A temporary directory left by a killed run (its process is gone) is
removed by the next conversion into the same parent directory.

The layout is mlx-lm's: `model.safetensors` or `model-0000i-of-0000n.safetensors` with
metadata {"format": "mlx"}, and `model.safetensors.index.json` with `total_size`,
`total_parameters` and a sorted `weight_map`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx

from qwen2_mlx.files import apply_default_mode

MAX_SHARD_BYTES = 5_000_000_000  # "at most 5 GB per file", as the Hub recommends
SHARD_METADATA = {"format": "mlx"}
PARTIAL_MARKER = ".partial-"

# Test hook: seconds to sleep after each shard is written, so a test can kill the process
# at a known point of a conversion.
PAUSE_AFTER_SHARD_ENV = "QWEN2_MLX_TEST_PAUSE_AFTER_SHARD"


class DiskFullError(OSError):
    """The disk filled up while writing the converted model (partial output removed)."""


def write_safetensors(file: Path, tensors: dict[str, mx.array], metadata: dict[str, str]) -> None:
    """Write one safetensors file; OSError(ENOSPC) when the disk is full.

    MLX reports a failed write as RuntimeError without errno, so the free space decides.
    """
    try:
        mx.save_safetensors(str(file), tensors, metadata=metadata)
    except RuntimeError as e:
        needed = sum(t.nbytes for t in tensors.values())
        free = shutil.disk_usage(file.parent).free
        if free < needed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file)) from e
        raise OSError(errno.EIO, f"cannot write {file}: {e}", str(file)) from e


def parameter_count(name: str, tensor: mx.array, bits: int | None) -> int:
    """Model parameters a stored tensor stands for: a packed weight holds 32 // bits each;
    quantization scales and biases are not parameters."""
    if bits is not None:
        if name.endswith((".scales", ".biases")):
            return 0
        if name.endswith(".weight"):
            return tensor.size * 32 // bits
    return tensor.size


class ShardedWriter:
    """Collects evaluated tensors and writes them in shards of at most `max_shard_bytes`.

    Within a shard the tensors are written in `order` (the model's parameter order), so a
    conversion that fits in one shard is byte-for-byte the layout mlx-lm writes.
    """

    def __init__(
        self,
        directory: Path,
        max_shard_bytes: int = MAX_SHARD_BYTES,
        order: list[str] | None = None,
        log: Callable[[str], None] = lambda _: None,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max shard size must be positive, got {max_shard_bytes}")
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._rank = {name: i for i, name in enumerate(order or [])}
        self._log = log
        self._buffer: dict[str, mx.array] = {}
        self._buffer_bytes = 0
        self._files: list[tuple[Path, list[str]]] = []
        self.total_size = 0
        self.total_parameters = 0

    def add(self, name: str, tensor: mx.array, bits: int | None = None) -> None:
        """Queue one tensor (evaluated now, so its inputs are freed); `bits` if it is packed."""
        mx.eval(tensor)
        if self._buffer and self._buffer_bytes + tensor.nbytes > self.max_shard_bytes:
            self.flush()
        self._buffer[name] = tensor
        self._buffer_bytes += tensor.nbytes
        self.total_size += tensor.nbytes
        self.total_parameters += parameter_count(name, tensor, bits)

    def flush(self) -> None:
        """Write the queued tensors as the next shard."""
        if not self._buffer:
            return
        names = sorted(self._buffer, key=lambda n: (self._rank.get(n, len(self._rank)), n))
        file = self.directory / f"shard-{len(self._files) + 1:05d}.safetensors"
        tensors = {n: self._buffer[n] for n in names}
        self._buffer, self._buffer_bytes = {}, 0
        write_safetensors(file, tensors, SHARD_METADATA)
        self._files.append((file, names))
        self._log(f"wrote shard {len(self._files)} ({len(names)} tensors, "
                  f"{format_bytes(sum(t.nbytes for t in tensors.values()))})")
        del tensors
        pause = os.environ.get(PAUSE_AFTER_SHARD_ENV)
        if pause:
            time.sleep(float(pause))

    def close(self) -> list[Path]:
        """Write the last shard, give the shards their final names and write the index."""
        self.flush()
        n = len(self._files)
        weight_map: dict[str, str] = {}
        final: list[Path] = []
        for i, (file, names) in enumerate(self._files, start=1):
            name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            file.rename(self.directory / name)
            final.append(self.directory / name)
            weight_map.update({tensor: name for tensor in names})
        index = {
            "metadata": {
                "total_size": self.total_size,
                "total_parameters": self.total_parameters,
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
        return final


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"  # pragma: no cover


def parse_size(text: str | int) -> int:
    """"5GB", "500MB", "64KB" or a byte count -> bytes (decimal units, as the Hub uses)."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    s = text.strip().upper()
    unit = next((u for u in units if s.endswith(u)), None)
    number, factor = (s[: -len(unit)].strip(), units[unit]) if unit else (s, 1)
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"size must look like 5GB, 500MB or a byte count, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value * factor)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(output: Path, log: Callable[[str], None] = lambda _: None) -> None:
    """Delete temporary directories of earlier conversions to `output` whose process died."""
    prefix = f".{output.name}{PARTIAL_MARKER}"
    if not output.parent.is_dir():
        return
    for entry in output.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(entry, ignore_errors=True)
            log(f"removed {entry.name}, left by an interrupted conversion")


@contextlib.contextmanager
def atomic_output_dir(
    output: Path, force: bool = False, log: Callable[[str], None] = lambda _: None
) -> Iterator[Path]:
    """Yield a temporary directory that becomes `output` when the block completes.

    On any exception (KeyboardInterrupt and SystemExit included) the temporary directory is
    removed and `output` is untouched. An existing `output` is refused unless `force`, which
    replaces it only after the new model is complete. A full disk raises DiskFullError.
    """
    output = Path(output)
    check_output_free(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(output, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}{PARTIAL_MARKER}{os.getpid()}-",
                                dir=output.parent))
    apply_default_mode(tmp)  # mkdtemp makes it 0700; the output gets the umask's mode
    try:
        try:
            yield tmp
        except OSError as e:
            if e.errno == errno.ENOSPC and not isinstance(e, DiskFullError):
                raise DiskFullError(
                    errno.ENOSPC,
                    f"no space left on {output.parent} while writing "
                    f"{Path(e.filename).name if e.filename else 'the model'}; the partial "
                    f"output was removed and {output} was not created (free space or choose "
                    "another --mlx-path)",
                ) from e
            raise
        _move_into_place(tmp, output, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class OutputExistsError(FileExistsError):
    """An output path that exists: refused without `force`, and refused even with it unless
    it is a model directory (config.json and *.safetensors) or an empty directory.

    `str()` words the fix for Python callers (force=True); `cli_message()` for the command
    line (--force).
    """

    def __init__(self, problem: str, replaceable: bool) -> None:
        super().__init__(problem + ("; pass force=True to replace it" if replaceable else ""))
        self.problem, self.replaceable = problem, replaceable

    def cli_message(self) -> str:
        return self.problem + ("; add --force to replace it" if self.replaceable else "")


def looks_like_model_dir(path: Path) -> bool:
    """A directory holding config.json and safetensors weights (what convert and fuse write)."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def check_output_free(output: Path, force: bool) -> None:
    """Refuse an existing output path, unless `force` and it is a model directory or an
    empty one (a file, or a directory of anything else, is never replaced)."""
    if not output.exists() and not output.is_symlink():
        return
    if output.is_symlink() or not output.is_dir():
        raise OutputExistsError(f"output {output} exists and is not a directory; it is never "
                                "replaced (choose another output path)", replaceable=False)
    entries = sorted(p.name for p in output.iterdir())
    if entries and not looks_like_model_dir(output):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputExistsError(
            f"output {output} exists and holds files that are not a model ({shown}); only a "
            "model directory (config.json and *.safetensors) or an empty one is ever replaced, "
            "so choose another output path or empty it yourself", replaceable=False)
    if not force:
        raise OutputExistsError(f"output {output} already exists", replaceable=True)


def check_not_source(output: Path, source: Path, what: str = "the source checkpoint") -> None:
    """Refuse an output that is the source model directory or one of its parents."""
    out, src = Path(output).resolve(), Path(source).resolve()
    if out == src or out in src.parents:
        raise ValueError(f"output {output} would overwrite {what} {source}; choose another "
                         "output path")


def _move_into_place(tmp: Path, output: Path, force: bool) -> None:
    check_output_free(output, force)
    if not output.exists() and not output.is_symlink():
        os.rename(tmp, output)
        return
    # Keep the old output until the new one is in place, then delete it.
    old = output.parent / f".{output.name}.replaced-{os.getpid()}"
    os.rename(output, old)
    os.rename(tmp, output)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
