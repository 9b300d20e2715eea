"""Leaderboard runs: compare lm-eval results across runs, and run resumable sweeps.

    lm-eval-dlmem compare RESULTS... [--labels A,B] [--output FILE.md] [--plot FILE.png]
    lm-eval-dlmem sweep SWEEP.yaml

Python API: `load_comparison(paths, labels)` -> runs, `report(runs)` -> Markdown,
`plot_lengths(runs, path)`; `load_sweep(path)` -> `Sweep`, `run_sweep(sweep)`.
"""

from .compare import load_comparison, markdown_table, report
from .plot import plot_lengths
from .results import NoResultsError, Run, Score, load_runs, split_length

__all__ = ["NoResultsError", "Run", "Score", "load_comparison", "load_runs", "markdown_table",
           "plot_lengths", "report", "split_length"]
