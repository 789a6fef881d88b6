"""PNG plots of load reports: latency CDFs, and throughput / TTFT against concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.load import Report


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _label(ax: Any, title: str, xlabel: str, ylabel: str, legend_size: int) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_cdfs(runs: dict[str, list[Report]], path: Path) -> Path:
    """TTFT and end-to-end latency CDFs, one line per server and load level."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, reports in runs.items():
        for r in reports:
            name = f"{label} c={r.concurrency}" if r.concurrency else f"{label} rate={r.rate}"
            for ax, values in ((axes[0], r.ttft_s), (axes[1], r.e2e_s)):
                xs = sorted(values)
                if xs:
                    ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
    for ax, title in zip(axes, ("time to first token", "end-to-end latency"), strict=True):
        _label(ax, title, "seconds", "fraction of requests", legend_size=7)
    return _save(plt, fig, path)


def sweep(runs: dict[str, list[Report]], path: Path) -> Path | None:
    """Output tokens/s and TTFT p50 against concurrency; None when no run swept concurrency."""
    if not any(len([r for r in rs if r.concurrency]) > 1 for rs in runs.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, reports in runs.items():
        swept = sorted((r for r in reports if r.concurrency), key=lambda r: r.concurrency or 0)
        cs = [r.concurrency for r in swept]
        axes[0].plot(cs, [r.output_throughput for r in swept], marker="o", label=label)
        axes[1].plot(cs, [r.ttft_ms.get("p50", 0) / 1000 for r in swept], marker="o", label=label)
    for ax, title, unit in zip(axes, ("output throughput", "TTFT p50"), ("tokens/s", "seconds"), strict=True):
        ax.set_xscale("log", base=2)
        _label(ax, title, "concurrent requests", unit, legend_size=8)
    return _save(plt, fig, path)
