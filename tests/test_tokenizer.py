"""Tests for qwen2_mlx.tokenizer against independent references.

References: transformers' own Qwen2 integration expectations, tiktoken built from the same BPE
ranks, and `tokenizers`' full decode for the streaming detokenizer.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from qwen2_mlx.tokenizer import Qwen2Tokenizer, StreamingDetokenizer

from tokenizer_fixture import (
    QWEN2_SPLIT_REGEX,
    build_qwen2_tokenizer_files,
    build_tiny_tokenizer_files,
    bytes_to_unicode,
    load_qwen_ranks,
    train_tiny_tokenizer_json,
)

ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    return build_qwen2_tokenizer_files(tmp_path_factory.mktemp("qwen2_tokenizer"))


@pytest.fixture(scope="module")
def real_tok(real_dir) -> Qwen2Tokenizer:
    return Qwen2Tokenizer.from_pretrained(real_dir)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer_files(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def tiny_tok(tiny_dir) -> Qwen2Tokenizer:
    return Qwen2Tokenizer.from_pretrained(tiny_dir)


def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


MULTILINGUAL = [
    "Hello, world! It's a test: we'll see, don't worry.",
    "  leading spaces, trailing spaces   \n\n\tand tabs\r\n",
    "你好，世界！人工智能正在改变世界。",
    "こんにちは、世界。カタカナ ひらがな 漢字",
    "안녕하세요 세계",
    "Привет, мир! Ελληνικά. مرحبا بالعالم. नमस्ते दुनिया",
    "Emoji 😀🤗🚀 ❤️ 👍🏽 👨‍👩‍👧‍👦 🇯🇵🇺🇸 🏳️‍🌈 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀋𠀍",
    "café Straße Øresund żółć Ångström ǅ ﬁ",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))",
    "12345678901234567890 3.14159 1,000,000",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]


# ---------------------------------------------------------------- real Qwen2 vocabulary


# From transformers' tests/models/qwen2/test_tokenization_qwen2.py::test_tokenizer_integration
# (expected input_ids for Qwen/Qwen-tokenizer, padding removed).
INTEGRATION_CASES = [
    (
        "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) "
        "provides general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, "
        "XLNet...) for Natural Language Understanding (NLU) and Natural Language Generation "
        "(NLG) with over 32+ pretrained models in 100+ languages and deep interoperability "
        "between Jax, PyTorch and TensorFlow.",
        [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722,
         1455, 529, 8, 5707, 4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830,
         61437, 64, 11, 1599, 10994, 11, 27604, 321, 33, 529, 11, 29881, 6954, 32574, 369, 18448,
         11434, 45451, 320, 45, 23236, 8, 323, 18448, 11434, 23470, 320, 30042, 38, 8, 448, 916,
         220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10, 15459, 323, 5538, 94130, 2897,
         1948, 619, 706, 11, 5355, 51, 21584, 323, 94986, 13],
    ),
    (
        "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。"
        "使用预训练模型可以减少计算消耗和碳排放，并且节省从头训练所需要的时间和资源。",
        [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830,
         98841, 104034, 104949, 9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949,
         73670, 101940, 100768, 104997, 33108, 100912, 105054, 90395, 100136, 106831, 45181, 64355,
         104034, 113521, 101975, 33108, 85329, 1773],
    ),
    (
        '```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\n'
        'tokenizer("世界，你好！")```',
        [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274,
         16948, 34841, 3135, 1138, 85593, 445, 99489, 3837, 108386, 6313, 899, 73594],
    ),
]


@pytest.mark.parametrize("text,expected", INTEGRATION_CASES, ids=["english", "chinese", "code"])
def test_transformers_integration_ids(real_tok, text, expected):
    assert real_tok.encode(text) == expected
    assert real_tok.decode(expected) == text


def test_default_system_block_ids(real_tok):
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert real_tok.encode(text) == [
        151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198
    ]


def _fuzz_text(rng: random.Random, n_pieces: int) -> str:
    pool = [
        "hello", "World", " the", "'s", "'LL", "'ve", "n't", " 'd", "x'm", "123", "4567890", "3.14",
        " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n ", "\u3000", "\u00a0",
        ",", ".", "!!", "?!", "...", "#", "##", "->", "=>", "{}", ";}\n", "()", "@@", "__init__",
        "你好", "世界", "人工智能", "。", "，", "こんにちは", "カタカナ", "한국어", "Привет",
        "Ελλάδα", "مرحبا", "नमस्ते", "😀", "🤗", "👍🏽", "👨‍👩‍👧", "🇯🇵", "𝔘𝔫𝔦", "𠀋",
        "e\u0301", "\u03d2\u0301", "a\u0308\u0304", "ﬁ", "\u200b", "\ufeff",
        "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    ]
    pieces = []
    for _ in range(n_pieces):
        if rng.random() < 0.15:  # random code points from assorted scripts
            lo, hi = rng.choice([(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x52F), (0x4E00, 0x9FFF),
                                 (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x300, 0x36F)])
            pieces.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
        else:
            pieces.append(rng.choice(pool))
    return "".join(pieces)


def test_matches_tiktoken_on_fuzz_text(real_tok):
    tiktoken = pytest.importorskip("tiktoken")
    # Independent BPE implementation over the same ranks and split regex (NFC applied first).
    enc = tiktoken.Encoding(
        name="qwen2_from_ranks",
        pat_str=QWEN2_SPLIT_REGEX,
        mergeable_ranks=load_qwen_ranks(),
        special_tokens={},
    )
    specials = {"<|endoftext|>": ENDOFTEXT, "<|im_start|>": IM_START, "<|im_end|>": IM_END}
    # Added tokens (normalized=false) are matched on the raw text, and NFC then applies to the
    # text between them, so "<|im_end|>" + U+0338 is not composed into "<|im_end|" + "≯".
    splitter = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")
    rng = random.Random(0)
    for _ in range(40):
        text = _fuzz_text(rng, 300)
        expected, normalized = [], []
        for segment in splitter.split(text):
            if segment in specials:
                expected.append(specials[segment])
                normalized.append(segment)
            elif segment:
                nfc = unicodedata.normalize("NFC", segment)
                expected.extend(enc.encode_ordinary(nfc))
                normalized.append(nfc)
        ids = real_tok.encode(text)
        assert ids == expected
        assert real_tok.decode(ids) == "".join(normalized)


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_roundtrip_multilingual(real_tok, tiny_tok, text):
    assert real_tok.decode(real_tok.encode(text)) == text
    assert tiny_tok.decode(tiny_tok.encode(text)) == text


def test_nfc_normalisation(real_tok):
    # The NFD form decodes back as its NFC form (only NFC is applied, not NFKC).
    assert real_tok.decode(real_tok.encode("\u03d2\u0301\u03d2\u0308\u017f\u0307")) == (
        "\u03d3\u03d4\u1e9b"
    )


def test_special_tokens_and_no_bos(real_tok):
    assert real_tok.encode("<|im_start|>") == [IM_START]
    assert real_tok.encode("<|im_end|><|endoftext|>") == [IM_END, ENDOFTEXT]
    assert real_tok.encode("hi", add_special_tokens=True) == real_tok.encode("hi")
    assert real_tok.bos_token is None and real_tok.bos_token_id is None
    assert real_tok.eos_token == "<|im_end|>" and real_tok.eos_token_id == IM_END
    assert real_tok.pad_token_id == ENDOFTEXT
    assert real_tok.vocab_size == 151646 == len(real_tok)
    assert real_tok.all_special_ids == [ENDOFTEXT, IM_START, IM_END]
    assert real_tok.convert_tokens_to_ids("<|im_end|>") == IM_END
    assert real_tok.convert_tokens_to_ids(["Hello", "<|im_start|>", "nope!?"]) == [
        9707, IM_START, None
    ]
    assert real_tok.token_to_id("Hello") == 9707
    assert real_tok.convert_ids_to_tokens([9707, IM_END]) == ["Hello", "<|im_end|>"]
    assert real_tok.id_to_token(10_000_000) is None


def test_decode_skip_special_tokens(real_tok):
    ids = real_tok.encode("<|im_start|>assistant\nHi there<|im_end|>\n<|endoftext|>")
    assert real_tok.decode(ids) == "<|im_start|>assistant\nHi there<|im_end|>\n<|endoftext|>"
    assert real_tok.decode(ids, skip_special_tokens=True) == "assistant\nHi there\n"


def test_decode_accepts_any_int_sequence_and_rejects_bad_ids(real_tok):
    import numpy as np

    assert real_tok.decode(np.array([9707, 11], dtype=np.int32)) == "Hello,"
    # Embedding padding rows (ids >= vocab_size) decode to nothing, as in `tokenizers`.
    assert real_tok.decode([9707, 151_900]) == "Hello"
    with pytest.raises(ValueError, match="non-negative"):
        real_tok.decode([9707, -1])
    with pytest.raises(ValueError, match="sequence of token ids"):
        real_tok.decode("Hello")
    with pytest.raises(ValueError, match="expects a str"):
        real_tok.encode([1, 2])


def test_matches_transformers_encode_decode(real_dir, real_tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(real_dir))
    for text in MULTILINGUAL:
        ids = ref.encode(text, add_special_tokens=True)
        assert real_tok.encode(text, add_special_tokens=True) == ids
        assert real_tok.decode(ids) == ref.decode(ids)
        assert real_tok.decode(ids, skip_special_tokens=True) == ref.decode(
            ids, skip_special_tokens=True
        )


# ------------------------------------------------------------------ configs and EOS union


def test_generation_defaults_and_eos_instruct(real_tok):
    assert real_tok.eos_token_ids == [ENDOFTEXT, IM_END]
    assert real_tok.generation_defaults == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
        "repetition_penalty": 1.05,
    }


@pytest.mark.parametrize(
    "config_eos,gen_eos,tok_eos,expected",
    [
        # Qwen2-Instruct: config and tokenizer say <|im_end|>, generation_config says both.
        (IM_END, [IM_END, ENDOFTEXT], "<|im_end|>", [ENDOFTEXT, IM_END]),
        # Qwen2 base: everything says <|endoftext|>.
        (ENDOFTEXT, ENDOFTEXT, "<|endoftext|>", [ENDOFTEXT]),
        # The trap: config says <|endoftext|>, tokenizer says <|im_end|>: stop on both.
        (ENDOFTEXT, None, "<|im_end|>", [ENDOFTEXT, IM_END]),
        (None, None, "<|im_end|>", [IM_END]),
        (IM_START, None, None, [IM_START]),
        (None, None, None, []),
    ],
)
def test_eos_token_ids_union(real_dir, tmp_path, config_eos, gen_eos, tok_eos, expected):
    d = _copy_dir(real_dir, tmp_path / "m")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["eos_token"] = tok_eos
    _write_json(d / "tokenizer_config.json", tc)
    gc = json.loads((d / "generation_config.json").read_text())
    gc.pop("eos_token_id")
    if gen_eos is not None:
        gc["eos_token_id"] = gen_eos
    _write_json(d / "generation_config.json", gc)
    if config_eos is not None:
        _write_json(d / "config.json", {"model_type": "qwen2", "eos_token_id": config_eos})
    tok = Qwen2Tokenizer.from_pretrained(d)
    assert tok.eos_token_ids == expected
    if tok_eos is not None:
        assert tok.eos_token == tok_eos


def test_missing_optional_configs(real_dir, tmp_path):
    d = tmp_path / "only_tokenizer_json"
    d.mkdir()
    shutil.copyfile(real_dir / "tokenizer.json", d / "tokenizer.json")
    tok = Qwen2Tokenizer.from_pretrained(str(d))
    assert tok.eos_token_ids == [] and tok.eos_token is None
    assert tok.pad_token_id is None and tok.generation_defaults == {}
    assert tok.encode("Hello") == [9707]
    # eos_token may also come as a transformers AddedToken dict; pad from generation_config.
    _write_json(d / "tokenizer_config.json", {"eos_token": {"content": "<|endoftext|>"}})
    _write_json(d / "generation_config.json", {"pad_token_id": 7, "eos_token_id": IM_END})
    tok = Qwen2Tokenizer.from_pretrained(d)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_ids == [ENDOFTEXT, IM_END]
    assert tok.pad_token_id == 7


def test_missing_tokenizer_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        Qwen2Tokenizer.from_pretrained(tmp_path / "does_not_exist")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json not found") as info:
        Qwen2Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


@pytest.mark.parametrize(
    "filename,content,match",
    [
        ("tokenizer_config.json", "{not json", "not valid JSON"),
        ("generation_config.json", "[1, 2]", "JSON object"),
        ("tokenizer_config.json", json.dumps({"eos_token": "<|nope|>"}), "not in the vocabulary"),
        ("tokenizer_config.json", json.dumps({"eos_token": 5}), "token string"),
        ("generation_config.json", json.dumps({"eos_token_id": "2"}), "non-negative int"),
        ("config.json", json.dumps({"eos_token_id": [1, -2]}), "non-negative int"),
        ("config.json", json.dumps({"eos_token_id": 10**7}), "outside the tokenizer vocabulary"),
        ("tokenizer.json", "{}", "cannot load"),
    ],
)
def test_bad_config_errors(real_dir, tmp_path, filename, content, match):
    d = _copy_dir(real_dir, tmp_path / "m")
    (d / filename).write_text(content)
    with pytest.raises(ValueError, match=match):
        Qwen2Tokenizer.from_pretrained(d)


def test_save_pretrained_copies_tokenizer_files(real_dir, tmp_path):
    d = _copy_dir(real_dir, tmp_path / "src")
    (d / "vocab.json").write_text("{}")
    (d / "merges.txt").write_text("#version: 0.2\n")
    (d / "special_tokens_map.json").write_text("{}")
    _write_json(d / "config.json", {"eos_token_id": IM_END})
    tok = Qwen2Tokenizer.from_pretrained(d)
    out = tmp_path / "out" / "nested"
    written = tok.save_pretrained(out)
    names = sorted(p.name for p in written)
    assert names == sorted([
        "tokenizer.json", "tokenizer_config.json", "generation_config.json",
        "special_tokens_map.json", "vocab.json", "merges.txt",
    ])
    for name in names:
        assert (out / name).read_bytes() == (d / name).read_bytes()
    assert not (out / "config.json").exists()  # the model's file, not the tokenizer's
    again = Qwen2Tokenizer.from_pretrained(out)
    assert again.encode(MULTILINGUAL[6]) == tok.encode(MULTILINGUAL[6])
    assert tok.save_pretrained(d)  # saving onto its own directory is a no-op, not an error


def test_save_pretrained_in_memory_tokenizer(real_dir, tmp_path):
    backend = Tokenizer.from_file(str(real_dir / "tokenizer.json"))
    tok = Qwen2Tokenizer(backend, tokenizer_config={"eos_token": "<|im_end|>"})
    written = tok.save_pretrained(tmp_path)
    assert sorted(p.name for p in written) == ["tokenizer.json", "tokenizer_config.json"]
    again = Qwen2Tokenizer.from_pretrained(tmp_path)
    assert again.eos_token_ids == [IM_END]
    assert again.encode("你好 world") == tok.encode("你好 world")


# ------------------------------------------------------------------------ tiny tokenizer


def test_tiny_tokenizer_layout(tiny_tok):
    assert tiny_tok.vocab_size == 512
    assert [tiny_tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        509, 510, 511
    ]
    assert tiny_tok.eos_token_ids == [509, 511]
    assert tiny_tok.pad_token_id == 509 and tiny_tok.bos_token_id is None
    assert tiny_tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 510
    assert max(tiny_tok.encode(" ".join(MULTILINGUAL))) < 512


def test_tiny_tokenizer_other_sizes_and_determinism(tmp_path):
    d = build_tiny_tokenizer_files(tmp_path / "t300", vocab_size=300)
    tok = Qwen2Tokenizer.from_pretrained(d)
    assert tok.vocab_size == 300 and tok.eos_token_ids == [297, 299]
    assert tok.decode(tok.encode(MULTILINGUAL[6])) == MULTILINGUAL[6]
    assert json.dumps(train_tiny_tokenizer_json(512)) == json.dumps(train_tiny_tokenizer_json(512))
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        build_tiny_tokenizer_files(tmp_path / "bad", vocab_size=100)


# ------------------------------------------------------------------ streaming detokenizer


STREAM_TEXTS = MULTILINGUAL + [
    "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334 a\u0308\u0304 e\u0301\u0301\u0301",
    "line one\n line two with leading space\n\n  two spaces 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 done",
    "🧑🏿‍🚀🧑🏿‍🚀 🫠🫡🪿 ꙮ 𓀀𓀁 \U0010fffd",
]


def _stream(tok: Qwen2Tokenizer, ids: list[int], skip_special_tokens: bool = False):
    detok = tok.detokenizer(skip_special_tokens=skip_special_tokens)
    pieces = [detok.add_token(i) for i in ids]
    final = detok.finalize()
    return detok, pieces, final


@pytest.mark.parametrize("which", ["real", "tiny"])
def test_streaming_matches_full_decode(real_tok, tiny_tok, which):
    tok = real_tok if which == "real" else tiny_tok
    held_back = 0
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        detok, pieces, final = _stream(tok, ids)
        full = tok.decode(ids)
        assert "".join(pieces) + final == full == unicodedata.normalize("NFC", text)
        assert detok.text == full and detok.tokens == ids
        # A piece holding half of a multi-byte character would show up as U+FFFD.
        assert all("\ufffd" not in p for p in pieces + [final])
        held_back += sum(1 for p in pieces if p == "")
    assert held_back > 0  # some tokens ended mid-character, so holding back was exercised


@pytest.mark.parametrize("which", ["real", "tiny"])
def test_streaming_random_ids_match_lossy_decode(real_tok, tiny_tok, which):
    # Random id sequences contain invalid UTF-8; U+FFFD must appear exactly where a full
    # decode puts it, and never earlier.
    tok = real_tok if which == "real" else tiny_tok
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        if which == "real":  # favour byte tokens (ids < 256) so that partial chars are common
            ids = [i % 256 if rng.random() < 0.7 else i for i in ids]
        detok, pieces, final = _stream(tok, ids)
        full = tok.decode(ids)
        assert "".join(pieces) + final == full, ids
        if "\ufffd" not in full:
            assert all("\ufffd" not in p for p in pieces)


def test_streaming_skip_special_tokens_and_reset(real_tok):
    ids = real_tok.encode("<|im_start|>assistant\n你好😀<|im_end|>\n")
    detok, pieces, final = _stream(real_tok, ids, skip_special_tokens=True)
    assert "".join(pieces) + final == real_tok.decode(ids, skip_special_tokens=True)
    detok.reset()
    assert detok.text == "" and detok.tokens == []
    assert detok.add_token(9707) == "Hello" and detok.text == "Hello"


def test_streaming_holds_back_partial_character_until_finalize(tiny_tok):
    # Feed the 4 bytes of 😀 (F0 9F 98 80) one single-byte token at a time; the byte tokens are
    # looked up through the GPT-2 byte alphabet, independently of token_bytes().
    table = bytes_to_unicode()
    ids = [tiny_tok.token_to_id(table[b]) for b in "😀".encode()]
    detok = tiny_tok.detokenizer()
    assert [detok.add_token(i) for i in ids] == ["", "", "", "😀"]
    # An unfinished character is flushed by finalize() exactly as a full decode renders it.
    detok = tiny_tok.detokenizer()
    assert [detok.add_token(i) for i in ids[:3]] == ["", "", ""]
    assert detok.finalize() == tiny_tok.decode(ids[:3]) == "\ufffd"


def test_streaming_errors(real_tok):
    with pytest.raises(ValueError, match="non-negative"):
        real_tok.detokenizer().add_token(-3)
    no_decoder = Qwen2Tokenizer(Tokenizer(models.BPE()))
    with pytest.raises(ValueError, match="ByteLevel decoder"):
        StreamingDetokenizer(no_decoder)
