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
results file is on disk.

A run is defined by its inputs: the spec and the files of every local checkpoint its model args
name (`pretrained`, `metastate`, `adapter`, ...: relative path, size and mtime of each file). A
run whose marker matches its inputs is skipped; a run whose inputs changed (spec edited, or a
checkpoint retrained in place) starts over (the old directory, `cache/` included, is moved under
`<output_dir>/.superseded/`). lm-eval writes into `<output_dir>/.staging/<name>/`; the files are
moved into the run directory only when it finished, replacing the previous attempt's, so a run
directory never holds two results files. Each run is locked while it runs (`<output_dir>/.locks/`,
an flock the kernel drops when its process dies): a second sweep on the same output_dir skips the
runs a live sweep is running. A failing run does not stop the sweep; the exit status is non-zero
and names the failures. `${VAR}` / `${VAR:-default}` in the YAML expand from the environment.
"""

from __future__ import annotations

import argparse
import copy
import errno
import fcntl
import gc
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from ..run_cache import local_signature
from .spec import RunSpec, Sweep, load_sweep

MARKER = "COMPLETE.json"
# Model args that name a checkpoint (ours, and `hf`'s `peft`): their local files define the run too.
CHECKPOINT_ARGS = ("pretrained", "model_path", "tokenizer", "metastate", "adapter", "peft")
# What lm-eval's EvaluationTracker writes into an --output_path (under <model_name_sanitized>/).
OUTPUT_PATTERNS = ("results_*.json", "samples_*.jsonl")


def run_dir(sweep: Sweep, spec: RunSpec) -> Path:
    return Path(sweep.output_dir) / spec.name


def staging_dir(sweep: Sweep, spec: RunSpec) -> Path:
    """Where lm-eval writes a run's files before they are moved into the run directory."""
    return Path(sweep.output_dir) / ".staging" / spec.name


# ---- what defines a run ----------------------------------------------------------------------
def run_inputs(spec: RunSpec) -> dict:
    """Everything that defines the run's results.

    Returns:
        {"spec": the spec's fingerprint (model, model args, tasks, ...),
         "checkpoints": {model arg: signature} for the args that name a local file or directory;
         a hub id is covered by the spec alone}.
    """
    checkpoints = {}
    for key in CHECKPOINT_ARGS:
        signature = local_signature(spec.model_args.get(key))
        if signature is not None:
            checkpoints[key] = signature
    return {"spec": spec.fingerprint(), "checkpoints": checkpoints}


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def changed_inputs(old: dict | None, new: dict) -> str:
    """Why a previous attempt with inputs `old` does not count for `new`, in words."""
    if not isinstance(old, dict):
        return "its previous run.json records no inputs (unreadable, or written by an older version)"
    if old.get("spec") != new["spec"]:
        return "the spec changed"
    old_ckpts = old.get("checkpoints") or {}
    changed = [k for k in sorted(set(old_ckpts) | set(new["checkpoints"]))
               if old_ckpts.get(k) != new["checkpoints"].get(k)]
    return f"the files of {', '.join(f'{k}=' for k in changed)} changed on disk" if changed else "its inputs changed"


def is_complete(sweep: Sweep, spec: RunSpec, inputs: dict | None = None) -> bool:
    """True when the run's marker exists, matches its inputs and its results file is still there."""
    marker = run_dir(sweep, spec) / MARKER
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    inputs = run_inputs(spec) if inputs is None else inputs
    return (isinstance(done, dict) and done.get("fingerprint") == fingerprint(inputs)
            and Path(done.get("results_file", "")).is_file())


def prepare_dir(sweep: Sweep, spec: RunSpec, inputs: dict) -> Path:
    """Create the run directory; move a previous attempt with other inputs out of the way (its
    `cache/` holds answers of the old checkpoint, which lm-eval would otherwise reuse)."""
    path = run_dir(sweep, spec)
    previous = path / "run.json"
    if previous.is_file():
        try:
            old = json.loads(previous.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
        if not isinstance(old, dict) or old.get("fingerprint") != fingerprint(inputs):
            dest = Path(sweep.output_dir) / ".superseded" / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(dest))
            why = changed_inputs(old.get("inputs") if isinstance(old, dict) else None, inputs)
            print(f"[sweep] {spec.name}: {why}; the previous attempt was moved to {dest}", flush=True)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / "run.json", json.dumps({"fingerprint": fingerprint(inputs), "inputs": inputs,
                                                "spec": spec.to_dict()}, indent=2, default=str))
    write_atomic(path / "command.txt", spec.lm_eval_command(str(path)) + "\n")
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader (or a kill) sees the old file or the new one, never
    half of one: a temp file beside it, then os.replace."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def install_outputs(staging: Path, path: Path) -> Path:
    """Move lm-eval's files from `staging` into the run directory `path`, replacing the previous
    attempt's results and samples (so the directory holds one results file).

    Returns:
        The results_*.json file, at its place under `path`.

    Raises:
        RuntimeError: lm-eval wrote no results file into `staging`.
    """
    new = sorted(staging.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not new:
        raise RuntimeError(f"lm-eval did not write a results file under {staging} (see its log above).")
    (path / MARKER).unlink(missing_ok=True)
    for old in output_files(path):
        old.unlink()
    for f in output_files(staging):
        dest = path / f.relative_to(staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dest)
    shutil.rmtree(staging, ignore_errors=True)
    return path / new[-1].relative_to(staging)


def output_files(path: Path) -> list[Path]:
    """lm-eval's results and samples files under a run (or staging) directory."""
    return sorted({f for pattern in OUTPUT_PATTERNS for f in path.rglob(pattern) if f.is_file()})


class RunLock:
    """An exclusive lock on one run, so that two sweeps on one output_dir do not both run it.

    An flock on `<output_dir>/.locks/<name>.lock`: the kernel drops it when the holding process
    ends, however it ends, so a killed sweep leaves no stale lock. The file holds the holder's pid
    for the message.
    """

    def __init__(self, sweep: Sweep, spec: RunSpec):
        self.path = Path(sweep.output_dir) / ".locks" / f"{spec.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock without waiting.

        Returns:
            None when this process holds it now, else the pid of the holder (as text; "?" when
            the holder has not written it yet).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return None

    def holder(self) -> str | None:
        """The pid holding the lock, or None when it is free (for --dry_run; takes nothing)."""
        if not self.path.is_file():
            return None
        held = self.acquire()
        self.release()
        return held

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


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


def evaluate(spec: RunSpec, path: Path, managers: TaskManagers, staging: Path) -> Path:
    """Run one spec through `simple_evaluate` and save it the way `lm_eval --output_path` does:
    into `staging`, then moved into the run directory `path` (see `install_outputs`).

    Returns:
        The results_*.json file, under `path`.

    Raises:
        Whatever the evaluation raises; RuntimeError when lm-eval did not write the results file.
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    shutil.rmtree(staging, ignore_errors=True)  # a killed attempt's leftovers
    staging.mkdir(parents=True)
    tracker = EvaluationTracker(output_path=str(staging))
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
    return install_outputs(staging, path)


def execute(sweep: Sweep, spec: RunSpec, managers: TaskManagers, inputs: dict | None = None) -> str | None:
    """Run one spec, recording success (marker) or failure (error.txt).

    Args:
        inputs: `run_inputs(spec)`, taken when the run starts (computed here when None).

    Returns:
        None on success, else a one-line description of the failure.
    """
    inputs = run_inputs(spec) if inputs is None else inputs
    path = prepare_dir(sweep, spec, inputs)
    error_file = path / "error.txt"
    start = time.time()
    try:
        results_file = evaluate(spec, path, managers, staging_dir(sweep, spec))
    except Exception as e:  # noqa: BLE001  one run's failure must not end the sweep; KeyboardInterrupt does
        write_atomic(error_file, f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n{traceback.format_exc()}")
        summary = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        del e
        _free_memory()
        return f"{summary} (traceback in {error_file})"
    error_file.unlink(missing_ok=True)
    marker = {"fingerprint": fingerprint(inputs), "inputs": inputs, "results_file": str(results_file),
              "seconds": round(time.time() - start, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_atomic(path / MARKER, json.dumps(marker, indent=2))
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
        failure = run_one(sweep, spec, managers, force, f"{i}/{len(sweep.runs)}")
        if failure:
            failures[spec.name] = failure
            print(f"[sweep] {spec.name}: FAILED: {failure}", file=sys.stderr, flush=True)
    try:
        write_comparison(sweep)
    except (OSError, ValueError) as e:  # the runs' own results are on disk either way
        print(f"[sweep] could not write the comparison: {e}", file=sys.stderr)
    return failures


def run_one(sweep: Sweep, spec: RunSpec, managers: TaskManagers, force: bool = False,
            counter: str = "") -> str | None:
    """One run as the sweep runs it, wherever it runs (this process, or a submitit job): under its
    lock, skipped when complete or held by another sweep. Returns the failure description or None."""
    lock = RunLock(sweep, spec)
    holder = lock.acquire()
    if holder is not None:
        print(f"[sweep] {counter} {spec.name}: being run by another sweep (pid {holder}), skipped", flush=True)
        return None
    try:
        return _run_locked(sweep, spec, managers, force, counter)
    finally:
        lock.release()


def _run_locked(sweep: Sweep, spec: RunSpec, managers: TaskManagers, force: bool, counter: str) -> str | None:
    """One run, under its lock: skip it when complete (checked now: another sweep may have just
    finished it), else execute it. Returns the failure description or None."""
    inputs = run_inputs(spec)
    if not force and is_complete(sweep, spec, inputs):
        print(f"[sweep] {counter} {spec.name}: complete, skipped", flush=True)
        return None
    print(f"[sweep] {counter} {spec.name}: {spec.lm_eval_command(str(run_dir(sweep, spec)))}", flush=True)
    return execute(sweep, spec, managers, inputs)


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
    write_atomic(out / "compare.md", text)
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
    from .launch import add_arguments

    add_arguments(p)
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
            holder = RunLock(sweep, spec).holder()
            state = (f"running (pid {holder})" if holder else "complete" if is_complete(sweep, spec) else "to run")
            print(f"{spec.name} [{state}]: {spec.lm_eval_command(str(run_dir(sweep, spec)))}")
        return 0
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    try:
        if args.launcher == "submitit":
            from .launch import submit_sweep

            failures = submit_sweep(sweep, args, only=only)
        else:
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
