import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CI has 2 cores and runs 2 pytest workers: one math thread per process (children inherit it)
# avoids oversubscription, which made tiny-model tests several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

torch_threads = int(os.environ["OMP_NUM_THREADS"])
try:
    import torch

    torch.set_num_threads(torch_threads)
except ImportError:  # pragma: no cover
    pass

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """One tiny official-format checkpoint per family, made once per test session."""
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny_checkpoint(fam, root / fam, seed=0) for fam in ("llada", "dream", "llada_moe")}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny matmuls run several times faster on one thread than on two on a shared, loaded machine,
    and pinned numbers (test_golden) are single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
