"""`vllm bench serve --ignore-eos` (vLLM's own load tool, from the vLLM install) completes every
request against our server: the fields it sends (ignore_eos, stream_options, ...) are served."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.conftest import MODEL
from tests.server_process import ROOT, ServerProcess

PROMPTS = 24


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm bench comes with the vLLM install")
def test_vllm_bench_serve_completes_every_request(server: ServerProcess, client: openai.OpenAI, tmp_path: Path) -> None:
    if client.models.retrieve(MODEL).model_extra["engine"] != "vllm":
        pytest.skip("run once, against the vLLM engine's server (the fields it sends are engine-independent)")
    tokenizer = client.models.retrieve(MODEL).model_extra["root"]
    cmd = [sys.executable, "-m", "benchmarks.vllm_bench", "bench", "serve", "--backend", "openai-chat",
           "--base-url", server.url, "--endpoint", "/v1/chat/completions", "--model", MODEL,
           "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", "32",
           "--random-output-len", "16", "--num-prompts", str(PROMPTS), "--max-concurrency", "8", "--ignore-eos",
           "--seed", "0", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == PROMPTS and result.get("failed", 0) == 0, done.stdout[-2000:]
    # --ignore-eos: every answer ran to its full length
    assert result["total_output_tokens"] == PROMPTS * 16
