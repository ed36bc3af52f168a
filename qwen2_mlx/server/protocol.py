"""Requests of the OpenAI API: their fields (pydantic models), and their translation into an
engine `Job` with every value checked.

Field names and ranges follow OpenAI's API reference; unknown fields are ignored as OpenAI
does; a value of the wrong type or out of range is a 400 naming the field (never FastAPI's
422). Types are strict: "0.5" is not a number and 1.0 is not an integer. Sampling fields a
request leaves out take the model's generation_config.json values (as transformers and vLLM
do), and greedy decoding when it does not sample.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwen2_mlx.chat_messages import check_tools
from qwen2_mlx.sampling import LogitsProcessor, SamplingParams
from qwen2_mlx.server.errors import APIError, bad_request
from qwen2_mlx.server.jobs import ChoiceSettings
from qwen2_mlx.validation import TokenIdError, check_token_ids

MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class _FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: _FunctionName


class _Common(_Request):
    """Fields both endpoints take."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off (vLLM's spelling, and ours)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None  # accepted and ignored, as the issue and OpenAI's docs allow


class ChatCompletionRequest(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


def parse_request(model: type[_Request], body: bytes) -> Any:
    """Validate a JSON body; a 400 in OpenAI's shape naming the first bad field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None


def _validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return bad_request(f"The request body is not valid JSON: {first['msg']}")
    if first["type"] == "model_type":
        return bad_request("The request body must be a JSON object")
    # Union members show in `loc` by type name ("str", "list[int]"): drop them.
    parts = [str(p) for p in first["loc"]
             if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS)]
    param = ".".join(parts) or None
    if first["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param=param,
                           code="missing_required_parameter")
    kind = "type" if first["type"].endswith("_type") else "value"
    return bad_request(f"Invalid {kind} for '{param}': {first['msg']}", param=param,
                       code=f"invalid_{kind}")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "literal['none','auto','required']",
              "NamedToolChoice"}


# --- from a request to a job -------------------------------------------------------------------


class ModelInfo:
    """What request translation needs to know about the served model."""

    def __init__(self, tokenizer, vocab_size: int, context_length: int, max_choices: int,
                 default_max_tokens: int | None = None,
                 processor_factories: tuple[Callable[[dict], LogitsProcessor | None], ...] = ()
                 ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.max_choices = max_choices
        self.default_max_tokens = default_max_tokens
        self.processor_factories = processor_factories


def chat_prompt(request: ChatCompletionRequest, info: ModelInfo) -> tuple[list[int], list | None,
                                                                           str]:
    """Token ids of a chat request's rendered conversation, the tools whose calls are parsed
    out of the answer, and the opening of a forced tool call (already in the ids)."""
    tools = request.tools
    try:
        tools = check_tools(tools)
    except ValueError as e:
        raise bad_request(str(e), param="tools") from None
    choice = request.tool_choice
    if choice is not None and choice != "none" and choice != "auto" and not tools:
        raise bad_request("tool_choice needs tools", param="tool_choice")
    if choice == "none":
        tools = None  # the model is not shown the tools and no call is parsed
    prefix = ""
    if isinstance(choice, NamedToolChoice):
        names = [t.get("function", t).get("name") for t in tools]
        if choice.function.name not in names:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not "
                              "among the tools", param="tool_choice")
        prefix = '<tool_call>\n{"name": ' + json.dumps(choice.function.name) + ', "arguments": '
    elif choice == "required":
        prefix = '<tool_call>\n{"name": "'
    tokenizer = info.tokenizer
    if prefix and tokenizer.tool_call_format != "qwen":
        raise bad_request("this model's tool-call format cannot be forced: use tool_choice "
                          "'auto'", param="tool_choice")
    try:
        text = tokenizer.apply_chat_template(request.messages, tools=tools,
                                             add_generation_prompt=True, tokenize=False,
                                             **(request.chat_template_kwargs or {}))
    except (ValueError, TypeError) as e:
        raise bad_request(str(e), param="messages") from None
    return tokenizer.encode(text + prefix), tools, prefix


def completion_prompts(request: CompletionRequest, info: ModelInfo) -> list[list[int]]:
    """Token ids of each prompt of a completions request (a string, ids, or a list of them)."""
    prompt = request.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt is empty", param="prompt")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            ids = info.tokenizer.encode(p)
        else:
            try:
                ids = check_token_ids(p, info.vocab_size)
            except TokenIdError as e:
                raise bad_request(f"prompt[{i}]: {e}", param="prompt") from None
        if not ids:
            raise bad_request("a prompt is empty: give at least one token", param="prompt")
        out.append(ids)
    return out


def choice_settings(request: _Common, prompts: list[list[int]], info: ModelInfo, *,
                    logprobs: int | None, max_tokens: int | None, tools=None,
                    tool_prefix: str = "") -> ChoiceSettings:
    """The engine's settings for a request's choices: limits checked against the context."""
    longest = max(len(p) for p in prompts)
    room = info.context_length - longest
    if room < 1:
        raise bad_request(f"This model's maximum context length is {info.context_length} "
                          f"tokens, but the prompt has {longest} tokens. Shorten the "
                          "prompt.", param="messages" if tools is not None else None,
                          code="context_length_exceeded")
    if request.n * len(prompts) > info.max_choices:
        raise bad_request(f"at most {info.max_choices} choices per request (prompts x n); "
                          f"got {request.n * len(prompts)}", param="n")
    if max_tokens is None:
        max_tokens = info.default_max_tokens or room
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise bad_request(f"stop takes up to {MAX_STOPS} non-empty strings", param="stop")
    return ChoiceSettings(
        sampling=_sampling(request, info.tokenizer.generation_defaults),
        max_tokens=min(max_tokens, room),
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=_logit_bias(request.logit_bias, info.vocab_size),
        stops=tuple(stops),
        logprobs=logprobs,
        tools=tools,
        tool_prefix=tool_prefix,
        make_processors=_processors(request, info),
    )


def _sampling(request: _Common, defaults: dict) -> SamplingParams:
    """Sampling settings: the request's, else generation_config.json's (greedy when it does
    not sample)."""
    sampled = bool(defaults.get("do_sample", False))

    def pick(value, key, off):
        if value is not None:
            return value
        return defaults.get(key, off) if sampled else off

    seed = None if request.seed is None else request.seed % 2**64
    try:
        return SamplingParams(
            temperature=float(pick(request.temperature, "temperature", 0.0)),
            top_p=float(pick(request.top_p, "top_p", 1.0)),
            top_k=max(0, int(pick(request.top_k, "top_k", 0))),
            min_p=float(request.min_p or 0.0),
            repetition_penalty=float(request.repetition_penalty
                                     if request.repetition_penalty is not None
                                     else defaults.get("repetition_penalty", 1.0)),
            seed=seed,
        )
    except ValueError as e:
        raise bad_request(str(e)) from None


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise bad_request(f"logit_bias keys must be token ids in [0, {vocab_size}), got "
                              f"{key!r}", param="logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias values must be in [-100, 100], got {value}",
                              param="logit_bias")
        out[int(key)] = float(value)
    return out


def _processors(request: _Common, info: ModelInfo
                ) -> Callable[[], list[LogitsProcessor]] | None:
    """Per-choice extra logits processors: `response_format`, and the server's own factories
    (an embedding application's, a test's). Each choice gets fresh ones."""
    factories: list[Callable[[], LogitsProcessor | None]] = []
    fmt = request.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        factories.append(_response_format(fmt, info))
    raw = request.model_dump()
    factories += [lambda f=f: f(raw) for f in info.processor_factories]
    if not factories:
        return None
    return lambda: [p for p in (f() for f in factories) if p is not None]


def _response_format(fmt: dict, info: ModelInfo) -> Callable[[], LogitsProcessor]:
    """A factory of processors that enforce `fmt` (qwen2_mlx.structured, when present)."""
    try:
        from qwen2_mlx import structured
    except ImportError:
        raise bad_request("response_format needs structured-output support, which this "
                          "build of qwen2-mlx does not have", param="response_format",
                          code="unsupported_value") from None
    try:
        matcher = structured.make_grammar_matcher(info.tokenizer, fmt, info.vocab_size)
    except ImportError as e:
        raise bad_request(str(e), param="response_format") from None
    except ValueError as e:
        raise bad_request(f"response_format: {e}", param="response_format") from None
    return lambda: structured.StructuredLogitsProcessor(matcher.fork())
