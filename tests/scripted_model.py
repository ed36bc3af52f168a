"""A test double for a model that writes a given text: a logits processor pins its output.

Wrapping a tiny random model keeps the real generation loop (prefill, KV cache, sampling,
detokenization) while the tokens come from a script, so tests can force a tool call or a
reasoning block through the real tokenizers.
"""

from __future__ import annotations

import mlx.core as mx

from qwen2_mlx.model import Model, ModelConfig


class ScriptedModel:
    """A model whose next-token logits are pinned to `script` once the prompt is read."""

    def __init__(self, model: Model, prompt_len: int, script: list[int]):
        self.model, self.prompt_len, self.script = model, prompt_len, script
        self.config = model.config
        self.seen = 0

    def make_cache(self, **kwargs):
        return self.model.make_cache(**kwargs)

    def __call__(self, tokens, cache=None):
        logits = self.model(tokens, cache=cache)
        self.seen += tokens.shape[1]
        step = self.seen - self.prompt_len
        if 0 <= step < len(self.script):
            pinned = mx.arange(logits.shape[-1]) == self.script[step]
            logits = mx.where(pinned, 1e4, -1e4).astype(logits.dtype) + 0 * logits
        return logits


def tiny_model_with_qwen_vocab() -> Model:
    """A one-layer random model with Qwen2's 151,936-row embedding (so any id is a token)."""
    mx.random.seed(0)
    return Model(ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, vocab_size=151936,
                             tie_word_embeddings=True, max_position_embeddings=4096))


def scripted(model: Model, tokenizer, messages, output: str, tools=None, end=True):
    """The model wrapped to answer `messages` with `output` (then <|im_end|> when `end`);
    returns it and the prompt ids."""
    prompt = tokenizer.apply_chat_template(messages, tools=tools)
    script = tokenizer.encode(output) + ([tokenizer.token_to_id("<|im_end|>")] if end else [])
    return ScriptedModel(model, len(prompt), script), prompt
