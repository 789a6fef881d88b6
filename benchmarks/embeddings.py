"""Embeddings/s: our server's /v1/embeddings against sentence-transformers in-process, on the same
model (all-MiniLM-L6-v2), seeded texts and machine; and what embedding traffic does to chat streams.

    python -m benchmarks.embeddings --engine auto --server-args=--enforce-eager \
        --out benchmarks/results/2026-11-24-cpu-minilm-embeddings            # what `make serve` runs
    python -m benchmarks.embeddings --engine vllm --out benchmarks/results/2026-11-24-cpu-minilm-embeddings-vllm-pooling
    python -m benchmarks.embeddings --engine vllm --server-args="--enforce-eager" --quick --out /tmp/emb
    python -m benchmarks.embeddings --peer-only --quick      # the peer alone: one JSON line

The peer gets as many torch threads as vLLM's CPU worker gets cores (one: vLLM keeps the other for
its front end; `--peer-threads 2` gives it the whole box) and runs in a process of its own, so its
torch settings are its own. Batch 1: one text per call, one after another; batch 32: 32 texts per
call; concurrency C: C clients sending one text each at once (the server batches them; the library
cannot, so its comparable figure is its batch-1 rate). Chat: 4 streams of 64 tokens alone, then
beside the concurrency-C embedding load; every stream must run to its length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai

from benchmarks.load import WORDS
from benchmarks.servers import ServerProcess, free_port

EMBED, CHAT = "all-minilm-l6-v2", "smollm2-135m-instruct"
SINGLES = 128  # batch 1 sends the first this many texts, one per call
CHAT_STREAMS, CHAT_TOKENS = 4, 64


def corpus(n: int, seed: int = 0) -> list[str]:
    """n seeded sentences of 10-60 words: the same texts for every measurement."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))).capitalize() + "."
            for _ in range(n)]


def peer(texts: list[str], threads: int) -> dict[str, Any]:
    """sentence-transformers in this process, on `threads` torch threads."""
    import torch
    from sentence_transformers import SentenceTransformer

    from server.models import default_embedding_folder

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(default_embedding_folder()), device="cpu")
    model.encode(texts[:32], batch_size=32)  # warm-up
    singles = texts[:SINGLES]
    start = time.perf_counter()
    for t in singles:
        model.encode([t], batch_size=1)
    batch1 = len(singles) / (time.perf_counter() - start)
    start = time.perf_counter()
    vectors = model.encode(texts, batch_size=32)
    batch32 = len(texts) / (time.perf_counter() - start)
    return {"batch 1": batch1, "batch 32": batch32, "threads": torch.get_num_threads(),
            "texts": len(texts), "dims": int(vectors.shape[1])}


async def concurrent_load(embed: Any, texts: list[str], clients: int, stop: asyncio.Event | None) -> float:
    """`clients` workers sending one text per request: the corpus once, or, with `stop`, round
    and round until it is set. Returns embeddings/s."""
    queue = list(reversed(texts))
    done = 0

    async def worker() -> None:
        nonlocal done
        while queue and not (stop is not None and stop.is_set()):
            await embed([queue.pop()])
            done += 1
            if stop is not None and not queue:
                queue.extend(reversed(texts))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done / (time.perf_counter() - started)


async def chat_streams(client: openai.AsyncOpenAI) -> dict[str, float]:
    """CHAT_STREAMS concurrent streams of CHAT_TOKENS tokens: mean inter-token latency (pooled
    over every gap), output tokens/s, and how many ran to their length."""
    async def one(i: int) -> tuple[list[float], int, bool]:
        stream = await client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": f"Tell me about rivers, part {i}."}],
            max_tokens=CHAT_TOKENS, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        stamps: list[float] = []
        tokens, finished = 0, False
        async for chunk in stream:
            if chunk.choices:
                if chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter())
                finished = finished or chunk.choices[0].finish_reason == "length"
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)], tokens, finished

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(CHAT_STREAMS)))
    wall = time.perf_counter() - start
    gaps = [g for r in results for g in r[0]]
    return {"itl_ms": 1000 * statistics.fmean(gaps) if gaps else float("nan"),
            "tokens_per_s": sum(r[1] for r in results) / wall, "completed": sum(r[2] for r in results)}


async def ours(base_url: str, texts: list[str], concurrency: int) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)

    async def embed(batch: list[str]) -> None:
        r = await client.embeddings.create(model=EMBED, input=batch, encoding_format="float")
        assert len(r.data) == len(batch)

    await embed(texts[:32])  # warm-up
    await client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    out: dict[str, Any] = {}
    singles = texts[:SINGLES]
    start = time.perf_counter()
    for t in singles:
        await embed([t])
    out["batch 1"] = len(singles) / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, len(texts), 32):
        await embed(texts[i:i + 32])
    out["batch 32"] = len(texts) / (time.perf_counter() - start)
    out[f"concurrency {concurrency}"] = await concurrent_load(embed, texts, concurrency, None)
    out["chat alone"] = await chat_streams(client)
    stop = asyncio.Event()
    load = asyncio.create_task(concurrent_load(embed, texts, concurrency, stop))
    await asyncio.sleep(1)  # the embedding load in flight before the chats start
    out["chat beside embeddings"] = await chat_streams(client)
    stop.set()
    out["embeddings beside chat"] = await load
    await client.close()
    return out


def run_peer(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.embeddings", "--peer-only", "--texts", str(args.texts),
           "--seed", str(args.seed), "--peer-threads", str(args.peer_threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the peer failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def report(args: argparse.Namespace, mine: dict[str, Any], theirs: dict[str, Any]) -> str:
    c = f"concurrency {args.concurrency}"
    lines = [
        f"# Embeddings: llm-service ({args.engine} engine) vs sentence-transformers in-process", "",
        f"all-MiniLM-L6-v2 ({theirs['dims']} dims); {args.texts} seeded texts of 10-60 words (seed "
        f"{args.seed}); {os.cpu_count()} cores; the peer on {theirs['threads']} torch thread(s); "
        f"server flags: `{args.server_args or '-'}`. Batch 1 uses the first {min(SINGLES, args.texts)} texts; "
        f"the peer's figure for concurrency is its batch-1 rate (it cannot batch separate callers).", "",
        "| load | llm-service emb/s | sentence-transformers emb/s | ratio |", "|---|---|---|---|",
    ]
    for ours_key, peer_key in (("batch 1", "batch 1"), ("batch 32", "batch 32"), (c, "batch 1")):
        a, b = mine[ours_key], theirs[peer_key]
        lines.append(f"| {ours_key} | {a:.1f} | {b:.1f} ({peer_key}) | {a / b:.2f}x |")
    alone, beside = mine["chat alone"], mine["chat beside embeddings"]
    lines += [
        "", f"| {CHAT_STREAMS} chat streams, {CHAT_TOKENS} tokens | mean ITL ms | output tok/s | ran to length |",
        "|---|---|---|---|",
        f"| alone | {alone['itl_ms']:.1f} | {alone['tokens_per_s']:.1f} | {alone['completed']}/{CHAT_STREAMS} |",
        f"| beside {args.concurrency} embedding clients ({mine['embeddings beside chat']:.1f} emb/s) | "
        f"{beside['itl_ms']:.1f} | {beside['tokens_per_s']:.1f} | {beside['completed']}/{CHAT_STREAMS} |",
        "", f"Under embedding load, chat ITL is {beside['itl_ms'] / alone['itl_ms']:.2f}x and chat tok/s "
        f"{beside['tokens_per_s'] / alone['tokens_per_s']:.2f}x their values alone.", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"],
                   help="our engine (auto: vLLM for chat; for embeddings vLLM on a GPU, transformers on CPU)")
    p.add_argument("--texts", type=int, default=512, help="corpus size (--quick: 64)")
    p.add_argument("--quick", action="store_true", help="64 texts: a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=16, help="embedding clients at once")
    p.add_argument("--peer-threads", type=int, default=1, choices=[1, 2],
                   help="torch threads for sentence-transformers (1 = vLLM's CPU worker's share)")
    p.add_argument("--server-args", default="", help="extra `llm-service serve` flags, as one string")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--peer-only", action="store_true", help="measure the peer alone, print it as JSON")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.texts = 64
    texts = corpus(args.texts, args.seed)
    if args.peer_only:
        print(json.dumps(peer(texts, args.peer_threads)))
        return 0
    if args.out is None:
        p.error("--out is required (unless --peer-only)")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"== machine: {os.cpu_count()} cores; engine {args.engine}; peer on {args.peer_threads} torch thread(s)")
    theirs = run_peer(args)
    print(f"== sentence-transformers: {theirs}")
    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve", "--engine", args.engine, "--host", "127.0.0.1",
           "--port", str(port), "--embedding-model", "default", *args.server_args.split()]
    server = ServerProcess(cmd, port, args.out / "llm-service.log", name="llm-service")
    try:
        started = time.monotonic()
        server.wait_ready(args.start_timeout)
        print(f"== llm-service: ready in {time.monotonic() - started:.0f}s")
        mine = asyncio.run(ours(server.base_url, texts, args.concurrency))
    finally:
        server.stop()
    md = report(args, mine, theirs)
    settings = {k: str(v) for k, v in vars(args).items()} | {"cores": os.cpu_count()}
    (args.out / "results.md").write_text(md)
    (args.out / "results.json").write_text(json.dumps(
        {"settings": settings, "llm-service": mine, "sentence-transformers": theirs}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
