"""The jinja2 fallback for chat templates qwen2-mlx does not render natively."""

from __future__ import annotations

import copy
import json
import sys

import pytest

from qwen2_mlx import jinja_template
from qwen2_mlx.jinja_template import ChatTemplateError
from qwen2_mlx.tokenizer import Qwen2Tokenizer

from family_tokenizers import build_family_tokenizer_files, read_template

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

# A template no checkpoint ships, touching what transformers' environment provides: tools and
# tojson (non-ASCII kept), namespace, loop controls, an extra variable, special tokens, the
# {% generation %} block, raise_exception, and trim_blocks / lstrip_blocks whitespace.
CUSTOM = """{{- bos_token or '' -}}
{%- set ns = namespace(n=0) -%}
{%- if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>
{% endif -%}
{%- for m in messages -%}
  {%- if m.role == 'secret' %}{{ raise_exception('no secrets') }}{% endif -%}
  {%- if m.role == 'skip' %}{% continue %}{% endif -%}
  {%- set ns.n = ns.n + 1 -%}
  [{{ ns.n }}:{{ m.role }}]
  {%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}
  {%- else %}{{ m.content }}{% endif %}{{ eos_token }}
{% endfor -%}
{% if true %}
trimmed{% endif %}
    {% if true %}stripped{% endif %}
{%- if add_generation_prompt %}[assistant]
  {%- if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}
{%- endif -%}
"""

TOOLS = [{"type": "function", "function": {"name": "wetter", "description": "Wetter in °C",
                                            "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "system", "content": "Sé breve."}, {"role": "skip", "content": "x"},
            {"role": "user", "content": "Grüß dich 👋"}, {"role": "assistant", "content": "Hallo!"},
            {"role": "assistant", "content": None}, {"role": "user", "content": "Und jetzt?"}]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    path = build_family_tokenizer_files(tmp_path_factory.mktemp("custom"), "qwen2.5", CUSTOM)
    return (Qwen2Tokenizer.from_pretrained(path),
            transformers.AutoTokenizer.from_pretrained(str(path)))


@pytest.mark.parametrize("kwargs", [
    {}, {"add_generation_prompt": False}, {"tools": TOOLS}, {"enable_thinking": False},
    {"enable_thinking": True, "tools": TOOLS}, {"bos_token": "<BOS>"},
])
def test_unrecognised_template_matches_transformers(tokenizers, kwargs):
    ours, hf = tokenizers
    assert ours.chat_format is None
    kwargs = {"add_generation_prompt": True, **kwargs}
    ref = hf.apply_chat_template(copy.deepcopy(MESSAGES), tokenize=False, **kwargs)
    assert ours.apply_chat_template(MESSAGES, tokenize=False, **kwargs) == ref
    ref_ids = hf.apply_chat_template(copy.deepcopy(MESSAGES), tokenize=True, **kwargs)
    ref_ids = list(ref_ids["input_ids"]) if hasattr(ref_ids, "keys") else list(ref_ids)
    assert ours.apply_chat_template(MESSAGES, **kwargs) == ref_ids
    assert "°C" in ref or "tools" not in kwargs  # tojson keeps non-ASCII


def test_template_errors_are_chat_template_errors(tokenizers):
    ours, _ = tokenizers
    with pytest.raises(ChatTemplateError, match="no secrets"):
        ours.apply_chat_template([{"role": "secret", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="syntax error"):
        jinja_template.render_jinja_template("{% for %}", MESSAGES, None, True, {})


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.append(1) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
])
def test_sandbox_refuses_unsafe_templates(template):
    with pytest.raises(ChatTemplateError):
        jinja_template.render_jinja_template(template, copy.deepcopy(MESSAGES), None, True, {})


def test_tools_to_a_template_that_ignores_them_is_an_error():
    with pytest.raises(ChatTemplateError, match="does not show tools"):
        jinja_template.render_jinja_template("{% for m in messages %}{{ m.content }}{% endfor %}",
                                             MESSAGES, TOOLS, True, {})


def test_without_jinja2_the_error_names_the_extra(tokenizers, monkeypatch):
    ours, _ = tokenizers
    jinja_template._compile.cache_clear()
    for name in [m for m in sys.modules if m == "jinja2" or m.startswith("jinja2.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 -> ImportError
    with pytest.raises(ChatTemplateError, match=r'pip install "qwen2-mlx\[templates\]"'):
        ours.apply_chat_template(MESSAGES)
    # The families' templates never need it.
    qwen25 = Qwen2Tokenizer(ours.backend, tokenizer_config={
        **ours._tokenizer_config, "chat_template": read_template("qwen2.5-instruct.jinja")})
    assert qwen25.apply_chat_template(MESSAGES[2:3], tokenize=False).startswith(
        "<|im_start|>system\nYou are Qwen")
    jinja_template._compile.cache_clear()


def test_named_templates_pick_tool_use_when_tools_are_given(tokenizers):
    ours, _ = tokenizers
    config = {**ours._tokenizer_config, "chat_template": [
        {"name": "default", "template": "plain:{{ messages[0].content }}"},
        {"name": "tool_use", "template": "tools:{{ tools | tojson }}"}]}
    named = Qwen2Tokenizer(ours.backend, tokenizer_config=config)
    assert named.apply_chat_template(MESSAGES[:1], tokenize=False) == "plain:Sé breve."
    assert named.apply_chat_template(MESSAGES[:1], tools=TOOLS, tokenize=False) == (
        "tools:" + json.dumps(TOOLS, ensure_ascii=False))


def test_no_template_is_a_clear_error(tokenizers):
    ours, _ = tokenizers
    bare = Qwen2Tokenizer(ours.backend, tokenizer_config={"eos_token": "<|im_end|>"})
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(MESSAGES)
