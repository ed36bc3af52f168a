"""`qwen2-mlx chat`: in a real pseudo-terminal (pexpect), scripted through a pipe, and its
input reader. Replies are checked against `ChatSession` driven through the Python API."""

from __future__ import annotations

import json
import re
import sys

import mlx.core as mx
import pexpect
import pytest
from click.testing import CliRunner

from qwen2_mlx import ChatSession, load
from qwen2_mlx.cli.chat_command import read_messages
from qwen2_mlx.cli.main import cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def spawn_chat(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "qwen2_mlx.cli.main", "chat", *args],
                          encoding="utf-8", timeout=120, dimensions=(40, 400))
    child.expect_exact(">>> ")
    return child


def say(child: pexpect.spawn, line: str) -> str:
    """Type `line` and return what was printed before the next prompt (the echo removed)."""
    child.sendline(line)
    child.expect_exact(">>> ")
    out = ANSI.sub("", child.before).replace("\r\n", "\n")
    echoed, _, rest = out.partition("\n")
    assert echoed.endswith(line.splitlines()[-1] if line else "")
    return rest.removesuffix("\n")


def saved_messages(path) -> list[dict]:
    _, meta = mx.load(str(path), return_metadata=True)
    return json.loads(meta["qwen2_mlx.chat_session"])["messages"]


def test_chat_in_a_pseudo_terminal(tiny_checkpoint, tmp_path):
    session = tmp_path / "talk.safetensors"
    child = spawn_chat("-m", str(tiny_checkpoint), "--max-tokens", "8", "--temp", "0")
    first = say(child, "hello")
    second = say(child, "what?")
    assert first and second
    assert say(child, "/undo") == "[removed 2 messages: what?]"
    assert say(child, "/retry") == first  # greedy: the first reply again, from the cache
    # A multi-line message, with a trailing backslash.
    child.sendline("one\\")
    child.expect_exact("... ")
    say(child, "two")
    # Ctrl-C in the middle of a long reply stops it and keeps the session.
    say(child, "/set max-tokens 3000")
    child.sendline("tell me a long story")
    child.expect(r"\n.{8}")  # the reply is streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(">>> ")
    say(child, "/set max-tokens 8")
    stats = say(child, "/stats")
    assert stats.startswith("messages: 6, tokens in cache: ")
    assert "(budget 4096)" in stats and "peak memory" in stats
    assert say(child, f"/save {session}") == f"[saved 6 messages to {session}]"
    assert "exists; /save! " in say(child, f"/save {session}")
    after_save = say(child, "and then?")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    messages = saved_messages(session)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert messages[2]["content"] == "one\ntwo"
    assert messages[4]["content"] == "tell me a long story"
    assert 0 < len(messages[5]["content"]) < 3000  # the stopped reply, kept

    # Start again, load, continue: the same reply as the first process gave after saving.
    child = spawn_chat("-m", str(tiny_checkpoint))  # the saved options come with the file
    loaded = say(child, f"/load {session}")
    assert re.fullmatch(r"\[loaded 6 messages, \d+ tokens cached\]", loaded)
    assert say(child, "and then?") == after_save
    child.sendintr()  # Ctrl-C at the prompt quits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_scripted_chat_prints_one_reply_per_message(tiny_checkpoint):
    result = CliRunner().invoke(cli, ["chat", "-m", str(tiny_checkpoint), "--max-tokens", "6",
                                      "--system", "Be brief.", "--temp", "0"],
                                input="Hi\nsecond\n/undo\nHello\n")
    assert result.exit_code == 0, result.output
    model, tokenizer = load(tiny_checkpoint)
    # generation_config.json's repetition penalty applies, as in `generate`.
    assert tokenizer.generation_defaults["repetition_penalty"] == 1.05
    chat = ChatSession(model, tokenizer, system="Be brief.", max_tokens=6,
                       repetition_penalty=1.05)
    expected = [chat.send("Hi"), chat.send("second")]
    chat.undo()
    expected.append(chat.send("Hello"))
    assert result.stdout == "".join(reply + "\n" for reply in expected)
    assert "[removed 2 messages: second]" in result.stderr


def test_scripted_errors_go_to_stderr_and_exit_1(tiny_checkpoint, tmp_path):
    (tmp_path / "taken").write_text("x")
    result = CliRunner().invoke(cli, ["chat", "-m", str(tiny_checkpoint), "--max-tokens", "3",
                                      "--max-kv-size", "120"],
                                input=f"/nope\n/save {tmp_path / 'taken'}\n{'word ' * 50}\n"
                                      "/set temperature -1\n/set top-k many\nok\n")
    assert result.exit_code == 1
    assert "Error: unknown command /nope" in result.stderr
    assert "Error: temperature must be a finite number >= 0" in result.stderr
    assert "Error: /set top-k needs an integer, got 'many'" in result.stderr
    assert "exists; /save! " in result.stderr
    assert "Error: the message is too long for max_kv_size=120" in result.stderr
    assert len(result.stdout.splitlines()) == 1  # "ok" was still answered
    assert (tmp_path / "taken").read_text() == "x"


def test_verbose_says_wired_memory_is_a_no_op_on_cpu(tiny_checkpoint):
    result = CliRunner().invoke(cli, ["chat", "-m", str(tiny_checkpoint), "-v",
                                      "--max-tokens", "2"], input="Hi\n")
    assert result.exit_code == 0
    assert "Wired memory: not used on the CPU backend (no-op)" in result.stderr
    assert "Generation: 2 tokens" in result.stderr


def test_load_keeps_the_saved_settings_unless_flags_say_otherwise(tiny_checkpoint, tmp_path):
    model, tokenizer = load(tiny_checkpoint)
    chat = ChatSession(model, tokenizer, max_tokens=3, temperature=0.0, stop=["zz"])
    chat.send("hi")
    chat.save(tmp_path / "s.safetensors")
    args = ["chat", "-m", str(tiny_checkpoint), "--load", str(tmp_path / "s.safetensors")]
    shown = CliRunner().invoke(cli, args, input="/set\n")
    assert "max_tokens=3" in shown.stderr and "stop=['zz']" in shown.stderr
    assert "temperature=0.0" in shown.stderr
    shown = CliRunner().invoke(cli, [*args, "--max-tokens", "5", "--system", "New."],
                               input="/set\n/system\n")
    assert "max_tokens=5" in shown.stderr and "stop=['zz']" in shown.stderr
    assert "New." in shown.stderr
    refused = CliRunner().invoke(cli, [*args, "--kv-bits", "8"], input="")
    assert refused.exit_code == 2 and "keeps its cache's format" in refused.output


def test_bad_model_or_file_is_one_line(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(cli, ["chat", "-m", str(tmp_path / "nope")], input="")
    assert result.exit_code == 1 and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["chat", "-m", str(tiny_checkpoint), "--load",
                                      str(tmp_path / "missing.safetensors")], input="")
    assert result.exit_code == 1
    assert "no such chat session file" in result.stderr


def test_help_shows_examples():
    result = CliRunner().invoke(cli, ["chat", "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and "--max-kv-size" in result.output


@pytest.mark.parametrize("lines, expected", [
    (["hi"], ["hi"]),
    (["one\\", "two\\", "three"], ["one\ntwo\nthree"]),
    (['"""', "a", "", "b", '"""'], ["a\n\nb"]),
    (['"""first', 'last"""'], ["first\nlast"]),
    (['"""inline"""', "next"], ["inline", "next"]),
])
def test_multi_line_input(lines, expected):
    feed = iter(lines)

    def read_line(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    assert list(read_messages(False, read_line)) == expected


def test_draft_model_gives_the_same_greedy_replies(tiny_checkpoint, checkpoint_factory):
    base = ["chat", "-m", str(tiny_checkpoint), "--max-tokens", "8", "--temp", "0"]
    lines = "Hi\nAnd then?\n"
    plain = CliRunner().invoke(cli, base, input=lines)
    draft = checkpoint_factory(seed=1)  # another random model with the same tokenizer
    fast = CliRunner().invoke(cli, base + ["--draft-model", str(draft), "-v"], input=lines)
    assert plain.exit_code == fast.exit_code == 0, fast.output
    assert fast.stdout == plain.stdout
    assert fast.stderr.count("Speculative: ") == 2
    lookup = CliRunner().invoke(cli, base + ["--prompt-lookup", "2"], input=lines)
    assert lookup.exit_code == 0 and lookup.stdout == plain.stdout
