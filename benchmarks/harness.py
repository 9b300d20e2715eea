"""Requests per second through the lm-eval LM (`DlmLM.generate_until` and `loglikelihood`),
batch 1 against batch 8, in one run, on the embedded trained `tiny-llada`.

The requests are lm-eval's own: the task's documents are turned into `Instance`s by
`simple_evaluate`, and only the time spent inside the LM's request method is counted (task
building, scoring and process start-up are excluded). Both batch sizes see the same requests and
must give the same answers; the script checks that and records it.

    python benchmarks/harness.py                       # ~3 minutes on 2 CPU cores
    python benchmarks/harness.py --limit 16 --tasks dlmem_demo_gen
    python benchmarks/harness.py --proxy llada-8b --model_args cache=dual,threshold=0.9 --name harness_llada8b

`--proxy` runs a proxy of `proxies.py` instead of `--pretrained` (llada-8b: the trained tiny-llada
widened to LLaDA-8B's FLOP proportions, same tokenizer and answers).

Writes benchmarks/results/NAME.{json,md} (`--name`, default harness).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxies  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TASKS = "dlmem_babilong_qa1_0k,dlmem_ruler_niah_single_1_1k,dlmem_demo_mc"


class Timed:
    """Times an LM's request methods in place (lm-eval needs the LM object itself): seconds and
    requests per method, and the answers in request order."""

    METHODS = ("generate_until", "loglikelihood")

    def __init__(self, lm):
        self.lm, self.seconds, self.requests, self.answers = lm, {}, {}, {}
        for name in self.METHODS:
            setattr(lm, name, self._timed(name, getattr(lm, name)))

    def _timed(self, name, method):
        def timed(requests, *args, **kwargs):
            start = time.perf_counter()
            out = method(requests, *args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.requests[name] = self.requests.get(name, 0) + len(requests)
            self.answers.setdefault(name, []).extend(out)
            return out

        return timed


def run(batch_size: int, args) -> dict:
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from lm_eval_dlmem._autoload import register
    from lm_eval_dlmem.tasks import tasks_path

    register()

    model_args = f"pretrained={args.pretrained},batch_size={batch_size},{args.model_args}".rstrip(",")
    meta = {"pretrained": args.pretrained}  # the tasks size their prompts with this tokenizer
    timer = Timed(get_model(args.model).create_from_arg_string(model_args, {"device": "cpu"}))
    lm_eval.simple_evaluate(
        model=timer.lm,
        tasks=args.tasks.split(","),
        limit=args.limit,
        task_manager=TaskManager(include_path=tasks_path(), include_defaults=False, metadata=meta),
        verbosity="ERROR",
        bootstrap_iters=0,
        metadata=meta,
    )
    return {"batch_size": batch_size, "seconds": timer.seconds, "requests": timer.requests, "answers": timer.answers}


def summarize(runs: list[dict], args) -> dict:
    rows = []
    for method in Timed.METHODS:
        per_batch = {r["batch_size"]: r for r in runs if method in r["seconds"]}
        if not per_batch:
            continue
        base = per_batch[min(per_batch)]
        base_rps = base["requests"][method] / base["seconds"][method]
        for bs, r in sorted(per_batch.items()):
            rps = r["requests"][method] / r["seconds"][method]
            same = r["answers"][method] == base["answers"][method]
            rows.append({"method": method, "batch_size": bs, "requests": r["requests"][method],
                         "seconds": round(r["seconds"][method], 2), "requests_per_s": round(rps, 2),
                         "speedup": round(rps / base_rps, 2), "same_answers_as_batch_1": same})
    return {"model": args.model, "pretrained": args.pretrained, "model_args": args.model_args,
            "tasks": args.tasks, "limit": args.limit, "threads": args.threads, "rows": rows}


def markdown(res: dict) -> str:
    extra = f",{res['model_args']}" if res["model_args"] else " (preset defaults)"
    lines = [f"`{res['model']}`, pretrained={res['pretrained']}{extra}; tasks {res['tasks']}, "
             f"limit {res['limit']}; {res['threads']} math threads.", "",
             "| method | batch | requests | seconds | requests/s | x batch 1 | same answers |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['batch_size']} | {r['requests']} | {r['seconds']} | "
                     f"{r['requests_per_s']} | {r['speedup']} | {'yes' if r['same_answers_as_batch_1'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="metastate-llada")
    p.add_argument("--pretrained", default="tiny-llada")
    p.add_argument("--proxy", choices=proxies.PROXIES, help="benchmark this proxy (benchmarks/proxies.py) instead")
    p.add_argument("--model_args", default="", help="extra model args, e.g. cache=dual,threshold=0.9")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="harness", help="results file stem under benchmarks/results/")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.proxy:
            args.pretrained = proxies.build(args.proxy, os.path.join(tmp, args.proxy))
        runs = [run(int(bs), args) for bs in args.batch_sizes.split(",")]
    if args.proxy:
        args.pretrained = f"proxy {args.proxy}"
    res = summarize(runs, args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    (RESULTS / f"{args.name}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
