"""Model configuration: the fields of a Hugging Face Qwen2 / Qwen2-MoE config.json that change
the computation, read in transformers 4.x or 5.x spelling and checked (types, sizes, layer
kinds, MoE and long-context settings) before a model is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qwen2_mlx.long_context import LongContext, resolve_long_context

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe")

# transformers' Qwen2MoeConfig defaults, for a qwen2_moe config.json that leaves a field out.
_QWEN2_MOE_DEFAULTS = dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                           shared_expert_intermediate_size=5632)


@dataclass
class ModelConfig:
    """The fields of a Hugging Face Qwen2 / Qwen2-MoE `config.json` that change the computation.

    The MoE fields (`num_experts` onwards) matter only for `model_type: qwen2_moe`.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    model_type: str = "qwen2"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: list[str] = field(default_factory=list)
    dual_chunk_attention_config: dict[str, Any] | None = None
    eos_token_id: int | list[int] | None = None
    # Qwen2-MoE (transformers' Qwen2MoeConfig); see moe.py for how they are used.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}: qwen2-mlx runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        sizes = ("hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "vocab_size")
        for name in sizes:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"config {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide "
                f"hidden_size ({self.hidden_size})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.use_sliding_window and not self.sliding_window:
            raise ValueError("use_sliding_window is true but sliding_window is not set")
        if self.model_type == "qwen2_moe":
            self._check_moe()
        if not self.layer_types:
            # transformers' Qwen2Config: layer i slides iff sliding on and i >= max_window_layers;
            # Qwen2MoeConfig: iff sliding on, i < max_window_layers and i is even.
            moe = self.model_type == "qwen2_moe"
            self.layer_types = [
                "sliding_attention"
                if self.use_sliding_window
                and ((i < self.max_window_layers and i % 2 == 0) if moe
                     else i >= self.max_window_layers)
                else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"unknown layer_types {sorted(unknown)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention but sliding_window is not set")
        _ = self.long_context  # validates rope_scaling / dual_chunk_attention_config early

    def _check_moe(self) -> None:
        if not self.qkv_bias:
            raise ValueError("qkv_bias=false is not supported: q/k/v projections carry biases")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"mlp_only_layers {bad} are not layer indices 0..{self.num_hidden_layers - 1}"
            )
        if self.num_experts == 0:
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}), "
                f"got {self.num_experts_per_tok}"
            )
        for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config {name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def long_context(self) -> LongContext:
        """Standard RoPE, static YaRN or Dual Chunk Attention, as the config selects."""
        return resolve_long_context(
            self.rope_scaling, self.dual_chunk_attention_config, self.max_position_embeddings
        )

    @property
    def context_length(self) -> int:
        """Longest sequence (prompt + generated) the model is configured for."""
        return self.long_context.context_length

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face config dict, in transformers 4.x or 5.x spelling.

        4.x writes top-level `rope_theta`/`rope_scaling`; 5.x nests both in `rope_parameters`.
        """
        if not isinstance(config, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(config).__name__}")
        config = dict(config)
        model_type = config.get("model_type")
        if model_type is None:
            raise ValueError("config.json has no model_type")
        rope_parameters = dict(config.get("rope_parameters") or {})
        if "rope_theta" not in config and "rope_theta" in rope_parameters:
            config["rope_theta"] = rope_parameters["rope_theta"]
        if config.get("rope_scaling") is None and rope_parameters:
            scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            config["rope_scaling"] = None if kind == "default" else scaling
        if config.get("num_key_value_heads") is None:
            config["num_key_value_heads"] = config.get("num_attention_heads")
        if not config.get("use_sliding_window", False):
            config["sliding_window"] = None
        if config.get("layer_types") is None:
            config.pop("layer_types", None)
        if model_type == "qwen2_moe":
            config = {**_QWEN2_MOE_DEFAULTS, **config}
            if config.get("mlp_only_layers") is None:
                config["mlp_only_layers"] = []
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [
            f.name for f in dataclasses.fields(cls)
            if f.name not in config
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"config.json lacks required fields: {', '.join(missing)}")
        return cls(**{k: v for k, v in config.items() if k in names})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


# What each field of ModelConfig may hold (JSON types), checked before any arithmetic so
# that `"hidden_size": "96"` is one clear line, not a traceback from deep inside.
_FIELD_CHECKS: dict[str, tuple[str, object]] = {
    "int": ("an integer", _is_int),
    "float": ("a number", _is_number),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "dict[str, Any] | None": ("an object or null", lambda v: v is None or isinstance(v, dict)),
    "int | None": ("an integer or null", lambda v: v is None or _is_int(v)),
    "int | list[int] | None": ("an integer, a list of integers or null",
                               lambda v: v is None or _is_int(v) or _int_list(v)),
    "list[str]": ("a list of strings",
                  lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "list[int]": ("a list of integers", _int_list),
}


def _check_field_types(config: ModelConfig) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type in ("int", "int | None") and isinstance(value, float) and value.is_integer():
            value = int(value)  # 32768.0 written by some tools
            setattr(config, f.name, value)
        what, ok = _FIELD_CHECKS[f.type]
        if not ok(value):
            shown = "null" if value is None else repr(value)
            raise ValueError(f"config field {f.name} must be {what}, got {shown} "
                             f"({type(value).__name__})")
