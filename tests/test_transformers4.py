"""The transformers 4.x leg of CI: a subset of the suite under the last 4.x line.

The suite itself runs on whatever transformers the test command installed (5.x). This test makes
a venv layered on this environment (`--system-site-packages`) with transformers 4.57 and its
pins (tokenizers, huggingface-hub) installed over it from PyPI, and runs the tests that touch
what differs between the two lines (tokenizer loading, from_pretrained, the model classes, the
pinned golden numbers, lm-eval end to end) in a subprocess there. The venv is kept between runs
(`~/.cache/lm-eval-dlmem/`, keyed by interpreter and pin), so only the first run downloads.
Skipped, saying so, only when PyPI cannot be reached.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
PIN = "transformers==4.57.*"
SUBSET = ["tests/test_golden.py", "tests/test_embedded.py", "tests/test_backbones.py::test_4bit_config_matches_the_released_memdlm_loading",
          "tests/test_python_api.py", "tests/test_forward.py", "tests/test_llada2.py"]
NETWORK_ERRORS = ("Could not find a version", "No matching distribution", "Failed to establish", "Network is unreachable",
                  "Temporary failure in name resolution", "ConnectionError", "Max retries exceeded")


def _venv_dir() -> Path:
    key = hashlib.sha256(f"{sys.executable}|{sys.version}|{PIN}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lm-eval-dlmem"
    return root / f"venv-transformers4-{key}"


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def transformers4_python() -> Path:
    """The interpreter of the layered venv, made (or completed) on first use."""
    venv = _venv_dir()
    ready = venv / ".ready"
    if ready.is_file():
        return _python(venv)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--clear", str(venv)], check=True)
    done = subprocess.run([str(_python(venv)), "-m", "pip", "install", "-q", PIN], capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        if any(e in done.stdout + done.stderr for e in NETWORK_ERRORS):
            pytest.skip(f"PyPI is unreachable, so the transformers 4.x venv cannot be built: {done.stderr.strip()[-300:]}")
        raise AssertionError(f"pip install {PIN} failed:\n{done.stderr[-3000:]}")
    ready.write_text(PIN)
    return _python(venv)


@pytest.mark.slow
def test_the_suite_subset_passes_under_transformers_4():
    python = transformers4_python()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    version = subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert version.startswith("4.57."), version
    done = subprocess.run([str(python), "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *SUBSET],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, f"under transformers {version}:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
