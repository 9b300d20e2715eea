"""Score against context length, one panel per task family and one line per run (the shape of
the MetaState/MemDLM figures), drawn with matplotlib's Agg backend (no display needed).

Lengths come from task names (`dlmem_ruler_vt_4k`, `dlmem_babilong_qa1_2k`, the groups
`dlmem_ruler_8k` / `dlmem_babilong_0k`) and, for lm-eval's own `ruler` tasks, from metric names
that are sequence lengths (`"4096,none"`).
"""

from __future__ import annotations

import math
import re

from .results import Run, format_length, split_length

Series = dict[str, dict[str, dict[int, float]]]  # family -> run label -> length -> score


def length_series(runs: list[Run], pattern: str = "ruler|babilong") -> Series:
    """Collect (length, score) points per task family and run.

    The score of a task is its first metric (lm-eval's order), so each family plots one metric.

    Returns:
        family -> run label -> {length: score}; families with a single length are dropped.
    """
    regex = re.compile(pattern) if pattern else None
    series: Series = {}
    for run in runs:
        for task, metrics in run.scores.items():
            if regex and not regex.search(task):
                continue
            for family, length, value in _points(task, metrics):
                series.setdefault(family, {}).setdefault(run.label, {})[length] = value
    return {fam: per_run for fam, per_run in series.items()
            if len({n for pts in per_run.values() for n in pts}) > 1}


def _points(task: str, metrics):
    split = split_length(task)
    if split is not None and metrics:
        key, score = next(iter(metrics.items()))
        yield f"{split[0]} ({key.split(',')[0]})", split[1], score.value
        return
    for key, score in metrics.items():  # lm-eval's built-in ruler: one metric per length
        name = key.split(",")[0]
        if name.isdigit():
            yield task, int(name), score.value


def plot_lengths(runs: list[Run], path: str, pattern: str = "ruler|babilong") -> bool:
    """Write the score-vs-length PNG to `path`.

    Args:
        runs: the runs to draw, baseline first (drawn dashed).
        path: the PNG file to write.
        pattern: regex selecting the tasks that take part.

    Returns:
        False (and nothing written) when no task family has scores at two or more lengths.
    """
    series = length_series(runs, pattern)
    if not series:
        return False
    from ..extras import require

    require("matplotlib", "compare --plot").use("Agg", force=True)
    import matplotlib.pyplot as plt

    families = sorted(series)
    cols = min(4, len(families))
    nrows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, family in zip(axes.flat, families):
        _panel(ax, family, series[family], [r.label for r in runs])
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.06 if nrows == 1 else 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _panel(ax, family: str, per_run: dict[str, dict[int, float]], order: list[str]) -> None:
    lengths = sorted({n for pts in per_run.values() for n in pts})
    # even spacing (lengths double from one point to the next), labelled 1k, 2k, ...
    pos = {n: i for i, n in enumerate(lengths)}
    for label in (lab for lab in order if lab in per_run):
        pts = sorted(per_run[label].items())
        ax.plot([pos[n] for n, _ in pts], [v for _, v in pts], marker="o",
                linestyle="--" if label == order[0] else "-", label=label)
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_title(family, fontsize=9)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)


__all__ = ["length_series", "plot_lengths"]
