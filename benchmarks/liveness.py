"""/live latency while clients send the largest prompts the body cap allows (hostile load).

Starts a server (the Transformers engine unless --engine says otherwise), then for --seconds sends
--attackers concurrent streams of 1.2 MB prompts that must be tokenized to be found too long, and
probes /live every 50 ms; prints the probe latency percentiles against an idle server's.

    python -m benchmarks.liveness --engine transformers --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

from benchmarks.servers import ServerProcess, free_port

PROMPT = "hello " * 200_000  # 1.2 MB: under the 4 MiB cap and the characters-per-token bound


async def probe(url: str, seconds: float) -> list[float]:
    out: list[float] = []
    async with httpx.AsyncClient(timeout=30) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.monotonic()
            (await c.get(url + "/live")).raise_for_status()
            out.append((time.monotonic() - t) * 1000)
            await asyncio.sleep(0.05)
    return out


async def attack(url: str, seconds: float, model: str) -> int:
    sent = 0
    async with httpx.AsyncClient(timeout=120) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            r = await c.post(url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 1})
            assert r.status_code == 400, r.text
            sent += 1
    return sent


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def run(url: str, seconds: float, attackers: int, model: str) -> None:
    idle = await probe(url, min(seconds, 5))
    attacks = [asyncio.create_task(attack(url, seconds, model)) for _ in range(attackers)]
    busy = await probe(url, seconds)
    sent = sum(await asyncio.gather(*attacks))
    print("/live latency, ms        p50     p99     max   (probes)")
    print(f"idle                  {pct(idle, 50):6.1f}  {pct(idle, 99):6.1f}  {max(idle):6.1f}   ({len(idle)})")
    print(f"{attackers} attackers         {pct(busy, 50):6.1f}  {pct(busy, 99):6.1f}  {max(busy):6.1f}   ({len(busy)}); "
          f"{sent} prompts of {len(PROMPT) / 1e6:.1f} MB refused")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="transformers")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--attackers", type=int, default=3)
    p.add_argument("--url", help="an already running server instead of starting one")
    args = p.parse_args(argv)
    model = "smollm2-135m-instruct"
    if args.url:
        asyncio.run(run(args.url, args.seconds, args.attackers, model))
        return 0
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "server", "serve", "--engine", args.engine, "--host", "127.0.0.1",
                            "--port", str(port), "--enforce-eager"], port, Path("/tmp") / f"liveness-{port}.log",
                           name="liveness")
    try:
        server.wait_ready()
        asyncio.run(run(server.url, args.seconds, args.attackers, model))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
