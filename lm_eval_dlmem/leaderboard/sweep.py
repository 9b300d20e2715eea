"""`lm-eval-dlmem sweep SWEEP.yaml`: run a list of lm-eval evaluations, resumable, then compare.

    output_dir: runs/frozen_vs_metastate     # default: runs/<yaml stem>; relative to the cwd
    defaults:                                # merged under every run (model_args key by key)
      model: metastate-llada
      model_args: {pretrained: GSAI-ML/LLaDA-8B-Instruct}
      tasks: [dlmem_ruler_4k]
      batch_size: 8
    runs:
      - name: frozen
      - name: metastate
        model_args: {metastate: ${METASTATE_CKPT}}
    compare: {tasks: null, plot_tasks: "ruler|babilong"}

Every run goes through lm-eval's Python API (`simple_evaluate`) and lm-eval's own results writer
(`EvaluationTracker`), so `<output_dir>/<name>/` holds exactly what `lm_eval --output_path` would
(results_*.json, samples_*.jsonl). Beside them: `run.json` (the resolved spec), `command.txt`
(the equivalent `lm_eval` command), `cache/` (`--use_cache`, so an interrupted run resumes),
`error.txt` (the traceback of a failed attempt) and `COMPLETE.json`, written only after the
results file is on disk. A run whose marker matches its spec is skipped; a run whose spec changed
starts over (the old directory is moved under `<output_dir>/.superseded/`). A failing run does not
stop the sweep; the exit status is non-zero and names the failures. `${VAR}` / `${VAR:-default}`
in the YAML expand from the environment.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from .spec import RunSpec, Sweep, load_sweep

MARKER = "COMPLETE.json"


def run_dir(sweep: Sweep, spec: RunSpec) -> Path:
    return Path(sweep.output_dir) / spec.name


def is_complete(sweep: Sweep, spec: RunSpec) -> bool:
    """True when the run's marker exists, matches its spec and its results file is still there."""
    marker = run_dir(sweep, spec) / MARKER
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return done.get("fingerprint") == spec.fingerprint() and Path(done.get("results_file", "")).is_file()


def prepare_dir(sweep: Sweep, spec: RunSpec) -> Path:
    """Create the run directory; move a previous attempt with a different spec out of the way."""
    path = run_dir(sweep, spec)
    previous = path / "run.json"
    if previous.is_file():
        try:
            old = json.loads(previous.read_text(encoding="utf-8")).get("fingerprint")
        except ValueError:
            old = None
        if old != spec.fingerprint():
            dest = Path(sweep.output_dir) / ".superseded" / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(dest))
            print(f"[sweep] {spec.name}: the spec changed; the previous attempt was moved to {dest}", flush=True)
    path.mkdir(parents=True, exist_ok=True)
    (path / "run.json").write_text(json.dumps({"fingerprint": spec.fingerprint(), "spec": spec.to_dict()},
                                              indent=2, default=str), encoding="utf-8")
    (path / "command.txt").write_text(spec.lm_eval_command(str(path)) + "\n", encoding="utf-8")
    return path


class TaskManagers:
    """One task index per include path, reused across runs (indexing lm-eval's tasks costs
    seconds); each run gets a shallow copy carrying its own metadata (= model_args | metadata,
    what the lm_eval CLI passes, so RULER/BABILong find the tokenizer through `pretrained`)."""

    def __init__(self):
        self._index = {}

    def get(self, include_path: list[str], metadata: dict, include_defaults: bool = True):
        from lm_eval.tasks import TaskManager

        key = (tuple(include_path), include_defaults)
        if key not in self._index:
            self._index[key] = TaskManager(include_path=list(include_path) or None,
                                           include_defaults=include_defaults)
        base = self._index[key]
        try:
            from lm_eval.tasks._factory import TaskFactory

            manager = copy.copy(base)
            manager.metadata = metadata
            manager._factory = TaskFactory(meta=metadata)
            return manager
        except (ImportError, AttributeError):  # a future lm-eval: index again rather than guess
            return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults,
                               metadata=metadata)


def evaluate(spec: RunSpec, path: Path, managers: TaskManagers) -> Path:
    """Run one spec through `simple_evaluate` and save it the way `lm_eval --output_path` does.

    Returns:
        The results_*.json file written.

    Raises:
        Whatever the evaluation raises; RuntimeError when lm-eval did not write the results file.
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(path))
    before = set(path.rglob("results_*.json"))
    results = lm_eval.simple_evaluate(
        model=spec.model, model_args=dict(spec.model_args), tasks=list(spec.tasks),
        num_fewshot=spec.num_fewshot, batch_size=spec.batch_size, max_batch_size=spec.max_batch_size,
        device=spec.device, use_cache=str(path / "cache" / "lm") if spec.use_cache else None,
        limit=spec.limit, log_samples=spec.log_samples, evaluation_tracker=tracker,
        system_instruction=spec.system_instruction, apply_chat_template=spec.apply_chat_template,
        fewshot_as_multiturn=spec.fewshot_as_multiturn, gen_kwargs=spec.gen_kwargs,
        task_manager=managers.get(spec.include_path, {**spec.model_args, **spec.metadata}, spec.include_defaults),
        confirm_run_unsafe_code=spec.confirm_run_unsafe_code, metadata=spec.metadata or None,
        **spec.seed_kwargs(),
    )
    if results is None:
        raise RuntimeError("simple_evaluate returned no results (not the main process?); run sweeps "
                           "in one process and scale a run with parallelize=True instead.")
    samples = results.pop("samples", None)
    tracker.save_results_aggregated(results=results, samples=samples)
    if samples:
        for task_name in results.get("configs", {}):
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    written = sorted(set(path.rglob("results_*.json")) - before, key=lambda p: p.stat().st_mtime)
    if not written:
        raise RuntimeError(f"lm-eval did not write a results file under {path} (see its log above).")
    return written[-1]


def execute(sweep: Sweep, spec: RunSpec, managers: TaskManagers) -> str | None:
    """Run one spec, recording success (marker) or failure (error.txt).

    Returns:
        None on success, else a one-line description of the failure.
    """
    path = prepare_dir(sweep, spec)
    error_file = path / "error.txt"
    start = time.time()
    try:
        results_file = evaluate(spec, path, managers)
    except Exception as e:  # noqa: BLE001  one run's failure must not end the sweep; KeyboardInterrupt does
        error_file.write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n{traceback.format_exc()}", encoding="utf-8")
        summary = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        del e
        _free_memory()
        return f"{summary} (traceback in {error_file})"
    error_file.unlink(missing_ok=True)
    marker = {"fingerprint": spec.fingerprint(), "results_file": str(results_file),
              "seconds": round(time.time() - start, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    (path / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    _free_memory()
    return None


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def run_sweep(sweep: Sweep, *, force: bool = False, only: list[str] | None = None) -> dict[str, str]:
    """Run every spec not yet complete, in order; then write the comparison of the finished ones.

    Args:
        sweep: the loaded sweep.
        force: rerun complete runs too.
        only: run just these names (the comparison still covers every finished run).

    Returns:
        name -> failure description, for the runs that failed (empty when all succeeded).
    """
    from .._autoload import register

    register()
    if only:
        unknown = sorted(set(only) - {s.name for s in sweep.runs})
        if unknown:
            raise ValueError(f"--only names unknown run(s) {unknown}; runs: {[s.name for s in sweep.runs]}.")
    managers, failures = TaskManagers(), {}
    for i, spec in enumerate(sweep.runs, 1):
        if only and spec.name not in only:
            continue
        if not force and is_complete(sweep, spec):
            print(f"[sweep] {i}/{len(sweep.runs)} {spec.name}: complete, skipped", flush=True)
            continue
        print(f"[sweep] {i}/{len(sweep.runs)} {spec.name}: {spec.lm_eval_command(str(run_dir(sweep, spec)))}",
              flush=True)
        failure = execute(sweep, spec, managers)
        if failure:
            failures[spec.name] = failure
            print(f"[sweep] {spec.name}: FAILED: {failure}", file=sys.stderr, flush=True)
    try:
        write_comparison(sweep)
    except (OSError, ValueError) as e:  # the runs' own results are on disk either way
        print(f"[sweep] could not write the comparison: {e}", file=sys.stderr)
    return failures


def write_comparison(sweep: Sweep) -> str | None:
    """Compare the complete runs (YAML order, first = baseline) into compare.md / compare.png."""
    from .compare import load_comparison, report
    from .plot import plot_lengths

    done = [s for s in sweep.runs if is_complete(sweep, s)]
    if not done:
        print("[sweep] no run is complete; nothing to compare.", file=sys.stderr)
        return None
    paths = [str(run_dir(sweep, s)) for s in done]
    runs = load_comparison(paths, labels=[s.name for s in done])
    text = report(runs, sweep.compare.get("tasks"))
    out = Path(sweep.output_dir)
    (out / "compare.md").write_text(text, encoding="utf-8")
    plotted = plot_lengths(runs, str(out / "compare.png"), sweep.compare.get("plot_tasks", "ruler|babilong"))
    print(text)
    print(f"[sweep] table: {out / 'compare.md'}" + (f", plot: {out / 'compare.png'}" if plotted else ""))
    return text


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lm-eval-dlmem sweep",
                                description="Run the evaluations listed in a sweep YAML (resumable), then compare them.")
    p.add_argument("sweep", help="sweep YAML file (see examples/sweeps/)")
    p.add_argument("--output_dir", default=None, help="override the sweep's output_dir")
    p.add_argument("--only", default=None, help="comma-separated run names to run")
    p.add_argument("--force", action="store_true", help="rerun runs that are already complete")
    p.add_argument("--limit", type=float, default=None, help="override every run's limit (quick check)")
    p.add_argument("--dry_run", action="store_true", help="print each run's status and lm_eval command, run nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        sweep = load_sweep(args.sweep, output_dir=args.output_dir, limit=args.limit)
    except (OSError, ValueError) as e:
        print(f"lm-eval-dlmem sweep: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("lm-eval-dlmem sweep runs in one process; for several GPUs give a run parallelize=True, or run "
              "`accelerate launch -m lm_eval ...` with a run's command.txt.", file=sys.stderr)
        return 2
    if args.dry_run:
        for spec in sweep.runs:
            state = "complete" if is_complete(sweep, spec) else "to run"
            print(f"{spec.name} [{state}]: {spec.lm_eval_command(str(run_dir(sweep, spec)))}")
        return 0
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    try:
        failures = run_sweep(sweep, force=args.force, only=only)
    except ValueError as e:
        print(f"lm-eval-dlmem sweep: {e}", file=sys.stderr)
        return 2
    if failures:
        print(f"[sweep] {len(failures)} run(s) failed:", file=sys.stderr)
        for name, why in failures.items():
            print(f"  - {name}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
