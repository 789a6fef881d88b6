"""Schemathesis against a live server (the Transformers engine; LLM_SERVICE_TEST_FUZZ_ENGINE=vllm for
vLLM's), driven by the server's own /openapi.json.

Every route but the admin API (it loads and unloads models), the routes of one stored response or
conversation (random ids only find 404s) and /metrics (not in the document) gets the document's
examples and random requests, valid and invalid. No answer may be a 5xx; each must have a
documented status, content type and body; every 4xx is OpenAI's error shape; a stream's events are
chunks of the documented schema ending in [DONE], or a Responses stream's final event
(tests/fuzz_hooks.py, which
also makes generated requests name the served model so that they reach the engine rather than
stop at a 404).

Deterministic (CI sends the same requests every run) and bounded: 150 random requests per route,
about a minute and a half on two cores. `LLM_SERVICE_TEST_FUZZ_EXAMPLES=500` is the wider local run:
that many per route, plus the coverage phase (every field's boundary and invalid values: some
thousand requests, each generation with `n: 128` among them; about five minutes more), without a
time limit. A failure prints schemathesis's report: each failing request as a curl command.

Schemathesis runs as its command line, not its pytest plugin: the plugin's fixture loader does
not work with pytest 9.2 (it sets `Node._nodeid`, which pytest no longer has).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MODEL
from tests.server_process import ROOT, ServerProcess

pytest.importorskip("schemathesis")

WIDE = "LLM_SERVICE_TEST_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("LLM_SERVICE_TEST_FUZZ_EXAMPLES", "150"))
PHASES = "examples,coverage,fuzzing" if WIDE else "examples,fuzzing"
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "error_shape", "stream_chunks")  # the last two: fuzz_hooks
# the routes in /openapi.json less the admin API's five and those of one stored response, conversation,
# file or batch (random ids: each only a 404; tests/conformance/test_responses.py and test_batches.py
# drive them)
FUZZED = 19
# CI fuzzes the Transformers engine (both venvs have it); LLM_SERVICE_TEST_FUZZ_ENGINE=vllm for vLLM's
ENGINE = os.environ.get("LLM_SERVICE_TEST_FUZZ_ENGINE", "transformers")


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    proc = ServerProcess("--engine", ENGINE, "--enforce-eager", "--max-tokens-limit", "8", "--max-num-seqs", "4",
                         "--embedding-model", "default", name="fuzz")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.mark.slow
@pytest.mark.timeout(0 if WIDE else 600)
def test_schemathesis_finds_no_failure(fuzz_server: ServerProcess, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{fuzz_server.url}/openapi.json",
        "--exclude-path-regex", "^/v1/(admin|responses|conversations|files|batches)/",
        "--phases", PHASES,
        "--checks", ",".join(CHECKS),
        "--generation-deterministic", "--max-examples", str(EXAMPLES), "--workers", "1",
        "--request-timeout", "120", "--suppress-health-check", "too_slow,filter_too_much,data_too_large",
        "--output-sanitize", "false", "--output-truncate", "false", "--warnings", "off", "--no-color",
        "--report", "json", "--report-json-path", str(report),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks", "LLM_SERVICE_TEST_FUZZ_MODEL": MODEL,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # in tmp_path: schemathesis keeps its cache (for `st replay`) in the working directory
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=None if WIDE else 540)
    out = done.stdout + done.stderr
    if not report.exists():
        pytest.fail(f"schemathesis did not run (exit {done.returncode}):\n{out[-3000:]}")
    summary = json.loads(report.read_text())
    failures = out[out.find("=== FAILURES ==="):out.find("=== SUMMARY ===")]
    assert done.returncode == 0, (f"schemathesis: {summary['test_cases']['unique_failures']} failure(s) "
                                  f"in {summary['test_cases']['generated']} requests\n{failures[:20000]}")
    assert summary["operations"]["tested"] == FUZZED
