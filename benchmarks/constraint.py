"""What grammar-constrained decoding costs: output tokens/s at one concurrency with free requests
(held to their length by min_tokens) against the same load whose answers must match a JSON Schema
(`response_format`) or be a required tool call, on each engine, in one run on one machine.

    python -m benchmarks.constraint --engines vllm,transformers --concurrency 16 \
        --out benchmarks/results/2026-11-23-cpu-smollm2-constraint

The grammars cannot end before max_tokens (an array of at least 100000 integers), so every answer
has the same length whatever its mode, and every prompt describes the tool (tool_choice "none"
where no call is asked for: the default template's fallback puts ~150 tokens of tool description
in the system turn), so the ratio is the cost of the grammar alone: compiling it once per
request, filling the token bitmask every step, and parsing calls. Modes are
interleaved (none, json, tools, none, ...) `--rounds` times after a discarded warm-up pass, and each
mode's median is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks import load
from benchmarks.compare import KV_GIB, MODEL_NAME
from benchmarks.servers import ServerProcess, free_port

MODES = ("none", "json", "tools")


def measure(engine: str, args: argparse.Namespace) -> dict[str, list[float]]:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve", "--engine", engine, "--model", str(args.model),
           "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--kv-cache-space", str(KV_GIB), *(["--enforce-eager"] if args.eager and engine == "vllm" else [])]
    server = ServerProcess(cmd, port, args.out / f"{engine}.log", name=engine)
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        started = time.monotonic()
        server.wait_ready(args.start_timeout)
        print(f"== {engine}: ready in {time.monotonic() - started:.0f}s", flush=True)
        # vLLM: one discarded pass per mode first, as it compiles each new batch shape on first use
        for round_ in range(-1 if engine == "vllm" else 0, args.rounds):
            for mode in MODES:
                largs = load.parser().parse_args([
                    "--base-url", server.base_url, "--model", MODEL_NAME, "--concurrency", str(args.concurrency),
                    "--requests", str(args.requests), "--warmup", "1", "--prompt-tokens", "100",
                    "--output-tokens", str(args.output_tokens), "--seed", str(args.seed + max(round_, 0)),
                    "--tokenizer", str(args.model), "--min-tokens", "--constraint", mode, "--describe-tools",
                ])
                report = asyncio.run(load.run(largs, args.concurrency))
                if report.ok != report.requests or set(report.output_token_counts) != {args.output_tokens}:
                    raise SystemExit(f"{engine} {mode}: {report.ok}/{report.requests} ok, lengths "
                                     f"{sorted(set(report.output_token_counts))}: not a like-for-like run")
                print(f"   {'warm-up' if round_ < 0 else f'round {round_ + 1}'} {mode:5s} "
                      f"{report.output_throughput:8.1f} output tok/s", flush=True)
                if round_ >= 0:
                    rates[mode].append(report.output_throughput)
        return rates
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="vllm,transformers")
    p.add_argument("--model", type=Path, default=None, help="the model folder (default: the default model's)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=48, help="requests per mode and round")
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eager", action="store_true", help="vLLM: --enforce-eager (starts faster, decodes slower)")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.model is None:
        from server import models
        from server.config import Settings

        args.model = models.resolve(Settings())
    args.out.mkdir(parents=True, exist_ok=True)
    results = {engine: measure(engine, args) for engine in args.engines.split(",")}
    lines = [f"# Cost of constrained decoding: {args.concurrency} streams, {args.output_tokens} output tokens, "
             f"{args.requests} requests per mode x {args.rounds} rounds (medians)", "",
             "| engine | free tok/s | json_schema tok/s | ratio | required tool call tok/s | ratio |",
             "|---|---|---|---|---|---|"]
    for engine, rates in results.items():
        free, js, tools = (statistics.median(rates[m]) for m in MODES)
        lines.append(f"| {engine} | {free:.0f} | {js:.0f} | {js / free:.2f}x | {tools:.0f} | {tools / free:.2f}x |")
    table = "\n".join(lines) + "\n"
    print(table)
    (args.out / "README.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
