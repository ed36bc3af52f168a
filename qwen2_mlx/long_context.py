"""Which long-context mode a model runs in: standard RoPE, static YaRN, or Dual Chunk Attention.

The rules follow Qwen's reference code (spec `long-context.md` §0):

* `dual_chunk_attention_config` in config.json selects DCA, and then `rope_scaling` is ignored
  (vLLM's `get_rope()` checks DCA first and builds plain RoPE frequencies);
* otherwise `rope_scaling` with type `yarn` selects static YaRN, applied at every length;
* otherwise plain RoPE.

A user can switch either mode on for a model whose config lacks it (`generate --dca`,
`--yarn-factor`); that is a config edit made before the model is built or re-configured, so
the same rules then apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen2_mlx.dca import DualChunkConfig


@dataclass(frozen=True)
class LongContext:
    """The resolved mode: what RoPE gets, the DCA settings, and the usable context."""

    mode: str  # "standard", "yarn" or "dca"
    rope_scaling: dict[str, Any] | None
    dca: DualChunkConfig | None
    context_length: int


def training_length(config: dict[str, Any]) -> int:
    """The context the model was trained at: YaRN's original length, else max positions."""
    scaling = config.get("rope_scaling") or {}
    return int(scaling.get("original_max_position_embeddings")
               or config.get("max_position_embeddings") or 32768)


def with_long_context(
    config: dict[str, Any],
    *,
    dca: bool = False,
    chunk_size: int | None = None,
    local_size: int | None = None,
    yarn_factor: float | None = None,
) -> dict[str, Any]:
    """Return a copy of a config dict with DCA or YaRN switched on.

    DCA defaults follow the ChunkLlama/vLLM pattern for Qwen2: chunk size = training length,
    local window = chunk size / 16, and the length temperature anchored at the training
    length. YaRN uses `factor` over the training length.
    """
    if dca and yarn_factor is not None:
        raise ValueError("choose one long-context mode: --dca or --yarn-factor, not both")
    if not dca and (chunk_size is not None or local_size is not None):
        raise ValueError("--chunk-size and --local-size need --dca")
    config = dict(config)
    trained = training_length(config)
    if dca:
        chunk = int(chunk_size or trained)
        config["dual_chunk_attention_config"] = {
            "chunk_size": chunk,
            "local_size": int(local_size or max(1, chunk // 16)),
            "original_max_position_embeddings": trained,
        }
    elif yarn_factor is not None:
        if not yarn_factor > 1.0:
            raise ValueError(f"yarn factor must be > 1, got {yarn_factor}")
        config.pop("dual_chunk_attention_config", None)
        config["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": float(yarn_factor),
            "original_max_position_embeddings": trained,
        }
    return config


def resolve_long_context(
    rope_scaling: dict[str, Any] | None,
    dual_chunk_attention_config: dict[str, Any] | None,
    max_position_embeddings: int,
) -> LongContext:
    """Pick the mode from config fields (DCA wins over rope_scaling, as in vLLM)."""
    if dual_chunk_attention_config is not None:
        dca = DualChunkConfig.from_dict(dual_chunk_attention_config)
        # DCA keeps every query-key distance <= chunk_size; Qwen reports at least 4x the
        # training length without training, so allow that unless the config says more.
        length = max(max_position_embeddings, 4 * dca.chunk_size)
        return LongContext("dca", None, dca, length)
    if rope_scaling is not None:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if kind == "yarn":
            factor = float(rope_scaling.get("factor", 1.0))
            original = int(rope_scaling.get("original_max_position_embeddings")
                           or max_position_embeddings)
            return LongContext("yarn", dict(rope_scaling), None,
                               max(max_position_embeddings, int(original * factor)))
        return LongContext("standard", dict(rope_scaling), None, max_position_embeddings)
    return LongContext("standard", None, None, max_position_embeddings)
