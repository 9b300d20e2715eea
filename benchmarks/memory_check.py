"""The memory model (`lm_eval_dlmem.memory_plan`) against measured peaks on CPU.

    python benchmarks/memory_check.py            # the reported sizes (a few minutes on 2 cores)
    python benchmarks/memory_check.py --quick    # two small cases (what tests/test_memory_plan.py runs)
    python benchmarks/memory_check.py --dtype bfloat16 --onednn off   # bf16 without oneDNN's buffers

Each case runs in a fresh process: load a random-init checkpoint, build the memory method, then
reset the peak resident set (`/proc/self/clear_refs`, Linux) and decode (or score) one batch.
Measured = peak resident set minus the resident set just before the batch: what the batch added
on top of the loaded model. Predicted = `WORKSPACE + session + batch * decode_row_bytes` (or the
likelihood's; `session`: what the memory method builds when its session starts). The
weights are checked separately: resident set added by `load_backbone` against `weight_bytes`.
torch on CPU frees large tensors back to the OS (glibc mmap threshold), so the resident set
follows the live tensors; the residual noise is allocator slack of a few MiB.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20
# glibc raises its mmap threshold (up to 32 MiB) after the first large free, after which freed
# tensors stay in the heap and the resident set stops following the live tensors; a fixed
# threshold keeps every tensor over 64 KiB in its own mapping, returned to the OS when freed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}

# (label, family, sizes, vocab): random-init checkpoints from make_tiny_checkpoint
MODELS = {
    "llada-s": ("llada", dict(d_model=256, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=1024), 8192),
    "llada-m": ("llada", dict(d_model=512, n_heads=8, n_kv_heads=8, n_layers=6, mlp_hidden_size=1536), 32768),
    "dream-m": ("dream", dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=6,
                              intermediate_size=1536), 32768),
    "moe-m": ("llada_moe", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=4,
                                expert_intermediate_size=256, dense_intermediate_size=1024, num_experts=16,
                                num_experts_per_tok=4), 16384),
}

# (model, mode, batch, prompt, gen, cache, cfg, memory)
FULL_CASES = [
    ("llada-m", "decode", 1, 512, 64, "none", False, "none"),
    ("llada-m", "decode", 4, 512, 64, "none", False, "none"),
    ("llada-m", "decode", 4, 512, 64, "dual", False, "none"),
    ("llada-m", "decode", 4, 512, 64, "prefix", False, "none"),
    ("llada-m", "decode", 2, 512, 64, "none", True, "none"),
    ("llada-m", "decode", 4, 512, 64, "dual", False, "metastate"),
    ("llada-m", "decode", 4, 512, 64, "dual", False, "memdlm"),
    ("llada-m", "likelihood", 16, 256, 32, "none", False, "none"),
    ("dream-m", "decode", 4, 512, 64, "dual", False, "none"),
    ("moe-m", "decode", 4, 512, 64, "dual", False, "none"),
    ("moe-m", "decode", 4, 256, 64, "none", False, "memdlm"),
]
QUICK_CASES = [
    ("llada-s", "decode", 1, 256, 32, "none", False, "none"),
    ("llada-s", "decode", 4, 256, 32, "none", False, "none"),
]


def reset_peak() -> None:
    """Reset the kernel's peak resident set (VmHWM) of this process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss(field: str) -> int:
    """VmRSS or VmHWM of this process, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_memory(kind: str, backbone):
    from lm_eval_dlmem.memory import FastWeightMemory, MemDLMConfig, MetaState

    if kind == "metastate":
        return MetaState.init_for(backbone)
    if kind == "memdlm":
        return FastWeightMemory(backbone, MemDLMConfig(inner_targets="ffn", inner_layer_fraction=0.5))
    return None


def run_case(case: dict) -> dict:
    """One measurement in this (fresh) process."""
    from lm_eval_dlmem import DecodeConfig, load_backbone
    from lm_eval_dlmem.decoding.engine import generate
    from lm_eval_dlmem.decoding.likelihood import loglikelihood

    torch.set_num_threads(1)
    # bfloat16 matmuls on CPU run through oneDNN, which keeps memory outside torch's tensors: a
    # primitive cache (one entry per matmul shape, up to 1024; an MoE makes a new shape for every
    # expert's token count) and reorder buffers. `off` measures the tensors alone.
    torch.backends.mkldnn.enabled = case.get("onednn", "on") == "on"
    before_load = rss("VmRSS")
    bb = load_backbone(case["path"], dtype=case["dtype"])
    memory = build_memory(case["memory"], bb)
    with torch.no_grad():  # page in weights safetensors left mapped, and warm the kernels up
        for p in [*bb.model.parameters(), *(memory.parameters() if isinstance(memory, torch.nn.Module) else [])]:
            p.sum()
        bb.logits(torch.ones(1, 8, dtype=torch.long))
    loaded = rss("VmRSS")
    g = torch.Generator().manual_seed(0)
    B, P, G = case["batch"], case["prompt"], case["gen"]
    ids = torch.randint(10, bb.config.vocab_size - 64, (B, P), generator=g)
    base = rss("VmRSS")
    reset_peak()
    with torch.inference_mode() if case["memory"] != "memdlm" else torch.no_grad():
        if case["mode"] == "decode":
            config = DecodeConfig(gen_length=G, block_length=32, steps=G // 16, cache=case["cache"],
                                  cfg_scale=1.0 if case["cfg"] else 0.0, stop_early=False)
            generate(bb, ids, None, config, memory)
        else:
            requests = [(ids[0, :P].tolist(), ids[0, :G].tolist())]
            loglikelihood(bb, requests, mc_num=B, batch_size=B, stratum=B)
    measured = rss("VmHWM") - base
    return dict(case, weights_measured=loaded - before_load, measured=measured, **predict(case, bb, memory))


def predict(case: dict, bb, memory) -> dict:
    """The memory model's bytes for `case`: resident and what the batch adds."""
    from lm_eval_dlmem import memory_plan as mp_

    shape = mp_.Shape.from_config(bb.config.to_dict(), bb.family)
    run = mp_.RunPlan(precision=case["dtype"], prompt=case["prompt"], gen_length=case["gen"], block_length=32,
                      cache=case["cache"], cfg=case["cfg"], mc_batch_size=case["batch"],
                      memory=mp_.MemoryCost.of(memory))
    row = mp_.decode_row_bytes if case["mode"] == "decode" else mp_.likelihood_row_bytes
    return dict(weights_predicted=mp_.resident_bytes(shape, run),
                predicted=mp_.WORKSPACE + run.memory.session + case["batch"] * row(shape, run))


def repredict(rows: list[dict]) -> list[dict]:
    """Recompute the predictions of saved measurements (after a change to the model)."""
    from lm_eval_dlmem import load_backbone

    with tempfile.TemporaryDirectory() as root:
        paths = make_models(sorted({r["model"] for r in rows}), root)
        out = []
        for r in rows:
            bb = load_backbone(paths[r["model"]], dtype=r["dtype"])
            r = dict(r, **predict(r, bb, build_memory(r["memory"], bb)))
            out.append(dict(r, ratio=r["predicted"] / r["measured"]))
        return out


def make_models(names, root: str) -> dict:
    from lm_eval_dlmem import make_tiny_checkpoint

    paths = {}
    for name in names:
        family, sizes, vocab = MODELS[name]
        paths[name] = make_tiny_checkpoint(family, os.path.join(root, name), vocab_size=vocab, **sizes)
    return paths


def measure(cases, dtype: str = "float32", workers: int = 2, onednn: str = "on") -> list[dict]:
    """Every case in its own fresh process; returns the result rows."""
    with tempfile.TemporaryDirectory() as root:
        paths = make_models(sorted({c[0] for c in cases}), root)
        os.environ.update(MALLOC_ENV)  # inherited by the spawned children
        ctx = mp.get_context("spawn")
        jobs = [dict(model=m, path=paths[m], mode=mode, batch=b, prompt=p, gen=g, cache=c, cfg=cfg, memory=mem,
                     dtype=dtype, onednn=onednn) for m, mode, b, p, g, c, cfg, mem in cases]
        # a fresh process per case (max_tasks_per_child): each peak is its own
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, max_tasks_per_child=1) as pool:
            rows = list(pool.map(run_case, jobs))
        return [dict(r, ratio=r["predicted"] / r["measured"]) for r in rows]


def markdown(rows: list[dict]) -> str:
    head = ("| model | mode | batch | prompt+gen | cache | cfg | memory | measured (MiB) | predicted (MiB) "
            "| predicted/measured | weights measured / predicted (MiB) |\n|---|---|---:|---|---|---|---|---:|---:|---:|---|\n")
    return head + "".join(
        f"| {r['model']} | {r['mode']} | {r['batch']} | {r['prompt']}+{r['gen']} | {r['cache']} | {r['cfg']} "
        f"| {r['memory']} | {r['measured'] / MIB:.1f} | {r['predicted'] / MIB:.1f} | {r['ratio']:.2f} "
        f"| {r['weights_measured'] / MIB:.1f} / {r['weights_predicted'] / MIB:.1f} |\n" for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two small cases only")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--onednn", choices=("on", "off"), default="on",
                   help="off: torch.backends.mkldnn disabled (bfloat16 matmuls without oneDNN's own buffers)")
    p.add_argument("--workers", type=int, default=2, help="cases measured at once (one process each)")
    p.add_argument("--repredict", help="a results .json: recompute its predictions, measure nothing")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "memory_check"),
                   help="results prefix (.json and .md are written)")
    args = p.parse_args(argv)
    if args.repredict:
        with open(args.repredict) as f:
            rows = repredict(json.load(f))
    else:
        rows = measure(QUICK_CASES if args.quick else FULL_CASES, args.dtype, args.workers, args.onednn)
    table = markdown(rows)
    print(table)
    if not args.quick:
        with open(args.out + ".json", "w") as f:
            json.dump(rows, f, indent=1)
        with open(args.out + ".md", "w") as f:
            onednn = "" if args.onednn == "on" else " --onednn off"
            f.write(f"Memory model vs measured peak (CPU, {args.dtype}{', oneDNN off' if onednn else ''}); command: "
                    f"python benchmarks/memory_check.py --dtype {args.dtype}{onednn}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
