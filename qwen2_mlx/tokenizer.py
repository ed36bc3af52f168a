"""Qwen2 tokenizer on top of the `tokenizers` library (no transformers at run time).

Reads the files of a Hugging Face model directory:
- tokenizer.json: the byte-level BPE (NFC normaliser, regex split, ByteLevel decoder) and the
  added special tokens; loaded with `tokenizers.Tokenizer.from_file`.
- tokenizer_config.json: eos/pad/bos token strings and the chat template.
- generation_config.json: EOS id(s) and the recommended sampling settings.
- config.json: the model's EOS id.

Qwen2 has no BOS token, and the three sources of EOS disagree on Instruct models (config says
<|im_end|>, generation_config says [<|im_end|>, <|endoftext|>]); stopping on only one of them is
a known Qwen trap, so `eos_token_ids` is the union of all of them.
"""

from __future__ import annotations

import codecs
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders

from qwen2_mlx.chat_messages import check_message_list, check_tools
from qwen2_mlx.chat_templates import ChatFormat, recognize_chat_template
from qwen2_mlx.jinja_template import render_jinja_template

# Files save_pretrained copies when the source directory has them (config.json is the model's,
# not the tokenizer's, and is left to the model writer).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)

# Sampling settings that generation_config.json may recommend (Qwen2-Instruct sets all five).
GENERATION_DEFAULT_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable character -> the byte it stands for."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_DECODER = _byte_decoder()


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_string(value: object, where: str) -> str | None:
    """A special-token entry is a string, null, or an AddedToken dict with 'content'."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where} must be a token string, got {value!r}")


def _id_list(value: object, where: str) -> list[int]:
    """An *_token_id field is an int, a list of ints, or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{where} must be a non-negative int or a list of them, got {value!r}")
    return list(values)


class Qwen2Tokenizer:
    """Byte-level BPE tokenizer of a Qwen2 model directory, with ChatML and EOS handling.

    Build it with `Qwen2Tokenizer.from_pretrained(model_dir)`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        tokenizer_config: dict | None = None,
        generation_config: dict | None = None,
        model_config: dict | None = None,
        chat_template: str | None = None,
        source_dir: Path | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._tokenizer_config = dict(tokenizer_config or {})
        self._generation_config = dict(generation_config or {})
        self._model_config = dict(model_config or {})
        self._source_dir = Path(source_dir) if source_dir is not None else None
        self._token_bytes: dict[int, bytes] = {}
        self._special_ids = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        )

        tc = self._tokenizer_config
        self.bos_token = _token_string(tc.get("bos_token"), "tokenizer_config.json bos_token")
        self.pad_token = _token_string(tc.get("pad_token"), "tokenizer_config.json pad_token")
        # chat_template.jinja wins over tokenizer_config.json, as in transformers 5.
        self._chat_templates = _named_templates(
            chat_template if chat_template is not None else tc.get("chat_template")
        )
        self.chat_template: str | None = self._chat_templates.get("default")
        # The built-in renderer for this template, or None when it needs jinja (or is absent).
        self.chat_format: ChatFormat | None = recognize_chat_template(self.chat_template)

        self.eos_token_ids = self._collect_eos_ids()
        eos = _token_string(tc.get("eos_token"), "tokenizer_config.json eos_token")
        if eos is None and self.eos_token_ids:
            eos = self.id_to_token(self.eos_token_ids[0])
        self.eos_token: str | None = eos

        gc = self._generation_config
        self.generation_defaults: dict = {k: gc[k] for k in GENERATION_DEFAULT_KEYS if k in gc}

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Qwen2Tokenizer:
        """Load the tokenizer of the model directory `path` (tokenizer.json is required)."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"model directory not found: {root}")
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"tokenizer.json not found in {root} (expected {tokenizer_file})"
            )
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"cannot load {tokenizer_file}: {e}") from e
        template_file = root / "chat_template.jinja"
        chat_template = (
            template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        )
        return cls(
            tokenizer,
            tokenizer_config=_read_json(root / "tokenizer_config.json"),
            generation_config=_read_json(root / "generation_config.json"),
            model_config=_read_json(root / "config.json"),
            chat_template=chat_template,
            source_dir=root,
        )

    def _collect_eos_ids(self) -> list[int]:
        ids = set(_id_list(self._model_config.get("eos_token_id"), "config.json eos_token_id"))
        ids.update(
            _id_list(
                self._generation_config.get("eos_token_id"), "generation_config.json eos_token_id"
            )
        )
        eos = _token_string(self._tokenizer_config.get("eos_token"), "tokenizer_config eos_token")
        if eos is not None:
            eos_id = self.token_to_id(eos)
            if eos_id is None:
                raise ValueError(
                    f"tokenizer_config.json eos_token {eos!r} is not in the vocabulary"
                )
            ids.add(eos_id)
        too_big = sorted(i for i in ids if i >= self.vocab_size)
        if too_big:
            raise ValueError(
                f"EOS id(s) {too_big} are outside the tokenizer vocabulary (size {self.vocab_size})"
            )
        return sorted(ids)

    # ------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added special tokens included (151,646 for Qwen2)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tokenizer

    def token_to_id(self, token: str) -> int | None:
        """Id of `token` (vocabulary or added token), or None if unknown."""
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of `token_id`, or None if out of range."""
        return self._tokenizer.id_to_token(int(token_id))

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """transformers-style lookup: one token -> id, a list of tokens -> list of ids."""
        if isinstance(tokens, str):
            return self.token_to_id(tokens)
        return [self.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        """transformers-style lookup: one id -> token, a list of ids -> list of tokens."""
        if isinstance(ids, int):
            return self.id_to_token(ids)
        return [self.id_to_token(i) for i in ids]

    def _special_id(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        """Id of `eos_token` (stop on all of `eos_token_ids`, not just this one)."""
        return self._special_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        """Id of `bos_token`; None for Qwen2, which has no BOS."""
        return self._special_id(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        """Padding id: tokenizer_config pad_token, else generation_config/config pad_token_id."""
        if self.pad_token is not None:
            return self.token_to_id(self.pad_token)
        for config in (self._generation_config, self._model_config):
            pad = config.get("pad_token_id")
            if isinstance(pad, int) and not isinstance(pad, bool):
                return pad
        return None

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the added tokens marked special (skipped by skip_special_tokens)."""
        return sorted(self._special_ids)

    # ------------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. <|im_start|>) are
        matched as single added tokens. Qwen2 has no BOS, so nothing is prepended."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        try:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            # tokenizers refuses lone surrogates (Python's stand-ins for undecodable bytes).
            if not _is_valid_unicode(text):
                raise ValueError(
                    "the text is not valid Unicode: it holds bytes that are not UTF-8 (decode "
                    "them with errors='replace' first)") from None
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Invalid UTF-8 byte sequences decode to U+FFFD (errors="replace");
        ids past the vocabulary (embedding padding rows) decode to nothing."""
        return self._tokenizer.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    @staticmethod
    def _check_ids(ids: Iterable[int]) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise ValueError(f"decode expects a sequence of token ids, got {type(ids).__name__}")
        out = [int(i) for i in ids]
        negative = [i for i in out if i < 0]
        if negative:
            raise ValueError(f"token ids must be non-negative, got {negative[:5]}")
        return out

    def token_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        """The bytes a ByteLevel decoder emits for `token_id` (b"" for unknown ids, and for
        special tokens when `skip_special_tokens`)."""
        token_id = int(token_id)
        if skip_special_tokens and token_id in self._special_ids:
            return b""
        cached = self._token_bytes.get(token_id)
        if cached is None:
            token = self._tokenizer.id_to_token(token_id) if token_id >= 0 else None
            if token is None:
                cached = b""
            else:
                # Like tokenizers' ByteLevel decoder: map every char back to its byte; a token
                # with a char outside the byte alphabet (an added token) is taken as UTF-8.
                try:
                    cached = bytes(_BYTE_DECODER[c] for c in token)
                except KeyError:
                    cached = token.encode("utf-8")
            self._token_bytes[token_id] = cached
        return cached

    # ------------------------------------------------------------------------------- chat
    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **template_kwargs,
    ) -> list[int] | str:
        """The model's own chat template applied to `messages`, as transformers applies it.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``; content is a string or a list of
                text parts; an assistant message may carry OpenAI-style ``tool_calls`` (its
                content may then be None) and ``tool`` messages carry results.
            tools: OpenAI function schemas (``{"type": "function", "function": {...}}``) shown
                to the model; an error for templates that do not show tools.
            add_generation_prompt: end with the assistant header so the model answers next.
            tokenize: return token ids (True) or the prompt text (False).
            template_kwargs: extra template variables (e.g. ``enable_thinking``); the special
                tokens (``bos_token``...) can be overridden here too.

        The families' templates are rendered by built-in code (`self.chat_format`); any other
        template by jinja2 in a sandbox (``pip install "qwen2-mlx[templates]"``).
        """
        check_message_list(messages)
        tools = check_tools(tools)
        template = self._chat_templates.get("tool_use") if tools else None
        if template is not None:
            fmt = recognize_chat_template(template)
        else:
            template, fmt = self.chat_template, self.chat_format
        if template is None:
            raise ValueError(
                "this tokenizer has no chat template (no chat_template in tokenizer_config.json "
                "and no chat_template.jinja); give the prompt as text or token ids"
            )
        special = self.special_tokens_map
        if fmt is not None:
            bos = template_kwargs.get("bos_token", special.get("bos_token"))
            text = fmt.render(messages, tools, add_generation_prompt, bos_token=bos)
        else:
            text = render_jinja_template(template, list(messages), tools,
                                         bool(add_generation_prompt), special, **template_kwargs)
        return self.encode(text) if tokenize else text

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The special tokens a chat template sees (those that are set), as in transformers."""
        tc = self._tokenizer_config
        tokens = {"bos_token": self.bos_token,
                  "eos_token": _token_string(tc.get("eos_token"), "tokenizer_config eos_token"),
                  "unk_token": _token_string(tc.get("unk_token"), "tokenizer_config unk_token"),
                  "pad_token": self.pad_token}
        return {k: v for k, v in tokens.items() if v is not None}

    @property
    def tool_call_format(self) -> str:
        """How this model writes tool calls: "qwen" (``<tool_call>`` JSON) or "deepseek"."""
        if self.chat_format is not None and self.chat_format.tool_call_format:
            return self.chat_format.tool_call_format
        if self.chat_template and "tool▁calls▁begin" in self.chat_template:
            return "deepseek"
        return "qwen"

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh StreamingDetokenizer over this tokenizer."""
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------- save
    def save_pretrained(self, save_directory: str | Path) -> list[Path]:
        """Write the tokenizer files to `save_directory`; returns the paths written.

        Copies the files the tokenizer was loaded from (TOKENIZER_FILES that exist there);
        a tokenizer built in memory writes tokenizer.json and its configs instead.
        """
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        if self._source_dir is not None:
            for name in TOKENIZER_FILES:
                src = self._source_dir / name
                if src.is_file():
                    dst = out / name
                    if not (dst.exists() and dst.samefile(src)):
                        shutil.copyfile(src, dst)
                    written.append(dst)
            return written
        self._tokenizer.save(str(out / "tokenizer.json"))
        written.append(out / "tokenizer.json")
        for name, config in (
            ("tokenizer_config.json", self._tokenizer_config),
            ("generation_config.json", self._generation_config),
        ):
            if config:
                path = out / name
                path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
                written.append(path)
        return written


def _named_templates(value: object) -> dict[str, str]:
    """tokenizer_config's chat_template: one text, or a list of {"name", "template"} entries."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str)
        and isinstance(t.get("template"), str) for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise ValueError("tokenizer_config.json chat_template must be a string or a list of "
                     "{'name': ..., 'template': ...} entries")


class StreamingDetokenizer:
    """Turns generated token ids into text piece by piece, never splitting a UTF-8 character.

    Each token is mapped to its bytes (Qwen2's decoder is ByteLevel), and the bytes go through
    an incremental UTF-8 decoder that holds back an incomplete trailing character. Work per token
    is constant, and the concatenated pieces plus `finalize()` equal `tokenizer.decode(ids)`
    exactly (invalid bytes become U+FFFD at the same places a full decode puts them).
    """

    def __init__(self, tokenizer: Qwen2Tokenizer, skip_special_tokens: bool = False) -> None:
        decoder = tokenizer.backend.decoder
        if not isinstance(decoder, decoders.ByteLevel):
            raise ValueError(
                "StreamingDetokenizer needs a ByteLevel decoder (as Qwen2's tokenizer.json has), "
                f"got {type(decoder).__name__}"
            )
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and text."""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []
        self._joined = ""
        self._joined_count = 0
        self._tokens: list[int] = []

    def _emit(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece

    def add_token(self, token_id: int) -> str:
        """Add one token id; return the text that became printable (maybe "")."""
        token_id = int(token_id)
        if token_id < 0:
            raise ValueError(f"token ids must be non-negative, got {token_id}")
        self._tokens.append(token_id)
        data = self._tokenizer.token_bytes(token_id, self._skip_special_tokens)
        return self._emit(self._utf8.decode(data, final=False))

    def finalize(self) -> str:
        """Flush bytes still held back (an unfinished character becomes U+FFFD, as in decode)."""
        piece = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return self._emit(piece)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._joined_count != len(self._pieces):
            self._joined = "".join(self._pieces)
            self._pieces = [self._joined] if self._joined else []
            self._joined_count = len(self._pieces)
        return self._joined

    @property
    def tokens(self) -> list[int]:
        """All token ids added so far."""
        return list(self._tokens)
