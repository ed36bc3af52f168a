"""Preference data for DPO: formats, the sequences built from token ids, score masks, errors
naming file and line, truncation, and batches of chosen + rejected rows."""

from __future__ import annotations

import numpy as np
import pytest

from qwen2_mlx.chat import render_chat
from qwen2_mlx.dpo.data import (
    encode_pair,
    load_preference_datasets,
    load_preference_jsonl,
    make_preference_batch,
)
from qwen2_mlx.tokenizer import Qwen2Tokenizer
from qwen2_mlx.train.data import BatchSchedule, DataFormatError, TruncationWarning

from lora_tasks import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(qwen2_tokenizer_dir):
    """The real Qwen2 tokenizer, so BPE merges across the prompt/reply boundary can happen."""
    return Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir)


def scored_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, m in zip(example.tokens, example.mask, strict=True) if m])


def test_sequences_are_prompt_ids_plus_reply_ids_plus_im_end(tokenizer):
    """prompt_ids = the chat template with the generation prompt; then the reply encoded on its
    own, <|im_end|> and "\\n", and nothing after (no trailing <|im_start|>assistant\\n)."""
    record = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."}
    pair = encode_pair(record, tokenizer, where="f:1")
    messages = [{"role": "user", "content": "Capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert pair.prompt_length == len(prompt)
    for example, reply in ((pair.chosen, "Paris."), (pair.rejected, "Lyon, I think.")):
        assert example.tokens[:len(prompt)] == prompt
        assert example.tokens[len(prompt):] == (tokenizer.encode(reply)
                                                 + tokenizer.encode("<|im_end|>\n"))
        # The sequence is the template's rendering of the finished conversation.
        full = messages + [{"role": "assistant", "content": reply}]
        assert tokenizer.decode(example.tokens) == render_chat(full, add_generation_prompt=False)
        assert not tokenizer.decode(example.tokens).endswith("<|im_start|>assistant\n")
        # Scored: the reply and its <|im_end|>, not the prompt and not the final newline.
        assert scored_text(tokenizer, example) == reply + "<|im_end|>"
        assert example.mask == ([False] * len(prompt) + [True] * (len(example.tokens)
                                                                   - len(prompt) - 1) + [False])


def test_reply_is_tokenized_on_its_own_so_the_prompt_is_a_common_prefix(tokenizer):
    """A reply starting with "\\n" would merge with the template's "\\n" if the joined text were
    tokenized ("\\n\\n" is one token); here the prompt ids stay intact in both sequences."""
    pair = encode_pair({"prompt": "Hi", "chosen": "\nHello", "rejected": "Hey"}, tokenizer,
                       where="f:1")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert pair.chosen.tokens[:len(prompt)] == pair.rejected.tokens[:len(prompt)] == prompt
    joined = tokenizer.encode(render_chat([{"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "\nHello"}],
                                          add_generation_prompt=False))
    assert joined[:len(prompt)] != prompt  # what re-tokenizing the joined text would give
    assert scored_text(tokenizer, pair.chosen) == "\nHello<|im_end|>"


def test_messages_system_and_conversational_replies(tokenizer):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "Name a colour."}]
    pair = encode_pair({"messages": history, "system": "Be terse.",
                        "chosen": [{"role": "assistant", "content": "Blue."}],
                        "rejected": "I cannot.", "id": 7}, tokenizer, where="f:1")
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "Be terse."}] + history)
    assert pair.chosen.tokens[:pair.prompt_length] == prompt
    assert scored_text(tokenizer, pair.chosen) == "Blue.<|im_end|>"
    # Without "system" the template's default system prompt is used, as at generation time.
    plain = encode_pair({"prompt": "x", "chosen": "a", "rejected": "b"}, tokenizer, where="f:1")
    assert tokenizer.decode(plain.chosen.tokens).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>")


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "chosen": "b"', "invalid JSON"),
    ('["a", "b"]', "expected a JSON object, got list"),
    ('{"chosen": "b", "rejected": "c"}', "needs exactly one of 'prompt' or 'messages', has "
                                         "neither"),
    ('{"prompt": "a", "messages": [{"role": "user", "content": "a"}], "chosen": "b", '
     '"rejected": "c"}', "has both"),
    ('{"prompt": "a", "rejected": "c"}', "no 'chosen' key"),
    ('{"prompt": "a", "chosen": "b", "rejected": 3}', "'rejected' must be a string, got int"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "'chosen' is empty"),
    ('{"prompt": "", "chosen": "b", "rejected": "c"}', "'prompt' is empty"),
    ('{"prompt": "a", "chosen": "b", "rejected": "b"}', "the same text"),
    ('{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}',
     "exactly one {'role': 'assistant'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
     '"chosen": "b", "rejected": "c"}', "ends with an assistant message"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}], '
     '"system": "t", "chosen": "b", "rejected": "c"}', "both 'system' and a system message"),
    ('{"messages": [{"role": "user"}], "chosen": "b", "rejected": "c"}',
     r"messages\[0\] has no 'content'"),
    ('{"prompt": "a", "system": 1, "chosen": "b", "rejected": "c"}', "'system' must be a string"),
])
def test_bad_lines_name_file_and_line(tokenizer, tmp_path, line, message):
    good = '{"prompt": "a", "chosen": "b", "rejected": "c"}'
    path = write_jsonl(tmp_path / "train.jsonl", [good, "", line])
    with pytest.raises(DataFormatError, match=rf"train\.jsonl:3: .*{message}"):
        load_preference_jsonl(path, tokenizer)


def test_empty_and_missing_files(tokenizer, tmp_path):
    with pytest.raises(DataFormatError, match="no preference pairs"):
        load_preference_jsonl(write_jsonl(tmp_path / "e.jsonl", [""]), tokenizer)
    with pytest.raises(FileNotFoundError, match="needs train.jsonl"):
        load_preference_datasets(tmp_path, tokenizer)
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    data = load_preference_datasets(tmp_path, tokenizer)
    assert len(data["train"]) == 1 and data["valid"] is None


def test_long_pairs_are_cut_with_one_warning_and_a_prompt_too_long_is_an_error(tokenizer,
                                                                               tmp_path):
    short = {"prompt": "a", "chosen": "b", "rejected": "c"}
    long = {"prompt": "a", "chosen": "word " * 40, "rejected": "c"}
    limit = len(encode_pair(short, tokenizer, where="x").chosen.tokens) + 3
    path = write_jsonl(tmp_path / "t.jsonl", [short, long, long])
    with pytest.warns(TruncationWarning, match=f"2 of 3 .* max_seq_length={limit}"):
        data = load_preference_jsonl(path, tokenizer, max_seq_length=limit)
    cut = data.examples[1]
    assert len(cut.chosen.tokens) == limit and sum(cut.chosen.mask) == limit - cut.prompt_length
    assert data.examples[0].chosen.tokens == encode_pair(short, tokenizer, where="x").chosen.tokens
    with pytest.raises(DataFormatError, match=r"t\.jsonl:1: the prompt alone is"):
        load_preference_jsonl(path, tokenizer, max_seq_length=cut.prompt_length)


def test_batch_rows_are_the_chosen_then_the_rejected_sequences(tokenizer):
    records = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in
               [("one", "1", "uno, which is Spanish"), ("two words", "2", "II"),
                ("three", "3 three", "tres")]]
    pairs = [encode_pair(r, tokenizer, where="x") for r in records]
    from qwen2_mlx.dpo.data import PreferenceDataset

    dataset = PreferenceDataset(pairs)
    batch = make_preference_batch(dataset, [2, 0])
    inputs, targets = np.array(batch.sequences.inputs), np.array(batch.sequences.targets)
    mask = np.array(batch.sequences.mask)
    order = [pairs[2].chosen, pairs[0].chosen, pairs[2].rejected, pairs[0].rejected]
    for row, example in enumerate(order):
        n = len(example.tokens)
        assert inputs[row, :n - 1].tolist() == example.tokens[:-1]
        assert targets[row, :n - 1].tolist() == example.tokens[1:]
        assert mask[row].tolist() == [float(m) for m in example.mask[1:]] + [0.0] * (
            mask.shape[1] - n + 1)
    assert np.array(batch.scored).tolist() == [sum(e.mask) for e in order]
    assert batch.size == 2 and batch.indices.tolist() == [2, 0]
    # BatchSchedule groups pairs by their longer sequence.
    plan = BatchSchedule(dataset, 1, shuffle=False)
    lengths = [len(dataset.examples[plan.indices(i)[0]].tokens) for i in range(3)]
    assert lengths == sorted(lengths)
