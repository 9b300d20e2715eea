"""Read lm-eval's aggregated results files into runs that `compare` can line up.

lm-eval writes `<output_path>/<model_name_sanitized>/results_<date>.json` (or `<stem>_<date>.json`
when `--output_path` ends in `.json`) for any model, ours or `hf`. One such file holds, per task
and group, metric keys `"<metric>,<filter>"` with a sibling `"<metric>_stderr,<filter>"`, and a
`config` block (model, model_args, limit). A path given to `compare` becomes one run per distinct
(model, model_args) configuration found under it; several files of the same configuration (tasks
run at different times) merge, the newest file winning for a task they share.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# Per-task keys of a results entry that are not metrics.
NON_METRIC_KEYS = {"name", "alias", "sample_len", "samples"}


class NoResultsError(ValueError):
    """A path given to `compare` holds no lm-eval results file."""


class CorruptResultsError(ValueError):
    """An lm-eval results file that cannot be read (truncated by a kill, a full disk, an edit)."""


# lm-eval names its aggregated results results_<date>.json, or <stem>_<date>.json when
# --output_path ends in .json; <date> is an ISO time with ':' replaced by '-'.
_LM_EVAL_NAME = re.compile(r"^results_.*\.json$|_\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(\.\d+)?\.json$")


@dataclass
class Score:
    """One metric of one task: value and, when lm-eval computed it, its standard error."""

    value: float
    stderr: float | None = None


@dataclass
class Run:
    """The results of one model configuration.

    scores: task -> "metric,filter" -> Score, in lm-eval's own task order (groups first).
    aliases: task -> lm-eval's display alias (subtasks of a group carry a " - " prefix).
    higher_is_better: task -> metric -> bool. groups: group -> its subtasks.
    """

    label: str
    source: str
    files: list[str]
    model: str
    model_args: dict
    config: dict
    scores: dict[str, dict[str, Score]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    higher_is_better: dict[str, dict[str, bool]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    n_samples: dict[str, int] = field(default_factory=dict)

    def describe(self, keys=None) -> str:
        """`model (k=v,...)` over `keys` (default: every model arg)."""
        keys = list(self.model_args) if keys is None else [k for k in keys if k in self.model_args]
        args = ",".join(f"{k}={self.model_args[k]}" for k in keys)
        return f"{self.model} ({args})" if args else self.model


def find_results_files(path: str | os.PathLike) -> list[Path]:
    """Every lm-eval aggregated results file at or under `path`.

    Args:
        path: a results JSON file, or a directory (an lm-eval `--output_path`, a sweep run dir).

    Returns:
        The files, sorted by path.

    Raises:
        FileNotFoundError: `path` does not exist.
        NoResultsError: nothing under `path` is an lm-eval results file.
        CorruptResultsError: a results file under `path` cannot be parsed (named in the message).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory.")
    candidates = [p] if p.is_file() else sorted(q for q in p.rglob("*.json") if q.is_file())
    files = [q for q in candidates if _is_results_file(q, named=q == p)]
    if not files:
        what = "is not an lm-eval results file" if p.is_file() else "holds no lm-eval results file"
        raise NoResultsError(
            f"{path} {what} (results_<date>.json with 'results' and 'config' keys). Pass the "
            "--output_path of a finished lm_eval run, a sweep run directory, or a results_*.json file."
        )
    return files


def _is_results_file(path: Path, named: bool = False) -> bool:
    """Whether `path` holds lm-eval aggregated results.

    Raises:
        CorruptResultsError: the file is not valid JSON and is one `compare` must read: named on
            the command line, or named the way lm-eval names results. Skipping it would show an
            older file's numbers, or none, without saying why.
    """
    if path.name.startswith("samples_"):  # per-sample logs (JSONL) sit beside the results
        return False
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        if named or _LM_EVAL_NAME.search(path.name):
            raise CorruptResultsError(
                f"{path} is corrupt or truncated ({type(e).__name__}: {e}); rerun the evaluation that "
                "wrote it, or delete the file.") from None
        return False
    return isinstance(data, dict) and isinstance(data.get("results"), dict) and "config" in data


def load_runs(path: str | os.PathLike) -> list[Run]:
    """The runs (one per model configuration) found at or under `path`, oldest first.

    Raises:
        FileNotFoundError, NoResultsError, CorruptResultsError: see `find_results_files`.
    """
    by_config: dict[str, list[tuple[float, Path, dict]]] = {}
    for file in find_results_files(path):
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        key = json.dumps([_config(data).get("model"), _model_args(data)], sort_keys=True, default=str)
        by_config.setdefault(key, []).append((_date(data, file), file, data))
    runs = []
    for entries in by_config.values():
        entries.sort(key=lambda e: e[0])
        runs.append((entries[0][0], _merge(str(path), entries)))
    runs.sort(key=lambda r: r[0])
    return [r for _, r in runs]


def _config(data: dict) -> dict:
    return data.get("config") or {}


def _model_args(data: dict) -> dict:
    """model_args as a dict: lm-eval stores the CLI dict, older versions or the API a string."""
    args = _config(data).get("model_args") or {}
    if isinstance(args, str):
        pairs = [a.split("=", 1) for a in args.split(",") if a.strip()]
        args = {k.strip(): (v[0] if v else "") for k, *v in pairs}
    return dict(args)


def _date(data: dict, file: Path) -> float:
    date = data.get("date")
    return float(date) if isinstance(date, (int, float)) else file.stat().st_mtime


def _merge(source: str, entries: list[tuple[float, Path, dict]]) -> Run:
    first = entries[0][2]
    run = Run(label="", source=source, files=[str(e[1]) for e in entries],
              model=str(_config(first).get("model") or first.get("model_name") or "?"),
              model_args=_model_args(first), config=_config(first))
    for _, _, data in entries:  # oldest first: newer files overwrite the tasks they share
        for task, entry in (data.get("results") or {}).items():
            run.scores[task] = parse_metrics(entry)
            run.aliases[task] = str(entry.get("alias", task))
        for task, hib in (data.get("higher_is_better") or {}).items():
            run.higher_is_better[task] = dict(hib or {})
        for group, subtasks in (data.get("group_subtasks") or {}).items():
            run.groups[group] = list(subtasks)
        for task, n in (data.get("n-samples") or {}).items():
            if isinstance(n, dict) and "effective" in n:
                run.n_samples[task] = int(n["effective"])
    return run


def parse_metrics(entry: dict) -> dict[str, Score]:
    """`{"acc,none": 0.5, "acc_stderr,none": 0.1, ...}` -> `{"acc,none": Score(0.5, 0.1)}`.

    Values that are not numbers (lm-eval writes "N/A" for missing stderrs) are dropped.
    """
    out: dict[str, Score] = {}
    for key, value in entry.items():
        if key in NON_METRIC_KEYS or "_stderr" in key.split(",")[0] or not _is_number(value):
            continue
        metric, _, filt = key.partition(",")
        stderr = entry.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
        out[key] = Score(float(value), float(stderr) if _is_number(stderr) else None)
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


# ---- context lengths from task names --------------------------------------------------------
_LENGTH = re.compile(r"^(?P<base>.+?)_(?P<n>\d+)(?P<unit>[kK])$")


def split_length(task: str) -> tuple[str, int] | None:
    """`dlmem_ruler_vt_4k` -> ("dlmem_ruler_vt", 4096); `dlmem_babilong_0k` -> ("dlmem_babilong", 0).

    Returns None for names without a trailing `_<N>k` length.
    """
    m = _LENGTH.match(task)
    if not m:
        return None
    return m.group("base"), int(m.group("n")) * 1024


def format_length(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


__all__ = ["CorruptResultsError", "NoResultsError", "Run", "Score", "find_results_files", "format_length", "load_runs",
           "parse_metrics", "split_length"]
