"""Speculative decoding (qwen2_mlx/speculative.py): exactness, drafters, caches and limits.

Two kinds of evidence:

* Greedy: speculative output must equal plain greedy decoding token for token, with a draft
  that often disagrees (a perturbed copy of the target, with the real Qwen2 tokenizer and
  its padding rows), for k = 1..5, with and without the 8-bit KV cache.
* Sampling: on a 16-token model, the exact joint distribution of the first two tokens (and
  the marginal of the third) is computed from the target's logits by full forward passes
  and transformers' own logits processors, then compared with thousands of speculative
  samples by a G-test. A deliberately wrong acceptance rule must fail the same test.
"""

from __future__ import annotations

import math
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from qwen2_mlx import speculative
from qwen2_mlx.generate import generate_step, stream_generate
from qwen2_mlx.model import Model, ModelConfig
from qwen2_mlx.sampling import SamplingParams
from qwen2_mlx.speculative import (
    DraftLength,
    PromptLookup,
    SpeculativeStats,
    check_draft_tokenizer,
    speculative_generate_step,
)
from qwen2_mlx.tokenizer import Qwen2Tokenizer

QWEN2_ROWS = 151_936  # Qwen2-0.5B's embedding rows; the tokenizer has 151,646 ids


def random_model(seed: int, vocab: int, *, hidden: int = 32, layers: int = 2, scale: float = 1.0,
                 tie: bool = True, **config) -> Model:
    """A random Qwen2 with head_dim 32 (so the 8-bit KV cache's group of 32 fits)."""
    cfg = ModelConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 32, num_key_value_heads=1, vocab_size=vocab,
                      tie_word_embeddings=tie, rope_theta=10000.0, **config)
    mx.random.seed(seed)
    model = Model(cfg)
    model.update(tree_map(lambda p: p * scale, model.parameters()))
    mx.eval(model.parameters())
    return model


def perturbed(model: Model, seed: int, noise: float, vocab: int) -> Model:
    """A copy of `model` with relative Gaussian noise on every weight, cut to `vocab` rows."""
    cfg = ModelConfig(**{**model.config.__dict__, "vocab_size": vocab})
    copy = Model(cfg)
    mx.random.seed(seed)

    def jitter(p):
        return p + noise * p.std() * mx.random.normal(p.shape)

    weights = tree_map(jitter, model.parameters())
    weights["model"]["embed_tokens"]["weight"] = weights["model"]["embed_tokens"]["weight"][:vocab]
    copy.update(weights)
    mx.eval(copy.parameters())
    return copy


def ids(tokens) -> mx.array:
    return mx.array(list(tokens), dtype=mx.uint32)


def plain_tokens(model, prompt, n, **sampling) -> list[int]:
    return [t for t, _ in generate_step(ids(prompt), model, sampling=SamplingParams(**sampling),
                                        max_tokens=n)]


def speculative_run(model, prompt, n, *, stats=None, cache=None, draft_cache=None, **kwargs):
    sampling = SamplingParams(**kwargs.pop("sampling", {}))
    return list(speculative_generate_step(ids(prompt), model, sampling=sampling,
                                          max_tokens=n, stats=stats, cache=cache,
                                          draft_cache=draft_cache, **kwargs))


@pytest.fixture(scope="module")
def tokenizer(qwen2_tokenizer_dir):
    return Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir)


@pytest.fixture(scope="module")
def pair():
    """A target with Qwen2's 151,936 rows and a draft that often disagrees with it: a noisy
    copy with exactly the tokenizer's 151,646 rows (no padding rows)."""
    target = random_model(0, QWEN2_ROWS, scale=2.0)
    return target, perturbed(target, 5, 0.05, 151_646)


PROMPT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"


# --- greedy: identical to plain decoding --------------------------------------------------------


@pytest.mark.parametrize("kv_bits", [None, 8])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_greedy_equals_plain_with_a_disagreeing_draft(pair, tokenizer, k, kv_bits):
    target, draft = pair
    plain = list(stream_generate(target, tokenizer, PROMPT, max_tokens=20, kv_bits=kv_bits))
    spec = list(stream_generate(target, tokenizer, PROMPT, max_tokens=20, kv_bits=kv_bits,
                                draft_model=draft, num_draft_tokens=k))
    assert [r.token for r in spec] == [r.token for r in plain]
    assert "".join(r.text for r in spec) == "".join(r.text for r in plain)
    stats = spec[-1].speculative
    # The draft both agrees and disagrees, so acceptance and rejection paths both ran.
    assert 0 < stats.accepted < stats.drafted
    assert stats.accepted == sum(r.from_draft for r in spec)
    assert stats.target_passes == len(spec) - stats.accepted
    np.testing.assert_allclose([r.logprob for r in spec], [r.logprob for r in plain], atol=2e-3)


@pytest.mark.parametrize("drafter", ["draft", "lookup"])
def test_greedy_with_stop_strings(pair, tokenizer, drafter):
    target, draft = pair
    full = list(stream_generate(target, tokenizer, PROMPT, max_tokens=24))
    text = "".join(r.text for r in full)
    # A stop string that spans two tokens, starting after the third token.
    pieces = [tokenizer.decode([r.token]) for r in full]
    start = len("".join(pieces[:3]))
    stop = text[start + len(pieces[3]) - 1: start + len(pieces[3]) + 1]
    assert len(stop) == 2 and stop not in "".join(pieces[:3])
    kwargs = {"draft_model": draft} if drafter == "draft" else {"prompt_lookup": 2}
    plain = list(stream_generate(target, tokenizer, PROMPT, max_tokens=24, stop=[stop]))
    spec = list(stream_generate(target, tokenizer, PROMPT, max_tokens=24, stop=[stop],
                                num_draft_tokens=4, **kwargs))
    expected = text[: text.index(stop)]
    assert "".join(r.text for r in spec) == "".join(r.text for r in plain) == expected
    assert spec[-1].finish_reason == plain[-1].finish_reason == "stop"
    assert [r.token for r in spec] == [r.token for r in plain]


def test_vocabulary_mismatch_is_an_error_before_generation(pair, tokenizer):
    target, _ = pair
    small = random_model(1, 1000)
    cache = target.make_cache()
    with pytest.raises(ValueError, match="draft model has 1000 vocabulary rows but the tokenizer"):
        next(stream_generate(target, tokenizer, "hi", draft_model=small, cache=cache))
    assert cache[0].offset == 0  # nothing was prefilled


def test_draft_tokenizer_must_agree_on_shared_ids(tokenizer, tiny_tokenizer_dir):
    check_draft_tokenizer(tokenizer, tokenizer)
    tiny = Qwen2Tokenizer.from_pretrained(tiny_tokenizer_dir)
    with pytest.raises(ValueError, match="draft model's tokenizer differs from the target's"):
        check_draft_tokenizer(tokenizer, tiny)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(), "exactly one drafter"),
        (dict(draft=True, prompt_lookup=2), "exactly one drafter"),
        (dict(prompt_lookup=-1), "prompt_lookup must be an int >= 1"),
        (dict(prompt_lookup=2, num_draft_tokens=0), "num_draft_tokens must be an int >= 1"),
    ],
)
def test_invalid_speculative_arguments(kwargs, message):
    model = random_model(0, 64)
    if kwargs.pop("draft", False):
        kwargs["draft_model"] = model
    with pytest.raises(ValueError, match=message):
        speculative_run(model, [1, 2, 3], 4, **kwargs)


# --- sampling: the exact distribution, by a goodness-of-fit test ----------------------------

SMALL_VOCAB = 16
SMALL_PROMPT = [3, 7, 3, 7, 11, 3]
LOOKUP_PROMPT = [7, 6, 6, 6, 7, 6]  # "7 6" recurs: prompt lookup drafts "6 6" after it
N_SAMPLES = 1000
ALPHA = 1e-3  # a correct sampler fails one G-test with probability 1e-3 (for fresh seeds)
SETTINGS = {
    # name: (drafter, prompt, sampling)
    "draft-t1": ("draft", SMALL_PROMPT, dict(temperature=1.0)),
    "draft-t0.7-top_p0.9": ("draft", SMALL_PROMPT, dict(temperature=0.7, top_p=0.9)),
    "draft-t1.3-penalty-top_k-min_p": (
        "draft", SMALL_PROMPT,
        dict(temperature=1.3, repetition_penalty=1.3, top_k=10, min_p=0.05)),
    "lookup-t1-penalty-top_k-min_p": (
        "lookup", LOOKUP_PROMPT,
        dict(temperature=1.0, repetition_penalty=1.2, top_k=8, min_p=0.02)),
}


@pytest.fixture(scope="module")
def small_pair():
    """A 16-token target and an unrelated draft (another seed), one layer each."""
    return random_model(10, SMALL_VOCAB, layers=1), random_model(11, SMALL_VOCAB, layers=1)


def reference_next(model, contexts: np.ndarray, sampling: dict) -> np.ndarray:
    """p(next | context) for each row of `contexts` (B, L): the model's last logits by a full
    forward pass (no cache), processed by transformers' own processors in float64."""
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.tensor(np.array(model(mx.array(contexts))[:, -1]), dtype=torch.float64)
    chain = LogitsProcessorList()
    if sampling.get("repetition_penalty", 1.0) != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(sampling["repetition_penalty"]))
    chain.append(TemperatureLogitsWarper(sampling["temperature"]))
    if sampling.get("top_k"):
        chain.append(TopKLogitsWarper(sampling["top_k"]))
    if sampling.get("top_p", 1.0) < 1.0:
        chain.append(TopPLogitsWarper(sampling["top_p"]))
    if sampling.get("min_p"):
        chain.append(MinPLogitsWarper(sampling["min_p"]))
    processed = chain(torch.tensor(contexts, dtype=torch.long), logits)
    probs = torch.softmax(processed, dim=-1).numpy()
    if sampling.get("top_p", 1.0) < 1.0:
        # float32 (ours) and float64 (here) must draw the same nucleus: no cumulative mass
        # may sit within 1e-5 of the cut.
        scaled = (processed / 1.0).numpy()
        for row in np.where(np.isfinite(scaled), scaled, -np.inf):
            p = np.sort(np.exp(row - row.max()) / np.exp(row - row.max()).sum())
            assert np.min(np.abs(np.cumsum(p) - (1 - sampling["top_p"]))) > 1e-5
    return probs


def first_tokens_distribution(model, prompt, sampling: dict) -> tuple[np.ndarray, np.ndarray]:
    """(P(t1, t2) as (V, V), P(t3) as (V,)) of plain sampling after `prompt`."""
    V = SMALL_VOCAB
    p1 = reference_next(model, np.array([prompt]), sampling)[0]
    p2 = reference_next(model, np.array([prompt + [a] for a in range(V)]), sampling)
    p3 = reference_next(model, np.array([prompt + [a, b] for a in range(V)
                                         for b in range(V)]), sampling)
    joint = p1[:, None] * p2
    return joint, (joint.reshape(-1, 1) * p3).sum(axis=0)


def chi2_sf(stat: float, df: int) -> float:
    import torch

    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def g_test(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of the G-test of `counts` against `probs`; cells expecting < 5 are pooled."""
    counts, probs = counts.reshape(-1).astype(float), probs.reshape(-1)
    expected = probs * counts.sum()
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    assert observed.sum() == counts.sum()  # nothing observed where the model has no mass
    assert len(observed) >= 5  # enough cells for the test to mean something
    nonzero = observed > 0
    stat = 2 * np.sum(observed[nonzero] * np.log(observed[nonzero] / expected[nonzero]))
    return chi2_sf(stat, len(observed) - 1)


class _SequenceCache:
    """Stands in for one layer's KV cache of `MemoModel`: it keeps the token ids instead."""

    def __init__(self):
        self.tokens: list[int] = []
        self.prompt_length = 0

    @property
    def offset(self) -> int:
        return len(self.tokens)

    @property
    def state(self):
        return ()

    def reserve(self, positions: int) -> None:
        pass

    def trim(self, n: int) -> int:
        n = min(max(n, 0), len(self.tokens))
        del self.tokens[len(self.tokens) - n:]
        return n


class MemoModel:
    """A model's exact logits by full forward passes (no KV cache), memoised by context.

    Thousands of speculative samples visit a few hundred distinct contexts of a 16-token
    model, so this makes the sampling test fast; the logits are those of the same forward
    pass the reference uses. (The KV-cache paths are covered token for token by the greedy
    tests, and `test_memo_model_is_a_faithful_stand_in` shows both give the same samples.)
    """

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self._memo: dict[tuple[tuple[int, ...], int], mx.array] = {}

    def make_cache(self, kv_bits=None):
        return [_SequenceCache()]

    def __call__(self, x: mx.array, cache):
        new = x[0].tolist()
        context = cache[0].tokens
        key = (tuple(context + new), len(new))
        if key not in self._memo:
            # Logits of the last len(new) positions of one full forward pass.
            logits = self.model(mx.array([key[0]]))[:, -len(new):]
            mx.eval(logits)
            self._memo[key] = logits
        context.extend(new)
        return self._memo[key]


def speculative_samples(small_pair, drafter: str, prompt, sampling: dict, n: int = N_SAMPLES):
    """Counts of (t1, t2) and of t3 over `n` speculative runs with seeds 0..n-1."""
    target, draft = (MemoModel(m) for m in small_pair)
    kwargs = {"draft_model": draft} if drafter == "draft" else {"prompt_lookup": 2}
    joint = np.zeros((SMALL_VOCAB, SMALL_VOCAB))
    third = np.zeros(SMALL_VOCAB)
    stats = SpeculativeStats()
    for seed in range(n):
        out = speculative_run(target, prompt, 3, num_draft_tokens=2, stats=stats,
                              sampling={**sampling, "seed": seed}, **kwargs)
        t1, t2, t3 = (t for t, _, _ in out)
        joint[t1, t2] += 1
        third[t3] += 1
    return joint, third, stats


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sampled_output_has_the_exact_distribution(small_pair, setting):
    drafter, prompt, sampling = SETTINGS[setting]
    joint, third = first_tokens_distribution(small_pair[0], prompt, sampling)
    counts, third_counts, stats = speculative_samples(small_pair, drafter, prompt, sampling)
    # Both acceptance and rejection happened often, so the residual and bonus draws were tested.
    assert 0.2 < stats.acceptance_rate < 0.9, stats
    assert g_test(counts, joint) > ALPHA
    assert g_test(third_counts, third) > ALPHA


WRONG_RULES = {
    # Accept every drafted token: (t1, t2) then follow the draft's own distribution.
    "accept-every-draft": ("acceptance_probability", lambda p_x, q_x: mx.ones_like(p_x)),
    # After a rejection draw from p instead of max(0, p - q): a subtler bias.
    "residual-is-p": ("residual_distribution", lambda p, q: p),
}


def test_the_test_has_power_against_accepting_every_draft(small_pair):
    """Under "accept every draft" (t1, t2) follow the draft's joint distribution: multinomial
    samples of N_SAMPLES from it fail the G-test at ALPHA in >= 99% of 400 repetitions."""
    _, prompt, sampling = SETTINGS["draft-t1"]
    joint, _ = first_tokens_distribution(small_pair[0], prompt, sampling)
    draft_joint, _ = first_tokens_distribution(small_pair[1], prompt, sampling)
    rng = np.random.default_rng(0)
    simulated = rng.multinomial(N_SAMPLES, draft_joint.reshape(-1), size=400)
    assert np.mean([g_test(c, joint) < ALPHA for c in simulated]) >= 0.99


@pytest.mark.parametrize("rule", list(WRONG_RULES))
def test_negative_control_a_wrong_rule_fails_the_same_test(small_pair, monkeypatch, rule):
    name, wrong = WRONG_RULES[rule]
    monkeypatch.setattr(speculative, name, wrong)
    _, prompt, sampling = SETTINGS["draft-t1"]
    joint, _ = first_tokens_distribution(small_pair[0], prompt, sampling)
    counts, _, stats = speculative_samples(small_pair, "draft", prompt, sampling)
    if rule == "accept-every-draft":
        assert stats.acceptance_rate == 1.0
    assert g_test(counts, joint) < ALPHA


def test_memo_model_is_a_faithful_stand_in(small_pair):
    """With real KV caches the same seeds give the same samples as through MemoModel."""
    target, draft = small_pair
    memo_target, memo_draft = MemoModel(target), MemoModel(draft)
    for seed in range(8):
        for sampling in (dict(temperature=1.0), dict(temperature=0.7, top_p=0.9)):
            sampling = {**sampling, "seed": seed}
            real = speculative_run(target, SMALL_PROMPT, 8, draft_model=draft,
                                   num_draft_tokens=3, sampling=sampling)
            memo = speculative_run(memo_target, SMALL_PROMPT, 8, draft_model=memo_draft,
                                   num_draft_tokens=3, sampling=sampling)
            assert [t for t, _, _ in real] == [t for t, _, _ in memo]


# --- prompt lookup -----------------------------------------------------------------------------


def lookup_by_brute_force(tokens: list[int], k: int, max_ngram: int) -> list[int]:
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # most recent earlier occurrence
            if tokens[start: start + n] == suffix:
                return tokens[start + n: start + n + k]
    return []


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    rng = np.random.default_rng(1)
    for trial in range(200):
        tokens = [int(t) for t in rng.integers(0, 4 + trial % 5, size=rng.integers(1, 30))]
        lookup = PromptLookup(3)
        # Grow the history in steps, as generation does, so the incremental index is tested.
        for end in sorted({len(tokens) // 3, len(tokens) // 2, len(tokens)} - {0}):
            assert lookup.propose(tokens[:end], 4) == lookup_by_brute_force(tokens[:end], 4, 3)
    assert PromptLookup(2).propose([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 3) == [7, 1, 2]  # "2 3", last
    assert PromptLookup(2).propose([5, 6, 7], 3) == []


def bigram_model(seed: int, vocab: int) -> Model:
    """A model whose next token depends on the last token only (attention and MLP outputs
    zeroed, untied LM head): its greedy output copies what followed a token before, so it
    stands in for a model that copies its input (editing, summarising, code)."""
    model = random_model(seed, vocab, layers=1, tie=False, scale=2.0)
    for layer in model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    return model


def test_copy_heavy_prompt_gets_high_acceptance():
    model = bigram_model(3, 512)
    document = [17] + plain_tokens(model, [17], 40)  # a text the model reproduces...
    prompt = document + [91, 92] + document[:5]  # ...and a request to copy it, begun
    stats = SpeculativeStats()
    out = speculative_run(model, prompt, 30, prompt_lookup=3, num_draft_tokens=5, stats=stats)
    assert [t for t, _, _ in out] == plain_tokens(model, prompt, 30) == document[5:35]
    assert stats.acceptance_rate > 0.9 and stats.tokens_per_pass > 4
    # An unrelated prompt gives lookup nothing to copy: few drafts, little acceptance.
    stats = SpeculativeStats()
    speculative_run(model, list(range(100, 130)), 30, prompt_lookup=3, stats=stats)
    assert stats.tokens_per_pass < 1.5


# --- rounds: rejection at every position, bonus, EOS, max_tokens, closing -----------------------


class CorruptedDraft:
    """A draft that is the target itself, except at absolute positions in `wrong`, where its
    argmax is forbidden: the drafted token there always differs from the target's."""

    def __init__(self, target, wrong: set[int]):
        self.target, self.wrong, self.config = target, wrong, target.config

    def make_cache(self, kv_bits=None):
        return self.target.make_cache(kv_bits=kv_bits)

    def __call__(self, x, cache):
        start = cache[0].offset
        logits = self.target(x, cache=cache)
        positions = mx.arange(start + 1, start + 1 + x.shape[1])  # of the token predicted
        wrong = mx.array([int(p) in self.wrong for p in np.array(positions)])
        best = mx.argmax(logits, axis=-1, keepdims=True)
        is_best = mx.arange(logits.shape[-1]) == best
        return mx.where(wrong[None, :, None] & is_best, -mx.inf, logits)


def expected_rounds(n_prompt: int, n: int, k: int, wrong: set[int]) -> list[bool]:
    """from_draft flags for greedy rounds of k drafted tokens when exactly the drafts at
    positions in `wrong` are rejected (an independent replay of the round structure)."""
    flags: list[bool] = []
    while len(flags) < n:
        pos = n_prompt + len(flags)  # position of the next token
        k_round = min(k, n - len(flags) - 1)
        accepted = 0
        while accepted < k_round and pos + accepted not in wrong:
            accepted += 1
        flags += [True] * accepted + [False]
    return flags


def test_rejection_at_every_position_and_bonus_tokens(pair):
    target, _ = pair
    prompt, k = [101, 202, 303], 4
    # Corrupt one position per round so that rounds accept 0, 1, .., k drafted tokens (k: all
    # accepted, then the bonus token).
    wrong, pos = set(), len(prompt)
    for run in [0, 1, 2, 3, 4, 2, 0, 4, 1, 3]:
        if run < k:
            wrong.add(pos + run)
        pos += run + 1
    n = pos - len(prompt)
    stats = SpeculativeStats()
    out = speculative_run(target, prompt, n, draft_model=CorruptedDraft(target, wrong),
                          num_draft_tokens=k, adaptive=False, stats=stats)
    assert [t for t, _, _ in out] == plain_tokens(target, prompt, n)
    flags = [f for _, _, f in out]
    assert flags == expected_rounds(len(prompt), n, k, wrong)
    runs = Counter(len(run) for run in "".join("a" if f else "|" for f in flags).split("|"))
    assert set(range(k + 1)) <= set(runs)  # rejected at each of positions 1..k, and bonus


def test_eos_inside_an_accepted_run_ends_generation(pair, tokenizer, monkeypatch):
    target, _ = pair
    plain = plain_tokens(target, tokenizer.encode(PROMPT), 12)
    # The draft is the target itself: every round accepts all 5 drafts, the 3rd token is EOS.
    monkeypatch.setattr(tokenizer, "eos_token_ids", [plain[2]])
    cache, draft_cache = target.make_cache(), target.make_cache()
    out = list(stream_generate(target, tokenizer, PROMPT, max_tokens=12, draft_model=target,
                               num_draft_tokens=5, cache=cache, draft_cache=draft_cache))
    assert [r.token for r in out] == plain[:3]
    assert [r.from_draft for r in out] == [True, True, True]  # drafted, accepted, then stop
    assert out[-1].finish_reason == "stop" and out[-1].speculative.drafted == 5
    n_prompt = len(tokenizer.encode(PROMPT))
    assert cache[0].offset == draft_cache[0].offset == n_prompt + 3


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 6, 7, 8])
def test_max_tokens_mid_round(pair, max_tokens):
    target, _ = pair
    prompt = [5, 6, 7, 8]
    stats = SpeculativeStats()
    cache = target.make_cache()
    out = speculative_run(target, prompt, max_tokens, draft_model=target, num_draft_tokens=3,
                          stats=stats, cache=cache)
    assert [t for t, _, _ in out] == plain_tokens(target, prompt, max_tokens)
    assert stats.target_passes == math.ceil(max_tokens / 4)  # 3 drafts + 1 bonus per pass
    assert cache[0].offset == len(prompt) + max_tokens


def assert_cache_holds(model, cache, sequence):
    """`cache` holds exactly `sequence`: its length, and the next logits after one more
    token equal a full forward pass over sequence + [that token]."""
    assert all(c.offset == len(sequence) for c in cache)
    probe = 42
    cached = model(mx.array([[probe]]), cache=cache)[0, -1]
    full = model(mx.array([sequence + [probe]]))[0, -1]
    np.testing.assert_allclose(np.array(cached), np.array(full), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("stop_after", [1, 3, 6, None])
@pytest.mark.parametrize("drafter", ["draft", "lookup"])
def test_cache_holds_prompt_and_yielded_tokens_after_close(pair, drafter, stop_after):
    target, draft = pair
    prompt = [11, 12, 13, 11, 12, 13, 11]
    cache, draft_cache = target.make_cache(), draft.make_cache()
    kwargs = {"draft_model": draft, "draft_cache": draft_cache} if drafter == "draft" \
        else {"prompt_lookup": 2}
    steps = speculative_generate_step(ids(prompt), target, sampling=SamplingParams(),
                                      max_tokens=10, num_draft_tokens=4, cache=cache, **kwargs)
    yielded = []
    for token, _, _ in steps:
        yielded.append(token)
        if len(yielded) == stop_after:
            steps.close()
            break
    assert len(yielded) == (stop_after or 10)
    assert_cache_holds(target, cache, prompt + yielded)
    if drafter == "draft":
        assert_cache_holds(draft, draft_cache, prompt + yielded)


@pytest.mark.parametrize("drafter", ["draft", "lookup"])
def test_cache_tokens_list_prompt_and_yielded_tokens(pair, drafter):
    """The ModelCache's ids (what the repetition penalty and a chat session read) follow the
    trims of rejected drafts."""
    target, draft = pair
    prompt = [11, 12, 13, 11, 12, 13, 11]
    cache, draft_cache = target.make_cache(), draft.make_cache()
    kwargs = {"draft_model": draft, "draft_cache": draft_cache} if drafter == "draft" \
        else {"prompt_lookup": 2}
    out = speculative_run(target, prompt, 9, cache=cache, **kwargs)
    assert cache.tokens == prompt + [t for t, _, _ in out]
    if drafter == "draft":
        assert draft_cache.tokens == cache.tokens


class SetAfter:
    """A cancel flag that turns set after `n` checks."""

    def __init__(self, n: int):
        self.n = n

    def is_set(self) -> bool:
        self.n -= 1
        return self.n < 0


@pytest.mark.parametrize("checks", [0, 1, 3])
def test_cancel_stops_and_keeps_the_cache_invariant(pair, checks):
    """Cancelled before the first token (0 checks: during the prefill; 1: before the first
    round), both caches are as they were; later, they hold the prompt and the tokens out."""
    target, draft = pair
    prompt = [11, 12, 13, 11, 12, 13, 11]
    cache, draft_cache = target.make_cache(), draft.make_cache()
    out = speculative_run(target, prompt, 20, cache=cache, draft_model=draft,
                          draft_cache=draft_cache, num_draft_tokens=2,
                          prefill_step_size=4, cancel=SetAfter(checks + 1))
    yielded = [t for t, _, _ in out]
    assert len(yielded) < 20
    if checks <= 2:  # one prefill step (of 4) + the check before the first round
        assert yielded == [] and cache.offset == 0 and draft_cache.offset == 0
    else:
        assert yielded and cache.tokens == prompt + yielded
        assert_cache_holds(target, cache, prompt + yielded)
        assert_cache_holds(draft, draft_cache, prompt + yielded)


# --- long context, the KV cache format, the structured-output hook, seeds, adaptive k ------------


class WindowRecorder:
    """Wraps a draft model and records the longest cache it was asked to attend over."""

    def __init__(self, model):
        self.model, self.config, self.longest = model, model.config, 0

    def make_cache(self, kv_bits=None):
        return self.model.make_cache(kv_bits=kv_bits)

    def __call__(self, x, cache):
        self.longest = max(self.longest, cache[0].offset + x.shape[1])
        return self.model(x, cache=cache)


def test_short_context_draft_serves_a_longer_sequence():
    target = random_model(20, 64, scale=1.5)
    draft = WindowRecorder(perturbed(target, 21, 0.02, 64))
    draft.config = ModelConfig(**{**draft.config.__dict__, "max_position_embeddings": 24})
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, 64, size=30)]
    stats = SpeculativeStats()
    out = speculative_run(target, prompt, 40, draft_model=draft, stats=stats)
    assert [t for t, _, _ in out] == plain_tokens(target, prompt, 40)
    assert draft.longest <= 24 and stats.accepted > 0  # windowed, and still useful


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_dual_chunk_attention_target(kv_bits):
    """A DCA target (chunks of 16) over 60+ positions, the draft with plain attention."""
    dca = {"chunk_size": 16, "local_size": 4, "original_max_position_embeddings": 256}
    target = random_model(30, 64, scale=1.5, dual_chunk_attention_config=dca)
    draft = perturbed(random_model(30, 64, scale=1.5), 31, 0.02, 64)
    assert target.make_cache()[0].mode == "dca" and draft.make_cache()[0].mode == "standard"
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 64, size=40)]
    stats = SpeculativeStats()
    out = speculative_run(target, prompt, 30, draft_model=draft, stats=stats,
                          cache=target.make_cache(kv_bits=kv_bits),
                          draft_cache=draft.make_cache(kv_bits=kv_bits))
    plain = [t for t, _ in generate_step(ids(prompt), target, sampling=SamplingParams(),
                                         cache=target.make_cache(kv_bits=kv_bits), max_tokens=30)]
    assert [t for t, _, _ in out] == plain
    assert stats.accepted > 0


def history_mask(history) -> mx.array:
    """Allowed next tokens depend on the whole history: ids congruent to len(history) mod 3."""
    return mx.arange(64) % 3 == len(history) % 3


def masked_greedy_reference(model, prompt, n) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        logits = np.array(model(mx.array([seq]))[0, -1])
        logits[np.arange(64) % 3 != len(seq) % 3] = -np.inf
        seq.append(int(logits.argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("drafter", ["draft", "lookup"])
def test_token_mask_hook_constrains_target_and_draft(drafter):
    target = random_model(40, 64, scale=1.5)
    draft = perturbed(target, 41, 0.05, 64)
    kwargs = {"draft_model": draft} if drafter == "draft" else {"prompt_lookup": 2}
    prompt = [1, 2, 3, 1, 2, 3, 1]
    stats = SpeculativeStats()
    out = speculative_run(target, prompt, 20, token_mask=history_mask, stats=stats, **kwargs)
    assert [t for t, _, _ in out] == masked_greedy_reference(target, prompt, 20)
    for seed in range(4):
        out = speculative_run(target, prompt, 20, token_mask=history_mask,
                              sampling={"temperature": 1.0, "seed": seed}, **kwargs)
        tokens = [t for t, _, _ in out]
        assert all(t % 3 == (len(prompt) + i) % 3 for i, t in enumerate(tokens))


def test_seed_makes_draws_reproducible():
    target = random_model(50, 64, scale=1.0)
    draft = perturbed(target, 51, 0.3, 64)

    def run(seed):
        return [t for t, _, _ in speculative_run(
            target, [1, 2, 3], 16, draft_model=draft,
            sampling={"temperature": 0.8, "top_p": 0.95, "seed": seed})]

    assert run(7) == run(7) and run(7) != run(8)


def test_draft_length_adapts_to_acceptance():
    length = DraftLength(5)
    assert length.k == 5
    for _ in range(10):
        length.update(length.k, 0)
    assert length.k == 1
    for _ in range(20):
        length.update(length.k, length.k)
    assert length.k == 5
    fixed = DraftLength(3, adaptive=False)
    fixed.update(3, 0)
    assert fixed.k == 3


def test_a_useless_draft_costs_about_one_draft_step_per_token(pair):
    target, _ = pair
    prompt = [7, 8, 9]
    contrarian = CorruptedDraft(target, set(range(200)))  # every drafted token is wrong
    stats = SpeculativeStats()
    out = speculative_run(target, prompt, 30, draft_model=contrarian, num_draft_tokens=5,
                          stats=stats)
    assert [t for t, _, _ in out] == plain_tokens(target, prompt, 30)
    assert stats.accepted == 0 and stats.drafted <= 1.3 * stats.target_passes


# --- the command line -----------------------------------------------------------------------------


def test_cli_draft_model_and_prompt_lookup(checkpoint_factory, tiny_checkpoint):
    from click.testing import CliRunner

    from qwen2_mlx.cli.main import cli

    runner = CliRunner()
    base = ["generate", "-m", str(tiny_checkpoint), "-p", "once upon a time", "--temp", "0",
            "--repetition-penalty", "1.0", "--max-tokens", "16"]
    plain = runner.invoke(cli, base)
    draft = checkpoint_factory(seed=1)
    spec = runner.invoke(cli, base + ["--draft-model", str(draft), "--num-draft-tokens", "3",
                                      "--verbose"])
    assert plain.exit_code == spec.exit_code == 0, spec.output
    assert spec.stdout == plain.stdout
    assert "Speculative: " in spec.stderr and "tokens per target pass" in spec.stderr
    lookup = runner.invoke(cli, base + ["--prompt-lookup", "2", "-v"])
    assert lookup.exit_code == 0 and lookup.stdout == plain.stdout
    assert "Speculative: " in lookup.stderr

    other_tokenizer = checkpoint_factory(vocab_size=600)
    bad = runner.invoke(cli, base + ["--draft-model", str(other_tokenizer)])
    assert bad.exit_code == 1 and bad.stderr.strip().count("\n") == 0
    assert "draft model: the draft model's tokenizer differs" in bad.stderr
    both = runner.invoke(cli, base + ["--draft-model", str(draft), "--prompt-lookup", "2"])
    assert both.exit_code == 2 and "choose one drafter" in both.stderr
