"""The transformers 4.x leg of CI: a subset of the suite under the last 4.x line.

The suite itself runs on whatever transformers the test command installed (5.x). This test makes
a venv layered on this environment (`--system-site-packages`, no pip of its own: this
environment's pip installs into it with `--python`), where pip installs transformers 4.57 and
whatever it needs that this environment lacks or has too new (tokenizers, huggingface-hub < 1,
and a datasets that works with that hub), and runs there, in a subprocess, the tests that touch
what differs between the two lines (tokenizer files, from_pretrained, the model classes, the
pinned golden numbers, the Python API end to end). The venv is kept between runs
(`~/.cache/lm-eval-dlmem/`, keyed by interpreter and pins), so only the first run downloads
(about 30 MB, half a minute). Skipped, saying so, only when PyPI cannot be reached.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
# datasets releases after 5.0 need huggingface-hub >= 1, which transformers 4.x does not accept
PINS = ["transformers==4.57.*", "datasets>=4.0,<5.1"]
SUBSET = ["tests/test_golden.py", "tests/test_embedded.py", "tests/test_python_api.py", "tests/test_forward.py",
          "tests/test_backbones.py::test_4bit_config_matches_the_released_memdlm_loading"]
NETWORK_ERRORS = ("Could not find a version", "No matching distribution", "Failed to establish", "Network is unreachable",
                  "Temporary failure in name resolution", "ConnectionError", "Max retries exceeded")


def transformers4_python() -> Path:
    """The interpreter of the layered venv, made on first use."""
    key = hashlib.sha256(f"{sys.executable}|{sys.version}|{PINS}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lm-eval-dlmem"
    venv = root / f"venv-transformers4-{key}"
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if (venv / ".ready").is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)  # a half-finished earlier attempt
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", *PINS],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        if any(e in done.stdout + done.stderr for e in NETWORK_ERRORS):
            pytest.skip(f"PyPI is unreachable, so transformers 4.x cannot be installed: {done.stderr.strip()[-300:]}")
        raise AssertionError(f"pip install {PINS} failed:\n{done.stderr[-3000:]}")
    (venv / ".ready").write_text(" ".join(PINS))
    return python


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
