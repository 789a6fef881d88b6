"""Our server against itself: start `llm-service serve` once per variant (its flags and environment
variables), run the same seeded load against each in turn, and print a table against the first.

    # CPU placement (issue 21): vLLM's own binding against ours, eager, 1 and 16 streams
    python -m benchmarks.variants --concurrency 1,16 --out benchmarks/results/2026-12-03-cpu-smollm2-placement \
        --variant "vllm's own=--cpu-placement default" --variant "auto (all cores)=--cpu-placement auto" \
        --variant "no reserved core=VLLM_CPU_NUM_OF_RESERVED_CPU=0 --cpu-placement default"

    # model parallelism (issue 20): one worker against two pipeline stages and three TP ranks
    python -m benchmarks.variants --concurrency 1,16 --out benchmarks/results/2026-12-03-cpu-smollm2-parallel \
        --variant "one worker=" --variant "PP 2=--pipeline-parallel-size 2" --variant "TP 3=--tensor-parallel-size 3"

    # speculative decoding on an answer that repeats its prompt
    python -m benchmarks.variants --workload echo --concurrency 1,16 --out benchmarks/results/2026-12-03-cpu-smollm2-ngram \
        --variant "plain=" --variant "ngram, 4 tokens=--speculative ngram --num-speculative-tokens 4"

A variant is NAME=ARGS; in ARGS, words of the form UPPER_NAME=value are environment variables, the
rest are `serve` flags (added to --common). `random` is load.py's workload (seeded prompts of random
words, a fixed answer length); `echo` asks, greedily, to repeat a paragraph word for word.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import openai

from benchmarks import load
from benchmarks.servers import ServerProcess, free_port

MODEL_NAME = "smollm2-135m-instruct"
ENV_WORD = re.compile(r"^[A-Z][A-Z0-9_]*=")
ECHO_TEXT = (
    "The server speaks the OpenAI API and runs each model on one of two engines. A request goes through "
    "a gate, which checks its key and records it, then through the pipeline, which renders the prompt, "
    "checks its limits and waits for a slot in the engine. The engine streams tokens back, and the "
    "server frames them as server-sent events until the answer ends or the client leaves."
)


@dataclass
class Row:
    variant: str
    workload: str
    concurrency: int
    requests: int
    ok: int
    output_tok_s: float
    ttft_p50_ms: float
    tpot_p50_ms: float


def variant(text: str) -> tuple[str, dict[str, str], list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a variant is NAME=ARGS, not {text!r}")
    words = shlex.split(rest)
    env = dict(w.split("=", 1) for w in words if ENV_WORD.match(w))
    return name, env, [w for w in words if not ENV_WORD.match(w)]


async def echo(base_url: str, concurrency: int, requests: int, seed: int) -> Row:
    """Greedy answers to 'repeat this': what prompt lookup proposes well."""
    args = load.parser().parse_args(["--base-url", base_url, "--temperature", "0"])
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    rng = random.Random(seed)
    sentences = ECHO_TEXT.split(". ")

    def prompt() -> str:
        rng.shuffle(sentences)  # the same paragraph in another order: each prompt its own text
        return "Repeat this text exactly, word for word:\n\n" + ". ".join(sentences)

    await load.one_request(client, args, MODEL_NAME, prompt(), seed, 160)  # warm-up
    queue = [prompt() for _ in range(requests)]
    samples: list[load.Sample] = []

    async def worker() -> None:
        while queue:
            samples.append(await load.one_request(client, args, MODEL_NAME, queue.pop(), seed, 160))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration = time.perf_counter() - started
    await client.close()
    ok = [s for s in samples if s.ok and s.ttft is not None and s.e2e is not None]
    tpots = [(s.e2e - s.ttft) / (s.output_tokens - 1) for s in ok if s.e2e and s.ttft and s.output_tokens > 1]
    return Row("", "echo", concurrency, len(samples), len(ok), sum(s.output_tokens for s in ok) / duration,
               1000 * statistics.median(s.ttft for s in ok if s.ttft is not None) if ok else 0.0,
               1000 * statistics.median(tpots) if tpots else 0.0)


def measure(name: str, env: dict[str, str], flags: list[str], args: argparse.Namespace) -> list[Row]:
    port = free_port()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    cmd = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port), "--embedding-model",
           "none", "--database-url", f"sqlite:///{Path(tempfile.gettempdir()) / f'llm-service-variant-{slug}-{port}.requests.db'}", *shlex.split(args.common), *flags]
    server = ServerProcess(cmd, port, args.out / f"{slug}.log", name=name, env=env)
    rows = []
    try:
        started = time.monotonic()
        server.wait_ready(args.start_timeout)
        print(f"== {name}: ready in {time.monotonic() - started:.0f}s")
        for c in args.concurrency:
            requests = max(4, args.rounds * c)
            if args.workload == "echo":
                row = asyncio.run(echo(server.base_url, c, requests, args.seed))
            else:
                largs = load.parser().parse_args([
                    "--base-url", server.base_url, "--model", MODEL_NAME, "--concurrency", str(c),
                    "--requests", str(requests), "--warmup", "2", "--prompt-tokens", str(args.prompt_tokens),
                    "--output-tokens", str(args.output_tokens), "--seed", str(args.seed), "--min-tokens",
                ])
                r = asyncio.run(load.run(largs, c))
                row = Row("", "random", c, r.requests, r.ok, r.output_throughput, r.ttft_ms.get("p50", 0.0),
                          r.tpot_ms.get("p50", 0.0))
            row.variant = name
            print(f"   c={c}: {row.output_tok_s:.1f} tok/s, TTFT p50 {row.ttft_p50_ms:.0f} ms, "
                  f"TPOT p50 {row.tpot_p50_ms:.1f} ms ({row.ok}/{row.requests} ok)")
            rows.append(row)
        return rows
    finally:
        server.stop()


def table(rows: list[Row]) -> str:
    base = {r.concurrency: r for r in rows if r.variant == rows[0].variant}
    lines = ["| variant | concurrency | output tok/s | vs first | TTFT p50 ms | vs first | TPOT p50 ms | vs first |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r.concurrency)
        first = (b.output_tok_s, b.ttft_p50_ms, b.tpot_p50_ms) if b else (0.0, 0.0, 0.0)
        got = (r.output_tok_s, r.ttft_p50_ms, r.tpot_p50_ms)
        ratios = [f"{a / f:.2f}x" if a and f else "-" for a, f in zip(got, first, strict=True)]
        lines.append(f"| {r.variant} | {r.concurrency} | {r.output_tok_s:.1f} | {ratios[0]} | {r.ttft_p50_ms:.0f} | "
                     f"{ratios[1]} | {r.tpot_p50_ms:.1f} | {ratios[2]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", type=variant, action="append", required=True, help="NAME=ARGS (repeat)")
    p.add_argument("--common", default="--engine vllm --enforce-eager --kv-cache-space 1 --max-model-len 2048",
                   help="flags every variant gets")
    p.add_argument("--workload", choices=["random", "echo"], default="random")
    p.add_argument("--concurrency", type=load.concurrency_levels, default=[1, 16])
    p.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x concurrency (at least 4)")
    p.add_argument("--prompt-tokens", default="100")
    p.add_argument("--output-tokens", default="128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for name, env, flags in args.variant:
        try:
            rows += measure(name, env, flags, args)
        except Exception as e:  # one variant failing must not lose the others' figures
            print(f"== {name} failed: {type(e).__name__}: {e}")
    if not rows:
        return 1
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    md = (f"# llm-service variants ({args.workload} workload)\n\nCommon flags: `{args.common}`. Variants: "
          + "; ".join(f"{n}: `{' '.join([*(f'{k}={v}' for k, v in e.items()), *f]) or '(none)'}`"
                      for n, e, f in args.variant)
          + f"\n\nRequests per level: {args.rounds} x concurrency (at least 4); ratios are against the first "
            "variant (throughput: higher is better; TTFT and TPOT: lower is better).\n\n" + table(rows) + "\n")
    (args.out / "summary.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
