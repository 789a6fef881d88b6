"""The SDK examples in clients/ run against a live server and print real answers."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.server_process import ROOT, ServerProcess


def test_examples_run_against_the_server(server: ServerProcess) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "clients.examples", "--base-url", server.base_url],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("sync:") and "Paris" in lines[0]
    assert lines[1].startswith("stream:") and len(lines[1]) > len("stream: ") + 10
    assert lines[2].startswith("async:")
    answers = ast.literal_eval(lines[2].removeprefix("async:").strip())  # three answers, printed as a list
    assert len(answers) == 3 and all(isinstance(a, str) and a for a in answers)
