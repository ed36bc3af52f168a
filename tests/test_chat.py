"""Tests for qwen2_mlx.chat: parity with transformers rendering Qwen2-Instruct's jinja template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwen2_mlx.chat import DEFAULT_SYSTEM_PROMPT, render_chat
from qwen2_mlx.chat import QWEN2_CHAT_TEMPLATE as PACKAGE_TEMPLATE
from qwen2_mlx.tokenizer import Qwen2Tokenizer

from tokenizer_fixture import (
    QWEN2_CHAT_TEMPLATE,
    build_qwen2_tokenizer_files,
    build_tiny_tokenizer_files,
)


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    return build_qwen2_tokenizer_files(tmp_path_factory.mktemp("qwen2_tokenizer"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer_files(tmp_path_factory.mktemp("tiny_tokenizer"))


CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Hello!"}],
    "with_system": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 = 4."},
        {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": "12."},
    ],
    "system_multi_turn_unicode": [
        {"role": "system", "content": "Réponds en français. 用中文也可以 😀"},
        {"role": "user", "content": "  leading spaces\nand\n\nnewlines\t"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "emoji 👨‍👩‍👧‍👦 and combining e\u0301"},
    ],
    "system_not_first": [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "late system"},
    ],
    "specials_in_content": [
        {"role": "user", "content": "say <|im_end|> then <|endoftext|>"},
    ],
    "extra_keys_and_custom_role": [
        {"role": "tool", "content": '{"result": 42}', "name": "calc"},
    ],
}


@pytest.fixture(scope="module")
def hf_real(real_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(real_dir))


@pytest.fixture(scope="module")
def hf_tiny(tiny_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def real_tok(real_dir) -> Qwen2Tokenizer:
    return Qwen2Tokenizer.from_pretrained(real_dir)


@pytest.fixture(scope="module")
def tiny_tok(tiny_dir) -> Qwen2Tokenizer:
    return Qwen2Tokenizer.from_pretrained(tiny_dir)


def _hf_ids(result) -> list[int]:
    # transformers 5 returns a BatchEncoding when tokenize=True; 4.x returned the id list.
    return list(result["input_ids"]) if hasattr(result, "keys") else list(result)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("which", ["real", "tiny"])
def test_parity_with_transformers(real_tok, tiny_tok, hf_real, hf_tiny, which, name,
                                  add_generation_prompt):
    ours, hf = (real_tok, hf_real) if which == "real" else (tiny_tok, hf_tiny)
    messages = CONVERSATIONS[name]
    ref_text = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ref_ids = _hf_ids(
        hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    )
    assert render_chat(messages, add_generation_prompt=add_generation_prompt) == ref_text
    assert ours.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    ) == ref_text
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == (
        ref_ids
    )


def test_render_exact_text():
    # Expected strings written out from the template text in the reference notes.
    assert DEFAULT_SYSTEM_PROMPT == "You are a helpful assistant."
    assert render_chat([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        add_generation_prompt=False,
    ) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"


def test_chat_ids_of_default_system_block(real_tok):
    ids = real_tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids[:11] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert ids[-3:] == [151644, 77091, 198]  # <|im_start|>assistant\n


def test_template_constant_is_qwen2_instruct_template(real_dir):
    config = json.loads((real_dir / "tokenizer_config.json").read_text())
    assert PACKAGE_TEMPLATE == QWEN2_CHAT_TEMPLATE == config["chat_template"]


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "must not be empty"),
        ("hello", "must be a list"),
        ({"role": "user", "content": "hi"}, "must be a list"),
        (None, "must be a list"),
        ([{"role": "user", "content": "ok"}, "oops"], r"messages\[1\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a str"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
         r"messages\[0\]\['content'\] must be a str, got list"),
        ([{"role": 1, "content": "x"}], r"messages\[0\]\['role'\] must be a str"),
    ],
)
def test_invalid_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages)


def test_template_is_read_from_the_checkpoint(real_dir, tmp_path):
    # No more "renders Qwen2's ChatML regardless": the checkpoint's own template decides.
    assert Qwen2Tokenizer.from_pretrained(real_dir).chat_format.name == "qwen2"
    d = tmp_path / "qwen25_like"
    shutil.copytree(real_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace(
        "You are a helpful assistant.", "You are Qwen, created by Alibaba Cloud."
    )
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    changed = Qwen2Tokenizer.from_pretrained(d)
    assert changed.chat_format is None  # not a published text: rendered by jinja2
    assert "You are Qwen, created by Alibaba Cloud." in changed.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False)
    # transformers 5 may store the template in chat_template.jinja, which wins.
    (d / "chat_template.jinja").write_text(QWEN2_CHAT_TEMPLATE + "\n")
    assert Qwen2Tokenizer.from_pretrained(d).chat_format.name == "qwen2"
