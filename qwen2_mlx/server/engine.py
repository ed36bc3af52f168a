"""The engine: one thread that owns every MLX call of the server.

HTTP handlers never touch MLX: they `submit` a tokenized `Job` and receive its events through
the job's `emit` callback; a client that goes away sets `job.cancelled`. The engine thread
loads the model, then loops:

1. take new jobs from the inbox; drop the work of cancelled jobs (a disconnected client's
   sequence is gone before the next forward pass);
2. prefill one chunk (`prefill_step_size` tokens) of the next prompt, when the batch has room
   for its `n` choices; a prompt starts from the longest prefix the prefix cache holds, and
   its last token is run alone to give the first logits (as `generate_step` does), from which
   each choice samples its first token;
3. decode one step for every active sequence.

So a long prompt is prefilled a chunk at a time between decode steps and never stalls the
sequences already running. Decoding is continuous batching: sequences join (their prefilled
caches padded on the left into a `BatchCache`) and leave (finished, cancelled) between
steps, and all active sequences share one (B, 1) forward pass. A single active sequence
decodes on its own `ModelCache`, exactly as `generate` would (and a DCA model, which is not
batched, decodes one sequence at a time). Each sequence has its own sampler (its own seed),
logits processors, stop strings and limits.

A finished sequence's keys and values (prompt and answer) go to the prefix cache, so the next
turn of a conversation prefills only what is new.

With a draft model (`load_draft`, `qwen2-mlx serve --draft-model`), a sequence decoding alone
(exactly one active, no prompt waiting to be prefilled) runs speculative rounds instead of
single steps (`speculative.SpeculativeDecoder`: draft k, verify in one target pass, keep the
accepted tokens, which have exactly the plain distribution); its cache always holds prompt +
generated[:-1], so when another sequence joins it enters the batch as it would have without
the draft. Its draft cache stays with it and catches up when it is alone again.
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from qwen2_mlx.batch_cache import BatchCache, cache_from_state, copy_state
from qwen2_mlx.cache import ModelCache
from qwen2_mlx.penalties import logit_bias, presence_frequency_penalty
from qwen2_mlx.prefix_cache import PrefixCache
from qwen2_mlx.sampling import (
    apply_logits_processors,
    make_logits_processors,
    make_sampler,
)
from qwen2_mlx.server.jobs import ChoiceEvent, Job, JobDone, JobError, TokenLogprob
from qwen2_mlx.server.metrics import Metrics
from qwen2_mlx.speculative import (
    ModelDrafter,
    SpeculativeDecoder,
    SpeculativeRound,
    check_draft_model,
    check_draft_tokenizer,
)
from qwen2_mlx.text_stream import TextDelta, TextStream


class QueueFullError(Exception):
    """The engine's queue is full: the client should retry later (HTTP 429)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the server is busy: too many requests are waiting")
        self.retry_after = retry_after


class ShuttingDownError(Exception):
    """The server is shutting down and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class EngineSettings:
    """Scheduling and memory limits of the engine.

    max_batch_size: sequences decoded together (a job's n choices each take one).
    max_queue: jobs waiting for room in the batch; beyond it `submit` raises QueueFullError.
    prefill_step_size: prompt tokens per prefill forward pass.
    prompt_cache_bytes: byte budget of the prefix cache (0 turns it off).
    kv_bits: store KV caches 8- (or 4-) bit quantized; None keeps the model's dtype.
    num_draft_tokens: most tokens a draft model proposes per round (when there is one).
    """

    max_batch_size: int = 8
    max_queue: int = 64
    prefill_step_size: int = 512
    prompt_cache_bytes: int = 1 << 30
    kv_bits: int | None = None
    num_draft_tokens: int = 4


class _Prompt:
    """One prompt of a job on its way into the batch: prefilled chunk by chunk."""

    def __init__(self, job: Job, index: int, ids: list[int]) -> None:
        self.job, self.index, self.ids = job, index, ids
        self.cache: ModelCache | None = None
        self.cached = 0  # positions taken from the prefix cache

    @property
    def remaining(self) -> int:
        """Prompt tokens still to prefill before the last one (which gives the logits)."""
        return len(self.ids) - 1 - self.cache.offset


class _Sequence:
    """One choice being decoded: its sampler, processors, text and limits."""

    def __init__(self, job: Job, choice: int, prompt: list[int], tokenizer,
                 vocab_size: int) -> None:
        s = job.settings
        self.job, self.choice, self.prompt = job, choice, prompt
        self.generated: list[int] = []
        self.cache: ModelCache | None = None  # its own cache while it decodes alone
        sampling = s.sampling
        if job.choice_seed(choice) != sampling.seed:
            sampling = dataclasses.replace(sampling, seed=job.choice_seed(choice))
        self.sampling = sampling
        self.sample = make_sampler(sampling)
        # Pure functions of (history, logits): a speculative round applies them to drafted
        # rows as well.
        self.row_processors = []
        if s.presence_penalty or s.frequency_penalty:
            self.row_processors.append(presence_frequency_penalty(
                s.presence_penalty, s.frequency_penalty, len(prompt)))
        if s.logit_bias:
            self.row_processors.append(logit_bias(s.logit_bias, vocab_size))
        extra = s.make_processors() if s.make_processors is not None else []
        self.processors = make_logits_processors(sampling) + self.row_processors + extra
        self.speculator: SpeculativeDecoder | None = None  # made when it first decodes alone
        self.grammar = None  # the response format's matcher, when speculative rounds may run
        self.speculative = _speculative_extra(extra, self)
        self.stream = TextStream(tokenizer, prompt, stops=s.stops,
                                 tools=s.tools, prefix=s.tool_prefix)
        self.last_token_time = 0.0

    @property
    def next_input(self) -> int:
        return self.generated[-1]

    def history(self) -> mx.array:
        return mx.array(self.prompt + self.generated, dtype=mx.int32)


def _speculative_extra(extra: list, seq: _Sequence) -> bool:
    """Whether `seq` may decode in speculative rounds given its extra processors: none, or
    a response format's `StructuredLogitsProcessor` (its matcher then masks drafted rows
    through `GrammarTokenMask`, which moves it back and forth). Any other processor (an
    embedding application's, a test's) may keep state between calls or depend on being
    called once per token, so its sequences decode plainly."""
    if not extra:
        return True
    structured = sys.modules.get("qwen2_mlx.structured")
    if structured is None or len(extra) != 1 \
            or type(extra[0]) is not structured.StructuredLogitsProcessor:
        return False
    seq.grammar = extra[0].matcher
    return True


class Engine:
    """Owns the model and runs generation on its own thread (see the module docstring).

    Args:
        load: called on the engine thread; returns ``(model, tokenizer)``.
        settings: limits and memory budgets.
        metrics: counters and histograms the engine updates (read by /metrics).
    """

    def __init__(self, load: Callable[[], tuple[object, object]], settings: EngineSettings,
                 metrics: Metrics | None = None,
                 load_draft: Callable[[], tuple[object, object]] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._load = load
        self._load_draft = load_draft
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _queued and the shutdown flags
        self._queued = 0  # jobs submitted and not yet started
        self._draining = False
        self._drain_deadline: float | None = None
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="qwen2-mlx-engine", daemon=True)
        # Engine-thread state.
        self._waiting: deque[Job] = deque()
        self._prompts: deque[_Prompt] = deque()
        self._active: list[_Sequence] = []
        self._batch: BatchCache | None = None
        self._steps = 0
        self.model = self.tokenizer = self.draft_model = None
        self.prefix_cache = PrefixCache(settings.prompt_cache_bytes)

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        """Start the thread and wait until the model is loaded (re-raises a load error)."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            # Let the thread clear its MLX streams before the caller may exit the process
            # (an exit racing that aborts: "terminate called without an active exception").
            self._thread.join()
            raise self._load_error

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFullError or ShuttingDownError instead of queueing."""
        with self._lock:
            if self._draining:
                raise ShuttingDownError("the server is shutting down")
            # Jobs the batch has room for start at the next step: only the rest wait.
            if self._queued - self._room() >= self.settings.max_queue:
                raise QueueFullError(retry_after=self._retry_after())
            self._queued += 1
        self._inbox.put(job)

    def cancel(self, job: Job) -> None:
        """Drop `job`'s work at the next step (a client went away)."""
        job.cancelled = True
        self._inbox.put(None)  # wake an idle engine

    def drain(self, timeout: float) -> None:
        """Take no new jobs; refuse those waiting to start (503); let running ones finish for
        up to `timeout` seconds, then end them (finish_reason "length")."""
        with self._lock:
            self._draining = True
            self._drain_deadline = time.monotonic() + timeout
        self._inbox.put(None)

    def stop(self, timeout: float = 10.0) -> None:
        """Drain with no grace period and wait for the thread to end."""
        if not self._thread.is_alive():
            return
        self.drain(0.0)
        self._stopped.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def max_choices(self) -> int:
        """Most choices one job may ask for: the batch size (1 for a model that is not
        batched)."""
        return self.settings.max_batch_size if self._batched else 1

    def counts(self) -> dict[str, int]:
        """Sequences decoding, prompts prefilling and jobs waiting (for /metrics)."""
        return {"active": len(self._active), "prefilling": len(self._prompts),
                "waiting": self._queued}

    def _room(self) -> int:
        """Free batch slots, as seen from another thread (a snapshot, good enough to tell
        a burst the batch can take from a queue)."""
        prefilling = sum(p.job.n for p in list(self._prompts))
        return max(0, self.max_choices - len(self._active) - prefilling)

    def _retry_after(self) -> int:
        # A rough wait: the batch frees a slot every few seconds on a small model.
        return max(1, min(60, self._queued // max(1, self.settings.max_batch_size)))

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            with mx.stream(mx.new_thread_local_stream(mx.default_device())):
                self._serve()
        finally:
            # MLX needs a thread's streams destroyed by that thread before it ends, or the
            # process can abort at exit ("terminate called without an active exception").
            mx.clear_streams()

    def _serve(self) -> None:
        """Load the model, then run steps until stopped (on the engine thread)."""
        try:
            self.model, self.tokenizer = self._load()
            cache = self.model.make_cache(kv_bits=self.settings.kv_bits)
            self._kv_group = getattr(cache[0], "group_size", 64)
            self._batched = self.model.layers[0].self_attn.mode == "standard"
            self._use_prefix_cache = self._batched and self.settings.prompt_cache_bytes > 0
            if self._load_draft is not None:
                self.draft_model = self._loaded_draft()
        except BaseException as e:  # reported by start() in the caller's thread
            # Nothing of this thread's MLX work may outlive its streams (cleared as it ends):
            # drop the models and the tracebacks' frames, which hold arrays of a failed load.
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            self._take_inbox(block=not self._has_work())
            if self._stopped.is_set() and not self._has_work():
                break
            try:
                self._step()
            except Exception as e:  # a failed step fails its jobs, never the server
                traceback.print_exc(file=sys.stderr)
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    def _loaded_draft(self):
        """Load the draft model and check it drafts for this model (ValueError otherwise)."""
        if not self._batched:
            raise ValueError("draft model: speculative decoding in the server needs a model "
                             "with standard attention (not --dca)")
        draft, draft_tokenizer = self._load_draft()
        try:
            check_draft_tokenizer(self.tokenizer, draft_tokenizer)
            check_draft_model(self.model, draft, self.tokenizer)
        except ValueError as e:
            raise ValueError(f"draft model: {e}") from None
        return draft

    def _has_work(self) -> bool:
        return bool(self._active or self._prompts or self._waiting)

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _step(self) -> None:
        self._drop_cancelled()
        if self._draining:
            self._refuse_waiting()
            if time.monotonic() >= self._drain_deadline:
                self._end_all("length")
        self._admit()
        if self._prompts:
            self._prefill_chunk()
        if self._active:
            self._decode_step()

    # --- admission and prefill
    def _free_slots(self) -> int:
        return self.max_choices - len(self._active)

    def _admit(self) -> None:
        """Start the next waiting job (its prompts go to prefill) once the batch has room
        for its first prompt's n choices; one job prefills at a time."""
        while self._waiting and not self._prompts:
            job = self._waiting[0]
            if not job.cancelled and self._free_slots() < job.n:
                return
            self._waiting.popleft()
            with self._lock:
                self._queued -= 1
            if job.cancelled:
                continue
            self.metrics.observe_queue_wait(time.monotonic() - job.created)
            self._prompts.extend(_Prompt(job, i, ids) for i, ids in enumerate(job.prompts))

    def _prefill_chunk(self) -> None:
        prompt = self._prompts[0]
        if prompt.cache is None:
            if self._free_slots() < prompt.job.n:
                return  # wait for room for all n choices
            self._start_prompt(prompt)
        n = min(self.settings.prefill_step_size, prompt.remaining)
        if n > 0:
            start = prompt.cache.offset
            self.model.forward(mx.array([prompt.ids[start:start + n]]), cache=prompt.cache)
            mx.eval([c.state for c in prompt.cache])
            self.metrics.prefill_tokens += n
        if prompt.remaining == 0:
            self._finish_prompt(prompt)
            self._prompts.popleft()

    def _start_prompt(self, prompt: _Prompt) -> None:
        match = self.prefix_cache.lookup(prompt.ids) if self._use_prefix_cache else None
        if match is None:
            prompt.cache = self.model.make_cache(kv_bits=self.settings.kv_bits)
        else:
            prompt.cached = match.tokens
            prompt.cache = cache_from_state(
                match.entry.state, match.entry.tokens[:match.tokens],
                bits=self.settings.kv_bits, group_size=self._kv_group)
            self.metrics.cached_tokens += match.tokens
        for layer in prompt.cache:
            layer.reserve(len(prompt.ids) + 256)
            # DCA takes its length temperature from the whole prompt, however it is chunked
            # (as generate_step sets it).
            layer.prompt_length = len(prompt.ids)
        self.metrics.prompt_cache_lookups += 1

    def _finish_prompt(self, prompt: _Prompt) -> None:
        """Run the last prompt token alone, sample each choice's first token, and join."""
        job = prompt.job
        logits = self.model.forward(mx.array([prompt.ids[-1:]]), cache=prompt.cache)
        logits = logits[:, -1, :].astype(mx.float32)
        self.metrics.prompt_tokens += len(prompt.ids)
        job.cached_tokens += prompt.cached
        sequences = [_Sequence(job, prompt.index * job.n + i, prompt.ids, self.tokenizer,
                               self.model.config.vocab_size) for i in range(job.n)]
        tokens = self._sample(sequences, mx.concatenate([logits] * job.n, axis=0))
        rows = []
        for seq, (token, logprob) in zip(sequences, tokens, strict=True):
            event = self._accept(seq, token, logprob)
            if event.finish_reason is None:
                rows.append(seq)
            else:
                self._remember(seq, cache=prompt.cache)
            self._emit(seq, event)
        if rows:
            self._join(rows, prompt.cache)

    def _join(self, rows: list[_Sequence], cache: ModelCache) -> None:
        """Add sequences that share the prefilled `cache` to the decoding set."""
        if not self._active and len(rows) == 1:
            rows[0].cache = cache  # alone: decode on its own cache, as generate does
        else:
            state = [layer.state for layer in cache]
            if self._batch is None:
                lone = self._active[0].cache if self._active else None
                earlier = [[layer.state for layer in lone]] if lone is not None else []
                self._batch = BatchCache.from_rows(earlier + [state] * len(rows),
                                                   bits=self.settings.kv_bits,
                                                   group_size=self._kv_group)
                for seq in self._active:
                    seq.cache = None
            else:
                self._batch.add_rows([state] * len(rows))
        self._active.extend(rows)

    # --- decoding
    def _decode_step(self) -> None:
        """One token for every active sequence: a (B, 1) forward pass over the batch, or,
        for a lone sequence, over its own cache exactly as `generate` decodes.

        With a draft model, a lone sequence runs a speculative round instead
        (`_speculative_step`)."""
        if self._speculates():
            self._speculative_step(self._active[0])
            return
        inputs = mx.array([[seq.next_input] for seq in self._active])
        if self._batch is None:
            logits = self.model.forward(inputs, cache=self._active[0].cache)
        else:
            logits = self.model.forward(inputs, cache=self._batch)
        logits = logits[:, -1, :].astype(mx.float32)
        self.metrics.decode_steps += 1
        self.metrics.decode_rows += len(self._active)
        self._steps += 1
        if self._steps % 256 == 0:
            mx.clear_cache()  # return freed buffers now and then, as generate_step does
        tokens = self._sample(self._active, logits)
        events = [self._accept(seq, token, logprob)
                  for seq, (token, logprob) in zip(self._active, tokens, strict=True)]
        keep = []
        for r, (seq, event) in enumerate(zip(self._active, events, strict=True)):
            if event.finish_reason is None:
                keep.append(r)
            else:  # stored before the client hears of it: its next turn will find it
                self._remember(seq, row=r)
            self._emit(seq, event)
        self._keep(keep)

    # --- speculative decoding (a lone sequence, with a draft model)
    def _speculates(self) -> bool:
        """Draft only while exactly one sequence decodes and no prompt waits to be prefilled
        (a job that cannot start for lack of room does not count), for a sequence whose
        processors allow it, when at least two more tokens may come."""
        if self.draft_model is None or self._batch is not None or len(self._active) != 1 \
                or self._prompts:
            return False
        seq = self._active[0]
        return seq.speculative and self._tokens_left(seq) >= 2

    def _tokens_left(self, seq: _Sequence) -> int:
        """Tokens `seq` may still generate before max_tokens or the context end."""
        return min(seq.job.settings.max_tokens - len(seq.generated),
                   self.model.config.context_length - len(seq.prompt) - len(seq.generated))

    def _speculator(self, seq: _Sequence) -> SpeculativeDecoder:
        """The sequence's drafter (the draft model prefilled with its history) and rounds."""
        tokens = seq.prompt + seq.generated
        k = self.settings.num_draft_tokens
        drafter = ModelDrafter(self.draft_model, self.draft_model.make_cache(), tokens,
                               max_draft=k, prefill_step_size=self.settings.prefill_step_size,
                               room=self._tokens_left(seq) + k)
        mask = None
        if seq.grammar is not None:
            from qwen2_mlx.structured import GrammarTokenMask

            mask = GrammarTokenMask(seq.grammar, len(seq.prompt))
        return SpeculativeDecoder(self.model, sampling=seq.sampling, drafter=drafter,
                                  num_draft_tokens=k, token_mask=mask,
                                  processors=seq.row_processors)

    def _speculative_step(self, seq: _Sequence) -> None:
        """One speculative round for the lone `seq`: its tokens are accepted one by one, as
        if decoded one per step; the first that ends the sequence (EOS, stop, limit) is its
        last, and the cache is trimmed to prompt + generated[:-1] before anything else."""
        if seq.speculator is None:
            seq.speculator = self._speculator(seq)
        spec = seq.speculator
        rnd = spec.round(seq.cache, seq.prompt + seq.generated, self._tokens_left(seq))
        self.metrics.decode_steps += 1
        self.metrics.decode_rows += 1
        self.metrics.speculative_rounds += 1
        self.metrics.speculative_drafted_tokens += rnd.drafted
        self._steps += 1
        if self._steps % 256 == 0:
            mx.clear_cache()
        logprobs = self._round_logprobs(seq, rnd)
        last = len(rnd.tokens) - 1
        for i, (token, logprob) in enumerate(zip(rnd.tokens, logprobs, strict=True)):
            event = self._accept(seq, token, logprob)
            self.metrics.speculative_accepted_tokens += i < rnd.accepted
            stop = event.finish_reason is not None or seq.job.cancelled
            if stop and i < last:
                seq.cache.trim(last - i)  # the unused tokens of the round
            if event.finish_reason is not None:
                self._remember(seq, row=0)
                self._emit(seq, event)
                self._keep([])
                return
            self._emit(seq, event)
            if stop:
                break
        if spec.processing.token_mask is not None:
            # Leave the matcher at the output, where the plain path's processor expects it.
            spec.processing.token_mask.sync(seq.generated)

    def _round_logprobs(self, seq: _Sequence, rnd: SpeculativeRound
                        ) -> list[TokenLogprob | None]:
        """The round's tokens' log-probabilities (and top k), as `_sample` reports them."""
        k = seq.job.settings.logprobs
        if k is None:
            return [None] * len(rnd.tokens)
        rows = rnd.logprobs[:len(rnd.tokens)]
        chosen = mx.take_along_axis(rows, mx.array(rnd.tokens)[:, None], axis=-1)[:, 0]
        if k:
            top = mx.argpartition(-rows, k - 1, axis=-1)[:, :k]
        else:
            top = mx.zeros((rows.shape[0], 0), dtype=mx.int32)
        top_logprobs = mx.take_along_axis(rows, top, axis=-1)
        mx.eval(chosen, top, top_logprobs)
        out = []
        for token, value, ids, values in zip(rnd.tokens, chosen.tolist(), top.tolist(),
                                             top_logprobs.tolist(), strict=True):
            pairs = sorted(zip(ids, values, strict=True), key=lambda pair: -pair[1])
            out.append(TokenLogprob(token, value, pairs))
        return out

    def _sample(self, sequences: list[_Sequence], logits: mx.array
                ) -> list[tuple[int, TokenLogprob | None]]:
        """Each row's processors, sampler and (when asked) log-probabilities, evaluated
        together: one (token, TokenLogprob or None) per row."""
        tokens, asked = [], {}
        for r, seq in enumerate(sequences):
            row = logits[r:r + 1]
            if seq.processors:
                row = apply_logits_processors(seq.processors, seq.history(), row)
            token = seq.sample(row).reshape(1)
            tokens.append(token)
            k = seq.job.settings.logprobs
            if k is not None:
                # Log-probabilities after the processors, before temperature and filters.
                logprobs = (row - mx.logsumexp(row, axis=-1, keepdims=True))[0]
                top = mx.argpartition(-logprobs, k - 1)[:k] if k else mx.array([], mx.int32)
                asked[r] = (logprobs[token], top, logprobs[top])
        sampled = mx.concatenate(tokens)
        mx.eval(sampled, list(asked.values()))
        out = []
        for r, token in enumerate(sampled.tolist()):
            if r not in asked:
                out.append((token, None))
                continue
            chosen, top_ids, top_logprobs = asked[r]
            top = sorted(zip(top_ids.tolist(), top_logprobs.tolist(), strict=True),
                         key=lambda pair: -pair[1])
            out.append((token, TokenLogprob(token, chosen.item(), top)))
        return out

    def _accept(self, seq: _Sequence, token: int, logprob: TokenLogprob | None) -> ChoiceEvent:
        """Record a sampled token; its event has `finish_reason` set when it ends the
        sequence (EOS, a stop string, max_tokens or the context end)."""
        now = time.monotonic()
        if not seq.generated:
            self.metrics.observe_ttft(now - seq.job.created)
        else:
            self.metrics.observe_itl(now - seq.last_token_time)
        seq.last_token_time = now
        seq.generated.append(token)
        self.metrics.generation_tokens += 1
        delta = seq.stream.add(token)
        context = self.model.config.context_length
        if delta.finish_reason is None and (
                len(seq.generated) >= seq.job.settings.max_tokens
                or len(seq.prompt) + len(seq.generated) >= context):
            delta = _merge(delta, seq.stream.finish("length"))
        return ChoiceEvent(seq.choice, delta.text, delta.reasoning, delta.tool_calls,
                           [logprob] if logprob is not None else [], delta.finish_reason)

    def _emit(self, seq: _Sequence, event: ChoiceEvent) -> None:
        seq.job.emit(event)
        if event.finish_reason is not None:
            self._sequence_done(seq)

    def _sequence_done(self, seq: _Sequence) -> None:
        job = seq.job
        job.finished_choices += 1
        job.completion_tokens += len(seq.generated)
        if job.finished_choices == job.choices:
            job.emit(JobDone(sum(len(p) for p in job.prompts), job.completion_tokens,
                             job.cached_tokens))

    def _keep(self, keep: list[int]) -> None:
        """Keep the active rows `keep` (the others finished or were cancelled): shrink the
        batch, and go back to a lone cache for a single sequence."""
        if len(keep) == len(self._active):
            return
        self._active = [self._active[r] for r in keep]
        if self._batch is None:
            return
        if not keep:
            self._batch = None
        elif len(keep) == 1:
            seq = self._active[0]
            held = seq.prompt + seq.generated[:-1]
            seq.cache = cache_from_state(self._batch.row_states(keep[0]), held,
                                         bits=self.settings.kv_bits, group_size=self._kv_group)
            self._batch = None
        else:
            self._batch.keep_rows(keep)
        mx.clear_cache()

    def _remember(self, seq: _Sequence, row: int | None = None,
                  cache: ModelCache | None = None) -> None:
        """Store a finished sequence (all it holds: prompt and answer but the last token) in
        the prefix cache, from its batch `row` or its own `cache`; only the first choice of
        each prompt (the others share its prompt)."""
        if not self._use_prefix_cache or seq.job.cancelled or seq.choice % seq.job.n:
            return
        if row is not None and self._batch is not None:
            state = self._batch.row_states(row)
        else:
            state = copy_state([layer.state for layer in (cache or seq.cache)])
        self.prefix_cache.insert(seq.prompt + seq.generated[:-1], state)

    # --- cancellation, shutdown, failure
    def _drop_cancelled(self) -> None:
        if any(p.job.cancelled for p in self._prompts):
            self._prompts = deque(p for p in self._prompts if not p.job.cancelled)
        keep = [r for r, seq in enumerate(self._active) if not seq.job.cancelled]
        if len(keep) < len(self._active):
            self.metrics.cancelled_sequences += len(self._active) - len(keep)
            self._keep(keep)

    def _refuse_waiting(self) -> None:
        """Answer the jobs that have not started with 503 (shutting down)."""
        for job in self._waiting:
            job.emit(_shutting_down())
        with self._lock:
            self._queued -= len(self._waiting)
        self._waiting.clear()

    def _end_all(self, reason: str) -> None:
        """The shutdown deadline: end every active sequence now (`reason`), and refuse the
        prompts still prefilling."""
        for seq in self._active:
            delta = seq.stream.finish(reason)
            self._emit(seq, ChoiceEvent(seq.choice, delta.text, delta.reasoning,
                                        delta.tool_calls, [], delta.finish_reason))
        self._active, self._batch = [], None
        for job in {p.job for p in self._prompts}:
            job.emit(_shutting_down())
        self._prompts.clear()

    def _fail_all(self, message: str) -> None:
        jobs = {seq.job for seq in self._active} | {p.job for p in self._prompts}
        for job in jobs:
            job.emit(JobError(500, message))
        self._active, self._batch = [], None
        self._prompts.clear()


def _shutting_down() -> JobError:
    return JobError(503, "the server is shutting down", "server_error", "service_unavailable")


def _merge(first: TextDelta, then: TextDelta) -> TextDelta:
    return TextDelta(first.text + then.text, first.reasoning + then.reasoning,
                     first.tool_calls + then.tool_calls, then.finish_reason)
