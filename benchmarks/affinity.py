"""Cache affinity across replicas: multi-turn chats through our nginx (deploy/nginx.conf) in front
of several replicas, with and without the X-Session-Id header it routes on.

    python -m benchmarks.affinity --engine vllm --out benchmarks/results/2026-12-03-cpu-smollm2-affinity
    python -m benchmarks.affinity --engine transformers --conversations 2 --out /tmp/affinity

Each of --conversations chats has a system prompt of ~200 tokens and --turns turns: a turn sends
the whole history plus a new question (temperature 0, --max-tokens per answer). The chats run
at once, each in its own thread, one turn after another, as users would: without a header
nginx's least-connections choice sends each turn wherever fewer requests are open. Reported per mode: the
cache-hit ratio (cached prompt tokens / prompt tokens, over turns 2 and later: turn 1 has no
history), which replicas each chat touched, and TTFT (streamed, p50 by turn).

Both modes run on the same replicas, one after the other, with different system prompts (a
second run cannot hit the first one's cache).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import httpx

from benchmarks.servers import Gateway, ServerProcess, free_port

MODEL = "smollm2-135m-instruct"
QUESTIONS = ("name a prime number above {n}.", "say why it is prime.", "give one more above {m}.",
             "compare the two.", "sum them up in a sentence.", "name a square number.", "say which is larger.")


@dataclass
class Turn:
    replica: str
    prompt_tokens: int
    cached_tokens: int
    ttft_ms: float


@dataclass
class Chat:
    session: str | None
    messages: list[dict[str, str]]
    turns: list[Turn] = field(default_factory=list)


def new_chat(index: int, mode: str, with_session: bool) -> Chat:
    system = (f"You are tutor {index} of the {mode} group. Answer briefly and exactly. "
              + "Keep to numbers and plain words. " * 18)
    return Chat(f"chat-{uuid.uuid4().hex}" if with_session else None, [{"role": "system", "content": system}])


def turn(client: httpx.Client, gateway: Gateway, chat: Chat, number: int, max_tokens: int,
         headers: dict[str, str] | None = None) -> Turn:
    """One streamed turn of `chat` through the gateway; the answer joins its history."""
    question = QUESTIONS[number % len(QUESTIONS)].format(n=10 * number, m=10 * number + 50)
    chat.messages.append({"role": "user", "content": f"Question {number + 1}: {question}"})
    request_id = f"affinity-{uuid.uuid4().hex[:16]}"
    sent = {**(headers or {}), "X-Request-Id": request_id, **({"X-Session-Id": chat.session} if chat.session else {})}
    body = {"model": MODEL, "messages": chat.messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    with client.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers=sent) as r:
        if r.status_code != 200:
            raise RuntimeError(f"turn {number + 1}: {r.status_code} {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(choice["delta"]["content"])
            usage = event.get("usage") or usage
    chat.messages.append({"role": "assistant", "content": "".join(text)})
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    done = Turn(gateway.upstreams([request_id])[0], usage["prompt_tokens"], cached,
                ((first or time.perf_counter()) - started) * 1000)
    chat.turns.append(done)
    return done


def run_mode(client: httpx.Client, gateway: Gateway, mode: str, conversations: int, turns: int,
             max_tokens: int, headers: dict[str, str] | None = None, together: bool = True) -> list[Chat]:
    """`together`: each chat runs its turns in its own thread, all at once (as users do); else
    turn 1 of each chat, then turn 2 of each, ..., one request at a time."""
    chats = [new_chat(i, mode, with_session=mode == "affinity") for i in range(conversations)]
    if together:
        def talk(chat: Chat) -> None:
            for number in range(turns):
                turn(client, gateway, chat, number, max_tokens, headers)

        with ThreadPoolExecutor(len(chats)) as pool:
            list(pool.map(talk, chats))
        return chats
    for number in range(turns):
        for chat in chats:
            turn(client, gateway, chat, number, max_tokens, headers)
    return chats


def summary(chats: list[Chat]) -> dict[str, Any]:
    later = [t for c in chats for t in c.turns[1:]]
    by_turn = [statistics.median(c.turns[i].ttft_ms for c in chats) for i in range(len(chats[0].turns))]
    return {
        "hit_ratio": sum(t.cached_tokens for t in later) / max(sum(t.prompt_tokens for t in later), 1),
        "replicas_per_chat": [len({t.replica for t in c.turns}) for c in chats],
        "ttft_p50_ms_by_turn": [round(x, 1) for x in by_turn],
        "chats": [[asdict(t) for t in c.turns] for c in chats],
    }


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    lines = [f"# Cache affinity: {args.replicas} replicas ({args.engine}) behind deploy/nginx.conf", "",
             f"{args.conversations} chats x {args.turns} turns, {args.max_tokens} tokens per answer, "
             f"the chats at once (each its turns in order), {date.today().isoformat()}.", "",
             "| routing | cache hits (turns 2+) | replicas per chat | TTFT p50 by turn (ms) |", "|---|---|---|---|"]
    names = {"affinity": "X-Session-Id (consistent hash)", "none": "no header (least connections)"}
    for mode, r in results.items():
        lines.append(f"| {names[mode]} | {r['hit_ratio']:.0%} | {', '.join(map(str, r['replicas_per_chat']))} "
                     f"| {' / '.join(f'{x:.0f}' for x in r['ttft_p50_ms_by_turn'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.affinity", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default="vllm", choices=("vllm", "transformers"))
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    folder = Path(tempfile.mkdtemp(prefix="affinity-"))
    engine_args = ["--enforce-eager", "--kv-cache-space", "1"] if args.engine == "vllm" else ["--kv-cache-space", "1"]
    replicas = []
    gateway = None
    try:
        for i in range(args.replicas):
            port = free_port()
            replicas.append(ServerProcess(
                [sys.executable, "-m", "server", "serve", "--engine", args.engine, *engine_args, "--port", str(port),
                 "--host", "127.0.0.1", "--embedding-model", "none", "--database-url", f"sqlite:///{folder}/r{i}.db"],
                port, folder / f"replica-{i}.log", name=f"replica-{i}"))
            replicas[-1].wait_ready()  # one at a time: two cold starts on two cores fight
        gateway = Gateway(nginx, [r.port for r in replicas], folder / "nginx")
        results: dict[str, dict[str, Any]] = {}
        with httpx.Client(timeout=600) as client:
            for mode in ("affinity", "none"):
                results[mode] = summary(run_mode(client, gateway, mode, args.conversations, args.turns, args.max_tokens))
                print(f"{mode}: cache hits {results[mode]['hit_ratio']:.0%}, replicas per chat "
                      f"{results[mode]['replicas_per_chat']}", flush=True)
    finally:
        if gateway is not None:
            gateway.stop()
        for r in replicas:
            r.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results}, indent=1))
    text = report(args, results)
    (args.out / "summary.md").write_text(text)
    print(text)
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
