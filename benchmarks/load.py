"""Load generator for any OpenAI-compatible server: streams requests and reports what serving
people compare (throughput, TTFT, TPOT, inter-token latency, end-to-end latency, errors).

    python -m benchmarks.load --base-url http://localhost:8000/v1 --concurrency 16 --requests 64 \
        --prompt-tokens 128 --output-tokens 128 --json benchmarks/results/run.json

Every request streams (TTFT and inter-token latency need it). `max_tokens` is the output length;
`min_tokens` (a vLLM extension that forces the full length) is sent only with --min-tokens, so a
peer without it is still measured. Prompts are seeded random words and every request carries its
own seed, so two servers on the same engine are sent, and generate, the same text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm

WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book "
    "eye job word business issue side kind head house service friend father power hour game line"
).split()


@dataclass
class Sample:
    ok: bool
    status: int | None = None
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    itls: list[float] = field(default_factory=list)


@dataclass
class Report:
    base_url: str
    model: str
    concurrency: int | None
    rate: float | None
    requests: int
    duration_s: float
    ok: int
    errors: dict[str, int]
    request_throughput: float
    output_throughput: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    settings: dict[str, Any]
    # raw per-request values (seconds), for latency CDFs
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    # per-request token counts as the server reported them
    prompt_token_counts: list[int] = field(default_factory=list)
    output_token_counts: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Length:
    """A fixed length ("128") or a seeded uniform range ("64:256"), in tokens."""

    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)


def _length(text: str) -> Length:
    low, _, high = text.partition(":")
    try:
        length = Length(int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW:HIGH, not {text!r}") from None
    if length.low < 1 or length.high < length.low:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, not {text!r}")
    return length


class PromptMaker:
    """Seeded prompts of a given length: exact in tokens with the model's tokenizer (--tokenizer),
    else in words (about one token each for these common English words)."""

    def __init__(self, tokenizer_path: str | None) -> None:
        self.tok: Any = None
        if tokenizer_path:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(tokenizer_path)

    def make(self, rng: random.Random, tokens: int) -> str:
        head = "Write a long story that uses these words:"
        words = [rng.choice(WORDS) for _ in range(tokens)]
        if self.tok is None:
            return f"{head} {' '.join(words)}"
        ids = self.tok.encode(" " + " ".join(words), add_special_tokens=False)
        budget = max(1, tokens - len(self.tok.encode(head, add_special_tokens=False)))
        return head + str(self.tok.decode(ids[:budget]))


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    xs = sorted(values)

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000

    return {"mean": statistics.fmean(xs) * 1000, "p50": q(0.50), "p90": q(0.90), "p99": q(0.99)}


# --constraint: grammars no answer can complete before max_tokens, so constrained answers are
# exactly as long as free ones held to min_tokens (the throughput of the same work, masked or not)
ENDLESS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 100000}
CONSTRAINTS: dict[str, dict[str, Any]] = {
    "none": {},
    "json": {"response_format": {"type": "json_schema", "json_schema": {"name": "numbers", "schema": ENDLESS}}},
    "tools": {"tool_choice": "required"},
}
# the tool the tools mode calls; with --describe-tools every mode's prompt describes it (the
# fallback's system turn), so modes differ in their grammar alone, not in their prompts' length
TOOLS = [{"type": "function", "function": {"name": "record", "parameters": {
    "type": "object", "properties": {"values": ENDLESS}, "required": ["values"]}}}]


async def one_request(
    client: openai.AsyncOpenAI, args: argparse.Namespace, model: str, prompt: str, seed: int, max_tokens: int
) -> Sample:
    extra: dict[str, Any] = dict(CONSTRAINTS[args.constraint])
    if args.constraint == "tools" or args.describe_tools:
        extra = {"tools": TOOLS, "tool_choice": "none", **extra}
    if args.min_tokens and args.constraint == "none":
        extra["min_tokens"] = max_tokens
    start = time.perf_counter()
    last = start
    s = Sample(ok=False)
    try:
        stream: Any
        if args.route == "chat":
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=args.temperature, seed=seed, stream=True, stream_options={"include_usage": True},
                extra_body=extra or None,
            )
        else:
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=args.temperature,
                seed=seed, stream=True, stream_options={"include_usage": True}, extra_body=extra or None,
            )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                c = chunk.choices[0]
                if args.route == "chat":
                    calls = c.delta.tool_calls or []
                    piece = c.delta.content or "".join(t.function.arguments or "" for t in calls if t.function)
                else:
                    piece = c.text
                if piece:
                    if s.ttft is None:
                        s.ttft = now - start
                    else:
                        s.itls.append(now - last)
                    last = now
            if chunk.usage:
                s.output_tokens = chunk.usage.completion_tokens
                s.prompt_tokens = chunk.usage.prompt_tokens
        s.e2e = time.perf_counter() - start
        s.ok = True
        s.status = 200
    except openai.APIStatusError as e:
        s.status = e.status_code
    except openai.APIError:
        s.status = None
    return s


async def run(args: argparse.Namespace, concurrency: int | None) -> Report:
    """One load run at a fixed concurrency (or, with concurrency None, at --rate)."""
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=args.timeout)
    model = args.model or (await client.models.list()).data[0].id
    rng = random.Random(args.seed)
    maker = PromptMaker(args.tokenizer)
    drawn = 0

    def draw() -> tuple[str, int, int]:
        """The next request: prompt, max_tokens and its own seed (so two servers on the same
        engine generate the same text), drawn in order from the run's seed."""
        nonlocal drawn
        drawn += 1
        return maker.make(rng, args.prompt_tokens.draw(rng)), args.output_tokens.draw(rng), args.seed + drawn

    for _ in range(args.warmup):
        prompt, n, seed = draw()
        await one_request(client, args, model, prompt, seed, n)

    samples: list[Sample] = []
    total = None if args.duration else args.requests
    bar = tqdm(total=total, desc=f"{args.route} c={concurrency or '-'} rate={args.rate or '-'}", unit="req", leave=False)
    started = time.perf_counter()
    issued = 0

    def next_request() -> tuple[str, int, int] | None:
        nonlocal issued
        if args.duration is not None:
            if time.perf_counter() - started >= args.duration:
                return None
        elif issued >= args.requests:
            return None
        issued += 1
        return draw()

    async def send(item: tuple[str, int, int]) -> None:
        prompt, n, seed = item
        samples.append(await one_request(client, args, model, prompt, seed, n))
        bar.update(1)

    if concurrency:  # a fixed number of requests in flight
        async def worker() -> None:
            while (item := next_request()) is not None:
                await send(item)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:  # Poisson arrivals at --rate
        tasks = []
        while (item := next_request()) is not None:
            tasks.append(asyncio.create_task(send(item)))
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.gather(*tasks)
    duration = time.perf_counter() - started
    bar.close()
    await client.close()

    ok = [s for s in samples if s.ok]
    tpots = [(s.e2e - s.ttft) / (s.output_tokens - 1) for s in ok if s.e2e and s.ttft and s.output_tokens > 1]
    return Report(
        base_url=args.base_url, model=model, concurrency=concurrency, rate=args.rate,
        requests=len(samples), duration_s=duration, ok=len(ok),
        errors=dict(Counter(str(s.status) for s in samples if not s.ok)),
        request_throughput=len(ok) / duration,
        output_throughput=sum(s.output_tokens for s in ok) / duration,
        ttft_ms=_pcts([s.ttft for s in ok if s.ttft is not None]),
        tpot_ms=_pcts(tpots),
        itl_ms=_pcts([x for s in ok for x in s.itls]),
        e2e_ms=_pcts([s.e2e for s in ok if s.e2e is not None]),
        settings={k: (asdict(v) if isinstance(v, Length) else v) for k, v in vars(args).items()
                  if k not in {"api_key", "json", "plot"}},
        ttft_s=[s.ttft for s in ok if s.ttft is not None],
        e2e_s=[s.e2e for s in ok if s.e2e is not None],
        prompt_token_counts=[s.prompt_tokens for s in ok],
        output_token_counts=[s.output_tokens for s in ok],
    )


def summary(r: Report) -> str:
    def row(name: str, d: dict[str, float]) -> str:
        return f"  {name:<5} " + "  ".join(f"{k} {v:8.1f}" for k, v in d.items()) + "  (ms)"

    load = f"concurrency={r.concurrency}" if r.concurrency else f"rate={r.rate}/s"
    return "\n".join([
        f"{r.base_url}  model={r.model}  {load}  requests={r.requests} ok={r.ok} errors={r.errors or 0}  in {r.duration_s:.1f}s",
        f"  throughput: {r.request_throughput:.2f} req/s, {r.output_throughput:.1f} output tok/s",
        row("TTFT", r.ttft_ms), row("TPOT", r.tpot_ms), row("ITL", r.itl_ms), row("E2E", r.e2e_ms),
    ])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://localhost:8000/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    p.add_argument("--route", choices=["chat", "completions"], default="chat")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=concurrency_levels, default=None,
                      help="requests in flight at once (default 16); a list such as 1,4,16 runs a sweep")
    load.add_argument("--rate", type=float, default=None, help="Poisson arrival rate, requests per second")
    p.add_argument("--requests", type=int, default=64, help="how many requests (unless --duration)")
    p.add_argument("--duration", type=float, default=None, help="send requests for this many seconds instead")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompt-tokens", type=_length, default=Length(100, 100),
                   help="prompt length: N or a seeded random LOW:HIGH (tokens with --tokenizer, else words)")
    p.add_argument("--output-tokens", type=_length, default=Length(128, 128),
                   help="max_tokens per request: N or a seeded random LOW:HIGH")
    p.add_argument("--tokenizer", default=None, help="the model's HF folder, for prompts exact in tokens")
    p.add_argument("--min-tokens", action="store_true", help="also send min_tokens=output-tokens (vLLM extension)")
    p.add_argument("--constraint", choices=list(CONSTRAINTS), default="none",
                   help="json: a json_schema response_format, tools: a required tool call; both grammars "
                        "cannot end before max_tokens, so answers are as long as free ones with --min-tokens")
    p.add_argument("--describe-tools", action="store_true",
                   help="send the tools mode's tool (with tool_choice none) in every mode: the same prompts")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", type=Path, default=None, help="write the report(s) here")
    p.add_argument("--plot", type=Path, default=None, help="write latency CDFs (and, for a sweep, "
                   "throughput and TTFT against concurrency) as PNG files into this folder")
    return p


def concurrency_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers, e.g. 1,4,16")
    return levels


def run_all(args: argparse.Namespace) -> list[Report]:
    """Every run the arguments ask for: one per concurrency level, or one at --rate."""
    levels: list[int | None] = list(args.concurrency) if args.concurrency else [None]
    if args.rate is None and not args.concurrency:
        levels = [16]
    return [asyncio.run(run(args, c)) for c in levels]


def main(argv: list[str] | None = None) -> list[Report]:
    args = parser().parse_args(argv)
    reports = run_all(args)
    for r in reports:
        print(summary(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(reports[0]) if len(reports) == 1 else {"runs": [asdict(r) for r in reports]}
        args.json.write_text(json.dumps(data, indent=1))
    if args.plot:
        from benchmarks import plots

        label = args.base_url
        for path in plots.latency_cdfs({label: reports}, args.plot / "latency-cdf.png"), plots.sweep(
            {label: reports}, args.plot / "sweep.png"
        ):
            if path:
                print(f"wrote {path}")
    return reports


if __name__ == "__main__":
    main()
