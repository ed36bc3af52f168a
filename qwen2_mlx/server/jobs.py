"""What the HTTP layer hands the engine (a `Job`) and what the engine sends back (events).

A job is one request, already validated and tokenized: one or more prompts, each decoded into
`n` choices with the same settings. The engine reports through `job.emit(event)`, called on
the engine thread; the HTTP layer turns that into a thread-safe hand-off to its event loop.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qwen2_mlx.sampling import LogitsProcessor, SamplingParams
from qwen2_mlx.tools import ToolCall


@dataclass(frozen=True)
class ChoiceSettings:
    """How every choice of a job is decoded.

    `seed` is the first choice's; choice i of the job draws with ``seed + i`` so that n > 1
    choices differ and each is reproducible. `logprobs`: None for none, else how many
    alternatives (top logprobs) to report with each token (0: only the sampled token's).
    `tool_prefix`: text appended to the prompt that opens a forced tool call; the parser reads
    it first. `make_processors`, when set, builds a fresh list of extra logits processors for
    each choice (a `response_format` constraint, a test's script).
    """

    sampling: SamplingParams
    max_tokens: int
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    stops: tuple[str, ...] = ()
    logprobs: int | None = None
    tools: list[dict] | None = None
    tool_prefix: str = ""
    make_processors: Callable[[], list[LogitsProcessor]] | None = None


@dataclass
class TokenLogprob:
    """One sampled token's log-probability and, when asked for, the most likely alternatives
    (token id, log-probability), most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class ChoiceEvent:
    """New output of one choice; `finish_reason` is set on its last event."""

    choice: int
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class JobDone:
    """Every choice finished; token counts for `usage`."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class JobError:
    """The job failed or was refused after it was queued (HTTP status and OpenAI error type)."""

    status: int
    message: str
    type: str = "server_error"
    code: str | None = None


Event = ChoiceEvent | JobDone | JobError

_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One request for the engine: `prompts` (token ids), `n` choices per prompt."""

    prompts: list[list[int]]
    n: int
    settings: ChoiceSettings
    emit: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set from any thread; the engine drops the job's work next step
    finished: bool = False  # set by the HTTP layer once it has the job's last event
    # Kept by the engine for `JobDone`.
    cached_tokens: int = 0
    completion_tokens: int = 0
    finished_choices: int = 0

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def choice_seed(self, choice: int) -> int | None:
        seed = self.settings.sampling.seed
        return None if seed is None else (seed + choice) % 2**64
