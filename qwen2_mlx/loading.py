"""`load`, the public entry point: the whole model (`loader.load`) or, in a run of several
processes, this process's part of it (`parallel.load_sharded`).

It sits above both so that the loader never imports the parallel package, which builds on it.
"""

from __future__ import annotations

import os

import mlx.core as mx

from qwen2_mlx import loader


def load(
    path_or_repo: str | os.PathLike,
    *,
    dtype: str | mx.Dtype | None = None,
    adapter_path: str | os.PathLike | None = None,
    revision: str | None = None,
    dca: bool = False,
    chunk_size: int | None = None,
    local_size: int | None = None,
    yarn_factor: float | None = None,
    parallel: str | None = None,
    group: mx.distributed.Group | None = None,
):
    """Load a Qwen2 model and its tokenizer: `(model, tokenizer)`.

    The arguments are `qwen2_mlx.loader.load`'s, plus:
        parallel: ``"tensor"`` or ``"pipeline"`` to hold only this process's part of the
            model, in a run of several processes started by ``mlx.launch`` (see
            `qwen2_mlx.parallel.load_sharded`); ``None`` loads the whole model.
        group: the ``mx.distributed`` group to shard over (default: ``mx.distributed.init()``).
    """
    options = dict(dtype=dtype, adapter_path=adapter_path, revision=revision, dca=dca,
                   chunk_size=chunk_size, local_size=local_size, yarn_factor=yarn_factor)
    if parallel is None and group is None:
        return loader.load(path_or_repo, **options)
    from qwen2_mlx.parallel import load_sharded

    return load_sharded(path_or_repo, parallel=parallel, group=group, **options)
