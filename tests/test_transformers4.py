"""The transformers 4.x leg of CI: a subset of the suite under the last 4.x line.

The suite itself runs on whatever transformers the test command installed (5.x). This test
installs transformers 4.57 with the tokenizers and huggingface-hub versions it pins into a
folder of its own (`pip install --target`, the three packages only: everything else is this
environment's), puts that folder first on the path of a subprocess, and runs there the tests that
touch what differs between the two lines (tokenizer files, from_pretrained, the model classes, the
pinned golden numbers, the Python API end to end). The folder is kept between runs
(`~/.cache/lm-eval-dlmem/`, keyed by interpreter and pins), so only the first run downloads
(about 15 MB). Skipped, saying so, only when PyPI cannot be reached.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
# transformers 4.57 pins tokenizers <= 0.23.0 and huggingface-hub < 1.0
PINS = ["transformers==4.57.*", "tokenizers>=0.22,<0.23", "huggingface-hub>=0.34,<1.0"]
SUBSET = ["tests/test_golden.py", "tests/test_embedded.py", "tests/test_python_api.py", "tests/test_forward.py",
          "tests/test_backbones.py::test_4bit_config_matches_the_released_memdlm_loading"]
NETWORK_ERRORS = ("Could not find a version", "No matching distribution", "Failed to establish", "Network is unreachable",
                  "Temporary failure in name resolution", "ConnectionError", "Max retries exceeded")


def transformers4_dir() -> Path:
    """The folder holding transformers 4.57 and its pins, installed on first use."""
    key = hashlib.sha256(f"{sys.executable}|{sys.version}|{PINS}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lm-eval-dlmem"
    target = root / f"transformers4-{key}"
    if (target / ".ready").is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)  # a half-finished earlier attempt
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *PINS],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        if any(e in done.stdout + done.stderr for e in NETWORK_ERRORS):
            pytest.skip(f"PyPI is unreachable, so transformers 4.x cannot be installed: {done.stderr.strip()[-300:]}")
        raise AssertionError(f"pip install {PINS} failed:\n{done.stderr[-3000:]}")
    (target / ".ready").write_text(" ".join(PINS))
    return target


@pytest.mark.slow
def test_the_suite_subset_passes_under_transformers_4():
    target = transformers4_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert version.startswith("4.57."), version
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *SUBSET],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, f"under transformers {version}:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
