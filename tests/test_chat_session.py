"""ChatSession: the cache equals the rendered conversation after every turn, and what rests on
it (overrides, cancel, undo, regenerate, the context budget, save/load, tool calls, reasoning).

The model is a tiny random one with Qwen2's full vocabulary and the tokenizers are the real
Qwen2.5 and QwQ ones with their published templates, so every id is a real token and random
replies often re-encode to other ids than they were generated as (the case the re-sync exists
for). The reference for "what the cache must hold" is `tokenizer.apply_chat_template` of the
session's messages, and for "what the reply must be" a fresh `generate` on the whole
conversation, which prefills everything from an empty cache.
"""

from __future__ import annotations

import json
import os
import stat
import threading

import mlx.core as mx
import pytest

from qwen2_mlx import ChatSession, generate, load
from qwen2_mlx.chat_session import ChatSessionBusyError
from qwen2_mlx.generate import ContextLengthError
from qwen2_mlx.model import Model, ModelConfig

from scripted_model import reply_scripted, tiny_model_built_here

QUESTIONS = ["Hello there!", "What is 2+2?", "Name a colour.", "Tell me more, please."]
GET_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture
def tok(qwen25_tokenizer):
    return qwen25_tokenizer


@pytest.fixture
def model(tiny_vocab_model):
    return tiny_vocab_model


def rendered(chat: ChatSession, tok, tools=None) -> list[int]:
    """The reference: the template applied to the session's messages."""
    return tok.apply_chat_template(chat.messages, tools=tools, add_generation_prompt=False)


def test_after_several_turns_the_reply_equals_a_fresh_generate(model, tok):
    chat = ChatSession(model, tok, max_tokens=16)
    for i in range(8):
        if i >= 3 and chat.stats.resynced_replies:
            break
        before = rendered(chat, tok) if chat.messages else []
        # Sampled replies: random tokens, which often re-encode to other ids.
        reply = chat.send(QUESTIONS[i % 3], temperature=2.0, seed=i)
        assert chat.cache.tokens == rendered(chat, tok)
        assert chat.cached_tokens == len(rendered(chat, tok))
        # Only the new message and the generation prompt were prefilled.
        asked = chat.messages[:-1]
        new = len(tok.apply_chat_template(asked, add_generation_prompt=True)) - len(before)
        assert reply.response.prompt_tokens == new
        assert reply.response.cached_prompt_tokens == len(before)
    assert chat.stats.resynced_replies >= 1  # the case the re-sync is for did happen

    conversation = chat.messages + [{"role": "user", "content": QUESTIONS[3]}]
    fresh = generate(model, tok, conversation, max_tokens=16)
    assert chat.send(QUESTIONS[3]) == fresh
    assert chat.cache.tokens == rendered(chat, tok)


def test_an_8_bit_cache_keeps_the_invariant(tok):
    from qwen2_mlx.cache import QuantizedKVCache

    mx.random.seed(3)  # head_dim 32: the quantization groups need a multiple of 32
    model = Model(ModelConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, vocab_size=151936,
                              tie_word_embeddings=True, max_position_embeddings=4096))
    chat = ChatSession(model, tok, kv_bits=8, max_tokens=12)
    for i, question in enumerate(QUESTIONS[:3]):
        chat.send(question, temperature=2.0, seed=i)
        assert chat.cache.tokens == rendered(chat, tok)
    assert isinstance(chat.cache[0], QuantizedKVCache)
    conversation = chat.messages + [{"role": "user", "content": QUESTIONS[3]}]
    fresh = generate(model, tok, conversation, max_tokens=12, kv_bits=8)
    assert chat.send(QUESTIONS[3]) == fresh


def test_default_system_prompt_is_rendered_once(model, tok):
    chat = ChatSession(model, tok, max_tokens=4)
    for question in QUESTIONS[:3]:
        chat.send(question)
    text = tok.decode(chat.cache.tokens)
    assert text.count("You are Qwen, created by Alibaba Cloud") == 1
    assert chat.system is None and chat.messages[0]["role"] == "user"


def test_given_system_prompt_replaces_the_default(model, tok):
    chat = ChatSession(model, tok, system="You are terse.", max_tokens=4)
    chat.send("Hi")
    text = tok.decode(chat.cache.tokens)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert "Alibaba" not in text


def test_per_turn_overrides_and_defaults(model, tok):
    chat = ChatSession(model, tok, max_tokens=5, temperature=0.0)
    assert chat.send("Hi").response.generation_tokens == 5
    assert chat.send("Again", max_tokens=2).response.generation_tokens == 2
    assert chat.send("And again").response.generation_tokens == 5  # the default is back
    sampled = [ChatSession(model, tok, max_tokens=6).send("Hi", temperature=1.0, seed=s)
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    # A stop string cuts the reply; the stored message is the cut text.
    full = ChatSession(model, tok, max_tokens=8).send("Hi", temperature=1.0, seed=5)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = ChatSession(model, tok, max_tokens=8)
    reply = cut.send("Hi", stop=[stop], temperature=1.0, seed=5)
    assert reply == full[:full.index(stop)] and reply.finish_reason == "stop"
    assert cut.messages[-1]["content"] == reply
    assert cut.cache.tokens == rendered(cut, tok)


def test_per_turn_tools_render_for_that_turn_and_the_next_turn_resyncs(model, tok):
    chat = ChatSession(model, tok, max_tokens=4)
    chat.send("Hi")
    chat.send("Weather?", tools=[GET_WEATHER])
    with_tools = rendered(chat, tok, tools=[GET_WEATHER])
    assert chat.cache.tokens == with_tools and "get_weather" in tok.decode(with_tools)
    reply = chat.send("Thanks")  # no tools: the system block changes, re-prefilled from there
    assert chat.cache.tokens == rendered(chat, tok)
    asked = tok.apply_chat_template(chat.messages[:-1], add_generation_prompt=True)
    same = next(i for i, (a, b) in enumerate(zip(with_tools, asked, strict=False)) if a != b)
    assert reply.response.cached_prompt_tokens == same
    assert reply.response.prompt_tokens == len(asked) - same


@pytest.mark.parametrize("options, message", [
    ({"temprature": 0.5}, "unknown generation option 'temprature'"),
    ({"cache": None}, "'cache' is managed by the chat session"),
    ({"cancel": None}, "'cancel' is managed by the chat session"),
])
def test_unknown_or_owned_options_are_clear_errors(model, tok, options, message):
    with pytest.raises(ValueError, match=message):
        ChatSession(model, tok, **options)
    chat = ChatSession(model, tok)
    with pytest.raises(ValueError, match=message):
        chat.stream("Hi", **options)


def test_cancel_from_the_consumer_keeps_the_partial_reply(model, tok):
    chat = ChatSession(model, tok, max_tokens=50)
    chat.send("Hi")
    responses = []
    for r in chat.stream("Tell me a long story"):
        responses.append(r)
        if len(responses) == 3:
            chat.cancel()
    assert len(responses) <= 4 and responses[-1].finish_reason == "cancelled"
    assert chat.messages[-1] == {"role": "assistant",
                                 "content": "".join(r.text for r in responses)}
    assert chat.cache.tokens == rendered(chat, tok)
    chat.send("Go on")  # the session continues
    assert chat.cache.tokens == rendered(chat, tok)


def test_cancel_between_turns_does_nothing(model, tok):
    chat = ChatSession(model, tok, max_tokens=4)
    chat.cancel()
    assert chat.send("Hi").finish_reason == "length"


def test_cancel_of_a_stream_made_but_not_started(model, tok):
    chat = ChatSession(model, tok, max_tokens=4)
    stream = chat.stream("Hi")  # e.g. made on the UI thread, handed to a worker
    chat.cancel()
    responses = list(stream)
    assert [r.finish_reason for r in responses] == ["cancelled"]
    assert chat.messages == [{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": ""}]
    assert chat.send("Hi again").finish_reason == "length"  # not cancelled


def test_cancel_during_the_prefill(model, tok):
    chat = ChatSession(model, tok, max_tokens=8, prefill_step_size=8)
    chat.send("Hi")
    before = chat.cache.tokens[:]
    calls = []

    def progress(done, total):
        calls.append((done, total))
        chat.cancel()

    responses = list(chat.stream("word " * 60, prompt_progress=progress))
    assert len(calls) == 1 and calls[0][0] == 8
    assert [r.finish_reason for r in responses] == ["cancelled"]
    assert responses[0].token is None and responses[0].generation_tokens == 0
    assert chat.messages[-1] == {"role": "assistant", "content": ""}
    # The prefill the user stopped is not redone: the cache holds what it held before.
    assert chat.cache.tokens == before
    assert rendered(chat, tok)[:len(before)] == before
    chat.send("Shorter")
    assert chat.cache.tokens == rendered(chat, tok)


def test_undo_trims_the_cache_without_prefilling(model, tok, monkeypatch):
    chat = ChatSession(model, tok, max_tokens=6)
    chat.send("Hi")
    after_first = (chat.messages, chat.cache.tokens[:])
    chat.send("More")
    calls = []
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: calls.append(1))
    removed = chat.undo()
    assert [m["role"] for m in removed] == ["user", "assistant"]
    assert removed[0]["content"] == "More"
    assert (chat.messages, chat.cache.tokens) == after_first
    assert calls == []
    chat.undo()
    assert chat.messages == [] and chat.cached_tokens == 0
    with pytest.raises(ValueError, match="nothing to undo"):
        chat.undo()


def test_regenerate_resamples_the_last_reply_from_the_cache(model, tok):
    chat = ChatSession(model, tok, max_tokens=8)
    first = chat.send("Hi")
    again = chat.regenerate()
    assert again == first  # greedy: the same reply, from the trimmed cache
    # The generation prompt is still cached: only its last token is fed again.
    assert again.response.prompt_tokens == 1
    assert len(chat.messages) == 2
    other = chat.regenerate(temperature=1.0, seed=3)
    assert other != first and chat.messages[-1]["content"] == other
    assert chat.cache.tokens == rendered(chat, tok)


def test_context_budget_drops_the_oldest_exchanges(model, tok):
    chat = ChatSession(model, tok, system="Be brief.", max_kv_size=90, max_tokens=8)
    dropped = []
    for question in QUESTIONS * 2:
        reply = chat.send(question)
        dropped.append(reply.response.truncated_messages)
        assert chat.cached_tokens <= 90
        assert chat.cache.tokens == rendered(chat, tok)
        assert chat.messages[0] == {"role": "system", "content": "Be brief."}
    assert sum(dropped) > 0 and all(n % 2 == 0 for n in dropped)
    assert chat.messages[-2]["content"] == QUESTIONS[-1]
    assert chat.stats.truncated_messages == sum(dropped)


def test_a_message_longer_than_the_context_is_a_clear_error(model, tok):
    chat = ChatSession(model, tok, max_kv_size=64, max_tokens=4)
    chat.send("Hi")
    kept = (chat.messages, chat.cache.tokens[:])
    with pytest.raises(ContextLengthError, match="too long for max_kv_size=64"):
        chat.send("word " * 100)
    assert (chat.messages, chat.cache.tokens) == kept


def test_save_and_load_resume_without_prefilling(model, tok, tmp_path):
    chat = ChatSession(model, tok, system="Be brief.", max_tokens=6, temperature=0.0)
    chat.send("Hi")
    chat.send("More")
    path = tmp_path / "conv.safetensors"
    chat.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()
    loaded = ChatSession.load(path, model, tok)
    assert loaded.messages == chat.messages
    assert loaded.defaults == {"max_tokens": 6, "temperature": 0.0}
    assert loaded.cache.tokens == chat.cache.tokens == rendered(loaded, tok)
    a, b = chat.send("Next"), loaded.send("Next")
    assert a == b
    assert b.response.prompt_tokens == a.response.prompt_tokens < 15  # no re-prefill

    with pytest.raises(FileExistsError, match="overwrite=True"):
        chat.save(path)
    chat.save(path, overwrite=True)
    assert len(ChatSession.load(path, model, tok).messages) == 7


def test_load_refuses_another_models_file(model, tok, tmp_path):
    chat = ChatSession(model, tok, max_tokens=4)
    chat.send("Hi")
    chat.save(tmp_path / "c.safetensors")
    mx.random.seed(1)
    other = Model(ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, vocab_size=151936,
                              tie_word_embeddings=True, max_position_embeddings=4096))
    with pytest.raises(ValueError, match="saved with another model"):
        ChatSession.load(tmp_path / "c.safetensors", other, tok)


def test_load_refuses_other_files(model, tok, tmp_path):
    from qwen2_mlx import save_cache

    with pytest.raises(FileNotFoundError, match="no such chat session file"):
        ChatSession.load(tmp_path / "missing.safetensors", model, tok)
    save_cache(tmp_path / "plain.safetensors", model.make_cache())
    with pytest.raises(ValueError, match="not a chat session file"):
        ChatSession.load(tmp_path / "plain.safetensors", model, tok)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        ChatSession.load(tmp_path / "junk.safetensors", model, tok)


def test_fingerprint_of_loaded_models_names_the_files(checkpoint_factory, tmp_path):
    model_a, tok_a = load(checkpoint_factory())
    model_b, _ = load(checkpoint_factory(seed=1))
    chat = ChatSession(model_a, tok_a, max_tokens=3)
    chat.send([{"role": "user", "content": "hi"}])
    chat.save(tmp_path / "a.safetensors")
    assert ChatSession.load(tmp_path / "a.safetensors", model_a, tok_a).messages == chat.messages
    with pytest.raises(ValueError, match=r"saved with another model \(qwen2 with 2 layers.*from"):
        ChatSession.load(tmp_path / "a.safetensors", model_b, tok_a)


def test_tool_calls_flow_through(model, tok):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    scripted = reply_scripted(model, tok, call)
    chat = ChatSession(scripted, tok, tools=[GET_WEATHER], max_tokens=40)
    reply = chat.send("Weather in Paris?")
    assert reply.finish_reason == "tool_calls"
    message = chat.messages[-1]
    assert message["role"] == "assistant" and message["content"] == ""
    [call_id] = [c["id"] for c in message["tool_calls"]]
    assert message["tool_calls"][0]["function"] == {"name": "get_weather",
                                                    "arguments": '{"city": "Paris"}'}
    assert chat.cache.tokens == rendered(chat, tok, tools=[GET_WEATHER])
    with pytest.raises(ValueError, match="no tool call 'nope' waits"):
        chat.send_tool_result("nope", "18C")
    chat.send_tool_result(call_id, {"temperature": 18})
    assert chat.messages[-2] == {"role": "tool", "tool_call_id": call_id,
                                 "content": '{"temperature": 18}'}
    assert chat.messages[-1]["role"] == "assistant"
    assert chat.cache.tokens == rendered(chat, tok, tools=[GET_WEATHER])


def test_several_tool_calls_need_all_their_results(model, tok):
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>'
    scripted = reply_scripted(model, tok, one % "Paris" + "\n" + one % "Oslo")
    chat = ChatSession(scripted, tok, tools=[GET_WEATHER], max_tokens=60)
    chat.send("Paris and Oslo?")
    first, second = (c["id"] for c in chat.messages[-1]["tool_calls"])
    with pytest.raises(ValueError, match=f"{second} still wait"):
        chat.send_tool_result(first, "18C")
    chat.add_tool_result(first, "18C")
    chat.send_tool_result(second, "9C")
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "tool",
                                                  "assistant"]


def test_reasoning_is_kept_apart_and_the_answer_reprefilled(model, qwq_tokenizer):
    tok = qwq_tokenizer
    scripted = reply_scripted(model, tok, "Two and two.\n</think>\n\nFour.")
    chat = ChatSession(scripted, tok, max_tokens=40)
    reply = chat.send("What is 2+2?")
    assert reply == "\n\nFour." and reply.reasoning == "Two and two.\n"
    # Stored as QwQ's template renders history: the answer alone, the reasoning apart.
    assert chat.messages[-1] == {"role": "assistant", "content": "Four.",
                                 "reasoning_content": "Two and two.\n"}
    # The template renders no reasoning: the cache was trimmed to the reply and re-prefilled.
    assert chat.cache.tokens == rendered(chat, tok)
    assert "Two and two" not in tok.decode(chat.cache.tokens)
    assert chat.stats.resynced_replies == 1
    # Regenerating prefills only "<think>\n": "<|im_start|>assistant\n" is still cached.
    again = chat.regenerate()
    assert again == "\n\nFour." and again.reasoning == "Two and two.\n"
    assert again.response.prompt_tokens == 2
    before = rendered(chat, tok)
    nxt = chat.send("And 3+3?")
    assert nxt.response.cached_prompt_tokens == len(before)  # the history did not change
    assert chat.cache.tokens == rendered(chat, tok)


def test_a_second_turn_from_the_consumer_loop_is_refused(model, tok):
    chat = ChatSession(model, tok, max_tokens=5)
    with pytest.raises(ChatSessionBusyError, match="in this thread's loop"):
        for _ in chat.stream("Hi"):
            chat.undo()
    assert chat.cache.tokens == rendered(chat, tok)  # the interrupted turn was settled


def test_bad_input_loses_nothing(model, tok):
    chat = ChatSession(model, tok, max_tokens=4)
    chat.send("Hi")
    kept = (chat.messages, chat.cache.tokens[:])
    with pytest.raises(ValueError, match="must end with a user or tool message"):
        chat.send({"role": "assistant", "content": "x"})
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        chat.send("x", max_tokens=0)
    with pytest.raises(ValueError, match="messages\\[0\\] has no 'role'"):
        chat.send({"content": "x"})
    assert (chat.messages, chat.cache.tokens) == kept
    with pytest.raises(ValueError, match="max_kv_size must be an integer"):
        ChatSession(model, tok, max_kv_size=0)


def test_a_tokenizer_without_a_chat_template_is_a_clear_error(model, tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", None)
    with pytest.raises(ValueError, match="has no chat template"):
        ChatSession(model, tok)


def test_memory_is_returned_between_turns(model, tok, monkeypatch):
    import qwen2_mlx.chat_session as chat_session

    events = []
    real_clear, real_prefill = mx.clear_cache, chat_session.prefill
    monkeypatch.setattr(mx, "clear_cache", lambda: (events.append("clear"), real_clear()))

    def prefill(*args, **kwargs):
        done = real_prefill(*args, **kwargs)
        events.append("prefilled")
        return done

    monkeypatch.setattr(chat_session, "prefill", prefill)
    chat = ChatSession(model, tok, max_tokens=4)
    for r in chat.stream("Hi"):
        if r.finish_reason:
            events.append("reply")
    # After the reply and the closing tokens' prefill, the turn returns the freed buffers.
    assert events[events.index("reply"):][-2:] == ["prefilled", "clear"]


def test_messages_and_system_can_be_replaced(model, tok):
    chat = ChatSession(model, tok, max_tokens=4)
    chat.send("Hi")
    chat.system = "New rules."
    assert chat.messages[0] == {"role": "system", "content": "New rules."}
    assert chat.cache.tokens == rendered(chat, tok)[:chat.cached_tokens]
    chat.send("Hello")
    assert chat.cache.tokens == rendered(chat, tok)
    chat.messages = [{"role": "user", "content": "Start over"}]
    chat.send(None)  # answer the conversation as it stands
    assert chat.cache.tokens == rendered(chat, tok)
    chat.reset()
    assert chat.messages == [] and chat.cached_tokens == 0


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_saved_file_holds_json_metadata(model, tok, tmp_path):
    chat = ChatSession(model, tok, max_tokens=3, stop=["\n\n"])
    chat.send("Hi")
    chat.save(tmp_path / "s.safetensors")
    _, meta = mx.load(str(tmp_path / "s.safetensors"), return_metadata=True)
    data = json.loads(meta["qwen2_mlx.chat_session"])
    assert data["messages"] == chat.messages and data["defaults"]["stop"] == ["\n\n"]


def test_worker_thread_generates_while_the_main_thread_cancels(tiny_checkpoint):
    _, tokenizer = load(tiny_checkpoint)
    model = tiny_model_built_here()
    chat = ChatSession(model, tokenizer, max_tokens=3000)
    got, started, errors = [], threading.Event(), []

    def worker():
        try:
            for r in chat.stream("tell me everything"):
                got.append(r)
                if len(got) == 2:
                    started.set()
        except Exception as e:  # reported to the main thread
            errors.append(e)
            started.set()

    thread = threading.Thread(target=worker)
    thread.start()
    assert started.wait(60)
    with pytest.raises(ChatSessionBusyError, match="on another thread"):
        chat.send("me too")
    at_cancel = len(got)
    chat.cancel()
    thread.join(60)
    assert not thread.is_alive() and errors == []
    assert got[-1].finish_reason == "cancelled"
    assert len(got) - at_cancel <= 2  # the token being computed, then the cancelled end
    # The main thread reads and continues what the worker wrote.
    expected = tokenizer.apply_chat_template(chat.messages, add_generation_prompt=False)
    assert chat.cache.tokens == expected
    following = chat.messages + [{"role": "user", "content": "and?"}]
    assert chat.send("and?", max_tokens=8) == generate(model, tokenizer, following,
                                                         max_tokens=8)


# --- speculative decoding and response formats, per session ------------------------------------


class FedCounter:
    """Wraps a draft model and counts the tokens fed through it."""

    def __init__(self, model):
        self.model, self.config, self.fed = model, model.config, 0

    def make_cache(self, kv_bits=None):
        return self.model.make_cache(kv_bits=kv_bits)

    def forward(self, x, cache=None):
        self.fed += x.shape[1]
        return self.model.forward(x, cache=cache)

    __call__ = forward


@pytest.fixture
def draft_model():
    """Another random model over the same vocabulary: it often disagrees with `model`."""
    mx.random.seed(1)
    draft = Model(ModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, vocab_size=151936,
                              tie_word_embeddings=True, max_position_embeddings=4096))
    mx.eval(draft.parameters())
    return draft


def test_a_draft_model_keeps_greedy_replies_and_prefills_only_new_tokens(model, tok,
                                                                         draft_model):
    plain = ChatSession(model, tok, max_tokens=12)
    draft = FedCounter(draft_model)
    fast = ChatSession(model, tok, max_tokens=12, draft_model=draft, num_draft_tokens=3)
    for i, question in enumerate(QUESTIONS[:3]):
        fed_before = draft.fed
        reply = fast.send(question)
        assert reply == plain.send(question)
        assert fast.cache.tokens == rendered(fast, tok)
        assert reply.response.speculative.target_passes < reply.response.generation_tokens + 1
        if i:
            # The draft's cache was kept: it was fed the turn's new prompt tokens and its
            # drafts, far fewer than the whole conversation it would re-prefill otherwise.
            assert draft.fed - fed_before < len(fast.cache.tokens) // 2


def test_a_response_format_applies_per_session_and_per_turn(model, tok):
    pytest.importorskip("llguidance")
    chat = ChatSession(model, tok, max_tokens=60,
                       response_format={"type": "regex", "pattern": "[0-9]{3}"})
    reply = chat.send("A number?")
    assert len(reply) == 3 and reply.isdigit()
    free = chat.send("Anything.", response_format=None, max_tokens=8)
    assert free.finish_reason in ("stop", "length")
    assert chat.cache.tokens == rendered(chat, tok)
