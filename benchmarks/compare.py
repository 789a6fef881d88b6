"""Us against peers: start each server on the same model and machine, one after the other, run the
identical seeded load against each, and write a Markdown table of ratios, plots and raw JSON.

    python -m benchmarks.compare --peers vllm,transformers --concurrency 1,4,16 \
        --out benchmarks/results/2026-11-21-cpu-smollm2-compare

    # our Transformers engine against `transformers serve --continuous-batching`
    python -m benchmarks.compare --engine transformers --peers transformers --concurrency 1,4,16 \
        --out benchmarks/results/2026-11-21-cpu-smollm2-transformers

Peers: `vllm` is vLLM's own OpenAI server on the same engine settings (on CPU: the same KV cache
size and, like ours, no chunked prefill), with its own placement of threads on cores;
`vllm-placed` is the same server given the placement ours chooses (`--cpu-placement auto`: the
VLLM_CPU_* variables it would set), so the two rows say how much of a gain is placement and how
much is ours; `transformers` is `transformers serve
--continuous-batching`. Each level sends `--rounds` x concurrency requests (at least 4).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import load, plots
from benchmarks.servers import ServerProcess, free_port

MODEL_NAME = "smollm2-135m-instruct"
KV_GIB = 4


def commands(model_path: Path, port: int, ours_args: list[str], eager: bool = False) -> dict[str, list[str]]:
    transformers_cli = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    eager_flag = ["--enforce-eager"] if eager else []
    return {
        "llm-service": [sys.executable, "-m", "server", "serve", "--model", str(model_path),
                        "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
                        "--kv-cache-space", str(KV_GIB), *eager_flag, *ours_args],
        "vllm": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
                 "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
                 "--kv-cache-memory-bytes", str(KV_GIB << 30), "--no-enable-chunked-prefill", *eager_flag],
        "transformers": [transformers_cli, "serve", str(model_path), "--continuous-batching",
                         "--host", "127.0.0.1", "--port", str(port)],
    }


def placed_environment() -> dict[str, str]:
    """The variables `--cpu-placement auto` gives vLLM's worker on this machine."""
    from server.config import Settings
    from server.engines.vllm_engine import cpu_placement

    return cpu_placement(Settings(), {})


def measure(name: str, cmd: list[str], port: int, args: argparse.Namespace,
            env: dict[str, str] | None = None) -> list[load.Report]:
    server = ServerProcess(cmd, port, args.out / f"{name}.log", name=name, env=env)
    try:
        started = time.monotonic()
        server.wait_ready(args.start_timeout)
        print(f"== {name}: ready in {time.monotonic() - started:.0f}s")
        reports = []
        for c in args.concurrency:
            # transformers serve names a local model by its path, and its /v1/models fails when no
            # Hugging Face cache folder exists, so every server is told the model explicitly
            model = str(args.model) if name == "transformers" else MODEL_NAME
            largs = load.parser().parse_args([
                "--base-url", f"http://127.0.0.1:{port}/v1", "--model", model, "--concurrency", str(c),
                "--requests", str(max(4, args.rounds * c)), "--warmup", "2",
                "--prompt-tokens", str(args.prompt_tokens), "--output-tokens", str(args.output_tokens),
                "--seed", str(args.seed), "--tokenizer", str(args.model),
                *(["--min-tokens"] if name != "transformers" else []),
            ])
            report = asyncio.run(load.run(largs, c))
            print(load.summary(report))
            reports.append(report)
        return reports
    finally:
        server.stop()


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(results: dict[str, list[load.Report]]) -> str:
    ours = {r.concurrency: r for r in results["llm-service"]}
    lines = [
        "| peer | concurrency | output tok/s: ours / peer | ratio | TTFT p50 ms: ours / peer | ratio | TPOT p50 ms: ours / peer | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for peer, reports in results.items():
        if peer == "llm-service":
            continue
        for p in reports:
            o = ours.get(p.concurrency)
            if o is None:
                continue
            lines.append(
                f"| {peer} | {p.concurrency} | {o.output_throughput:.1f} / {p.output_throughput:.1f} | "
                f"{ratio(o.output_throughput, p.output_throughput)} | "
                f"{o.ttft_ms.get('p50', 0):.0f} / {p.ttft_ms.get('p50', 0):.0f} | "
                f"{ratio(o.ttft_ms.get('p50'), p.ttft_ms.get('p50'))} | "
                f"{o.tpot_ms.get('p50', 0):.1f} / {p.tpot_ms.get('p50', 0):.1f} | "
                f"{ratio(o.tpot_ms.get('p50'), p.tpot_ms.get('p50'))} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", default="vllm", help="comma list of: vllm, vllm-placed, transformers")
    p.add_argument("--concurrency", type=load.concurrency_levels, default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=4, help="requests per level = rounds x concurrency")
    p.add_argument("--prompt-tokens", default="100", help="N or LOW:HIGH tokens")
    p.add_argument("--output-tokens", default="128", help="N or LOW:HIGH tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: the embedded default model)")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"], help="our engine")
    p.add_argument("--ours-args", default="", help="extra `llm-service serve` flags, as one string")
    p.add_argument("--enforce-eager", action="store_true", help="both vLLM servers without torch.compile (fast starts)")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from server import models
        from server.config import Settings

        args.model = models.resolve(Settings())
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    results: dict[str, list[load.Report]] = {}
    for name in [*peers, "llm-service"]:  # the peers first: ours runs last, on a machine no cooler
        port = free_port()
        ours = ["--engine", args.engine, *args.ours_args.split()]
        cmd = commands(args.model, port, ours, args.enforce_eager)["vllm" if name == "vllm-placed" else name]
        env = placed_environment() if name == "vllm-placed" else None
        if env is not None:
            print(f"== {name}: {' '.join(f'{k}={v}' for k, v in env.items()) or 'vLLM placement unchanged'}")
        try:
            results[name] = measure(name, cmd, port, args, env)
        except Exception as e:  # one peer failing must not lose the others' figures
            print(f"== {name} failed: {type(e).__name__}: {e} (see {args.out / (name + '.log')})")
    if "llm-service" not in results:
        return 1
    (args.out / "results.json").write_text(json.dumps({k: [asdict(r) for r in v] for k, v in results.items()}, indent=1))
    plots.latency_cdfs(results, args.out / "latency-cdf.png")
    plots.sweep(results, args.out / "sweep.png")
    md = (
        f"# llm-service ({args.engine} engine) vs {', '.join(peers)}\n\nModel {MODEL_NAME}; {args.prompt_tokens}-token prompts, "
        f"{args.output_tokens} output tokens, seed {args.seed}; ratio = ours / peer (throughput: higher is "
        "better; TTFT and TPOT: lower is better).\n\n" + table(results) + "\n\n![sweep](sweep.png)\n![latency](latency-cdf.png)\n"
    )
    (args.out / "summary.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
