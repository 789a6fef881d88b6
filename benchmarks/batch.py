"""The Batch API on one server: its throughput against the same prompts sent as concurrent
requests, and what a running batch does to interactive time to first token.

    python -m benchmarks.batch --engine auto --out benchmarks/results/2026-11-25-cpu-smollm2-batch
    python -m benchmarks.batch --engine vllm --server-args=--enforce-eager --quick --out /tmp/batch
    python -m benchmarks.batch --url http://127.0.0.1:8000 --batch-concurrency 4 --quick --out /tmp/batch

Throughput: --prompts seeded short chat prompts, each held to exactly --max-tokens output tokens
(temperature 0, ignore_eos and min_tokens), sent as one batch (timed from the upload until the
batch reads completed, polled every 0.2 s) and as non-streamed requests from as many concurrent
clients as the server runs batch lines (--batch-concurrency), and from 16; output tokens/s of
each, and batch / concurrent. Interactive: --ttft-samples streamed chats of 16 tokens on one
short prompt, one after another, on the idle server, then beside a --batch-lines batch (measured
once it is in_progress and its lines run); TTFT p50 during / idle, where the goal is 1.5x at
most. The batch must outlast that measurement: the report says how many of its lines had
completed when it ended, and whether the batch had finished early; it is then cancelled.

The server this starts has its own request-log database and files folder (a temporary folder),
so no other server's batch runner can take its lines. With --url the server is one already
running; it should be idle, and --batch-concurrency should be what it was started with (the
report states the most batch lines its /metrics showed running at once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import openai

from benchmarks.load import WORDS, _pcts
from benchmarks.servers import ServerProcess, free_port

ENDED = ("completed", "failed", "cancelled", "expired")
POLL = 0.2  # seconds between batch polls
CONCURRENCY = 16  # the second concurrent level, beside the server's batch concurrency
TTFT_PROMPT = "Name three rivers in Europe."
TTFT_TOKENS = 16
BACKGROUND_TOKENS = 64  # max_tokens of each background line: long enough to outlast the measurement


def prompts(n: int, seed: int = 0) -> list[str]:
    """n seeded short chat prompts: the same ones for every way of sending them."""
    rng = random.Random(seed)
    return [f"Write a few sentences about the {rng.choice(WORDS)}, the {rng.choice(WORDS)} and the "
            f"{rng.choice(WORDS)}." for _ in range(n)]


def held(max_tokens: int) -> dict[str, Any]:
    """Exactly max_tokens output tokens: no end-of-sequence before then."""
    return {"ignore_eos": True, "min_tokens": max_tokens}


def body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, **held(max_tokens)}


def jsonl(bodies: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": b}) + "\n" for i, b in enumerate(bodies)).encode()


class Server:
    """The server under test, as the SDK and its /metrics see it."""

    def __init__(self, url: str, api_key: str) -> None:
        self.client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=600)
        self.http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)

    async def running_lines(self) -> int | None:
        """Batch lines running now (the llm_batch_lines_running gauge); None if /metrics says nothing."""
        try:
            text = (await self.http.get("/metrics")).text
        except httpx.HTTPError:
            return None
        m = re.search(r"^llm_batch_lines_running(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
        return int(float(m.group(1))) if m else None

    async def submit(self, bodies: list[dict[str, Any]]) -> tuple[Any, str]:
        """Upload the lines and create the batch: (the batch, its input file's id)."""
        f = await self.client.files.create(file=("in.jsonl", jsonl(bodies)), purpose="batch")
        b = await self.client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                             completion_window="24h")
        return b, f.id

    async def tidy(self, *file_ids: str | None) -> None:
        for id in file_ids:
            if id:
                try:
                    await self.client.files.delete(id)
                except openai.APIError:
                    pass

    async def close(self) -> None:
        await self.client.close()
        await self.http.aclose()


async def as_batch(s: Server, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """The bodies as one batch: wall time from the upload until it reads completed, the output
    tokens of each line, and the most lines seen running at once."""
    started = time.perf_counter()
    b, input_id = await s.submit(bodies)
    peak = 0
    while b.status not in ENDED:
        await asyncio.sleep(POLL)
        b, running = await asyncio.gather(s.client.batches.retrieve(b.id), s.running_lines())
        peak = max(peak, running or 0)
    wall = time.perf_counter() - started
    if b.status != "completed" or not b.output_file_id:
        raise SystemExit(f"the batch {b.id} ended {b.status}: {b.errors}")
    results = [json.loads(line) for line in (await s.client.files.content(b.output_file_id)).text.splitlines() if line]
    await s.tidy(input_id, b.output_file_id, b.error_file_id)
    bad = [r["custom_id"] for r in results if r["response"]["status_code"] != 200]
    if bad or len(results) != len(bodies):
        raise SystemExit(f"the batch {b.id}: {len(results)}/{len(bodies)} lines answered, failed: {bad[:5]}")
    tokens = [r["response"]["body"]["usage"]["completion_tokens"] for r in results]
    # peak None: /metrics never showed a line running (no such gauge, or one not kept)
    return {"wall_s": wall, "tokens": tokens, "peak_running": peak or None}


async def concurrently(s: Server, bodies: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    """The bodies as requests from `clients` concurrent clients, each sending the next when its
    last is answered."""
    queue = list(reversed(bodies))
    tokens: list[int] = []

    async def worker() -> None:
        while queue:
            b = queue.pop()
            r = await s.client.chat.completions.create(model=b["model"], messages=b["messages"],
                                                       max_tokens=b["max_tokens"], temperature=0,
                                                       extra_body=held(b["max_tokens"]))
            tokens.append(r.usage.completion_tokens if r.usage else 0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return {"wall_s": time.perf_counter() - started, "tokens": tokens}


async def ttfts(s: Server, model: str, n: int) -> list[float]:
    """n streamed chats on one prompt, one after another: each one's time to its first token (s)."""
    out = []
    for _ in range(n):
        started = time.perf_counter()
        stream = await s.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": TTFT_PROMPT}], max_tokens=TTFT_TOKENS,
            temperature=0, stream=True, extra_body=held(TTFT_TOKENS))
        first = None
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
        if first is None:
            raise SystemExit("a streamed chat sent no content")
        out.append(first)
    return out


def completed(b: Any) -> int:
    return b.request_counts.completed if b.request_counts else 0


async def beside_batch(s: Server, model: str, args: argparse.Namespace) -> tuple[list[float], dict[str, Any]]:
    """TTFTs while a --batch-lines batch runs, and what the batch did meanwhile; then it is cancelled."""
    bodies = [body(model, p, BACKGROUND_TOKENS) for p in prompts(args.batch_lines, args.seed + 1)]
    b, input_id = await s.submit(bodies)
    while b.status == "validating":
        await asyncio.sleep(POLL)
        b = await s.client.batches.retrieve(b.id)
    if b.status != "in_progress":
        raise SystemExit(f"the background batch {b.id} is {b.status}, not in_progress: {b.errors}")
    for _ in range(int(1 / POLL)):  # its lines claimed (the runner looks every 0.5 s); 1 s at most
        if await s.running_lines():
            break
        await asyncio.sleep(POLL)
    done_at_start = completed(await s.client.batches.retrieve(b.id))
    started = time.perf_counter()
    samples = await ttfts(s, model, args.ttft_samples)
    seconds = time.perf_counter() - started
    b = await s.client.batches.retrieve(b.id)
    info = {"lines": len(bodies), "max_tokens": BACKGROUND_TOKENS, "status_at_end": b.status,
            "completed_at_start": done_at_start, "completed_at_end": completed(b),
            "measurement_s": seconds, "ended_early": b.status != "in_progress" or completed(b) >= len(bodies)}
    if b.status not in ENDED:
        b = await s.client.batches.cancel(b.id)
        deadline = time.monotonic() + 120
        while b.status not in ENDED and time.monotonic() < deadline:
            await asyncio.sleep(POLL)
            b = await s.client.batches.retrieve(b.id)
    info["final_status"] = b.status
    await s.tidy(input_id, b.output_file_id, b.error_file_id)
    return samples, info


def rate(run: dict[str, Any]) -> float:
    return float(sum(run["tokens"]) / run["wall_s"])


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    s = Server(url, args.api_key)
    try:
        model = args.model or (await s.client.models.list()).data[0].id
        bodies = [body(model, p, args.max_tokens) for p in prompts(args.prompts, args.seed)]
        levels = sorted({args.batch_concurrency, CONCURRENCY})
        # warm-up: one request, then one round at each level (vLLM compiles new batch shapes)
        await concurrently(s, bodies[:1], 1)
        for c in ([] if args.quick else levels):
            await concurrently(s, bodies[:c], c)
        runs: dict[str, dict[str, Any]] = {"batch": await as_batch(s, bodies)}
        print(f"   batch: {rate(runs['batch']):.1f} output tok/s", flush=True)
        for c in levels:
            runs[f"concurrency {c}"] = await concurrently(s, bodies, c)
            print(f"   concurrency {c}: {rate(runs[f'concurrency {c}']):.1f} output tok/s", flush=True)
        for name, run in runs.items():
            if run["tokens"] != [args.max_tokens] * len(bodies):
                raise SystemExit(f"{name}: output lengths {sorted(set(run['tokens']))}, not all {args.max_tokens}: "
                                 "not a like-for-like run")
        idle = await ttfts(s, model, args.ttft_samples)
        print(f"   TTFT idle: p50 {_pcts(idle)['p50']:.1f} ms", flush=True)
        during, background = await beside_batch(s, model, args)
        print(f"   TTFT beside a batch: p50 {_pcts(during)['p50']:.1f} ms", flush=True)
    finally:
        await s.close()
    throughput = {name: {"output_tokens_per_s": rate(run), "wall_s": run["wall_s"], "output_tokens": sum(run["tokens"]),
                         **({"peak_running": run["peak_running"]} if "peak_running" in run else {})}
                  for name, run in runs.items()}
    ratios = {f"batch / concurrency {c}": rate(runs["batch"]) / rate(runs[f"concurrency {c}"]) for c in levels}
    ttft: dict[str, dict[str, Any]] = {"idle": {**_pcts(idle), "values_ms": [1000 * x for x in idle]},
                                       "during batch": {**_pcts(during), "values_ms": [1000 * x for x in during]}}
    return {"model": model, "throughput": throughput, "ratios": ratios, "ttft_ms": ttft,
            "ttft_p50_during_over_idle": _pcts(during)["p50"] / _pcts(idle)["p50"],
            "background_batch": background}


def report(args: argparse.Namespace, r: dict[str, Any]) -> str:
    t, bg = r["throughput"], r["background_batch"]
    where = f"the server at {args.url}" if args.url else f"llm-service ({args.engine} engine)"
    lines = [
        f"# Batch API: {where}, {r['model']}", "",
        f"{args.prompts} seeded prompts (seed {args.seed}), {args.max_tokens} output tokens each (ignore_eos), "
        f"temperature 0; {os.cpu_count()} cores; batch concurrency {args.batch_concurrency} (the most lines "
        f"/metrics showed running at once: {t['batch']['peak_running'] or 'not shown'}); server flags: `{args.server_args or '-'}`.", "",
        "| sent as | wall s | output tok/s | batch / this |", "|---|---|---|---|",
        f"| one batch of {args.prompts} lines | {t['batch']['wall_s']:.1f} | "
        f"{t['batch']['output_tokens_per_s']:.1f} | - |",
    ]
    for name, ratio in r["ratios"].items():
        level = name.removeprefix("batch / ")
        lines.append(f"| {args.prompts} requests, {level} | {t[level]['wall_s']:.1f} | "
                     f"{t[level]['output_tokens_per_s']:.1f} | {ratio:.2f}x |")
    idle, during = r["ttft_ms"]["idle"], r["ttft_ms"]["during batch"]
    x = r["ttft_p50_during_over_idle"]
    lines += [
        "", f"| TTFT, {args.ttft_samples} streamed chats of {TTFT_TOKENS} tokens, one at a time | p50 ms | "
        "p90 ms | mean ms |", "|---|---|---|---|",
        f"| idle server | {idle['p50']:.1f} | {idle['p90']:.1f} | {idle['mean']:.1f} |",
        f"| beside a batch of {bg['lines']} lines of {bg['max_tokens']} tokens | {during['p50']:.1f} | "
        f"{during['p90']:.1f} | {during['mean']:.1f} |",
        "", f"Beside the batch, TTFT p50 is {x:.2f}x its idle value (goal: 1.5x at most: "
        f"{'met' if x <= 1.5 else 'NOT met'}). The batch's lines done: {bg['completed_at_start']} when the "
        f"measurement began, {bg['completed_at_end']}/{bg['lines']} when it ended {bg['measurement_s']:.1f} s later"
        + (f"; WARNING: the batch had ended ({bg['status_at_end']}) before the measurement did, so the last "
           "samples ran on an idle server." if bg["ended_early"] else
           f", the batch still running; then it was {bg['final_status']}."),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"], help="our engine")
    p.add_argument("--url", default=None, help="an already running server (its root, e.g. http://127.0.0.1:8000) "
                   "instead of starting one")
    p.add_argument("--api-key", default="none")
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    p.add_argument("--batch-concurrency", type=int, default=4,
                   help="batch lines the server runs at once (passed to the server this starts; with --url, "
                        "what that server was started with); also the first concurrent level")
    p.add_argument("--prompts", type=int, default=64, help="prompts for the throughput runs (--quick: 8)")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per prompt (--quick: 16)")
    p.add_argument("--ttft-samples", type=int, default=20, help="streamed chats per TTFT measurement (--quick: 4)")
    p.add_argument("--batch-lines", type=int, default=200, help="lines of the batch running beside the "
                   "TTFT measurement (--quick: 20)")
    p.add_argument("--quick", action="store_true", help="8 prompts of 16 tokens, 4 TTFT samples, a 20-line "
                   "batch, no warm-up rounds: a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default="", help="extra `llm-service serve` flags, as one string")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=None,
                   help="folder for results.md, results.json and the server's log "
                        "(default: benchmarks/results/DATE-cpu|gpu-batch[-quick])")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.max_tokens, args.ttft_samples, args.batch_lines = 8, 16, 4, 20
    if args.url:
        args.url = args.url.rstrip("/").removesuffix("/v1")
    if args.out is None:
        device = "gpu" if shutil.which("nvidia-smi") else "cpu"
        args.out = Path("benchmarks/results") / f"{date.today().isoformat()}-{device}-batch{'-quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"== machine: {os.cpu_count()} cores; {args.prompts} prompts of {args.max_tokens} tokens; "
          f"batch concurrency {args.batch_concurrency}", flush=True)
    if args.url:
        results = asyncio.run(measure(args.url, args))
    else:
        with tempfile.TemporaryDirectory(prefix="llm-service-batch-") as scratch:
            port = free_port()
            cmd = [sys.executable, "-m", "server", "serve", "--engine", args.engine, "--host", "127.0.0.1",
                   "--port", str(port), "--embedding-model", "none", "--batch-concurrency", str(args.batch_concurrency),
                   "--database-url", f"sqlite:///{scratch}/requests.sqlite3", "--files-dir", f"{scratch}/files",
                   *args.server_args.split()]
            server = ServerProcess(cmd, port, args.out / "llm-service.log", name="llm-service")
            try:
                started = time.monotonic()
                server.wait_ready(args.start_timeout)
                print(f"== llm-service: ready in {time.monotonic() - started:.0f}s", flush=True)
                results = asyncio.run(measure(server.url, args))
            finally:
                server.stop()
    md = report(args, results)
    settings = {k: str(v) for k, v in vars(args).items() if k != "api_key"} | {"cores": os.cpu_count()}
    (args.out / "results.md").write_text(md)
    (args.out / "results.json").write_text(json.dumps({"settings": settings, **results}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
