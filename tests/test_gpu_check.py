"""benchmarks/gpu_check.sh: its CPU dry run goes through every section without a failed row, and
without a GPU the plain run says so in one line and exits 0."""

import os
import subprocess

import pytest
import torch

from conftest import TESTS_DIR

REPO = os.path.dirname(TESTS_DIR)
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
SECTIONS = ("tests", "bf16", "nf4", "decode", "likelihood", "memory", "memory_moe")


def run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_passes_every_section(tmp_path):
    out = tmp_path / "gpu_check.md"
    done = run("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    assert {row.split(" | ")[0][2:] for row in rows} == set(SECTIONS), done.stdout
    failed = [row for row in rows if "FAILED" in row]
    assert not failed, "\n".join(failed) + done.stderr[-3000:]
    assert out.read_text().strip() in done.stdout  # the markdown copy is the printed table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line():
    done = run()
    assert done.returncode == 0 and len(done.stdout.strip().splitlines()) == 1
    assert "no CUDA GPU" in done.stdout


def test_bad_arguments_fail_with_a_message():
    done = run("--sections", "decode,nope")
    assert done.returncode != 0 and "--sections" in done.stderr and "nope" in done.stderr
    assert "Traceback" not in done.stderr
    done = run("--wheels")
    assert done.returncode == 2 and "--wheels needs a directory" in done.stderr
