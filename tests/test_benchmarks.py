"""A short load run against a live server: the report adds up."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ENGINES
from tests.server_process import ROOT, ServerProcess


def test_short_load_run(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--base-url", server.base_url, "--concurrency", "3",
         "--requests", "6", "--warmup", "1", "--prompt-tokens", "20", "--output-tokens", "12", "--min-tokens",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "output tok/s" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["requests"] == rep["ok"] == 6 and rep["errors"] == {}
    # min_tokens makes every answer exactly the asked length
    assert abs(rep["output_throughput"] * rep["duration_s"] - 6 * 12) < 1e-6
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 < rep[metric]["p50"] <= rep[metric]["p99"]
    assert rep["ttft_ms"]["p50"] < rep["e2e_ms"]["p50"]


def test_completions_route_and_rate_mode(server: ServerProcess) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--base-url", server.base_url, "--route", "completions",
         "--rate", "20", "--requests", "4", "--warmup", "0", "--prompt-tokens", "10", "--output-tokens", "6"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "requests=4 ok=4" in r.stdout


def test_concurrency_sweep_writes_json_and_plots(server: ServerProcess, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "server", "bench", "--base-url", server.base_url, "--concurrency", "1,2",
         "--requests", "2", "--warmup", "0", "--prompt-tokens", "10", "--output-tokens", "6",
         "--json", str(tmp_path / "sweep.json"), "--plot", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    runs = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert [x["concurrency"] for x in runs] == [1, 2]
    for png in ("latency-cdf.png", "sweep.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_compare_table_states_ratios() -> None:
    from benchmarks.compare import table
    from benchmarks.load import Report

    def rep(c: int, tps: float, ttft: float, tpot: float) -> Report:
        return Report(base_url="x", model="m", concurrency=c, rate=None, requests=4, duration_s=1, ok=4, errors={},
                      request_throughput=4, output_throughput=tps, ttft_ms={"p50": ttft}, tpot_ms={"p50": tpot},
                      itl_ms={}, e2e_ms={}, settings={})

    md = table({"vllm": [rep(16, 100, 200, 50)], "llm-service": [rep(16, 110, 180, 50)]})
    assert "| vllm | 16 | 110.0 / 100.0 | 1.10x | 180 / 200 | 0.90x | 50.0 / 50.0 | 1.00x |" in md


def test_lengths_in_tokens_and_seeded_ranges(server: ServerProcess, tmp_path: Path) -> None:
    from server import models
    from server.config import Settings

    folder = models.resolve(Settings())

    def run(seed: int) -> dict:
        out = tmp_path / f"len-{seed}.json"
        r = subprocess.run(
            [sys.executable, "-m", "benchmarks.load", "--base-url", server.base_url, "--route", "completions",
             "--tokenizer", str(folder), "--prompt-tokens", "40", "--output-tokens", "3:9", "--min-tokens",
             "--concurrency", "4", "--requests", "8", "--warmup", "0", "--seed", str(seed), "--json", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        assert r.returncode == 0, r.stderr
        return json.loads(out.read_text())

    a, b = run(1), run(1)
    assert all(38 <= n <= 42 for n in a["prompt_token_counts"]), a["prompt_token_counts"]
    outs = a["output_token_counts"]
    assert all(3 <= n <= 9 for n in outs) and len(set(outs)) > 1
    # the same seed draws the same lengths (requests finish in any order, so compare as multisets)
    assert sorted(outs) == sorted(b["output_token_counts"])


def test_duration_mode_stops_by_itself(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "dur.json"
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--base-url", server.base_url, "--concurrency", "2",
         "--duration", "4", "--warmup", "0", "--prompt-tokens", "10", "--output-tokens", "8", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["ok"] == rep["requests"] >= 2
    assert 4 <= rep["duration_s"] < 15 and time.monotonic() - started < 60


def test_embeddings_peer_alone_reports_json() -> None:
    """The in-process peer of benchmarks/embeddings.py, in its own process: no server needed."""
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.embeddings", "--peer-only", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["threads"] == 1 and rep["texts"] == 64 and rep["dims"] == 384
    assert rep["batch 1"] > 0 and rep["batch 32"] > 0


def test_batch_quick_run_against_the_session_server(server: ServerProcess, tmp_path: Path) -> None:
    """benchmarks/batch.py --quick: the same prompts as one batch and as concurrent requests, and
    interactive TTFT idle and beside a running batch, which it cancels afterwards (engine-independent:
    once, against the first engine's server)."""
    if server.name != f"conformance-{ENGINES[0]}":
        pytest.skip("engine-independent: runs against the first engine's server only")
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.batch", "--url", server.url, "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "TTFT p50 is" in r.stdout and (tmp_path / "results.md").read_text() in r.stdout
    rep = json.loads((tmp_path / "results.json").read_text())
    t = rep["throughput"]
    assert set(t) == {"batch", "concurrency 4", "concurrency 16"}
    # ignore_eos and min_tokens: every answer of every run is 16 tokens, 8 prompts each
    assert all(run["output_tokens"] == 8 * 16 and run["output_tokens_per_s"] > 0 for run in t.values())
    assert set(rep["ratios"]) == {"batch / concurrency 4", "batch / concurrency 16"}
    for when in ("idle", "during batch"):
        assert len(rep["ttft_ms"][when]["values_ms"]) == 4 and rep["ttft_ms"][when]["p50"] > 0
    bg = rep["background_batch"]
    assert bg["lines"] == 20 and 0 <= bg["completed_at_start"] <= bg["completed_at_end"] <= 20
    assert bg["final_status"] in ("cancelled", "completed")
