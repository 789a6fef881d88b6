"""`llm-service chat`: pipe and --prompt modes, retries and errors, and the interactive mode
driven through a real pseudo-terminal (typing, commands, Ctrl-C)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.server_process import ROOT, ServerProcess, free_port

CHAT = [sys.executable, "-m", "server", "chat"]


def test_pipe_mode(server: ServerProcess) -> None:
    r = subprocess.run([*CHAT, "--base-url", server.base_url, "--temperature", "0"],
                       input="What is the capital of France?", cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_prompt_flag_with_system_prompt(server: ServerProcess) -> None:
    r = subprocess.run([*CHAT, "--base-url", server.base_url, "--temperature", "0", "--max-tokens", "5",
                        "--system", "You are terse.", "--prompt", "Count to ten."],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_unreachable_server_is_said_plainly() -> None:
    r = subprocess.run([*CHAT, "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--retries", "1", "--prompt", "hi"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "cannot reach the server" in r.stderr and "Traceback" not in r.stderr


class _Stub(BaseHTTPRequestHandler):
    """503 with Retry-After on the first /v1/models, then a model list; 401 on chat."""

    calls: list[tuple[str, float]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        _Stub.calls.append((self.path, time.monotonic()))
        if len([c for c in _Stub.calls if c[0] == "/v1/models"]) == 1:
            self._json(503, {"error": {"message": "loading", "type": "server_error", "param": None, "code": None}}, {"retry-after": "1"})
        else:
            self._json(200, {"object": "list", "data": [{"id": "stub", "object": "model", "created": 0, "owned_by": "x"}]})

    def do_POST(self) -> None:
        _Stub.calls.append((self.path, time.monotonic()))
        self._json(401, {"error": {"message": "Invalid API key", "type": "authentication_error", "param": None, "code": "invalid_api_key"}})


@pytest.fixture
def stub() -> Iterator[str]:
    _Stub.calls = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_retry_after_is_honoured_and_a_bad_key_is_explained(stub: str) -> None:
    r = subprocess.run([*CHAT, "--base-url", stub, "--api-key", "wrong", "--prompt", "hi"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "refused the API key" in r.stderr
    models = [t for p, t in _Stub.calls if p == "/v1/models"]
    assert len(models) == 2 and models[1] - models[0] >= 0.95  # waited as Retry-After said
    assert [p for p, _ in _Stub.calls].count("/v1/chat/completions") == 1  # 401 is not retried


class Terminal:
    """The chat in a pseudo-terminal that is its controlling terminal, so Ctrl-C is a real SIGINT."""

    def __init__(self, args: list[str]) -> None:
        self.master, slave = pty.openpty()

        def make_controlling() -> None:
            # a person's terminal delivers Ctrl-C even where pytest runs with SIGINT ignored (a
            # background job of a shell script)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(args, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, preexec_fn=make_controlling,
                                     env={**os.environ, "TERM": "xterm", "COLUMNS": "120", "LINES": "40"})
        os.close(slave)
        self.screen = ""

    def read_until(self, pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.plain()):
                return self.plain()
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.screen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:
                    break
        raise AssertionError(f"{pattern!r} not seen; screen:\n{self.plain()[-3000:]}")

    def plain(self) -> str:
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.screen)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.master)


def test_interactive_session(server: ServerProcess, tmp_path: Path) -> None:
    # bounded answers: greedy multi-turn text of a 135M model depends on the CPU's bf16 arithmetic
    # (on some CPUs it rambles on for the whole context); what this test checks is the client
    t = Terminal([*CHAT, "--base-url", server.base_url, "--temperature", "0", "--max-tokens", "200"])
    t.read_until(r"you> ")
    t.type("My name is Ada. What is the capital of France?\n")
    t.read_until(r"Paris")
    t.read_until(r"tok/s · TTFT")
    # multi-line input with a trailing backslash: a second answer, with its own stats line
    t.type("What is my \\\nname?\n")
    t.read_until(r"tok/s · TTFT(.|\n)*tok/s · TTFT")
    saved = tmp_path / "chat.json"
    t.type(f"/save {saved}\n")
    t.read_until(r"saved 4 messages")
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "What is my \nname?"
    t.type("/reset\n")
    t.read_until(r"conversation forgotten")
    t.type("/model\n")
    t.read_until(r"model: smollm2-135m-instruct")
    # Ctrl-C cancels a long answer, the server stops generating, the chat goes on
    t.type("Write a very long essay about the history of Rome.\n")
    time.sleep(2)
    t.type("\x03")
    t.read_until(r"cancelled")
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.url}/health").json()["running_requests"] != 0:
        assert time.monotonic() < deadline, "the cancelled answer kept generating"
        time.sleep(0.1)
    t.type("/save " + str(saved) + "\n")
    t.read_until(r"saved 0 messages")
    t.type("/exit\n")
    assert t.close() == 0
