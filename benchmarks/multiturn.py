"""What the prefix cache buys a chat: time to first token turn by turn, with and without it.

    python -m benchmarks.multiturn --out benchmarks/results/2026-12-03-cpu-smollm2-prefix-cache

Starts `llm-service serve` (the transformers engine by default) twice, with the prefix cache and
with `--no-enable-prefix-caching`, one after the other, and runs the same seeded conversations on
each, one at a time: a system prompt of a few hundred tokens, then `--turns` user messages, each
turn's prompt holding the whole history (the previous prompt, its answer, the new message).
Answers are greedy, so both servers see the same histories. Each turn's TTFT (streamed, from the
request to the first content) and `usage.prompt_tokens_details.cached_tokens` are reported as
medians over the conversations; the first conversation warms the server and is not counted.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import openai

from benchmarks.compare import KV_GIB, MODEL_NAME
from benchmarks.servers import ServerProcess, free_port

SYSTEM = (
    "You are the assistant of a travel agency. Be concise and friendly. When a traveller asks about a "
    "destination, name two or three places worth seeing, the best season to go, and one thing to avoid. "
    "Never invent prices, visa rules or opening hours: say you do not know and point to an official source. "
    "Prefer trains over flights for trips under five hours. Mention accessibility when it matters. "
)
PLACES = ["Lisbon", "Kyoto", "Cape Town", "Oaxaca", "Tallinn", "Hanoi", "Bergen", "Marrakech", "Quebec", "Hobart"]
ASKS = ["What should I see in {}?", "When is the best time to visit {}?", "How many days do I need for {}?",
        "What food should I try in {}?", "How do I get around {}?", "Is {} good for a family with kids?",
        "What should I avoid in {}?", "Which day trips can I take from {}?"]


def conversation(rng: random.Random, turns: int) -> list[str]:
    place = rng.choice(PLACES)
    return [ask.format(place) for ask in rng.sample(ASKS, turns)]


def chat(client: openai.OpenAI, questions: list[str], max_tokens: int) -> list[dict[str, Any]]:
    """One conversation: each turn's TTFT, prompt tokens, cached tokens and answer."""
    messages: list[Any] = [{"role": "system", "content": SYSTEM * 3}]
    turns = []
    for question in questions:
        messages.append({"role": "user", "content": question})
        start = time.perf_counter()
        ttft = None
        text = []
        usage = None
        stream = client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        assert usage is not None and ttft is not None
        details = usage.prompt_tokens_details
        answer = "".join(text)
        turns.append({"ttft_ms": ttft * 1000, "prompt_tokens": usage.prompt_tokens,
                      "cached_tokens": details.cached_tokens if details else None, "answer": answer})
        messages.append({"role": "assistant", "content": answer})
    return turns


def measure(label: str, flags: list[str], args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve", "--engine", args.engine, "--model", str(args.model),
           "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port), "--embedding-model", "none",
           "--kv-cache-space", str(KV_GIB), *flags]
    server = ServerProcess(cmd, port, args.out / f"{label}.log", name=label)
    try:
        server.wait_ready(args.start_timeout)
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)
        rng = random.Random(args.seed)
        runs = []
        for i in range(args.conversations + 1):  # the first one warms the server up
            turns = chat(client, conversation(rng, args.turns), args.max_tokens)
            print(f"   {label} conversation {i}: TTFT ms " + " ".join(f"{t['ttft_ms']:.0f}" for t in turns)
                  + ", cached " + " ".join(str(t["cached_tokens"]) for t in turns), flush=True)
            if i > 0:
                runs.append(turns)
        return runs
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="transformers", choices=["vllm", "transformers"])
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: the embedded default model)")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--conversations", type=int, default=3, help="measured conversations (after one warm-up)")
    p.add_argument("--max-tokens", type=int, default=64, help="longest answer per turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.model is None:
        from server import models
        from server.config import Settings

        args.model = models.resolve(Settings())
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"cache": measure("cache", [], args), "no-cache": measure("no-cache", ["--no-enable-prefix-caching"], args)}
    same = all(a["answer"] == b["answer"] for ca, cb in zip(results["cache"], results["no-cache"], strict=True)
               for a, b in zip(ca, cb, strict=True))

    def median(label: str, turn: int, key: str) -> float:
        return statistics.median(c[turn][key] or 0 for c in results[label])

    lines = [f"# Prefix cache, {args.engine} engine: a {args.turns}-turn chat ({MODEL_NAME}, greedy, answers up to "
             f"{args.max_tokens} tokens, medians of {args.conversations} conversations, seed {args.seed})", "",
             "| turn | prompt tokens | cached tokens | TTFT ms with cache | TTFT ms without | speed-up |",
             "|---|---|---|---|---|---|"]
    for turn in range(args.turns):
        on, off = median("cache", turn, "ttft_ms"), median("no-cache", turn, "ttft_ms")
        lines.append(f"| {turn + 1} | {median('cache', turn, 'prompt_tokens'):.0f} | "
                     f"{median('cache', turn, 'cached_tokens'):.0f} | {on:.0f} | {off:.0f} | {off / on:.2f}x |")
    lines += ["", f"Answers identical with and without the cache: {'yes' if same else 'no'}."]
    md = "\n".join(lines) + "\n"
    print(md)
    (args.out / "summary.md").write_text(md)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
