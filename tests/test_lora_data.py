"""Fine-tuning data: JSONL formats, loss masks, errors naming file and line, batching."""

from __future__ import annotations

import numpy as np
import pytest

from qwen2_mlx.chat import render_chat
from qwen2_mlx.tokenizer import Qwen2Tokenizer
from qwen2_mlx.train.data import (
    BatchSchedule,
    DataFormatError,
    Example,
    TruncationWarning,
    make_batch,
)
from qwen2_mlx.train.text_data import Dataset, encode_record, load_datasets, load_jsonl

from lora_tasks import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return Qwen2Tokenizer.from_pretrained(tiny_tokenizer_dir)


def trained_text(tokenizer, example: Example) -> str:
    return tokenizer.decode([t for t, m in zip(example.tokens, example.mask, strict=True) if m])


@pytest.fixture(scope="module")
def qwen2_tokenizer(qwen2_tokenizer_dir):
    return Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir)


def test_chat_trains_on_every_assistant_reply_and_its_end_token(qwen2_tokenizer):
    tokenizer = qwen2_tokenizer
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"},
                {"role": "user", "content": "\n\nAgain?"},
                {"role": "assistant", "content": "\nYes, again."}]
    example = encode_record({"messages": messages}, tokenizer, where="f:1")
    assert example.tokens == tokenizer.encode(render_chat(messages, add_generation_prompt=False))
    # The reply that starts with "\n" merges with the template's "\n" into one token ("\n\n"),
    # which begins in the prompt and so is not trained.
    assert tokenizer.encode("\n\n") == [271] and 271 in example.tokens
    assert trained_text(tokenizer, example) == "Hello there<|im_end|>Yes, again.<|im_end|>"
    everything = encode_record({"messages": messages}, tokenizer, where="f:1", mask_prompt=False)
    assert all(everything.mask)


def test_prompt_completion_is_a_user_assistant_chat(tokenizer):
    example = encode_record({"prompt": "2+2?", "completion": "4"}, tokenizer, where="f:1")
    as_chat = encode_record({"messages": [{"role": "user", "content": "2+2?"},
                                          {"role": "assistant", "content": "4"}]},
                            tokenizer, where="f:1")
    assert example == as_chat
    assert trained_text(tokenizer, example) == "4<|im_end|>"


def test_plain_prompt_completion_and_text_end_with_endoftext(tokenizer):
    raw = encode_record({"prompt": "Q: 2+2? A:", "completion": " 4"}, tokenizer, where="f:1",
                        chat=False)
    assert tokenizer.decode(raw.tokens) == "Q: 2+2? A: 4<|endoftext|>"
    assert trained_text(tokenizer, raw) == " 4<|endoftext|>"
    text = encode_record({"text": "Once upon a time"}, tokenizer, where="f:1")
    assert tokenizer.decode(text.tokens) == "Once upon a time<|endoftext|>" and all(text.mask)


BAD_LINES = [
    ('{"prompt": "a", "completion": "b"', "invalid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"question": "a", "answer": "b"}', "no 'messages', 'prompt'/'completion' or 'text' key "
                                         r"\(keys: answer, question\)"),
    ('{"prompt": "a"}', "has 'prompt' but no 'completion'"),
    ('{"prompt": "a", "completion": 3}', "'completion' must be a string, got int"),
    ('{"text": ""}', "'text' is empty"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\] has no 'content' key"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "the chat has no assistant message"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_malformed_line_names_file_and_line(tokenizer, tmp_path, line, message):
    good = {"prompt": "a", "completion": "b"}
    path = write_jsonl(tmp_path / "train.jsonl", [good, "", good, line, good])
    with pytest.raises(DataFormatError, match=rf"train\.jsonl:4: {message}"):
        load_jsonl(path, tokenizer)


def test_missing_or_empty_files_are_clear_errors(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="needs train.jsonl"):
        load_datasets(tmp_path, tokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_datasets(tmp_path / "nope", tokenizer)
    write_jsonl(tmp_path / "train.jsonl", [""])
    with pytest.raises(DataFormatError, match="train.jsonl: the file has no examples"):
        load_datasets(tmp_path, tokenizer)


def test_long_examples_are_truncated_with_one_counting_warning(tokenizer, tmp_path):
    records = [{"text": "short"}, {"text": "a much longer text " * 5}, {"text": "x " * 40}]
    write_jsonl(tmp_path / "train.jsonl", records)
    write_jsonl(tmp_path / "valid.jsonl", records[:1])
    with pytest.warns(TruncationWarning, match=r"2 of 3 examples in .*train\.jsonl are longer "
                                               r"than max_seq_length=16 tokens"):
        data = load_datasets(tmp_path, tokenizer, max_seq_length=16)
    assert data["train"].truncated == 2 and data["test"] is None
    assert max(len(e.tokens) for e in data["train"].examples) == 16


def test_batches_shift_pad_and_mark_trained_targets():
    batch = make_batch([Example([1, 2, 3, 4], [False, False, True, True]),
                        Example([5, 6], [False, True])], pad_id=0)
    assert np.array(batch.inputs).tolist() == [[1, 2, 3], [5, 6, 0]]
    assert np.array(batch.targets).tolist() == [[2, 3, 4], [6, 0, 0]]
    assert np.array(batch.mask).tolist() == [[0, 1, 1], [1, 0, 0]]
    assert np.array(batch.positions).tolist() == [1, 2, 3]
    assert batch.trained == 3 and batch.tokens == 4


def test_schedule_is_length_sorted_reproducible_and_covers_each_epoch():
    lengths = [5, 2, 9, 3, 7, 4, 8]
    dataset = Dataset([Example(list(range(n)), [True] * n) for n in lengths])
    schedule = BatchSchedule(dataset, batch_size=2, seed=3)
    assert len(schedule) == 4
    epoch = [sorted(schedule.indices(i).tolist()) for i in range(4)]
    assert sorted(i for group in epoch for i in group) == list(range(7))
    for group in epoch:  # neighbours in length share a batch
        assert group in ([1, 3], [0, 5], [4, 6], [2])
    again = BatchSchedule(dataset, batch_size=2, seed=3)
    order = [schedule.indices(i).tolist() for i in range(12)]
    assert order == [again.indices(i).tolist() for i in reversed(range(12))][::-1]
    with pytest.raises(ValueError, match="fewer than batch_size 8"):
        BatchSchedule(dataset, batch_size=8)


def test_bytes_that_are_not_utf8_name_file_line_and_byte(tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"train\.jsonl:2: not valid UTF-8 \(byte 14 of "
                                              "the line\\)"):
        load_jsonl(path, tokenizer)


def test_a_cut_off_line_reports_its_real_column(tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "cut off"\n{"text": "more"}\n')
    with pytest.raises(DataFormatError, match=r"train\.jsonl:2: invalid JSON \(Expecting ',' "
                                              r"delimiter at column 19\)"):
        load_jsonl(path, tokenizer)


def test_a_byte_order_mark_is_not_an_error(tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "fine"}\n')
    assert len(load_jsonl(path, tokenizer)) == 1
