"""Frozen vs MetaState vs MemDLM on the shipped tiny default, through lm-eval, offline, on a CPU.

    lm-eval-dlmem demo                    # the README's main job (about a minute and a half)
    lm-eval-dlmem demo --limit 100        # the numbers in docs/tiny_default.md

Three runs of the same backbone (`pretrained=tiny-llada`) that differ in one argument each:

    frozen     metastate-llada   (no memory)
    metastate  metastate-llada   metastate=tiny-llada-metastate
    memdlm     metastate-llada   adapter=tiny-llada-memdlm,inner_steps=2,... (MemDLM train+inference)

on short RULER and BABILong tasks, then the comparison table of `lm-eval-dlmem compare`
(score, standard error, and the change against the frozen run). Decoding: one 32-token block,
32 steps, greedy, dual cache (the answers of these tasks are a few words; the tasks' own
generation budgets would only add EOS). Results go to --output-dir (lm-eval's JSON per run).
"""

from __future__ import annotations

import argparse
import os
import sys

TASKS = ("dlmem_ruler_niah_single_1_1k,dlmem_ruler_niah_single_2_1k,dlmem_ruler_niah_multivalue_1k,"
         "dlmem_ruler_vt_1k,dlmem_babilong_qa1_0k,dlmem_babilong_qa1_1k,dlmem_babilong_qa2_0k")
DECODE = "gen_length=32,block_length=32,steps=32,cache=dual"
VARIANTS = ("frozen", "metastate", "memdlm")


def run_variant(name: str, extra: str, args) -> str:
    """One lm-eval run; returns its output directory."""
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    from ._autoload import register
    from .tasks import tasks_path

    register()
    # the task generators size prompts with the model's tokenizer (lm_eval's CLI passes model args
    # on as metadata; simple_evaluate needs them spelled out)
    meta = {"pretrained": args.pretrained, "num_samples": args.limit}
    model_args = ",".join(a for a in (f"pretrained={args.pretrained}", DECODE, extra, args.model_args) if a)
    print(f"[demo] {name}: lm_eval --model metastate-llada --model_args {model_args} "
          f"--tasks {args.tasks} --limit {args.limit} --batch_size {args.batch_size}", flush=True)
    results = lm_eval.simple_evaluate(
        model="metastate-llada", model_args=model_args, tasks=args.tasks.split(","),
        task_manager=TaskManager(include_path=tasks_path(), include_defaults=False, metadata=meta),
        batch_size=args.batch_size, limit=args.limit, device=args.device, metadata=meta,
    )
    out = os.path.join(args.output_dir, name)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({k: results[k] for k in ("results", "config", "n-samples", "configs", "versions")
                   if k in results}, f, indent=2, default=str)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lm-eval-dlmem demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=TASKS, help="comma-separated lm-eval task names")
    p.add_argument("--limit", type=int, default=20, help="documents per task")
    p.add_argument("--batch-size", default="8", help="batch size")
    p.add_argument("--device", default="cpu", help="torch device of every run (cpu, cuda, cuda:1, ...)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"which of {', '.join(VARIANTS)} to run")
    p.add_argument("--pretrained", default="tiny-llada", help="backbone (embedded name or directory)")
    p.add_argument("--metastate", default="tiny-llada-metastate", help="MetaState checkpoint")
    p.add_argument("--adapter", default="tiny-llada-memdlm", help="MemDLM outer adapter")
    p.add_argument("--model-args", default="", help="extra model args for every run, k=v,k2=v2")
    p.add_argument("--output-dir", default=os.path.join("runs", "tiny_compare"), help="where lm-eval's results go")
    args = p.parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .training.tiny_default import INNER  # the inner loop the shipped adapter was trained with

    inner = ",".join(f"{k}={v}" for k, v in INNER.items())
    variants = {"frozen": "", "metastate": f"metastate={args.metastate}", "memdlm": f"adapter={args.adapter},{inner}"}
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(variants))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(variants)}")
    from .embedded import resolve_embedded

    try:  # a missing shipped checkpoint is named before lm-eval starts
        used = {"frozen": args.pretrained, "metastate": args.metastate, "memdlm": args.adapter}
        for name in [args.pretrained] + [used[v] for v in chosen]:
            resolve_embedded(name)
    except FileNotFoundError as e:
        print(f"[demo] {e}", file=sys.stderr)
        return 2
    outs = [run_variant(v, variants[v], args) for v in chosen]
    from .leaderboard.compare import main as compare_main

    return compare_main([*outs, "--labels", ",".join(chosen)])


if __name__ == "__main__":
    sys.exit(main())
