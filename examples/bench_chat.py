"""Time to first token of each turn of a conversation: a `ChatSession` (which prefills only the
new message) against re-prefilling the whole conversation every turn, and against mlx-lm's
`chat` loop on the same checkpoint and the same user messages.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python examples/bench_chat.py --random-preset Qwen2.5-0.5B --dtype float32

The checkpoint is random, with a published model's exact shapes (`bench_generate.py` writes
it), and the tokenizer is Qwen2.5's real one with its chat template (rebuilt offline by the test
fixtures, so this script runs from a checkout with the test extra installed). Each turn sends a
fixed user message of `--user-tokens` tokens; replies are greedy and `--reply-tokens` long, so
the conversation reaches about 1,500 tokens in 6 turns. Per turn the three engines run one
after the other, in an order that rotates from run to run; the script prints medians over
`--runs` runs and the ratios (the machine may be shared: ratios hold better than times).

For mlx-lm it reproduces `mlx_lm.chat`'s loop (one prompt cache for the session; each turn
templates only the new user message, with the system prompt, and generates with
`mlx_lm.stream_generate`), then compares what that cache holds with the template of the same
conversation: the token difference is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from qwen2_mlx import ChatSession, load, stream_generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_generate import write_random_checkpoint  # noqa: E402

WORDS = ("the river carried small boats past the old mill while children counted clouds and "
         "a baker sold warm bread to travellers who had walked since dawn through quiet hills "
         "where shepherds sang about distant cities and forgotten kings").split()


def user_message(turn: int, tokens: int, tokenizer) -> str:
    """A deterministic English message of about `tokens` tokens, different every turn."""
    words, i = [f"Question {turn}:"], turn * 7
    while len(tokenizer.encode(" ".join(words))) < tokens:
        words.append(WORDS[i % len(WORDS)])
        i += 3
    return " ".join(words) + "?"


def write_tokenizer(out_dir: Path) -> None:
    from family_tokenizers import build_family_tokenizer_files, read_template

    build_family_tokenizer_files(out_dir, "qwen2.5", read_template("qwen2.5-instruct.jinja"))


class OurSession:
    """qwen2-mlx: a ChatSession across the turns."""

    def __init__(self, model, tokenizer, reply_tokens: int, step: int):
        self.chat = ChatSession(model, tokenizer, max_tokens=reply_tokens,
                                prefill_step_size=step)

    def turn(self, message: str) -> tuple[float, int]:
        tic = time.perf_counter()
        ttft, prefilled = None, 0
        for r in self.chat.stream(message):
            if ttft is None:
                ttft, prefilled = time.perf_counter() - tic, r.prompt_tokens
        return ttft, prefilled


def whole_conversation(model, tokenizer, messages: list[dict], step: int) -> tuple[float, int]:
    """qwen2-mlx without a session: the whole conversation prefilled from an empty cache."""
    tic = time.perf_counter()
    first = next(iter(stream_generate(model, tokenizer, messages, max_tokens=1,
                                      prefill_step_size=step)))
    return time.perf_counter() - tic, first.prompt_tokens


class MlxLmChat:
    """mlx-lm's `chat` loop: one prompt cache, each turn templates only the new message."""

    def __init__(self, path: Path, reply_tokens: int, step: int):
        from mlx_lm import load as lm_load
        from mlx_lm.models.cache import make_prompt_cache

        self.model, self.tokenizer = lm_load(str(path))
        self.cache = make_prompt_cache(self.model)
        self.reply_tokens, self.step = reply_tokens, step
        self.held: list[int] = []  # the ids whose keys and values its cache holds
        self.replies: list[str] = []

    def turn(self, message: str) -> tuple[float, int]:
        from mlx_lm import stream_generate as lm_stream_generate

        prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                    add_generation_prompt=True)
        tic = time.perf_counter()
        ttft, text, tokens = None, [], []
        for r in lm_stream_generate(self.model, self.tokenizer, prompt,
                                    max_tokens=self.reply_tokens, prompt_cache=self.cache,
                                    prefill_step_size=self.step):
            if ttft is None:
                ttft = time.perf_counter() - tic
            text.append(r.text)
            tokens.append(r.token)
        self.held += list(prompt) + tokens
        del self.held[self.cache[0].offset:]  # what its cache really holds
        self.replies.append("".join(text))
        return ttft, len(prompt)


def describe_difference(held: list[int], template: list[int], tokenizer) -> list[str]:
    """How mlx-lm's context differs from the template of the same conversation."""
    first = next((i for i, (a, b) in enumerate(zip(held, template, strict=False)) if a != b),
                 min(len(held), len(template)))
    start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    system = tokenizer.encode("<|im_start|>system")
    assistant = tokenizer.encode("<|im_start|>assistant")

    def count(ids, pattern):
        return sum(ids[i:i + len(pattern)] == pattern for i in range(len(ids)))

    def closed_replies(ids):
        """Assistant segments that end with <|im_end|> before the next <|im_start|>."""
        heads = [i for i in range(len(ids)) if ids[i:i + len(assistant)] == assistant]
        closed = 0
        for h in heads:
            nxt = next((j for j in range(h + 1, len(ids)) if ids[j] == start), len(ids))
            closed += end in ids[h:nxt]
        return closed, len(heads)

    (held_closed, replies), (template_closed, _) = closed_replies(held), closed_replies(template)
    return [
        f"mlx-lm's cache holds {len(held)} tokens; the template of the same conversation has "
        f"{len(template)}; the first difference is at token {first}: "
        f"{tokenizer.decode(held[first:first + 6])!r} against "
        f"{tokenizer.decode(template[first:first + 6])!r}",
        f"system blocks: {count(held, system)} in mlx-lm's context (the default system prompt "
        f"again every turn), {count(template, system)} in the template",
        f"replies closed by <|im_end|>: {held_closed} of {replies} in mlx-lm's context, "
        f"{template_closed} of {replies} in the template",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-preset", default="Qwen2.5-0.5B")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--user-tokens", type=int, default=220)
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prefill-step-size", type=int, default=512)
    parser.add_argument("--no-mlx-lm", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(args.random_preset, args.dtype, Path(tmp) / "ckpt")
        write_tokenizer(path)
        model, tokenizer = load(path)
        lm_model = None if args.no_mlx_lm else MlxLmChat(path, args.reply_tokens,
                                                          args.prefill_step_size)
        messages = [user_message(t, args.user_tokens, tokenizer) for t in range(args.turns)]
        step = args.prefill_step_size
        # Warm-up (first-call allocations), not timed.
        whole_conversation(model, tokenizer, [{"role": "user", "content": messages[0]}], step)
        if lm_model is not None:
            lm_model.turn(messages[0])
        times = {name: [[] for _ in messages] for name in ("session", "whole", "mlx-lm")}
        tokens = {name: [0] * len(messages) for name in times}
        context = [0] * len(messages)
        lm = None
        for run in range(args.runs):
            ours = OurSession(model, tokenizer, args.reply_tokens, step)
            if lm_model is not None:  # a fresh cache per run, the weights loaded once
                from mlx_lm.models.cache import make_prompt_cache

                lm = lm_model
                lm.cache, lm.held, lm.replies = make_prompt_cache(lm.model), [], []
            for t, message in enumerate(messages):
                history = ours.chat.messages + [{"role": "user", "content": message}]
                order = ["session", "whole", "mlx-lm"]
                order = order[run % 3:] + order[:run % 3]
                for name in order:
                    if name == "session":
                        ttft, n = ours.turn(message)
                    elif name == "whole":
                        ttft, n = whole_conversation(model, tokenizer, history, step)
                    elif lm is not None:
                        ttft, n = lm.turn(message)
                    else:
                        continue
                    times[name][t].append(ttft)
                    tokens[name][t] = n
                context[t] = ours.chat.cached_tokens
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)

        print(f"backend {mx.default_device()}, {args.random_preset} random weights "
              f"({args.dtype}), {args.turns} turns of {args.user_tokens}-token messages and "
              f"{args.reply_tokens}-token greedy replies, median of {args.runs} runs; the "
              "machine may be shared")
        print("| turn | context after | prefilled: session / whole / mlx-lm | TTFT ms: session "
              "| whole conversation | mlx-lm chat | whole / session | mlx-lm / session |")
        print("|---|---|---|---|---|---|---|---|")
        med = {k: [statistics.median(v) * 1000 if v else float("nan") for v in runs]
               for k, runs in times.items()}
        for t in range(args.turns):
            s, w, m = med["session"][t], med["whole"][t], med["mlx-lm"][t]
            print(f"| {t + 1} | {context[t]} | {tokens['session'][t]} / {tokens['whole'][t]} / "
                  f"{tokens['mlx-lm'][t]} | {s:.0f} | {w:.0f} | {m:.0f} | {w / s:.2f}x | "
                  f"{m / s:.2f}x |")
        stats = ours.chat.stats
        print(f"session: {stats.resynced_replies} of {stats.turns} replies re-synced "
              f"({stats.resynced_tokens} tokens re-prefilled); cache == template: "
              f"{ours.chat.cache.tokens == ours.chat.template_ids()}")
        if lm is not None:
            conversation = []
            for message, reply in zip(messages, lm.replies, strict=True):
                conversation += [{"role": "user", "content": message},
                                 {"role": "assistant", "content": reply}]
            template = tokenizer.apply_chat_template(conversation, add_generation_prompt=False)
            for line in describe_difference(lm.held, template, tokenizer):
                print(line)


if __name__ == "__main__":
    main()
