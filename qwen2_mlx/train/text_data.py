"""Fine-tuning data: JSONL files in chat, prompt/completion or text format.

One JSON object per line, the format read per line from its keys:

- chat: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``,
  rendered with Qwen2's ChatML template (the default system prompt is added when the first
  message is not a system message, exactly as at generation time);
- prompt/completion: ``{"prompt": ..., "completion": ...}``, rendered as a user/assistant chat
  (or, with ``chat=False``, as the plain text prompt + completion followed by <|endoftext|>);
- text: ``{"text": ...}``, followed by <|endoftext|>.

With ``mask_prompt`` (the default) the loss covers only the assistant turns (their content and
the closing <|im_end|>, so the model learns to stop) or the completion; text examples train on
every token. The trained span is found from the tokenizer's character offsets of the fully
rendered text, so BPE merges across the boundary cannot shift it: a token that starts inside
the prompt is a prompt token.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qwen2_mlx.chat import IM_END, render_chat, validate_messages
from qwen2_mlx.train.data import (
    SPLITS,
    DataFormatError,
    Example,
    TruncationWarning,
    load_splits,
    read_jsonl,
)


@dataclass
class Dataset:
    """Tokenized examples of one file."""

    examples: list[Example]
    path: Path | None = None
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.examples)


def _end_of_text_id(tokenizer) -> int:
    # Qwen2 separates pretraining documents with <|endoftext|>; fall back to the EOS token.
    token_id = tokenizer.token_to_id("<|endoftext|>")
    if token_id is None:
        token_id = tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("the tokenizer has neither <|endoftext|> nor an EOS token to end texts")
    return token_id


def _spans_to_mask(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    return [any(lo <= start < hi for lo, hi in spans) for start, _ in offsets]


def _chat_text_and_spans(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text of `messages` and the character spans of each assistant reply
    (its content plus <|im_end|>, not the newline after it)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # Each rendered message ends with content + "<|im_end|>\n".
        end = len(render_chat(messages[: i + 1], add_generation_prompt=False)) - 1
        spans.append((end - len(IM_END) - len(message["content"]), end))
    return render_chat(messages, add_generation_prompt=False), spans


def _string_field(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value:
        raise DataFormatError(f"{where}: {key!r} is empty")
    return value


def encode_record(record: object, tokenizer, *, where: str, mask_prompt: bool = True,
                  chat: bool = True) -> Example:
    """Tokens and loss mask of one parsed JSONL record; `where` ("file:line") prefixes errors."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    backend = tokenizer.backend
    if "messages" in record:
        messages = record["messages"]
        try:
            validate_messages(messages)
        except ValueError as e:
            raise DataFormatError(f"{where}: {e}") from e
        text, spans = _chat_text_and_spans(messages)
        if mask_prompt and not spans:
            raise DataFormatError(f"{where}: the chat has no assistant message to train on "
                                  "(or train on the whole text with --no-mask-prompt)")
        encoding = backend.encode(text, add_special_tokens=False)
        tokens = list(encoding.ids)
        mask = _spans_to_mask(encoding.offsets, spans) if mask_prompt else [True] * len(tokens)
    elif "prompt" in record or "completion" in record:
        missing = [k for k in ("prompt", "completion") if k not in record]
        if missing:
            present = "completion" if missing[0] == "prompt" else "prompt"
            raise DataFormatError(f"{where}: has {present!r} but no {missing[0]!r}")
        prompt = _string_field(record, "prompt", where)
        completion = _string_field(record, "completion", where)
        if chat:
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": completion}]
            text, spans = _chat_text_and_spans(messages)
            end = []
        else:
            text, spans = prompt + completion, [(len(prompt), len(prompt) + len(completion))]
            end = [_end_of_text_id(tokenizer)]
        encoding = backend.encode(text, add_special_tokens=False)
        tokens = list(encoding.ids) + end
        mask = (_spans_to_mask(encoding.offsets, spans) + [True] * len(end) if mask_prompt
                else [True] * len(tokens))
    elif "text" in record:
        text = _string_field(record, "text", where)
        tokens = list(backend.encode(text, add_special_tokens=False).ids)
        tokens.append(_end_of_text_id(tokenizer))
        mask = [True] * len(tokens)
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataFormatError(f"{where}: no 'messages', 'prompt'/'completion' or 'text' key "
                              f"(keys: {keys})")
    if len(tokens) < 2:
        raise DataFormatError(f"{where}: the example has {len(tokens)} token; at least 2 are "
                              "needed to predict one")
    if not any(mask[1:]):
        raise DataFormatError(f"{where}: no token to train on after the first one")
    return Example(tokens, mask)


def load_jsonl(path: str | os.PathLike, tokenizer, *, max_seq_length: int = 2048,
               mask_prompt: bool = True, chat: bool = True) -> Dataset:
    """Tokenize a JSONL file. Blank lines are skipped; a malformed line raises
    DataFormatError naming the file and line; examples longer than `max_seq_length` tokens are
    cut to that length and reported in one TruncationWarning with their count."""
    path = Path(path)
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2, got {max_seq_length}")
    examples: list[Example] = []
    truncated = emptied = 0
    for where, record in read_jsonl(path):
        example = encode_record(record, tokenizer, where=where, mask_prompt=mask_prompt,
                                chat=chat)
        if len(example.tokens) > max_seq_length:
            truncated += 1
            example = Example(example.tokens[:max_seq_length], example.mask[:max_seq_length])
            emptied += not any(example.mask[1:])
        examples.append(example)
    if not examples:
        raise DataFormatError(f"{path}: the file has no examples")
    if truncated:
        lost = f"; {emptied} of them kept no trained token" if emptied else ""
        warnings.warn(
            f"{truncated} of {len(examples)} examples in {path} are longer than "
            f"max_seq_length={max_seq_length} tokens and were truncated{lost}",
            TruncationWarning, stacklevel=2,
        )
    return Dataset(examples, path, truncated)


def load_datasets(data_dir: str | os.PathLike, tokenizer, *, splits: Sequence[str] = SPLITS,
                  max_seq_length: int = 2048, mask_prompt: bool = True,
                  chat: bool = True) -> dict[str, Dataset | None]:
    """{split: Dataset or None} for ``<data_dir>/{train,valid,test}.jsonl``.

    train.jsonl is required when "train" is in `splits`; missing other files give None.
    """
    def load_file(file: Path) -> Dataset:
        return load_jsonl(file, tokenizer, max_seq_length=max_seq_length,
                          mask_prompt=mask_prompt, chat=chat)

    return load_splits(data_dir, load_file, splits,
                       "train.jsonl (and optionally valid.jsonl, test.jsonl)")
