"""Conversion cost and output size: qwen2-mlx's converter side by side with mlx-lm's.

Writes a random checkpoint with Qwen2-0.5B's exact shapes in bfloat16, split into several
shards as the Hub serves larger models, then for float16, q8 and q4 (group 64):

* converts it with `qwen2_mlx.convert` in a fresh process and reports that process's peak
  RSS growth next to the largest input shard (streaming keeps it near one shard);
* converts it with mlx-lm (if installed) and compares the outputs' sizes and bytes.

    python examples/bench_convert.py --shard-mb 200
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import write_random_checkpoint  # noqa: E402

CHILD = r"""
import json, sys
from pathlib import Path
def rss_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0
from qwen2_mlx.convert import convert
Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (Linux)
before = rss_kb("VmRSS:")
convert(sys.argv[1], sys.argv[2], log=None, **json.loads(sys.argv[3]))
print(json.dumps({"growth_mb": (rss_kb("VmHWM:") - before) / 1024}))
"""

SETTINGS = {
    "float16": dict(dtype="float16"),
    "q8": dict(dtype="float16", quantize=True, q_bits=8, q_group_size=64),
    "q4": dict(dtype="float16", quantize=True, q_bits=4, q_group_size=64),
}


def reshard(single: Path, out: Path, shard_mb: int) -> list[Path]:
    """Split a one-file checkpoint into ~shard_mb shards with a Hub-style index."""
    weights = mx.load(str(single / "model.safetensors"))
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        current[name] = weights[name]
        size += weights[name].nbytes
        if size >= shard_mb * 2**20:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    out.mkdir(parents=True)
    weight_map, files = {}, []
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out / name), shard, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        files.append(out / name)
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(single / "config.json", out)
    return files


def write_placeholder_tokenizer(folder: Path) -> None:
    """mlx-lm's converter copies a tokenizer; a small byte-level BPE stands in for Qwen2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["a placeholder tokenizer for a conversion benchmark"],
                                  trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="Qwen2-0.5B")
    parser.add_argument("--shard-mb", type=int, default=200)
    args = parser.parse_args()
    try:
        import mlx_lm
    except ImportError:
        mlx_lm = None

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        single = write_random_checkpoint(args.preset, "bfloat16", tmp / "single")
        source = tmp / "sharded"
        shards = reshard(single, source, args.shard_mb)
        shutil.rmtree(single)
        write_placeholder_tokenizer(source)
        largest = max(p.stat().st_size for p in shards) / 2**20
        print(f"{args.preset} random bf16 checkpoint: {len(shards)} shards, "
              f"largest {largest:.0f} MB, total {size(source) / 2**20:.0f} MB")
        for name, settings in SETTINGS.items():
            ours = tmp / f"ours_{name}"
            out = subprocess.run([sys.executable, "-c", CHILD, str(source), str(ours),
                                  json.dumps(settings)], capture_output=True, text=True,
                                 check=True)
            growth = json.loads(out.stdout.strip().splitlines()[-1])["growth_mb"]
            line = (f"{name:>8}: qwen2-mlx {size(ours):,} bytes, peak RSS growth "
                    f"{growth:.0f} MB (largest input shard {largest:.0f} MB)")
            if mlx_lm is not None:
                theirs = tmp / f"mlx_lm_{name}"
                mlx_lm.convert(str(source), str(theirs), **settings)
                same = all(filecmp.cmp(p, theirs / p.name, shallow=False)
                           for p in ours.glob("*.safetensors"))
                line += f" | mlx-lm {size(theirs):,} bytes, byte-identical: {same}"
            print(line, flush=True)
            shutil.rmtree(ours)


if __name__ == "__main__":
    main()
