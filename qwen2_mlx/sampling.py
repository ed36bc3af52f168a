"""Token sampling: logits processors, sampling filters and the categorical draw.

Order of operations (the same as transformers' ``GenerationMixin._get_logits_processor``,
because exactness against the PyTorch reference is this project's first standard):

1. logits processors (repetition penalty), on the raw logits;
2. temperature: ``logits / temperature``;
3. top-k, 4. top-p, 5. min-p, each applied to the temperature-scaled logits and each
   seeing the output of the previous filter;
6. a categorical draw from the surviving logits (``mx.random.categorical``).

``temperature == 0`` means greedy decoding: the argmax of the (processed) logits, with
no filter (every filter keeps the argmax anyway).

Note: mlx-lm and llama.cpp apply temperature *last* (the filters see untempered
probabilities), so with ``temperature != 1`` their top-p / min-p sets differ from the
ones computed here. We deliberately follow transformers.

Every filter replaces removed logits with ``-inf``; all maths is done in float32. On
tie-free float32 logits the surviving sets equal transformers' warpers exactly. At a cut
that falls inside a group of exactly equal logits (common with bf16 logits) the whole
group survives, as in TopKLogitsWarper; transformers' top-p / min-p instead split such a
group in whatever order torch's unstable sort gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

__all__ = [
    "SamplingParams",
    "Sampler",
    "LogitsProcessor",
    "make_sampler",
    "make_logits_processors",
    "apply_logits_processors",
    "filter_logits",
    "logprobs_from_logits",
]

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

_MAX_SEED = 2**64  # mx.random.key takes an unsigned 64-bit seed


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling configuration (names and semantics follow transformers' GenerationConfig).

    Attributes:
        temperature: divides the logits before filtering; ``0`` means greedy (argmax).
        top_p: nucleus sampling; keep the smallest top set whose probability mass
            reaches ``top_p`` (``1.0`` disables).
        top_k: keep the ``top_k`` largest logits, ties with the k-th included
            (``0`` disables).
        min_p: drop tokens whose probability is below ``min_p`` times the largest
            probability after temperature (``0.0`` disables).
        min_tokens_to_keep: lower bound on the survivors of top-k, top-p and min-p.
        repetition_penalty: transformers' CTRL-style penalty over the recent history
            (``1.0`` disables).
        repetition_context_size: how many of the most recent history tokens the
            penalty looks at.
        seed: if set, draws come from a private PRNG key stream seeded with it
            (reproducible and independent of ``mx.random.seed``); else the global
            MLX random state is used.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    repetition_penalty: float = 1.0
    repetition_context_size: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = disabled), got {self.top_k!r}")
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_int(self.min_tokens_to_keep) or self.min_tokens_to_keep < 1:
            raise ValueError(
                f"min_tokens_to_keep must be an int >= 1, got {self.min_tokens_to_keep!r}"
            )
        rp = self.repetition_penalty
        if not _is_real(rp) or not math.isfinite(rp) or rp <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {rp!r}")
        if not _is_int(self.repetition_context_size) or self.repetition_context_size < 1:
            raise ValueError(
                f"repetition_context_size must be an int >= 1, got {self.repetition_context_size!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < _MAX_SEED):
            raise ValueError(f"seed must be None or an int in [0, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax (``temperature == 0``)."""
        return self.temperature == 0.0


def _check_logits(logits: mx.array) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (batch, vocab), got shape {tuple(logits.shape)}")
    if not mx.issubdtype(logits.dtype, mx.floating):
        raise ValueError(f"logits must be a floating dtype, got {logits.dtype}")


# --- filters (each mirrors the transformers LogitsWarper of the same name) ---------------


def _top_k(x: mx.array, top_k: int, min_tokens_to_keep: int) -> mx.array:
    # TopKLogitsWarper: remove x < (k-th largest value), so ties with the k-th survive.
    k = min(max(top_k, min_tokens_to_keep), x.shape[-1])
    kth_value = mx.min(mx.topk(x, k, axis=-1), axis=-1, keepdims=True)
    return mx.where(x < kth_value, -mx.inf, x)


def _top_p(x: mx.array, top_p: float, min_tokens_to_keep: int) -> mx.array:
    # TopPLogitsWarper: sort ascending, drop the prefix whose cumulative probability is
    # <= 1 - top_p, but never the last `min_tokens_to_keep` (largest) entries. The
    # cumulative sum is non-decreasing, so the dropped prefix is the first `n_remove`
    # sorted entries and the cut is "remove x < sorted_x[n_remove]". Cutting by value
    # keeps a tie group at the boundary whole (as TopKLogitsWarper does); transformers
    # instead splits it in whatever order torch's unstable sort leaves it.
    vocab = x.shape[-1]
    sorted_x = mx.sort(x, axis=-1)
    cumulative = mx.cumsum(mx.softmax(sorted_x, axis=-1), axis=-1)
    n_remove = mx.sum(cumulative <= (1.0 - top_p), axis=-1, keepdims=True)
    n_remove = mx.minimum(n_remove, max(vocab - min_tokens_to_keep, 0)).astype(mx.int32)
    smallest_kept = mx.take_along_axis(sorted_x, n_remove, axis=-1)
    return mx.where(x < smallest_kept, -mx.inf, x)


def _min_p(x: mx.array, min_p: float, min_tokens_to_keep: int) -> mx.array:
    # MinPLogitsWarper: drop p < min_p * max(p), but re-admit the min_tokens_to_keep most
    # probable tokens (ties with the k-th included, as in TopKLogitsWarper). The top token
    # always survives on its own since min_p <= 1.
    probs = mx.softmax(x, axis=-1)
    remove = probs < min_p * mx.max(probs, axis=-1, keepdims=True)
    k = min(min_tokens_to_keep, x.shape[-1])
    if k > 1:
        kth_prob = mx.min(mx.topk(probs, k, axis=-1), axis=-1, keepdims=True)
        remove = mx.logical_and(remove, probs < kth_prob)
    return mx.where(remove, -mx.inf, x)


def _make_filter(params: SamplingParams) -> Callable[[mx.array], mx.array]:
    """Build the float32 temperature + top-k + top-p + min-p chain for ``params``."""
    temperature = float(params.temperature)
    keep = params.min_tokens_to_keep

    def apply(logits: mx.array) -> mx.array:
        x = logits.astype(mx.float32)
        if temperature != 1.0:
            x = x / temperature  # TemperatureLogitsWarper divides (not multiplies by 1/T)
        if params.top_k > 0:
            x = _top_k(x, params.top_k, keep)
        if params.top_p < 1.0:
            x = _top_p(x, float(params.top_p), keep)
        if params.min_p > 0.0:
            x = _min_p(x, float(params.min_p), keep)
        return x

    return apply


def filter_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Return the float32 logits whose softmax is the sampling distribution for ``params``.

    Applies temperature, top-k, top-p and min-p (in that order); removed tokens get
    ``-inf``. Logits processors are *not* applied here (see ``make_logits_processors``).
    Raises ValueError for greedy params, which define no distribution.
    """
    if params.greedy:
        raise ValueError("filter_logits needs temperature > 0; temperature == 0 is greedy")
    _check_logits(logits)
    return _make_filter(params)(logits)


def make_sampler(params: SamplingParams) -> Sampler:
    """Return ``sample(logits: (B, V)) -> (B,) uint32`` token ids for ``params``.

    Greedy params give the argmax. Otherwise the logits go through ``filter_logits``
    and one categorical draw is taken per row. With ``params.seed`` set, each call
    consumes the next key of a private stream (``mx.random.key(seed)`` split once per
    call), so a fresh sampler built from the same params replays the same draws.
    """
    if params.greedy:

        def sample_greedy(logits: mx.array) -> mx.array:
            _check_logits(logits)
            return mx.argmax(logits, axis=-1)

        return sample_greedy

    # The filter is a pure function of the logits (params are Python constants), so
    # it can be compiled without threading the random state through it.
    filter_fn = mx.compile(_make_filter(params))

    if params.seed is None:

        def sample_global(logits: mx.array) -> mx.array:
            _check_logits(logits)
            return mx.random.categorical(filter_fn(logits), axis=-1)

        return sample_global

    key = mx.random.key(params.seed)

    def sample_seeded(logits: mx.array) -> mx.array:
        nonlocal key
        _check_logits(logits)
        key, draw_key = mx.random.split(key)
        return mx.random.categorical(filter_fn(logits), axis=-1, key=draw_key)

    return sample_seeded


# --- logits processors ---------------------------------------------------------------------


def _repetition_penalty(penalty: float, context_size: int) -> LogitsProcessor:
    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        _check_logits(logits)
        if tokens.ndim not in (1, 2):
            raise ValueError(
                f"tokens must be 1-D (shared history) or 2-D (batch, length), "
                f"got shape {tuple(tokens.shape)}"
            )
        x = logits.astype(mx.float32)
        window = tokens[..., -context_size:]
        if window.shape[-1] == 0:
            return x
        batch, vocab = x.shape
        if window.ndim == 1:
            window = mx.broadcast_to(window[None], (batch, window.shape[0]))
        elif window.shape[0] != batch:
            raise ValueError(
                f"2-D tokens must have one row per logits row: got {window.shape[0]} rows "
                f"for {batch} logits rows"
            )
        # Like transformers, ids outside the logits' vocab (e.g. an embedding table larger
        # than lm_head) are routed to a spare column that is dropped afterwards.
        window = window.astype(mx.int32)
        window = mx.where((window >= 0) & (window < vocab), window, vocab)
        seen = mx.put_along_axis(
            mx.zeros((batch, vocab + 1), dtype=mx.bool_), window, mx.array(True), axis=-1
        )[:, :vocab]
        # RepetitionPenaltyLogitsProcessor: negative scores are multiplied, the rest divided,
        # once per distinct token however often it repeats.
        penalised = mx.where(x < 0, x * penalty, x / penalty)
        return mx.where(seen, penalised, x)

    return process


def make_logits_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """Return the logits processors for ``params`` (``[]`` if none is active).

    Each processor maps ``(tokens, logits) -> logits``: ``tokens`` is the token history
    (prompt + generated so far) as a 1-D int array shared by all rows, or 2-D
    ``(B, L)`` with one history per row; ``logits`` is ``(B, V)``. The result is float32.
    The repetition penalty matches transformers' RepetitionPenaltyLogitsProcessor applied
    to the last ``repetition_context_size`` tokens of the history.
    """
    processors: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        processors.append(
            _repetition_penalty(float(params.repetition_penalty), params.repetition_context_size)
        )
    return processors


def apply_logits_processors(
    processors: Sequence[LogitsProcessor], tokens: mx.array, logits: mx.array
) -> mx.array:
    """Apply ``processors`` in order to ``logits`` given the token history ``tokens``."""
    for process in processors:
        logits = process(tokens, logits)
    return logits


def logprobs_from_logits(logits: mx.array) -> mx.array:
    """Log-softmax over the last axis, computed in float32: ``logits - logsumexp(logits)``."""
    x = logits.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)
