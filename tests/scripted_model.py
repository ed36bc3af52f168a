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


def tiny_model_built_here() -> Model:
    """A tiny model (512-token vocabulary) built on the calling thread and never run: any lazy
    constant it has was recorded on this thread's stream, as a model an app loads on its main
    thread before generating on a worker."""
    mx.random.seed(7)
    model = Model(ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, vocab_size=512,
                              tie_word_embeddings=True, max_position_embeddings=8192))
    mx.eval(model.parameters())  # as load() does; the rotary tables are not parameters
    return model


def scripted(model: Model, tokenizer, messages, output: str, tools=None, end=True):
    """The model wrapped to answer `messages` with `output` (then <|im_end|> when `end`);
    returns it and the prompt ids."""
    prompt = tokenizer.apply_chat_template(messages, tools=tools)
    script = tokenizer.encode(output) + ([tokenizer.token_to_id("<|im_end|>")] if end else [])
    return ScriptedModel(model, len(prompt), script), prompt


class ReplyScriptedModel:
    """A model that answers every assistant turn with `script` (token ids): at the k-th
    position after the last `marker` (the template's generation prompt) in what it has read,
    cache included, the logits are pinned to script[k]; elsewhere they are the random model's.

    Unlike `ScriptedModel` it does not count calls, so it scripts every turn of a chat
    session, a regenerated reply, or a continued cache alike.
    """

    def __init__(self, model: Model, marker: list[int], script: list[int]):
        self.model, self.marker, self.script = model, list(marker), list(script)
        self.config = model.config

    def make_cache(self, **kwargs):
        return self.model.make_cache(**kwargs)

    def __call__(self, tokens, cache=None):
        seen = list(cache.tokens) if cache is not None else []
        logits = self.model(tokens, cache=cache)
        sequence = seen + tokens[0].tolist()
        m = len(self.marker)
        starts = [i + m for i in range(len(sequence) - m + 1)
                  if sequence[i:i + m] == self.marker]
        if starts:
            step = len(sequence) - starts[-1]
            if 0 <= step < len(self.script):
                pinned = mx.arange(logits.shape[-1]) == self.script[step]
                last = mx.where(pinned, 1e4, -1e4).astype(logits.dtype)
                logits = mx.concatenate([logits[:, :-1], last[None, None] + 0 * logits[:, -1:]],
                                        axis=1)
        return logits


def reply_scripted(model: Model, tokenizer, output: str, end: str = "<|im_end|>"):
    """`ReplyScriptedModel` answering `output` then `end` after each generation prompt of
    the tokenizer's template."""
    user = [{"role": "user", "content": "x"}]
    with_prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(user, add_generation_prompt=False)
    common = 0
    while common < min(len(with_prompt), len(without)) and (
            with_prompt[common] == without[common]):
        common += 1
    marker = with_prompt[common:]
    script = tokenizer.encode(output) + [tokenizer.token_to_id(end)]
    return ReplyScriptedModel(model, marker, script)
