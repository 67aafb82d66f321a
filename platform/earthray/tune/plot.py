"""The sweep's scores plot: each trial's score against the value of each swept field, best trial marked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from earthray.tune.results import SweepResult


def _positions(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Numbers stay where they are; any other values (strings, lists, flags) get one slot each, in order."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    labels = sorted({json.dumps(v) for v in values})
    return [float(labels.index(json.dumps(v))) for v in values], labels


def plot_scores(result: SweepResult, out: Path, log_x: set[str] = frozenset()) -> Path:
    """A PNG with one panel per swept field (a log axis for fields in ``log_x``): the score of each trial
    that has one, filled if it trained to the end, hollow if stopped (or interrupted) earlier, the best
    starred. Drawn with Matplotlib's Agg canvas, which leaves the process's pyplot backend alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    scored = [r for r in result.rows if r.score is not None and r.score == r.score]
    fig = Figure(figsize=(4.2 * len(result.paths), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(result.paths), squeeze=False, sharey=True)[0]
    for ax, path in zip(axes, result.paths):
        xs, labels = _positions([r.config.get(path) for r in scored])
        done = [(x, r.score) for x, r in zip(xs, scored) if r.status == "done"]
        early = [(x, r.score) for x, r in zip(xs, scored) if r.status != "done"]
        if done:
            ax.scatter(*zip(*done), color="tab:blue", label=f"trained to step {result.max_steps}")
        if early:
            ax.scatter(*zip(*early), facecolors="none", edgecolors="tab:gray", label="stopped earlier (last rung)")
        if result.best is not None:
            x = xs[[r.trial_id for r in scored].index(result.best.trial_id)]
            ax.scatter([x], [result.best.score], marker="*", s=260, color="tab:red", zorder=3,
                       label=f"best ({result.best.trial_id})")
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        elif path in log_x:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # a range under a decade labels every minor tick
        ax.margins(0.12)
        ax.set_xlabel(path)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{result.metric} ({'higher' if result.mode == 'max' else 'lower'} is better)")
    if scored:
        axes[0].legend(fontsize="small")
    fig.suptitle(f"sweep {result.name}: {len(scored)} of {len(result.rows)} trials scored")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
