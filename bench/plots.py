"""PNG plots of a run: per suite, training-step time against each swept size; and the speed-up
of ours over each baseline on the headline cases."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullLocator, ScalarFormatter

from .core import Result

BASELINE_COLORS = {"torch.nn": "tab:blue", "loop": "tab:gray", "mamba_ssm": "tab:green"}


def scaling(results: Sequence[Result], suite: str, title: str, path: Path) -> Path | None:
    """Median time of the training step against each sweep axis, one line per contender."""
    ok = [r for r in results if r.suite == suite and r.status == "ok" and r.axes]
    axes = list(dict.fromkeys(a for r in ok for a in r.axes))
    if not axes:
        return None
    contenders = list(dict.fromkeys(r.contender for r in ok))
    colors = {c: f"C{i}" for i, c in enumerate(contenders)}
    fig, panels = plt.subplots(1, len(axes), figsize=(4.2 * len(axes), 3.6), squeeze=False)
    for panel, axis in zip(panels[0], axes):
        points = [r for r in ok if axis in r.axes]
        fixed = {k: v for k, v in points[0].shape.items() if k != axis and
                 all(p.shape.get(k) == v for p in points)}
        for c in contenders:
            line = sorted((r.shape[axis], r.median_s * 1e3) for r in points if r.contender == c)
            if line:
                panel.plot(*zip(*line), marker="o", label=c, color=colors[c])
        panel.set_xscale("log", base=2)
        panel.set_xticks(sorted({r.shape[axis] for r in points}))
        panel.xaxis.set_major_formatter(ScalarFormatter())
        panel.xaxis.set_minor_locator(NullLocator())
        panel.set_yscale("log")
        panel.set_xlabel(axis)
        panel.set_ylabel("median time (ms)")
        panel.set_title(" ".join(f"{k}={v}" for k, v in fixed.items()), fontsize=9)
        panel.grid(True, which="both", alpha=0.3)
    panels[0][0].legend(fontsize=8)
    fig.suptitle(f"{suite}: training step (forward + backward), {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speedups(results: Sequence[Result], title: str, path: Path) -> Path | None:
    """Horizontal bars: speed-up of each of our contenders over each baseline, headline cases."""
    rows = [r for r in results if r.headline and r.status == "ok" and r.kind == "ours"
            and r.speedups]
    if not rows:
        return None
    kinds = {r.contender: r.kind for r in results}
    labels, bars = [], []
    for r in rows:
        for baseline, ratio in r.speedups.items():
            labels.append(f"{r.suite} {r.case} · {r.contender} vs {baseline}")
            bars.append((ratio, BASELINE_COLORS.get(kinds.get(baseline, ""), "tab:orange")))
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(bars) + 1.2))
    y = range(len(bars))
    ax.barh(list(y), [b[0] for b in bars], color=[b[1] for b in bars])
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    for i, (ratio, _) in enumerate(bars):
        ax.text(ratio, i, f" {ratio:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("speed-up (baseline time / our time; log scale)")
    ax.set_title(f"Speed-up over each baseline, {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: Sequence[Result], title: str, out_dir: Path, tag: str) -> list[Path]:
    written = []
    for suite in dict.fromkeys(r.suite for r in results):
        p = scaling(results, suite, title, out_dir / f"{tag}-{suite}-scaling.png")
        if p is not None:
            written.append(p)
    p = speedups(results, title, out_dir / f"{tag}-speedup.png")
    if p is not None:
        written.append(p)
    return written
