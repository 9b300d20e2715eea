"""`lm-eval-dlmem sweep FILE --launcher submitit`: a sweep's runs as a submitit job array.

One job per run that is not complete yet (a SLURM array job, or with `--cluster local` processes
on this machine), each running that run exactly as `lm-eval-dlmem sweep` does in-process
(`sweep.run_one`: its lock, the staging directory, `COMPLETE.json`), so resuming, skipping runs
another sweep holds and the comparison table are the same whichever launcher ran them. The
submitting process waits for the jobs, then writes the comparison of every finished run;
`--no_wait` returns after submitting (rerun the same command later: finished runs are skipped and
the table is written). submitit keeps each job's log and pickled result under `--submitit_folder`
(default `<output_dir>/.submitit/`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from ..extras import require
from .spec import RunSpec, Sweep
from .sweep import TaskManagers, is_complete, run_dir, run_one, write_comparison

# submitit's parameter names, as the sweep's command line spells them (see `add_arguments`)
GENERIC = ("timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb")  # one task per run: a run is one process
SLURM = ("slurm_partition", "slurm_account", "slurm_qos", "slurm_constraint", "slurm_array_parallelism")


def add_arguments(parser) -> None:
    """The launcher's options of `lm-eval-dlmem sweep`."""
    g = parser.add_argument_group("cluster (--launcher submitit)")
    g.add_argument("--launcher", choices=("local", "submitit"), default="local",
                   help="local: runs one after another in this process (default); submitit: one job per run")
    g.add_argument("--cluster", choices=("auto", "slurm", "local", "debug"), default="auto",
                   help="submitit executor: auto = SLURM when sbatch is available, else local processes")
    g.add_argument("--submitit_folder", default=None, help="job logs and results (default <output_dir>/.submitit)")
    g.add_argument("--no_wait", action="store_true", help="return after submitting; rerun later for the table")
    for name in GENERIC:
        g.add_argument(f"--{name}", type=int, default=None, help=f"submitit {name}")
    for name in SLURM:
        kind = int if name == "slurm_array_parallelism" else str
        g.add_argument(f"--{name}", type=kind, default=None, help=f"SLURM {name.removeprefix('slurm_')}")


def executor_parameters(args) -> dict:
    """The submitit parameters given on the command line (unset ones keep submitit's defaults)."""
    params = {name: getattr(args, name) for name in GENERIC + SLURM if getattr(args, name, None) is not None}
    return {"name": "lm-eval-dlmem-sweep", **params}


def pending(sweep: Sweep, only: list[str] | None, force: bool) -> list[RunSpec]:
    """The runs to submit: selected by --only, and not complete (unless --force)."""
    return [s for s in sweep.runs if (not only or s.name in only) and (force or not is_complete(sweep, s))]


def job_main(sweep: Sweep, name: str, force: bool) -> str | None:
    """What one submitit job runs: the named run, as the in-process sweep runs it."""
    from .._autoload import register

    register()
    (spec,) = [s for s in sweep.runs if s.name == name]
    failure = run_one(sweep, spec, TaskManagers(), force, name)
    if failure:
        print(f"[sweep] {name}: FAILED: {failure}", file=sys.stderr, flush=True)
    return failure


def submit_sweep(sweep: Sweep, args, *, only: list[str] | None = None) -> dict[str, str]:
    """Submit the pending runs as one job array, wait (unless --no_wait), then write the table.

    Returns:
        name -> failure description for the runs that failed (a job that died counts).

    Raises:
        MissingExtraError: submitit is not installed (`pip install 'lm-eval-dlmem[cluster]'`).
        ValueError: `--only` names unknown runs, or `--cluster slurm` where SLURM is not available.
    """
    submitit = require("submitit", "sweep --launcher submitit")
    if only:
        unknown = sorted(set(only) - {s.name for s in sweep.runs})
        if unknown:
            raise ValueError(f"--only names unknown run(s) {unknown}; runs: {[s.name for s in sweep.runs]}.")
    # jobs may start in another directory (SLURM nodes): every path they use is absolute
    sweep = dataclasses.replace(sweep, output_dir=os.path.abspath(sweep.output_dir))
    todo = pending(sweep, only, args.force)
    if not todo:
        print("[sweep] every selected run is complete; nothing to submit.", flush=True)
        write_comparison(sweep)
        return {}
    executor = make_executor(submitit, sweep, args)
    jobs = executor.map_array(job_main, [sweep] * len(todo), [s.name for s in todo], [args.force] * len(todo))
    for spec, job in zip(todo, jobs):
        print(f"[sweep] {spec.name}: job {job.job_id} ({spec.lm_eval_command(str(run_dir(sweep, spec)))})", flush=True)
    if args.no_wait:
        print("[sweep] submitted; run the same command again once the jobs finished to write the table.")
        return {}
    failures = {}
    for spec, job in zip(todo, jobs):
        try:
            failure = job.result()
        except Exception as e:  # noqa: BLE001  a job killed by the scheduler, out of memory, ...
            lines = str(e).strip().splitlines() or [type(e).__name__]
            failure = f"job {job.job_id} failed: {lines[-1][:300]} (log under {executor.folder})"
        if failure:
            failures[spec.name] = failure
            print(f"[sweep] {spec.name}: FAILED: {failure}", file=sys.stderr, flush=True)
    try:
        write_comparison(sweep)
    except (OSError, ValueError) as e:
        print(f"[sweep] could not write the comparison: {e}", file=sys.stderr)
    return failures


def make_executor(submitit, sweep: Sweep, args):
    """submitit's AutoExecutor for `--cluster` (auto: SLURM if available, else local processes)."""
    folder = args.submitit_folder or str(Path(sweep.output_dir) / ".submitit")
    cluster = None if args.cluster == "auto" else args.cluster
    try:
        executor = submitit.AutoExecutor(folder=os.path.join(folder, "%j"), cluster=cluster)
    except Exception as e:  # submitit raises its own types when the cluster is not available
        raise ValueError(f"--cluster {args.cluster}: submitit cannot use it here ({e}); use --cluster local to "
                         "run the jobs as processes on this machine.") from None
    executor.update_parameters(**executor_parameters(args))
    return executor
