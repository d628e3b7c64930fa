"""PNG plots of a report.json (matplotlib, Agg backend; no display needed).

Each plot is drawn when its data is in the report, and skipped (with a note) when it is not:

    time_breakdown.png   stacked bars of time per op, one bar per phase   report["breakdown"]
    memory_per_step.png  bytes per KV tier over decode steps             report["memory_per_step"]
    throughput_vs_batch.png  total tok/s vs batch size, one line per policy  report["runs"]
    predicted_vs_measured.png  predicted vs measured total tok/s          report["runs"]

Report keys: breakdown = {"by_op": {op: seconds}, "by_phase": {phase: seconds}};
memory_per_step = [{"step": i, tier: bytes, ...}];
runs = [{"label", "batch", "total_tok_s", "predicted_total_tok_s"?}].
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

MIB = 2**20


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_time_breakdown(report: dict, out: Path) -> Path | None:
    """Two stacked bars: seconds per op kind, and wall seconds per phase."""
    breakdown = report.get("breakdown", {})
    bars = {"by op": breakdown.get("by_op") or {}, "by phase": breakdown.get("by_phase") or {}}
    bars = {name: parts for name, parts in bars.items() if parts}
    if not bars:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x, (name, parts) in enumerate(bars.items()):
        bottom = 0.0
        for part, seconds in parts.items():
            ax.bar(x, seconds, bottom=bottom, label=f"{name}: {part}")
            bottom += seconds
    ax.set_xticks(range(len(bars)), list(bars))
    ax.set_title("Time breakdown by op and by phase")
    ax.set_ylabel("time (s)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, out / "time_breakdown.png")


def plot_memory_per_step(report: dict, out: Path) -> Path | None:
    rows = report.get("memory_per_step")
    if not rows:
        return None
    plt = _pyplot()
    tiers = [k for k in rows[0] if k != "step"]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.stackplot(steps, *[[r.get(t, 0) / MIB for r in rows] for t in tiers], labels=tiers)
    ax.set_title("KV memory per tier over decode steps")
    ax.set_xlabel("decode step")
    ax.set_ylabel("memory (MiB)")
    ax.legend(title="tier", loc="upper left")
    return _save(fig, out / "memory_per_step.png")


def plot_throughput_vs_batch(report: dict, out: Path) -> Path | None:
    runs = [r for r in report.get("runs", []) if "batch" in r and "total_tok_s" in r]
    if len({r["batch"] for r in runs}) < 2:
        return None
    plt = _pyplot()
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in runs:
        lines[r.get("label", "run")].append((r["batch"], r["total_tok_s"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in lines.items():
        points.sort()
        ax.plot([b for b, _ in points], [t for _, t in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_title("Total throughput vs batch size")
    ax.set_xlabel("batch size (prompts)")
    ax.set_ylabel("total throughput (tok/s)")
    ax.legend(title="policy", fontsize=8)
    return _save(fig, out / "throughput_vs_batch.png")


def plot_predicted_vs_measured(report: dict, out: Path) -> Path | None:
    runs = [r for r in report.get("runs", []) if r.get("predicted_total_tok_s")]
    if not runs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    measured = [r["total_tok_s"] for r in runs]
    predicted = [r["predicted_total_tok_s"] for r in runs]
    # one colour and marker per policy (legend), each point tagged with its batch size: nearby
    # points of two policies stay readable
    markers = "os^Dv<>"
    for idx, label in enumerate(dict.fromkeys(r.get("label", "") for r in runs)):
        mine = [r for r in runs if r.get("label", "") == label]
        ax.scatter([r["total_tok_s"] for r in mine], [r["predicted_total_tok_s"] for r in mine],
                   marker=markers[idx % len(markers)], label=label or "run", alpha=0.8)
        for r in mine:
            if "batch" in r:
                ax.annotate(f"b{r['batch']}", (r["total_tok_s"], r["predicted_total_tok_s"]),
                            fontsize=7, xytext=(4, -10 if idx % 2 else 4),
                            textcoords="offset points")
    top = max(measured + predicted) * 1.1
    ax.plot([0, top], [0, top], linestyle="--", color="gray", label="prediction = measurement")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_title("Cost model: predicted vs measured")
    ax.set_xlabel("measured total throughput (tok/s)")
    ax.set_ylabel("predicted total throughput (tok/s)")
    ax.legend(fontsize=8)
    return _save(fig, out / "predicted_vs_measured.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


PLOTS = (plot_time_breakdown, plot_memory_per_step, plot_throughput_vs_batch,
         plot_predicted_vs_measured)


def render_all(report: dict, out: Path) -> tuple[list[Path], list[str]]:
    """Write every plot the report has data for; returns (written, skipped plot names)."""
    written, skipped = [], []
    for plot in PLOTS:
        path = plot(report, out)
        if path is None:
            skipped.append(plot.__name__.removeprefix("plot_"))
        else:
            written.append(path)
    return written, skipped
