"""Writing files the way users expect: atomically, and with the permissions of their umask.

`tempfile.mkstemp` and `mkdtemp` create 0600 files and 0700 directories, whatever the umask; a
file renamed into place keeps them, so converted models, adapters and caches would be readable
by their owner only. Everything written through here gets ``0666 & ~umask`` (files) or
``0777 & ~umask`` (directories), as `open()` and `mkdir` give, e.g. 0644 and 0755 under the
usual umask 022.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask (read by setting and restoring it, under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_default_mode(path: Path) -> None:
    """Give `path` the mode a plain `open()` / `mkdir` would have given it."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def atomic_write_bytes(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it into place
    (with the umask's permissions). A crash leaves the old file or the new one, never a
    half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        apply_default_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(path: Path, arrays: dict[str, mx.array],
                            metadata: dict[str, str] | None = None) -> None:
    """`mx.save_safetensors` through `atomic_write_bytes`."""
    atomic_write_bytes(path, lambda tmp: mx.save_safetensors(tmp, arrays, metadata=metadata or {}))


def atomic_write_json(path: Path, data: dict) -> None:
    """Indented JSON through `atomic_write_bytes`."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
