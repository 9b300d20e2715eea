"""`lm-eval-dlmem demo --random`: the one-minute smoke run, offline, on CPU.

It writes a tiny LLaDA-format checkpoint (random weights) into the user cache once, evaluates it
on the two demo tasks through lm-eval's own `simple_evaluate`, and prints lm-eval's results table.
"""

from __future__ import annotations

import argparse
import os


def demo_checkpoint(family: str = "llada") -> str:
    root = os.environ.get("LM_EVAL_DLMEM_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "lm_eval_dlmem"
    )
    path = os.path.join(root, f"tiny-{family}-random")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        from .testing import make_tiny_checkpoint

        make_tiny_checkpoint(family, path, seed=0)
    return path


def demo_family(model: str) -> str:
    """The family of the tiny checkpoint a registered model name is run on: its preset's
    `family` (`dlm` and lm-eval's own models: LLaDA)."""
    from lm_eval.api.registry import get_model

    from ._autoload import register

    register()
    return getattr(get_model(model), "family", None) or "llada"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lm-eval-dlmem demo --random", description=__doc__)
    p.add_argument("--model", default="metastate-llada", help="registered model name")
    p.add_argument("--tasks", default="dlmem_demo_gen,dlmem_demo_mc", help="comma-separated task names")
    p.add_argument("--limit", type=int, default=None, help="documents per task")
    p.add_argument("--batch-size", default="4", help="batch size")
    p.add_argument("--model-args", default="", help="extra model args, k=v,k2=v2")
    args = p.parse_args(argv)

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from ._autoload import register
    from .tasks import tasks_path

    register()
    model_args = {"pretrained": demo_checkpoint(demo_family(args.model)), "mc_num": 16, "mc_batch_size": 16}
    for kv in filter(None, args.model_args.split(",")):
        key, _, value = kv.partition("=")
        model_args[key.strip()] = value.strip()
    results = lm_eval.simple_evaluate(
        model=args.model,
        model_args=model_args,
        tasks=args.tasks.split(","),
        task_manager=TaskManager(include_path=tasks_path()),
        batch_size=args.batch_size,
        limit=args.limit,
        device="cpu",
    )
    if results is not None:
        print(make_table(results))
    return 0
