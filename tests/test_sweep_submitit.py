"""`lm-eval-dlmem sweep --launcher submitit`: a two-run sweep through submitit's LocalExecutor
(each run a separate process, as each is a SLURM array task on a cluster), resumable, ending in
the same comparison table as the in-process sweep."""

import json
import os
from pathlib import Path

import pytest

from lm_eval_dlmem.leaderboard import sweep as sweep_mod
from test_sweep import write_yaml

TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent


@pytest.fixture
def job_env(monkeypatch):
    """The jobs are fresh interpreters: they must import this checkout and run one math thread."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(TESTS_DIR / "tasks"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LM_EVAL_DLMEM_AUTOLOAD", "0")  # the job registers through the package itself


def test_two_run_sweep_through_the_submitit_local_executor(tiny_ckpts, tmp_path, capsys, job_env):
    pytest.importorskip("submitit", reason="submitit is in the [cluster] extra, which [test] installs")
    out = tmp_path / "out"
    data = {
        "output_dir": str(out),
        "defaults": {"model": "metastate-llada", "tasks": ["t_gen"], "include_path": [str(TESTS_DIR / "tasks")],
                     "include_defaults": False, "device": "cpu", "batch_size": 4, "limit": 2,
                     "model_args": {"pretrained": tiny_ckpts["llada"], "block_length": 4, "steps": 2}},
        "runs": [{"name": "frozen"}, {"name": "steps1", "model_args": {"steps": 1}}],
    }
    f = write_yaml(tmp_path / "sweep.yaml", data)
    args = [f, "--launcher", "submitit", "--cluster", "local", "--timeout_min", "20", "--slurm_partition", "unused"]
    assert sweep_mod.main(args) == 0, capsys.readouterr().err[-3000:]
    printed = capsys.readouterr().out
    job_ids = set()
    for name in ("frozen", "steps1"):
        done = json.loads((out / name / "COMPLETE.json").read_text())
        assert Path(done["results_file"]).is_file()
        assert (out / name / "command.txt").read_text().startswith("lm_eval --model metastate-llada")
        line = next(l for l in printed.splitlines() if l.startswith(f"[sweep] {name}: job "))
        job_ids.add(line.split()[3])
    assert len(job_ids) == 2  # one job (one process) per run
    assert list((out / ".submitit").rglob("*_log.out"))  # submitit's per-job logs
    table = (out / "compare.md").read_text()
    assert table.splitlines()[0] == "| Task | Metric | Filter |  | frozen | steps1 | Δ steps1 |"

    # resumable: the finished runs are not submitted again; a changed run is
    assert sweep_mod.main(args) == 0
    assert "nothing to submit" in capsys.readouterr().out
    data["runs"][1]["model_args"]["steps"] = 4
    assert sweep_mod.main([write_yaml(tmp_path / "sweep.yaml", data), *args[1:]]) == 0
    printed = capsys.readouterr().out
    assert "[sweep] steps1: job" in printed and "[sweep] frozen: job" not in printed


def test_a_failing_job_is_reported_and_the_others_still_count(tiny_ckpts, tmp_path, capsys):
    """The debug executor (in this process) is enough to check the bookkeeping of a failure."""
    pytest.importorskip("submitit", reason="submitit is in the [cluster] extra, which [test] installs")
    out = tmp_path / "out"
    data = {
        "output_dir": str(out),
        "defaults": {"model": "metastate-llada", "tasks": ["t_gen"], "include_path": [str(TESTS_DIR / "tasks")],
                     "include_defaults": False, "device": "cpu", "limit": 1,
                     "model_args": {"pretrained": tiny_ckpts["llada"], "block_length": 4, "steps": 1}},
        "runs": [{"name": "ok"}, {"name": "broken", "model_args": {"pretrained": str(tmp_path / "missing")}}],
    }
    f = write_yaml(tmp_path / "sweep.yaml", data)
    assert sweep_mod.main([f, "--launcher", "submitit", "--cluster", "debug"]) == 1
    err = capsys.readouterr().err
    assert "broken" in err and "1 run(s) failed" in err
    assert (out / "ok" / "COMPLETE.json").is_file() and not (out / "broken" / "COMPLETE.json").exists()


def test_submitit_missing_names_the_cluster_extra(tmp_path, monkeypatch, capsys):
    import sys

    from lm_eval_dlmem import cli

    monkeypatch.setitem(sys.modules, "submitit", None)
    f = write_yaml(tmp_path / "sweep.yaml", {"output_dir": str(tmp_path / "o"),
                                             "runs": [{"name": "a", "model": "m", "tasks": ["t"]}]})
    assert cli.main(["sweep", f, "--launcher", "submitit"]) == 2
    assert "pip install 'lm-eval-dlmem[cluster]'" in capsys.readouterr().err
