"""`lm-eval-dlmem compare RESULTS...`: one Markdown table of every task and metric across runs.

    lm-eval-dlmem compare runs/frozen runs/metastate --labels frozen,metastate \
        --output compare.md --plot compare.png

Each RESULTS path is an lm-eval `--output_path` (any model: ours, `hf`, `vllm`...), a sweep run
directory or a `results_*.json` file; it contributes one column per model configuration found
under it. The first run is the baseline (the frozen model): every other run gets a delta column
against it. The plot draws score against context length for the RULER/BABILong tasks, whose
names end in their length (`dlmem_ruler_vt_4k`, `dlmem_babilong_qa1_2k`, `dlmem_ruler_8k`).
"""

from __future__ import annotations

import argparse
import re
import sys

from .results import NoResultsError, Run, Score, load_runs
from .spec import check_regex

MISSING = "—"


def load_comparison(paths: list[str], labels: list[str] | None = None) -> list[Run]:
    """Load the runs under `paths`, in order, and give each a label.

    Args:
        paths: lm-eval output paths or results files; the first run found is the baseline.
        labels: one label per run; default: the path's last component (plus the model args
            that tell runs apart when a path holds several configurations).

    Returns:
        The runs, baseline first.

    Raises:
        FileNotFoundError, NoResultsError: a path is missing or holds no results.
        CorruptResultsError: a results file under a path cannot be parsed (named in the message).
        ValueError: the number of labels does not match the number of runs.
    """
    runs: list[Run] = []
    for path in paths:
        found = load_runs(path)
        stem = _stem(path)
        for run in found:
            run.label = stem if len(found) == 1 else f"{stem}:{_distinct_args(run, found)}"
        runs.extend(found)
    if labels:
        if len(labels) != len(runs):
            found_desc = "; ".join(f"{r.label} = {r.describe()}" for r in runs)
            raise ValueError(f"--labels gives {len(labels)} label(s) but {len(runs)} run(s) were found: {found_desc}.")
        for run, label in zip(runs, labels):
            run.label = label
    _dedupe_labels(runs)
    return runs


def _stem(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", str(path)) if p not in ("", ".")]
    name = parts[-1] if parts else str(path)
    return name.removesuffix(".json")


def differing_args(runs: list[Run], skip=("pretrained",)) -> list[str]:
    """Model args whose value is not the same in every run (first-seen order)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.model_args))
    return [k for k in keys if k not in skip and len({str(r.model_args.get(k)) for r in runs}) > 1]


def _distinct_args(run: Run, runs: list[Run]) -> str:
    desc = ",".join(f"{k}={run.model_args.get(k)}" for k in differing_args(runs, skip=()))
    return desc or run.model


def _dedupe_labels(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        n = seen.get(run.label, 0)
        seen[run.label] = n + 1
        if n:
            run.label = f"{run.label}#{n + 1}"


# ---- the table --------------------------------------------------------------------------------
def rows(runs: list[Run], task_pattern: str | None = None) -> list[tuple[str, str]]:
    """Every (task, "metric,filter") in any run: baseline order first, then new ones as they come."""
    pattern = re.compile(check_regex("task_pattern", task_pattern)) if task_pattern else None
    out, seen = [], set()
    for run in runs:
        for task, metrics in run.scores.items():
            if pattern and not pattern.search(task):
                continue
            for key in metrics:
                if (task, key) not in seen:
                    seen.add((task, key))
                    out.append((task, key))
    return out


def format_score(score: Score | None) -> str:
    if score is None:
        return MISSING
    if score.stderr is None:
        return f"{score.value:.4f}"
    return f"{score.value:.4f} ± {score.stderr:.4f}"


def markdown_table(runs: list[Run], task_pattern: str | None = None) -> str:
    """The comparison table: one row per task/metric/filter, a column per run, and a delta
    column (run - baseline) for every run after the first.

    Raises:
        ValueError: `task_pattern` is not a valid regex, or no task matches it (or the runs hold no
            metric at all).
    """
    table_rows = rows(runs, task_pattern)
    if not table_rows:
        raise ValueError(f"No task/metric to compare{f' matches --tasks {task_pattern!r}' if task_pattern else ''}.")
    base = runs[0]
    header = ["Task", "Metric", "Filter", ""]
    for i, run in enumerate(runs):
        header += [run.label] if i == 0 else [run.label, f"Δ {run.label}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + [":-:"] + ["--:"] * (len(header) - 4)) + "|"]
    for task, key in table_rows:
        metric, _, filt = key.partition(",")
        alias = next((r.aliases[task] for r in runs if task in r.aliases), task)
        hib = next((r.higher_is_better[task][metric] for r in runs
                    if metric in r.higher_is_better.get(task, {})), None)
        cells = [_cell(alias), metric, filt or MISSING, {True: "↑", False: "↓", None: ""}[hib]]
        ref = base.scores.get(task, {}).get(key)
        for i, run in enumerate(runs):
            score = run.scores.get(task, {}).get(key)
            cells.append(format_score(score))
            if i:
                cells.append(MISSING if score is None or ref is None else f"{score.value - ref.value:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    # lm-eval indents a group's subtasks with " - "; keep the nesting visible in Markdown
    stripped = text.lstrip()
    return ("&nbsp;&nbsp;" + stripped[2:] if stripped.startswith("- ") else stripped).replace("|", "\\|")


def runs_legend(runs: list[Run]) -> str:
    """What each column is (model, pretrained and the model args that differ between runs),
    and a warning when runs scored different numbers of samples."""
    keys = ["pretrained"] + differing_args(runs)
    lines = [f"- **{r.label}**{' (baseline)' if i == 0 else ''}: {r.describe(keys)}, limit={r.config.get('limit')}"
             f" ({len(r.files)} file{'s' if len(r.files) > 1 else ''} from {r.source})" for i, r in enumerate(runs)]
    uneven = sorted(t for t in {t for r in runs for t in r.n_samples}
                    if len({r.n_samples[t] for r in runs if t in r.n_samples}) > 1)
    if uneven:
        lines.append(f"- Warning: the runs scored different numbers of samples for {', '.join(uneven)}; "
                     "their deltas compare different subsets.")
    return "\n".join(lines)


def report(runs: list[Run], task_pattern: str | None = None) -> str:
    return markdown_table(runs, task_pattern) + "\n\n" + runs_legend(runs) + "\n"


# ---- command line ----------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lm-eval-dlmem compare",
        description="Compare lm-eval runs: a Markdown table with deltas against the first run, and a "
                    "score-vs-context-length plot for RULER/BABILong tasks.")
    p.add_argument("results", nargs="+", help="lm-eval --output_path directories or results_*.json files; "
                                              "the first run is the baseline")
    p.add_argument("--labels", default=None, help="comma-separated column labels, one per run")
    p.add_argument("--output", default=None, help="also write the table to this Markdown file")
    p.add_argument("--plot", default=None, help="write the score-vs-context-length PNG here")
    p.add_argument("--tasks", default=None, help="regex: only tasks whose name matches")
    p.add_argument("--plot_tasks", default="ruler|babilong",
                   help="regex: which length-suffixed tasks go into the plot (default: ruler|babilong)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    try:
        for flag in ("tasks", "plot_tasks"):  # before any file is read
            if getattr(args, flag) is not None:
                check_regex(f"--{flag}", getattr(args, flag))
        runs = load_comparison(args.results, labels)
        text = report(runs, args.tasks)
    except (FileNotFoundError, NoResultsError, ValueError) as e:
        print(f"lm-eval-dlmem compare: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    if args.plot:
        from .plot import plot_lengths

        if not plot_lengths(runs, args.plot, args.plot_tasks):
            print(f"lm-eval-dlmem compare: no task matching {args.plot_tasks!r} has a context length in its "
                  f"name (e.g. dlmem_ruler_vt_4k); {args.plot} was not written.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
