"""ChatML formatting for Qwen2-Instruct, without jinja.

Qwen2-Instruct's chat template (tokenizer_config.json "chat_template") has exactly one branch: a
default system message is inserted when the first message is not a system message. Everything
else is a fixed wrapper around each message, so a few lines of Python reproduce it exactly.
"""

from __future__ import annotations

from qwen2_mlx.chat_messages import check_message_list

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# The jinja text this module reproduces, verbatim from Qwen2-Instruct's tokenizer_config.json.
# Kept to recognise models whose template is (or is not) the one implemented here.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _format_message(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def validate_messages(messages: object) -> None:
    """Raise ValueError unless `messages` is a non-empty list of {'role': str, 'content': str}."""
    for i, message in enumerate(check_message_list(messages)):
        if "content" not in message:
            raise ValueError(f"messages[{i}] has no 'content' key")
        if not isinstance(message["content"], str):
            raise ValueError(
                f"messages[{i}]['content'] must be a str, got {type(message['content']).__name__}"
            )


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render `messages` as Qwen2-Instruct's ChatML prompt, identical to its jinja template.

    A default system message ("You are a helpful assistant.") is prepended when the first
    message's role is not "system". With `add_generation_prompt`, the text ends with
    "<|im_start|>assistant\\n" so that the model writes the assistant's reply next.
    Extra keys in a message are ignored, as the template ignores them.
    """
    validate_messages(messages)
    return chatml(messages, add_generation_prompt)


def chatml(messages: list[dict], add_generation_prompt: bool) -> str:
    """Qwen2-Instruct's rendering of already checked messages (see `render_chat`)."""
    parts = []
    if messages[0]["role"] != "system":
        parts.append(_format_message("system", DEFAULT_SYSTEM_PROMPT))
    parts.extend(_format_message(m["role"], m["content"]) for m in messages)
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)
