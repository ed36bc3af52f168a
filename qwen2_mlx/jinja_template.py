"""Rendering a chat template that qwen2-mlx does not know, with jinja2 in a sandbox.

Optional: jinja2 comes with ``pip install "qwen2-mlx[templates]"``. The environment matches the
one transformers renders chat templates in (sandboxed, trim_blocks and lstrip_blocks, the loop
controls extension, a `tojson` that keeps non-ASCII and does not escape HTML, and the
`raise_exception` and `strftime_now` helpers), and the template sees the same variables:
`messages`, `tools`, `documents` (None), `add_generation_prompt`, the tokenizer's special
tokens (`bos_token`, `eos_token`, ...) and any extra keyword arguments (`enable_thinking`...).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

INSTALL_HINT = 'pip install "qwen2-mlx[templates]"'


class ChatTemplateError(ValueError):
    """The chat template cannot be rendered (jinja2 missing, a syntax error, or the template
    itself rejected the conversation)."""


def _jinja():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as e:
        raise ChatTemplateError(
            "this model's chat template is not one qwen2-mlx renders natively, and rendering "
            f"it needs jinja2: {INSTALL_HINT}"
        ) from e
    return jinja2


@lru_cache(maxsize=16)
def _compile(template: str):
    jinja2 = _jinja()

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker):
        rendered as its body, since no mask is computed here."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template has a syntax error (line {e.lineno}): "
                                f"{e.message}") from e


def template_reads(template: str, name: str) -> bool:
    """Whether the template refers to the variable `name` at all."""
    jinja2 = _jinja()
    from jinja2 import meta

    env = jinja2.Environment(extensions=[jinja2.ext.loopcontrols])
    try:
        return name in meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateSyntaxError:
        return True  # the render reports the syntax error


def render_jinja_template(template: str, messages: list[dict], tools: list[dict] | None,
                          add_generation_prompt: bool, special_tokens: dict[str, str],
                          **template_kwargs) -> str:
    """Render `template` as transformers' `apply_chat_template(tokenize=False)` does.

    Message keys whose value is None are dropped first, as transformers does, so a template
    sees a missing key rather than None. Raises ChatTemplateError when jinja2 is missing or the
    template fails.
    """
    jinja2 = _jinja()
    compiled = _compile(template)
    if tools and not template_reads(template, "tools"):
        raise ChatTemplateError("this model's chat template does not show tools to the model; "
                                "call it without tools")
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    variables = {**special_tokens, **template_kwargs}
    try:
        return compiled.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {e}") from e
    except (TypeError, AttributeError, KeyError, IndexError) as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {e!r}") from e
