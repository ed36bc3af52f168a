"""A minimal desktop chat window on `ChatSession`, with Tkinter (in the standard library, on
macOS as on Linux): a transcript, an input box, Send and Stop buttons.

    python examples/chat_app.py --model Qwen/Qwen2.5-1.5B-Instruct --system "You are terse."

How it is put together (the threading rules of qwen2-mlx, in practice):
- Tk runs on the main thread and MLX on one long-lived worker thread that owns the session:
  the window never blocks while a prompt is read or a reply is written.
- The worker sends what it produces (text pieces, the end of a reply) through a queue that
  the Tk event loop drains every few milliseconds with `after`; Tk widgets are touched only
  by the main thread.
- Stop (or Escape) calls `chat.cancel()`, the one session call that is safe from any thread:
  the reply ends within a token and keeps what was written.
- Closing the window (or Ctrl+Q) cancels the reply, waits for the worker to be idle, then
  closes. The worker is a daemon thread that is never ended: MLX 0.32 can abort the process
  when a thread that ran compiled MLX functions exits while Python shuts down.

Enter sends; Shift+Enter makes a new line. `--report FILE` writes the transcript, the messages
and the widgets' screen positions as JSON every 100 ms and after each reply (for the test
that drives the window with xdotool).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import tkinter as tk
from pathlib import Path
from tkinter import scrolledtext

from qwen2_mlx import ChatSession, load

POLL_MS = 20


class ChatWorker:
    """The thread that owns all MLX work: it runs the reply streams it is given, in order."""

    def __init__(self, events: queue.Queue):
        self.events = events
        self.jobs: queue.Queue = queue.Queue()
        self.idle = threading.Event()
        self.idle.set()
        threading.Thread(target=self._run, name="qwen2-mlx-chat", daemon=True).start()

    def run(self, stream) -> None:
        self.idle.clear()
        self.jobs.put(stream)

    def _run(self) -> None:
        while True:
            stream = self.jobs.get()
            try:
                last = None
                for last in stream:
                    self.events.put(("piece", last.reasoning + last.text))
                self.events.put(("done", last.finish_reason if last else None))
            except Exception as e:  # shown in the window; the session stays usable
                self.events.put(("error", str(e)))
            finally:
                if self.jobs.empty():
                    self.idle.set()


class ChatApp:
    """The window: transcript, input box, Send and Stop."""

    def __init__(self, root: tk.Tk, chat: ChatSession, report: Path | None = None):
        self.root, self.chat, self.report = root, chat, report
        self.events: queue.Queue = queue.Queue()
        self.worker = ChatWorker(self.events)
        self.replies: list[str | None] = []  # finish reasons, one per reply
        self.stops = 0  # presses of Stop (or Escape)
        self.closing = False

        root.title("qwen2-mlx chat")
        root.geometry("720x480")
        self.transcript = scrolledtext.ScrolledText(root, wrap="word", state="disabled",
                                                    height=18)
        self.transcript.tag_configure("you", foreground="#1a5fb4")
        self.transcript.tag_configure("note", foreground="#808080")
        self.transcript.pack(fill="both", expand=True, padx=8, pady=(8, 4))
        bar = tk.Frame(root)
        bar.pack(fill="x", padx=8, pady=(0, 8))
        # The buttons are packed first so that the input box gets only the room left.
        self.stop_button = tk.Button(bar, text="Stop", width=8, command=self.stop,
                                     state="disabled")
        self.stop_button.pack(side="right", padx=(6, 0))
        self.send_button = tk.Button(bar, text="Send", width=8, command=self.send)
        self.send_button.pack(side="right", padx=(6, 0))
        self.input = tk.Text(bar, height=3, width=40, wrap="word")
        self.input.pack(side="left", fill="x", expand=True)
        self.status = tk.Label(root, text="Ready", anchor="w")
        self.status.pack(fill="x", padx=8, pady=(0, 6))

        self.input.bind("<Return>", self._on_return)
        root.bind("<Escape>", lambda _: self.stop())
        root.bind("<Control-q>", lambda _: self.close())
        root.protocol("WM_DELETE_WINDOW", self.close)
        self.input.focus_set()
        root.after(POLL_MS, self.poll)
        if report is not None:
            root.after(100, self.report_often)

    # ---------------------------------------------------------------------- actions
    def _on_return(self, event) -> str | None:
        if event.state & 0x1:  # Shift+Enter: a new line
            return None
        self.send()
        return "break"

    def send(self) -> None:
        text = self.input.get("1.0", "end").strip()
        if not text or not self.worker.idle.is_set():
            return
        try:
            # Made here, run by the worker: a Stop pressed before the worker starts it counts.
            stream = self.chat.stream(text)
        except ValueError as e:
            self._append(f"[error: {e}]\n", "note")
            return
        self.input.delete("1.0", "end")
        self._append(f"You: {text}\n", "you")
        self._append("Assistant: ")
        self.send_button.configure(state="disabled")
        self.stop_button.configure(state="normal")
        self.status.configure(text="Thinking...")
        self.worker.run(stream)

    def stop(self) -> None:
        self.stops += 1
        self.chat.cancel()

    def close(self) -> None:
        """Stop generating, wait for the worker to be idle, then close the window."""
        self.closing = True
        self.chat.cancel()
        if not self.worker.idle.is_set():
            self.root.after(POLL_MS, self.close)
            return
        self.write_report()
        self.root.destroy()

    # ------------------------------------------------------------------ worker events
    def poll(self) -> None:
        while True:
            try:
                kind, value = self.events.get_nowait()
            except queue.Empty:
                break
            if kind == "piece":
                self._append(value)
                self.status.configure(text="Writing...")
            elif kind == "done":
                self._finish(value)
            else:
                self._append(f"\n[error: {value}]\n", "note")
                self._finish(None)
        if not self.closing:
            self.root.after(POLL_MS, self.poll)

    def _finish(self, finish_reason: str | None) -> None:
        if finish_reason == "cancelled":
            self._append(" [stopped]", "note")
        self._append("\n\n")
        self.replies.append(finish_reason)
        self.send_button.configure(state="normal")
        self.stop_button.configure(state="disabled")
        self.status.configure(text=f"Ready ({self.chat.cached_tokens} tokens in the cache)")
        self.write_report()

    def _append(self, text: str, tag: str | None = None) -> None:
        self.transcript.configure(state="normal")
        self.transcript.insert("end", text, tag or ())
        self.transcript.see("end")
        self.transcript.configure(state="disabled")

    # ---------------------------------------------------------------------- test hook
    def report_often(self) -> None:
        if not self.closing:
            self.write_report()
            self.root.after(100, self.report_often)

    def write_report(self) -> None:
        if self.report is None:
            return

        def centre(widget) -> list[int]:
            return [widget.winfo_rootx() + widget.winfo_width() // 2,
                    widget.winfo_rooty() + widget.winfo_height() // 2]

        data = {
            "transcript": self.transcript.get("1.0", "end"),
            "messages": self.chat.messages if self.worker.idle.is_set() else None,
            "replies": self.replies,
            "stops": self.stops,
            "widgets": {"input": centre(self.input), "send": centre(self.send_button),
                        "stop": centre(self.stop_button)},
            "transcript_box": [self.transcript.winfo_rootx(), self.transcript.winfo_rooty(),
                               self.transcript.winfo_width(), self.transcript.winfo_height()],
            "closed": self.closing,
        }
        tmp = self.report.with_name(self.report.name + ".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct",
                        help="local model directory or Hugging Face repo id")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature")
    parser.add_argument("--report", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    chat = ChatSession(model, tokenizer, system=args.system, max_tokens=args.max_tokens,
                       temperature=args.temp)
    root = tk.Tk()
    ChatApp(root, chat, report=args.report)
    root.mainloop()


if __name__ == "__main__":
    main()
