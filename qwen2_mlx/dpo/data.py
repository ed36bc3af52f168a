"""Preference data for DPO: JSONL pairs of a prompt with a chosen and a rejected reply.

One JSON object per line:

- ``{"prompt": "...", "chosen": "...", "rejected": "...", "system": "..."?}``: a single user
  turn (with an optional system message);
- ``{"messages": [...], "chosen": "...", "rejected": "..."}``: a whole conversation as the
  prompt (ending with a user turn), answered by either reply.

`chosen` / `rejected` are strings, or TRL's conversational form: a list holding one assistant
message. Other keys (ids, scores) are ignored.

Both sequences of a pair are built from token ids, never by re-tokenizing joined text:
``prompt_ids + answer_ids + <|im_end|> "\\n"``, where `prompt_ids` is the Qwen2 chat template
with the generation prompt (``...<|im_start|>assistant\\n``) and `answer_ids` the reply encoded
on its own. So the prompt is an exact common prefix of the two sequences and the reply is
tokenized as the model would generate it after that prompt. Nothing follows the reply's
``<|im_end|>\\n``: mlx-lm-lora renders the pair with ``add_generation_prompt=True`` and so
appends a stray ``<|im_start|>assistant\\n`` after the answer, which we never do.

The scored tokens (the DPO log-probability of a reply) are the reply and its ``<|im_end|>``:
the model must both say the answer and stop. The newline after ``<|im_end|>`` completes the
template's rendering but is not scored, since generation stops at ``<|im_end|>`` and never
emits it (the same targets as ``qwen2-mlx lora``'s assistant turns).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen2_mlx.chat import IM_END, render_chat, validate_messages
from qwen2_mlx.train.data import (
    Batch,
    DataFormatError,
    Example,
    TruncationWarning,
    load_splits,
    make_batch,
    read_jsonl,
)


@dataclass
class PreferencePair:
    """The two tokenized sequences of one preference example.

    `chosen` and `rejected` are full sequences (prompt + reply) with their score masks (True
    on the reply's tokens and its <|im_end|>); `prompt_length` is the shared prompt's length.
    """

    chosen: Example
    rejected: Example
    prompt_length: int

    @property
    def tokens(self) -> list[int]:
        """The longer of the two sequences: the width this pair pads a batch to (what
        `BatchSchedule` sorts by, so pairs of similar lengths share a batch)."""
        longer = max(self.chosen, self.rejected, key=lambda e: len(e.tokens))
        return longer.tokens


@dataclass
class PreferenceDataset:
    """Tokenized pairs of one file, and, once precomputed, their reference log-probs."""

    examples: list[PreferencePair]
    path: Path | None = None
    truncated: int = 0
    # Summed reference log-probs of each pair's chosen / rejected reply (float32, one per
    # pair), filled by `precompute_reference_logps`.
    ref_chosen: np.ndarray | None = None
    ref_rejected: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.examples)


def _reply(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataFormatError(f"{where}: no {key!r} key (a preference pair needs 'chosen' and "
                              "'rejected' replies)")
    value = record[key]
    # TRL's conversational format: [{"role": "assistant", "content": "..."}].
    if isinstance(value, list):
        if (len(value) != 1 or not isinstance(value[0], dict)
                or value[0].get("role") != "assistant"):
            raise DataFormatError(f"{where}: {key!r} as a list must hold exactly one "
                                  "{'role': 'assistant', 'content': ...} message")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value:
        raise DataFormatError(f"{where}: {key!r} is empty")
    return value


def prompt_messages(record: object, where: str) -> list[dict]:
    """The chat messages a record's replies answer, from 'prompt' (+ 'system') or 'messages'."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        keys = ", ".join(sorted(map(str, record))) or "none"
        what = "both" if has_prompt else "neither"
        raise DataFormatError(f"{where}: needs exactly one of 'prompt' or 'messages', has {what} "
                              f"(keys: {keys})")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataFormatError(f"{where}: 'system' must be a string, got "
                              f"{type(system).__name__}")
    if has_prompt:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise DataFormatError(f"{where}: 'prompt' must be a string, got "
                                  f"{type(prompt).__name__}")
        if not prompt:
            raise DataFormatError(f"{where}: 'prompt' is empty")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = record["messages"]
        try:
            validate_messages(messages)
        except ValueError as e:
            raise DataFormatError(f"{where}: {e}") from e
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if messages[-1]["role"] == "assistant":
            raise DataFormatError(f"{where}: 'messages' ends with an assistant message; the "
                                  "prompt must end where the reply starts (give the replies as "
                                  "'chosen' and 'rejected')")
        if system is not None and messages[0]["role"] == "system":
            raise DataFormatError(f"{where}: has both 'system' and a system message in "
                                  "'messages'; give one")
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    return messages


def _im_end_tokens(tokenizer) -> list[int]:
    im_end = tokenizer.token_to_id(IM_END)
    if im_end is None:
        raise ValueError(f"the tokenizer has no {IM_END} token; DPO data is rendered with the "
                         "Qwen2 chat template")
    return [im_end] + list(tokenizer.encode("\n"))


def encode_pair(record: object, tokenizer, *, where: str) -> PreferencePair:
    """Tokens and score masks of one parsed JSONL record; `where` ("file:line") prefixes
    errors."""
    messages = prompt_messages(record, where)
    chosen, rejected = _reply(record, "chosen", where), _reply(record, "rejected", where)
    if chosen == rejected:
        raise DataFormatError(f"{where}: 'chosen' and 'rejected' are the same text, so the "
                              "pair states no preference")
    prompt = list(tokenizer.encode(render_chat(messages, add_generation_prompt=True)))
    end = _im_end_tokens(tokenizer)
    # Scored: the reply and its <|im_end|>; the template's trailing "\n" is not.
    unscored_tail = len(end) - 1

    def sequence(reply: str) -> Example:
        reply_ids = list(tokenizer.encode(reply)) + end
        tokens = prompt + reply_ids
        mask = ([False] * len(prompt) + [True] * (len(reply_ids) - unscored_tail)
                + [False] * unscored_tail)
        return Example(tokens, mask)

    return PreferencePair(sequence(chosen), sequence(rejected), len(prompt))


def _truncate(example: Example, max_seq_length: int) -> Example:
    return Example(example.tokens[:max_seq_length], example.mask[:max_seq_length])


def load_preference_jsonl(path: str | os.PathLike, tokenizer, *,
                          max_seq_length: int = 2048) -> PreferenceDataset:
    """Tokenize a preference JSONL file.

    Blank lines are skipped; a malformed line raises DataFormatError naming the file and line.
    Sequences longer than `max_seq_length` tokens lose their end (the reply is scored up to
    the cut), reported in one TruncationWarning with their count; a pair whose prompt leaves
    no reply token inside the limit is an error naming its line.
    """
    path = Path(path)
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2, got {max_seq_length}")
    pairs: list[PreferencePair] = []
    truncated = 0
    for where, record in read_jsonl(path):
        pair = encode_pair(record, tokenizer, where=where)
        longest = max(len(pair.chosen.tokens), len(pair.rejected.tokens))
        if longest > max_seq_length:
            if pair.prompt_length >= max_seq_length:
                raise DataFormatError(
                    f"{where}: the prompt alone is {pair.prompt_length} tokens, which leaves "
                    f"no reply token within max_seq_length={max_seq_length}; raise it or "
                    "shorten the prompt")
            truncated += 1
            pair = PreferencePair(_truncate(pair.chosen, max_seq_length),
                                  _truncate(pair.rejected, max_seq_length),
                                  pair.prompt_length)
        pairs.append(pair)
    if not pairs:
        raise DataFormatError(f"{path}: the file has no preference pairs")
    if truncated:
        warnings.warn(
            f"{truncated} of {len(pairs)} preference pairs in {path} are longer than "
            f"max_seq_length={max_seq_length} tokens; their replies were cut at the limit",
            TruncationWarning, stacklevel=2,
        )
    return PreferenceDataset(pairs, path, truncated)


def load_preference_datasets(data_dir: str | os.PathLike, tokenizer, *,
                             splits: Sequence[str] = ("train", "valid"),
                             max_seq_length: int = 2048) -> dict[str, PreferenceDataset | None]:
    """{split: PreferenceDataset or None} for ``<data_dir>/{train,valid,test}.jsonl``.

    train.jsonl is required when "train" is in `splits`; missing other files give None.
    """
    def load_file(file: Path) -> PreferenceDataset:
        return load_preference_jsonl(file, tokenizer, max_seq_length=max_seq_length)

    return load_splits(data_dir, load_file, splits,
                       "train.jsonl (and optionally valid.jsonl) of preference pairs")


@dataclass
class PreferenceBatch:
    """B pairs as one padded batch of 2B sequences: rows 0..B-1 are the chosen replies, rows
    B..2B-1 the rejected ones in the same order (one forward pass scores both, as in TRL).

    `indices` are the pairs' positions in their dataset (to look up precomputed reference
    log-probs); `scored` is the number of scored tokens of each row (IPO's length
    normalisation).
    """

    sequences: Batch
    indices: np.ndarray
    scored: mx.array

    @property
    def size(self) -> int:
        return len(self.indices)


def make_preference_batch(dataset: PreferenceDataset, indices: Sequence[int],
                          pad_id: int = 0) -> PreferenceBatch:
    pairs = [dataset.examples[i] for i in indices]
    sequences = make_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return PreferenceBatch(sequences, np.asarray(indices, dtype=np.int64),
                           sequences.mask.sum(axis=1))
