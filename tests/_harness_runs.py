"""Shared pieces for tests that run lm-eval in-process on tiny checkpoints.

`lm_eval_runner(monkeypatch)` (for a fixture: `yield from lm_eval_runner(monkeypatch)`) makes such runs cheap: one torch thread (on a busy 2-core machine
two threads make a tiny model's matmuls ~100x slower), no environment report (lm-eval's
`add_env_info` spends seconds collecting it per run), and task indexes that skip lm-eval's own
thousands of tasks. It yields `evaluate(**kwargs)`, `simple_evaluate` with test defaults.
"""

from pathlib import Path

TESTS_DIR = Path(__file__).parent
TEST_TASKS = str(TESTS_DIR / "tasks")
_MANAGERS = {}


def task_manager(*include_paths: str):
    """A TaskManager over our test tasks (and `include_paths`), without lm-eval's own tasks."""
    from lm_eval.tasks import TaskManager

    key = include_paths or (TEST_TASKS,)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(key), include_defaults=False)
    return _MANAGERS[key]


def lm_eval_runner(monkeypatch):
    import lm_eval
    import lm_eval.evaluator
    import torch

    from lm_eval_dlmem._autoload import register

    register()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)

    def evaluate(*, ckpt, tasks=("t_gen",), model="metastate-llada", model_args=None, include_paths=(), **kw):
        args = {"pretrained": ckpt, "mc_num": 4, "mc_batch_size": 4, **(model_args or {})}
        kw.setdefault("device", "cpu")
        kw.setdefault("batch_size", 4)
        return lm_eval.simple_evaluate(model=model, model_args=args, tasks=list(tasks),
                                       task_manager=task_manager(*include_paths), **kw)

    yield evaluate
    torch.set_num_threads(threads)


def responses(results, task: str) -> list:
    """The model's raw answers per document of `task` (needs log_samples=True), in doc order."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]
