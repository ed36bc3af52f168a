"""A Qwen2.5-1M-style checkpoint end to end: its config selects Dual Chunk Attention by itself,
its tokenizer brings the Qwen2.5 chat template, and a chat generation runs across chunks.

Qwen/Qwen2.5-7B-Instruct-1M's config.json has max_position_embeddings 1010000, rope_theta 1e7
and dual_chunk_attention_config {chunk_size 262144, local_size 8192,
original_max_position_embeddings 262144}; the tiny model keeps that shape at a small scale
(chunks of 32 tokens, the length temperature from 32 on) so an 80-token chat spans chunks.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from qwen2_mlx import load, stream_generate

from conftest import make_hf_checkpoint
from family_tokenizers import build_family_tokenizer_files, read_template

DCA = {"chunk_size": 32, "local_size": 8, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = make_hf_checkpoint(
        tmp_path_factory.mktemp("qwen25_1m"), vocab_size=151936, tokenizer=False,
        rope_theta=10_000_000.0, max_position_embeddings=1_010_000,
        extra_config={"dual_chunk_attention_config": DCA, "eos_token_id": 151645,
                      "bos_token_id": 151643})
    return build_family_tokenizer_files(out, "qwen2.5", read_template("qwen2.5-instruct.jinja"))


CHAT = [{"role": "user", "content": "Summarise: " + "the cat sat on the mat and then " * 9}]


def test_1m_config_selects_dca_and_the_template_renders(checkpoint):
    model, tokenizer = load(checkpoint)
    assert model.config.long_context.mode == "dca"
    assert model.config.context_length == 1_010_000
    assert tokenizer.chat_format.name == "qwen2.5"
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert len(tokenizer.encode(text)) > 2 * DCA["chunk_size"]


def test_1m_chat_generation_across_chunks(checkpoint):
    model, tokenizer = load(checkpoint)
    prompt = tokenizer.apply_chat_template(CHAT)
    stepwise = list(stream_generate(model, tokenizer, CHAT, max_tokens=8, prefill_step_size=7))
    one_shot = list(stream_generate(model, tokenizer, CHAT, max_tokens=8,
                                    prefill_step_size=4096))
    assert [r.token for r in stepwise] == [r.token for r in one_shot]
    # The first token is the argmax of a plain forward pass over the whole prompt (DCA with
    # the whole prompt's length temperature, no cache).
    logits = np.array(model(mx.array([prompt]))[0, -1].astype(mx.float32))
    assert stepwise[0].token == int(logits.argmax())
    assert stepwise[-1].prompt_tokens == len(prompt)
    assert stepwise[-1].finish_reason in ("stop", "length")
