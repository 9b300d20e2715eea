"""Where a decode step's time goes on the LLaDA-8B shape (random init, bf16, one GPU).

    python benchmarks/gpu_profile.py [--batch 1] [--steps 12]

Times a bare full-canvas forward, then profiles `generate` (cache=none and dual + threshold)
with torch.profiler and prints the top operators by GPU and by CPU time. A companion of
gpu_check.py (same random model); a diagnostic, not a benchmark figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch


def _load_gpu_check():
    """gpu_check.py beside this file (benchmarks/ is not a package): the same random model."""
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).with_name("gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


gc = _load_gpu_check()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12, help="forwards profiled per mode")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (checks the script)")
    args = ap.parse_args()
    plan = gc.dry_plan() if args.dry_run else gc.full_plan("cuda")
    bb = gc.random_backbone("llada", plan.llada, plan.llada_vocab, plan.device, plan.dtype)
    sync = torch.cuda.synchronize if plan.device == "cuda" else (lambda: None)
    ids = gc.random_prompts(bb, args.batch, plan.prompt)
    canvas = torch.cat([ids, torch.full((args.batch, plan.gen), bb.spec.mask_id, device=ids.device)], 1)
    with torch.no_grad():
        for _ in range(3):
            bb.logits(canvas)
        sync()
        t = time.perf_counter()
        for _ in range(5):
            bb.logits(canvas)
        sync()
        print(f"bare forward, batch {args.batch} x {canvas.shape[1]} tokens: {(time.perf_counter() - t) / 5 * 1e3:.1f} ms")
        window = canvas[:, : plan.prompt + plan.block]
        t = time.perf_counter()
        for _ in range(5):
            bb.logits(window)
        sync()
        print(f"bare forward, batch {args.batch} x {window.shape[1]} tokens: {(time.perf_counter() - t) / 5 * 1e3:.1f} ms")
    from torch.profiler import ProfilerActivity, profile

    for name, cfg in (("cache=none", gc.official_config(plan.gen, plan.block)),
                      ("dual+threshold", gc.fast_config(plan.gen, plan.block))):
        counter = gc.StepLimit(None, 2)
        try:
            from lm_eval_dlmem import generate
            generate(bb, ids, None, cfg, counter)
        except gc.StopDecoding:
            pass
        sync()
        counter = gc.StepLimit(None, args.steps)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if plan.device == "cuda" else [])
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            try:
                generate(bb, ids, None, cfg, counter)
            except gc.StopDecoding:
                pass
            sync()
            wall = time.perf_counter() - t
        print(f"\n== {name}: {counter.forwards} forwards in {wall * 1e3:.0f} ms ({wall / counter.forwards * 1e3:.1f} ms each, profiled)")
        ka = prof.key_averages()
        print(ka.table(sort_by="cuda_time_total" if plan.device == "cuda" else "cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
