"""examples/chat_app.py under a virtual X server: typed into and clicked with xdotool (real X
input events), stopped mid-reply with its Stop button, screenshotted from Xvfb's framebuffer,
closed with Ctrl+Q.

Needs Debian's `xvfb` and `xdotool` (`.ci/run` installs them when apt is available) and
Tkinter in the Python running the tests; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

APP = Path(__file__).resolve().parents[1] / "examples" / "chat_app.py"


def _missing() -> str | None:
    try:
        import tkinter  # noqa: F401
    except ImportError:
        return "Tkinter is not installed for this Python (Debian: apt-get install python3-tk)"
    for tool, package in (("Xvfb", "xvfb"), ("xdotool", "xdotool")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package}; .ci/run does it)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture
def display(tmp_path):
    """A virtual X server whose screen is also a file (-fbdir): (DISPLAY, framebuffer)."""
    fbdir = tmp_path / "fb"
    fbdir.mkdir()
    read, write = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "800x600x24",
                               "-fbdir", str(fbdir), "-nolisten", "tcp"],
                              pass_fds=(write,), stderr=subprocess.DEVNULL)
    os.close(write)
    number = b""
    while not number.endswith(b"\n"):
        chunk = os.read(read, 16)
        if not chunk:
            server.kill()
            pytest.fail("Xvfb did not start")
        number += chunk
    os.close(read)
    try:
        yield f":{number.decode().strip()}", fbdir / "Xvfb_screen0"
    finally:
        server.terminate()
        server.wait(10)


def read_xwd(path: Path) -> np.ndarray:
    """The RGB pixels (H, W, 3) of an XWD file (Xvfb's -fbdir screen: 32 bits per pixel)."""
    data = path.read_bytes()
    fields = struct.unpack(">25I", data[:100])
    header, width, height = fields[0], fields[4], fields[5]
    byte_order, bits, line = fields[7], fields[11], fields[12]
    ncolors = fields[19]
    assert bits == 32, f"expected 32 bits per pixel, got {bits}"
    start = header + ncolors * 12
    pixels = np.frombuffer(data, np.uint32 if byte_order == 0 else ">u4", height * line // 4,
                           start).reshape(height, line // 4)[:, :width]
    return np.stack([(pixels >> 16) & 255, (pixels >> 8) & 255, pixels & 255],
                    axis=-1).astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """A plain 8-bit RGB PNG (no imaging library needed)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def wait_for(report: Path, ready, what: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    data = None
    while time.monotonic() < deadline:
        if report.exists():
            data = json.loads(report.read_text(encoding="utf-8"))
            if ready(data):
                return data
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}: {data if report.exists() else 'no report'}")


def test_chat_app_streams_stops_and_closes(display, checkpoint_factory, tmp_path):
    # A model slow enough on this CPU (tens of ms a token) that Stop lands mid-reply.
    model = checkpoint_factory(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
                               intermediate_size=1536)
    env = dict(os.environ, DISPLAY=display[0])
    report = tmp_path / "report.json"
    app = subprocess.Popen([sys.executable, str(APP), "--model", str(model),
                            "--max-tokens", "32", "--report", str(report)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def xdotool(*args: str) -> None:
        subprocess.run(["xdotool", *args], env=env, check=True, timeout=30)

    def click(name: str, data: dict) -> None:
        x, y = data["widgets"][name]
        xdotool("mousemove", "--sync", str(x), str(y), "click", "1")

    try:
        data = wait_for(report, lambda d: True, "the window")
        blank = read_xwd(display[1])
        # First message: typed into the input box, sent with the Send button, stopped with
        # the Stop button while the reply streams.
        click("input", data)
        xdotool("type", "--delay", "20", "tell me a story")
        click("send", data)
        opening = len("You: tell me a story\nAssistant: ")
        wait_for(report, lambda d: len(d["transcript"]) > opening + 4, "the reply to stream")
        click("stop", data)
        data = wait_for(report, lambda d: d["replies"] == ["cancelled"], "the stop")
        assert data["stops"] == 1
        # Second message, sent with Enter; it runs to its end.
        click("input", data)
        xdotool("type", "--delay", "20", "hello")
        xdotool("key", "Return")
        data = wait_for(report, lambda d: len(d["replies"]) == 2 and d["messages"],
                        "the second reply")
        assert data["replies"][1] in ("stop", "length")
        time.sleep(0.3)  # let Tk paint the last pieces
        shot = read_xwd(display[1])
        write_png(tmp_path / "chat_app.png", shot)

        messages = data["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 2
        assert messages[0]["content"] == "tell me a story"
        assert messages[2]["content"] == "hello"
        transcript = data["transcript"]
        for reply in (messages[1]["content"], messages[3]["content"]):
            # The stopped reply keeps what was written. (A Tk text drops NUL characters, which
            # a random model writes.)
            assert reply and reply.replace("\0", "") in transcript
        assert "[stopped]" in transcript and "You: hello" in transcript
        # The screenshot is not blank, and the transcript's pixels show the text.
        assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 8
        assert (shot != shot[0, 0]).any(axis=-1).mean() > 0.05
        x, y, w, h = data["transcript_box"]
        area = (slice(y, y + h), slice(x, x + w))
        assert (shot[area] != blank[area]).any(axis=-1).mean() > 0.005

        # Closing while a reply streams stops it and closes cleanly.
        click("input", data)
        xdotool("type", "--delay", "20", "more")
        xdotool("key", "Return")
        wait_for(report, lambda d: "You: more\nAssistant: " in d["transcript"]
                 and not d["transcript"].rstrip().endswith("Assistant:"), "the third reply")
        xdotool("key", "ctrl+q")
        out, err = app.communicate(timeout=60)
        final = json.loads(report.read_text(encoding="utf-8"))
        assert final["closed"] and len(final["messages"]) == 6
    finally:
        if app.poll() is None:
            app.kill()
            app.communicate()
    assert app.returncode == 0, err
    assert "Traceback" not in err and "terminate called" not in err
    assert (tmp_path / "chat_app.png").stat().st_size > 1000
