"""Speculative decoding: a cheap drafter proposes k tokens, the target checks them in one pass.

Each round the drafter (a small model sharing the target's tokenizer, or prompt lookup)
proposes tokens x_1..x_k with draft probabilities q_i; the target runs one forward pass over
[last token, x_1..x_k], which gives its distributions p_0..p_k at every position at once.
Acceptance is the rejection sampling of Leviathan et al. 2023 (Algorithm 1) and Chen et al.
2023: x_i is kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection a token
is drawn from the normalised residual max(0, p_i - q_i); when all k survive, a bonus token is
drawn from p_k. Every emitted token is then distributed exactly as in plain sampling, whatever
the drafter proposes; a good drafter only makes the rounds longer. (mlx-lm instead keeps x_i
only when the target's own sample equals it: also exact, but a drafted token survives with
probability sum(p q) instead of sum(min(p, q)), so it gains little at temperature > 0.)

p and q are the *processed* distributions of `sampling.py`: repetition penalty over the
same token history (per position, the drafted tokens before it included), temperature,
top-k, top-p and min-p, in transformers' order. Greedy decoding is the special case where
a drafted token is accepted when it equals the target's argmax, so the output is plain
greedy decoding token for token.

Drafters:
* a draft model (`draft_model`): samples x_i from its own processed distribution q_i;
* prompt lookup (`prompt_lookup=N`): the tokens that followed the most recent earlier
  occurrence of the last n-gram (n = N down to 1) of prompt + output. q is a point mass, so
  x is accepted with probability p(x) and the residual is p with x removed.

The number of drafted tokens adapts (`DraftLength`) within 1..num_draft_tokens.

Caches: after every round both caches are trimmed to the accepted tokens. When the generator
finishes or is closed, the target cache holds exactly the prompt plus every yielded token
(the project's invariant), and so does the draft cache, within the draft's window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from qwen2_mlx.cache import KVCache
from qwen2_mlx.prefill import PromptProgress, prefill, prepare_cache
from qwen2_mlx.sampling import (
    SamplingParams,
    apply_logits_processors,
    filter_logits,
    make_logits_processors,
)

__all__ = [
    "DraftLength",
    "ModelDrafter",
    "PromptLookup",
    "SpeculativeDecoder",
    "SpeculativeRound",
    "SpeculativeStats",
    "TokenMask",
    "acceptance_probability",
    "check_draft_model",
    "check_draft_tokenizer",
    "residual_distribution",
    "speculative_generate_step",
    "verify_greedy",
    "verify_sampled",
]

TokenMask = Callable[[Sequence[int]], "mx.array | None"]
"""The structured-output hook: `mask(history) -> bool array (vocab,)` of the tokens allowed
after `history` (all token ids so far, drafted ones included), or None for "all allowed"."""


@dataclass
class SpeculativeStats:
    """Running counts of one speculative generation (what `--verbose` reports)."""

    drafted: int = 0  # tokens proposed by the drafter
    accepted: int = 0  # drafted tokens accepted and yielded (`from_draft`)
    generated: int = 0  # tokens yielded
    target_passes: int = 0  # target forward passes after the prompt (one per round)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens generated per target forward pass (plain decoding: 1)."""
        return self.generated / self.target_passes if self.target_passes else 0.0

    def summary(self) -> str:
        return (f"Speculative: {self.accepted}/{self.drafted} drafted tokens accepted "
                f"({100 * self.acceptance_rate:.1f}%), "
                f"{self.tokens_per_pass:.2f} tokens per target pass")


# --- checks ----------------------------------------------------------------------------------


def check_draft_model(model, draft_model, tokenizer) -> None:
    """Raise ValueError unless `draft_model` can draft for `model` with `tokenizer`.

    The two may differ only in padding rows of their embeddings (Qwen2-0.5B has 151,936,
    Qwen2-7B 152,064 for the same 151,646 tokenizer ids): every id the tokenizer produces
    must be a row of both.
    """
    ids = len(tokenizer)
    for name, m in (("target", model), ("draft", draft_model)):
        rows = m.config.vocab_size
        if rows < ids:
            raise ValueError(
                f"the {name} model has {rows} vocabulary rows but the tokenizer has {ids} ids: "
                "the draft model must use the target's tokenizer (every Qwen2 and Qwen2.5 "
                "size shares one)"
            )


def check_draft_tokenizer(tokenizer, draft_tokenizer) -> None:
    """Raise ValueError if the draft's tokenizer maps any shared id to another token.

    Ids only one of them has (Qwen2.5 adds special tokens after Qwen2's) are padding rows
    of the other model: allowed, since a draft only proposes and the target decides.
    """
    target = tokenizer.backend.get_vocab(with_added_tokens=True)
    draft = draft_tokenizer.backend.get_vocab(with_added_tokens=True)
    shared = min(len(tokenizer), len(draft_tokenizer))
    by_id = {i: t for t, i in target.items() if i < shared}
    for token, i in draft.items():
        if i < shared and by_id.get(i) != token:
            raise ValueError(
                f"the draft model's tokenizer differs from the target's: id {i} is "
                f"{token!r} for the draft and {by_id.get(i)!r} for the target; a draft must "
                "share the target's vocabulary"
            )


# --- acceptance --------------------------------------------------------------------------------


def acceptance_probability(p_drafted: mx.array, q_drafted: mx.array) -> mx.array:
    """min(1, p(x) / q(x)) for each drafted token x (Leviathan et al. 2023, Algorithm 1)."""
    return mx.minimum(1.0, p_drafted / mx.maximum(q_drafted, mx.array(1e-30)))


def residual_distribution(p: mx.array, q: mx.array) -> mx.array:
    """max(0, p - q), unnormalised: what to draw from after rejecting a token drawn from q."""
    residual = mx.maximum(p - q, 0.0)
    # All zeros means p == q up to rounding: rejection then had probability ~0, and p itself
    # is the exact distribution to draw from.
    return mx.where(mx.sum(residual, axis=-1, keepdims=True) > 0, residual, p)


def verify_sampled(
    p: mx.array, q: mx.array, drafted: mx.array, key: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Rejection sampling of k drafted tokens: (number accepted, the token that follows them).

    `p` (k+1, V) are the target's processed probabilities at the k+1 positions, `q` (k, V)
    the draft's, `drafted` (k,) the proposed ids. The following token is drawn from
    max(0, p_i - q_i) normalised at the first rejection i, or from p_k when all k pass.
    """
    k = drafted.size
    key_u, key_r = mx.random.split(key) if key is not None else (None, None)
    idx = drafted.astype(mx.int32)[:, None]
    p_x = mx.take_along_axis(p[:k], idx, axis=-1)[:, 0]
    q_x = mx.take_along_axis(q, idx, axis=-1)[:, 0]
    u = mx.random.uniform(shape=(k,), key=key_u)
    accepted = (u < acceptance_probability(p_x, q_x)).astype(mx.int32)
    n = mx.sum(mx.cumprod(accepted))  # accepted run length: stops at the first rejection
    rows = mx.concatenate([residual_distribution(p[:k], q), p[k:]])  # row k: the bonus
    # One draw per row (categorical normalises); only row n is used.
    candidates = mx.random.categorical(mx.log(rows), axis=-1, key=key_r)
    return n, candidates[n]


def verify_greedy(target_argmax: mx.array, drafted: mx.array) -> tuple[mx.array, mx.array]:
    """Greedy acceptance: keep drafted tokens while they equal the target's argmax."""
    k = drafted.size
    same = (drafted.astype(mx.uint32) == target_argmax[:k].astype(mx.uint32)).astype(mx.int32)
    n = mx.sum(mx.cumprod(same))
    return n, target_argmax[n]


def _verify(sampling: SamplingParams, scores: mx.array, q: mx.array | None, drafted: mx.array,
            key: mx.array | None) -> tuple[mx.array, mx.array]:
    """(drafted tokens accepted, the token after them) for one round's target scores."""
    if sampling.greedy:
        return verify_greedy(mx.argmax(scores, axis=-1), drafted)
    if drafted.size == 0:  # nothing drafted: a plain sampling step
        return mx.array(0), mx.random.categorical(scores[0], key=key)
    return verify_sampled(mx.softmax(scores, axis=-1), q, drafted, key=key)


# --- the processed distribution, per position ------------------------------------------------


class _Processing:
    """Logits -> the distribution plain sampling draws from (sampling.py), row by row.

    Row r of a call belongs to the position after `tokens + drafted[:first + r]`: the
    repetition penalty and the token mask see exactly that history, as in plain decoding.
    Logits of another width (a draft model's padding rows) are cut or padded with -inf to
    the target's vocabulary, so p and q share one index space.

    `processors` are further logits processors ``(tokens, logits) -> logits`` (the server's
    presence/frequency penalties and logit_bias), applied after the repetition penalty and
    before the token mask, row by row with that row's whole history (1-D): they must be
    pure functions of (history, logits), since rows of rejected drafts are processed too.
    """

    def __init__(self, sampling: SamplingParams, vocab: int, token_mask: TokenMask | None,
                 processors: Sequence[Callable] = ()):
        self.sampling = sampling
        self.vocab = vocab
        self.processors = make_logits_processors(sampling)
        self.row_processors = list(processors)
        self.token_mask = token_mask
        # Compiled as make_sampler compiles it: a pure function of the logits.
        self._filter = mx.compile(lambda x: filter_logits(x, sampling))

    def __call__(
        self,
        logits: mx.array,
        tokens: list[int],
        drafted: mx.array | None = None,
        drafted_ids: list[int] | None = None,
        first: int = 0,
    ) -> tuple[mx.array, mx.array]:
        """(logprobs, scores) for logits (R, W). logprobs are log-softmax after the
        processors, as plain decoding reports them; scores are the processed logits (greedy)
        or the filtered ones whose softmax is the sampling distribution."""
        rows = logits.shape[0]
        x = self._width(logits.astype(mx.float32))
        if self.processors:
            x = apply_logits_processors(
                self.processors, self._history(tokens, drafted, first, rows), x)
        if self.row_processors:
            x = self._per_row(x, tokens, drafted, first, rows)
        if self.token_mask is not None:
            x = mx.where(self._masks(tokens, drafted_ids or [], first, rows), x, -mx.inf)
        logprobs = x - mx.logsumexp(x, axis=-1, keepdims=True)
        scores = x if self.sampling.greedy else self._filter(x)
        return logprobs, scores

    def _width(self, x: mx.array) -> mx.array:
        width = x.shape[-1]
        if width > self.vocab:
            return x[:, : self.vocab]
        if width < self.vocab:
            pad = mx.full((x.shape[0], self.vocab - width), -mx.inf, dtype=x.dtype)
            return mx.concatenate([x, pad], axis=-1)
        return x

    def _per_row(self, x, tokens, drafted, first, rows) -> mx.array:
        base = mx.array(tokens, dtype=mx.int32)
        out = []
        for r in range(rows):
            used = first + r
            history = base if used == 0 else mx.concatenate(
                [base, drafted[:used].astype(mx.int32)])
            out.append(apply_logits_processors(self.row_processors, history, x[r:r + 1]))
        return out[0] if rows == 1 else mx.concatenate(out)

    def _history(self, tokens, drafted, first, rows) -> mx.array:
        # Row r: the last context tokens + drafted[:first + r]. Rows are left-padded with -1
        # to one length; the penalty sends ids outside the vocabulary to a column it drops.
        base = mx.array(tokens[-self.sampling.repetition_context_size:], dtype=mx.int32)
        used = first + rows - 1
        seq = base if used == 0 else mx.concatenate([base, drafted[:used].astype(mx.int32)])
        if rows == 1:
            return seq
        seq = mx.concatenate([mx.full((rows - 1,), -1, dtype=mx.int32), seq])
        length = seq.size - (rows - 1)
        return mx.stack([seq[r: r + length] for r in range(rows)])

    def _masks(self, tokens, drafted_ids, first, rows) -> mx.array:
        masks = []
        for r in range(rows):
            allowed = self.token_mask(tokens + drafted_ids[: first + r])
            if allowed is None:
                allowed = mx.ones((self.vocab,), dtype=mx.bool_)
            allowed = allowed.astype(mx.bool_)[: self.vocab]
            if allowed.size < self.vocab:
                allowed = mx.concatenate(
                    [allowed, mx.zeros((self.vocab - allowed.size,), dtype=mx.bool_)])
            masks.append(allowed)
        return mx.stack(masks)


# --- the caches --------------------------------------------------------------------------------

# Every write, trim and read of cached ids in this module goes through these three (and
# `prefill.prefill`), so that core's ModelCache, which carries the ids it holds, needs
# changes here only.


def _forward(model, ids: mx.array, cache: list[KVCache]) -> mx.array:
    """Feed 1-D `ids` through `model` into `cache`; returns their logits (L, vocab).

    The ids are the checked prompt's or sampled ones, so the model's id check (a host sync)
    is skipped: a draft step stays lazy."""
    return getattr(model, "forward", model)(ids[None], cache=cache)[0]


def _trim(cache: list[KVCache], n: int) -> None:
    # Core's ModelCache (hardening issue): `cache.trim(n)` trims every layer and the token ids
    # the cache carries; a plain list of layer caches is trimmed layer by layer.
    if n <= 0:
        return
    if hasattr(cache, "trim"):
        cache.trim(n)
    else:
        for layer_cache in cache:
            layer_cache.trim(n)


def _cached_tokens(cache: list[KVCache]) -> list[int]:
    # The ids a cache says it holds (core's ModelCache.tokens); [] for a plain list, whose
    # positions before the prompt are then unknown to the drafter and the penalty.
    return [int(t) for t in getattr(cache, "tokens", None) or []]


# --- drafters ---------------------------------------------------------------------------------


class PromptLookup:
    """Prompt lookup decoding: propose what followed the last n-gram's previous occurrence.

    Keeps, for n = 1..max_ngram, a map from each n-gram to the position just after its
    most recent occurrence, extended incrementally as tokens arrive (O(max_ngram) per token).
    """

    def __init__(self, max_ngram: int):
        if not isinstance(max_ngram, int) or max_ngram < 1:
            raise ValueError(f"prompt_lookup must be an int >= 1, got {max_ngram!r}")
        self.max_ngram = max_ngram
        self._after: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram)]
        self._indexed = 0  # n-grams ending before this position are in the maps

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest
        suffix n-gram (n <= max_ngram) of `tokens`; [] when there is none."""
        # Index every n-gram that ends before the last token, so the suffix itself is never
        # its own "earlier occurrence".
        for end in range(self._indexed, len(tokens) - 1):
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                self._after[n - 1][tuple(tokens[end - n + 1: end + 1])] = end + 1
        self._indexed = max(self._indexed, len(tokens) - 1)
        if k < 1:
            return []
        for n in range(min(self.max_ngram, len(tokens)), 0, -1):
            start = self._after[n - 1].get(tuple(tokens[len(tokens) - n:]))
            if start is not None:
                return list(tokens[start: start + k])
        return []


def draft_view(ids: Sequence[int], rows: int) -> list[int]:
    """`ids` as a draft with `rows` embedding rows is shown them: a target padding-row id the
    draft lacks becomes 0. The draft only proposes, so this can cost acceptance, never
    exactness."""
    return [t if t < rows else 0 for t in ids]


class ModelDrafter:
    """A draft model with its own cache, holding `tokens[start:]` (within its context).

    The draft sees the target's token history, but only as much as fits its own context
    (`window`): when a draft round would run past it, the cache is emptied and re-primed with
    the last half window of tokens. That is how a short-context draft serves a long-context
    (DCA or YaRN) target: it attends normally over the recent window; exactness does not
    depend on it.
    """

    def __init__(self, model, cache: list[KVCache], tokens: list[int], *, held: int = 0,
                 base: int = 0, max_draft: int, prefill_step_size: int = 512, room: int = 0):
        self.model = model
        self.cache = cache  # holds `base` positions of unknown ids, then tokens[start:][:held]
        self.rows = model.config.vocab_size
        self.window = model.config.context_length
        self.prefill_step_size = prefill_step_size
        self.base = base
        self.start = 0
        self.held = held
        if base + len(tokens) + max_draft > self.window:
            self._reprime(tokens)
        else:
            self._prefill(tokens, room)

    def _ids(self, ids: Sequence[int]) -> mx.array:
        return mx.array(draft_view(ids, self.rows), dtype=mx.uint32)

    def _prefill(self, tokens: list[int], room: int = 0) -> None:
        # Feeds all of tokens[start + held:] but the last, which the first draft step feeds.
        ids = self._ids(tokens[self.start + self.held:])
        prepare_cache(self.cache, ids.size, room)
        prefill(self.model, self.cache, ids[:-1], step_size=self.prefill_step_size)
        self.held = len(tokens) - self.start - 1

    def _reprime(self, tokens: list[int]) -> None:
        _trim(self.cache, self.cache[0].offset)
        self.base = self.held = 0
        self.start = max(0, len(tokens) - self.window // 2)
        self._prefill(tokens)

    def propose(self, tokens: list[int], k: int, processing: _Processing,
                keys: list[mx.array | None]) -> tuple[mx.array, mx.array | None, list[int]]:
        """Draft k tokens after `tokens`: (ids (k,), q (k, V) or None when greedy, and the
        ids on the host when a token mask needs them)."""
        pending = len(tokens) - self.start - self.held  # 1, or 2 after a fully accepted round
        if self.base + self.held + pending + k > self.window:
            self._reprime(tokens)
        x = self._ids(tokens[self.start + self.held:])
        drafted: list[mx.array] = []
        probs: list[mx.array] = []
        host: list[int] = []
        for i in range(k):
            logits = _forward(self.model, x, self.cache)[-1:]
            so_far = mx.concatenate(drafted) if drafted else None
            _, scores = processing(logits, tokens, so_far, host, first=i)
            if processing.sampling.greedy:
                token = mx.argmax(scores, axis=-1)
            else:
                probs.append(mx.softmax(scores, axis=-1))
                token = mx.random.categorical(scores, axis=-1, key=keys[i])
            drafted.append(token)
            if processing.token_mask is not None:
                host.append(token.item())
            x = token
        if k:
            self.held = len(tokens) - self.start + k - 1  # the last drafted token is not fed
        ids = mx.concatenate(drafted) if drafted else mx.array([], dtype=mx.uint32)
        return ids, (mx.concatenate(probs) if probs else None), host

    def rewind(self, tokens_before: int, accepted: int, k: int) -> None:
        """After a round: keep tokens_before + the accepted drafted tokens it has fed."""
        if k == 0:
            return
        keep = tokens_before - self.start + min(accepted, k - 1)
        _trim(self.cache, self.held - keep)
        self.held = keep

    def settle(self, tokens: list[int]) -> None:
        """Make the cache hold exactly tokens[start:] (feeding the last one or two if they
        still fit the window)."""
        wanted = len(tokens) - self.start
        if self.held > wanted:
            _trim(self.cache, self.held - wanted)
            self.held = wanted
        elif self.held < wanted and self.base + wanted <= self.window:
            _forward(self.model, self._ids(tokens[self.start + self.held:]), self.cache)
            mx.eval([c.state for c in self.cache])
            self.held = wanted


# --- adaptive draft length ---------------------------------------------------------------------


class DraftLength:
    """How many tokens to draft next round, adapted within 1..max_k.

    Keeps a decayed estimate alpha of the per-token acceptance probability (accepted
    tokens over tokens tested: a round that stops at a rejection tested accepted + 1). The
    j-th drafted token of a round survives with probability about alpha^j, so drafting goes
    on while alpha^j >= `threshold`: k = floor(ln threshold / ln alpha). A poorly matched
    draft thus falls to k = 1 (one cheap draft step per target pass) and a good one rises to
    max_k. k depends only on acceptance counts, never on timing, so seeded runs replay.
    """

    threshold = 0.25
    decay = 0.9

    def __init__(self, max_k: int, adaptive: bool = True):
        self.max_k = max_k
        self.adaptive = adaptive
        self._accepted, self._tested = 1.6, 2.0  # prior: alpha = 0.8, weight of 2 tokens

    @property
    def alpha(self) -> float:
        return self._accepted / self._tested

    @property
    def k(self) -> int:
        alpha = self.alpha
        if not self.adaptive or alpha >= 1.0:
            return self.max_k
        if alpha <= 0.0:
            return 1
        return max(1, min(self.max_k, math.floor(math.log(self.threshold) / math.log(alpha))))

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        tested = accepted + (1 if accepted < drafted else 0)
        self._accepted = self.decay * self._accepted + accepted
        self._tested = self.decay * self._tested + tested


# --- the generation loop -----------------------------------------------------------------------


class _Keys:
    """Random keys: a private stream seeded with `seed`, or None (MLX's global state)."""

    def __init__(self, seed: int | None):
        self._key = mx.random.key(seed) if seed is not None else None

    def take(self, n: int) -> list[mx.array | None]:
        if self._key is None:
            return [None] * n
        keys = mx.random.split(self._key, n + 1)
        self._key = keys[0]
        return [keys[i] for i in range(1, n + 1)]


@dataclass
class SpeculativeRound:
    """What one round produced: `tokens` (the accepted drafted tokens, then the target's
    own), `logprobs` (one row per token: log-softmax after the processors, as plain decoding
    reports them), `accepted` (how many of `tokens` were drafted) and `drafted` (k)."""

    tokens: list[int]
    logprobs: mx.array
    accepted: int
    drafted: int


class SpeculativeDecoder:
    """Speculative decoding one round at a time: draft k tokens, verify them in one target
    pass, return the tokens that come out (`round`). `speculative_generate_step` runs its
    rounds in a loop; the server's engine runs one round per step of a lone sequence.

    `drafter` is a `ModelDrafter` or a `PromptLookup`; `processors` are extra per-row
    logits processors (see `_Processing`), `token_mask` the structured-output hook. The
    draws come from a private key stream seeded with `sampling.seed` (or MLX's global one).
    """

    def __init__(self, model, *, sampling: SamplingParams, drafter: ModelDrafter | PromptLookup,
                 num_draft_tokens: int = 4, adaptive: bool = True,
                 token_mask: TokenMask | None = None, processors: Sequence[Callable] = (),
                 stats: SpeculativeStats | None = None):
        self.model = model
        self.sampling = sampling
        self.drafter = drafter
        self.vocab = model.config.vocab_size
        self.processing = _Processing(sampling, self.vocab, token_mask, processors)
        self.keys = _Keys(sampling.seed)
        self.length = DraftLength(num_draft_tokens, adaptive)
        self.stats = stats if stats is not None else SpeculativeStats()

    def round(self, cache: list[KVCache], tokens: list[int], limit: int) -> SpeculativeRound:
        """One round after `tokens` (the whole history), `cache` holding all of it but the
        last token; at most `limit` (>= 1) tokens come out. Afterwards `cache` holds the
        history plus the round's tokens but the last one (the next round's first input),
        and the draft cache a prefix of that. `stats.drafted` and `.target_passes` are
        counted here, `.accepted` and `.generated` by the caller as it uses the tokens."""
        k = min(self.length.k, limit - 1)
        round_keys = self.keys.take(k + 1)
        if isinstance(self.drafter, PromptLookup):
            drafted_ids = self.drafter.propose(tokens, k)
            drafted = mx.array(drafted_ids, dtype=mx.uint32)
            q = (mx.arange(self.vocab)[None] == drafted[:, None]).astype(mx.float32)
        else:
            drafted, q, drafted_ids = self.drafter.propose(tokens, k, self.processing,
                                                           round_keys[:k])
        k = drafted.size
        if self.processing.token_mask is not None and len(drafted_ids) < k:
            drafted_ids = drafted.tolist()
        x = mx.concatenate([mx.array(tokens[-1:], dtype=mx.uint32), drafted.astype(mx.uint32)])
        logits = _forward(self.model, x, cache)
        logprobs, scores = self.processing(logits, tokens, drafted, drafted_ids)
        accepted, token = _verify(self.sampling, scores, q, drafted, round_keys[k])
        mx.eval(accepted, token, drafted)  # the round's one host sync
        accepted = accepted.item()
        new = drafted.tolist()[:accepted] + [token.item()]

        # Keep the accepted tokens in both caches: target held tokens + drafted.
        _trim(cache, k - accepted)
        if isinstance(self.drafter, ModelDrafter):
            self.drafter.rewind(len(tokens), accepted, k)
        self.length.update(k, accepted)
        self.stats.drafted += k
        self.stats.target_passes += 1
        return SpeculativeRound(new, logprobs, accepted, k)


def speculative_generate_step(
    prompt: mx.array,
    model,
    *,
    sampling: SamplingParams,
    draft_model=None,
    prompt_lookup: int = 0,
    num_draft_tokens: int = 4,
    adaptive: bool = True,
    cache: list[KVCache] | None = None,
    draft_cache: list[KVCache] | None = None,
    max_tokens: int = 256,
    prefill_step_size: int = 512,
    token_mask: TokenMask | None = None,
    stats: SpeculativeStats | None = None,
    cancel=None,
    prompt_progress: PromptProgress | None = None,
) -> Iterator[tuple[int, mx.array, bool]]:
    """Yield `(token, logprobs, from_draft)` for up to `max_tokens` tokens after `prompt`.

    Exactly one drafter: `draft_model` (a model sharing the target's tokenizer, see
    `check_draft_model`) or `prompt_lookup=N` (n-grams up to N). Each round drafts
    k <= `num_draft_tokens` tokens (adapted with `DraftLength` unless `adaptive=False`) and
    verifies them with one target pass; `from_draft` is True for a drafted token that was
    accepted. The tokens are distributed exactly as `generate_step`'s with the same
    `sampling` (greedy: identical). `seed` in `sampling` makes the draws reproducible.

    `token_mask` is the hook for constrained decoding: called with the token history before
    each position (the target's k+1 positions and each draft step), it returns the allowed
    tokens (bool (vocab,)) or None; disallowed tokens get -inf after the repetition penalty
    and before temperature and the filters, for the target and the draft alike, so a drafted
    token the mask forbids is always rejected. It may be called with drafted tokens that are
    later rejected, and then with a shorter history: it must not commit state.

    When the generator finishes or is closed, `cache` holds exactly the prompt plus every
    yielded token, and `draft_cache` the same (its last window, for a short-context draft).
    `stats` (a `SpeculativeStats`) is updated as tokens are yielded. `cancel` and
    `prompt_progress` work as in `generate_step` (cancel is checked before each prefill step
    and each round; cancelled during the prefill, the caches are left as they were).
    """
    if (draft_model is None) == (not prompt_lookup):
        raise ValueError("speculative decoding needs exactly one drafter: a draft model or "
                         "prompt_lookup=N (n-gram size), not both and not neither")
    if not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool) \
            or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be an int >= 1, got {num_draft_tokens!r}")
    lookup = PromptLookup(prompt_lookup) if draft_model is None else None
    cache = cache if cache is not None else model.make_cache()
    stats = stats if stats is not None else SpeculativeStats()
    known = _cached_tokens(cache)
    tokens = known + [int(t) for t in prompt.tolist()]
    base = cache[0].offset - len(known)  # cached positions whose ids are unknown

    room = max_tokens + num_draft_tokens
    if draft_model is not None:
        # Check the draft's cache before any prefill: empty, or holding what `cache` holds.
        if draft_cache is None:
            draft_cache = draft_model.make_cache()
        if draft_cache[0].offset not in (0, cache[0].offset):
            raise ValueError(
                f"draft_cache holds {draft_cache[0].offset} positions but cache holds "
                f"{cache[0].offset}: it must be empty or hold the same tokens"
            )
    start = cache[0].offset
    prepare_cache(cache, prompt.size, room)
    if not prefill(model, cache, prompt[:-1], step_size=prefill_step_size, cancel=cancel,
                   progress=prompt_progress, total=prompt.size):
        _trim(cache, cache[0].offset - start)
        return
    drafter = None
    draft_start = draft_cache[0].offset if draft_model is not None else 0
    if draft_model is not None:
        shared = draft_cache[0].offset > 0  # the same prefix as the target's cache
        drafter = ModelDrafter(draft_model, draft_cache, tokens,
                               held=len(known) if shared else 0, base=base if shared else 0,
                               max_draft=num_draft_tokens, prefill_step_size=prefill_step_size,
                               room=room)
    decoder = SpeculativeDecoder(model, sampling=sampling,
                                 drafter=drafter or lookup,
                                 num_draft_tokens=num_draft_tokens, adaptive=adaptive,
                                 token_mask=token_mask, stats=stats)

    def settle() -> None:
        # The invariant: the cache holds exactly the prompt + every yielded token; cancelled
        # or failed before the first token, both caches hold what they held before.
        if n == 0:
            _trim(cache, cache[0].offset - start)
            if drafter is not None:
                _trim(draft_cache, draft_cache[0].offset - draft_start)
            return
        held = cache[0].offset - base
        if held > len(tokens):
            _trim(cache, held - len(tokens))
        elif held == len(tokens) - 1:
            _forward(model, mx.array(tokens[-1:], dtype=mx.uint32), cache)
            mx.eval([c.state for c in cache])
        if drafter is not None:
            drafter.settle(tokens)

    n = 0
    try:
        while n < max_tokens:
            if cancel is not None and cancel.is_set():
                return
            step = decoder.round(cache, tokens, max_tokens - n)
            new, logprobs, accepted = step.tokens, step.logprobs, step.accepted
            for i, t in enumerate(new):
                tokens.append(t)
                n += 1
                stats.generated += 1
                stats.accepted += i < accepted
                if n == 1 and prompt_progress is not None:
                    prompt_progress(prompt.size, prompt.size)
                yield t, logprobs[i], i < accepted
            if n % 256 < len(new):
                mx.clear_cache()
    finally:
        settle()
