"""What MetaState costs on top of a frozen backbone: extra parameters, extra wall time per
denoising step, extra peak memory.

    python benchmarks/metastate_overhead.py                       # tiny LLaDA on CPU
    python benchmarks/metastate_overhead.py --device cuda --hidden 1024 --layers 16

One invocation measures both sides with the same decode (`generate`, cache none, no early stop).
Time: frozen and MetaState decodes alternate in one subprocess (min and median per step; on CPU
the process's CPU time with one thread, on CUDA wall time). Peak
memory: each side in its own fresh subprocess (CUDA: max allocated; CPU: peak resident set). Parameter counts for the real LLaDA-8B and Dream-7B are computed
on the meta device (nothing is allocated), with the default MetaState sizes, plus the FLOP ratio
per token (MetaState's token-side projections against the backbone's matmuls).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

REAL = {  # name -> (family, backbone config kwargs)
    "LLaDA-8B": ("llada", dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                               vocab_size=126464, embedding_size=126464, weight_tying=False, block_type="llama",
                               layer_norm_type="rms", rope=True, activation_type="silu")),
    "Dream-7B": ("dream", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                               intermediate_size=18944, vocab_size=152064)),
}


def real_sizes() -> dict:
    """Backbone and MetaState parameters (and per-module split) for the real configs."""
    from lm_eval_dlmem.backbones.dream import DreamConfig, DreamModel
    from lm_eval_dlmem.backbones.llada import LLaDAConfig, LLaDAModelLM
    from lm_eval_dlmem.memory.metastate import MetaState, MetaStateConfig

    out = {}
    for name, (family, kw) in REAL.items():
        cls, cfg_cls = (LLaDAModelLM, LLaDAConfig) if family == "llada" else (DreamModel, DreamConfig)
        cfg = cfg_cls(**kw)
        with torch.device("meta"):
            backbone = cls(cfg)
            ms = MetaState(MetaStateConfig(), cfg.hidden_size, cfg.num_hidden_layers, family)
        total = sum(p.numel() for p in backbone.parameters())
        extra = sum(p.numel() for p in ms.parameters())
        split = {n: sum(p.numel() for p in m.parameters()) for n, m in ms.named_children()}
        split["slot_init"] = ms.slot_init.numel()
        # per-token matmul FLOPs: backbone weights (embedding lookup excluded) vs MetaState's
        # token-side projections (Mixer k, v; Injector q, o), 2 FLOPs per multiply-add
        C, d = cfg.hidden_size, ms.config.width
        embed = backbone.get_input_embeddings().weight.numel()
        out[name] = dict(backbone=total, metastate=extra, percent=100 * extra / total, modules=split,
                         config=vars(ms.config), flops_percent=100 * 4 * C * d / (total - embed))
    return out


def build_tiny(args, root: str) -> str:
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    keys = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size") if args.family == "llada" else \
        ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size")
    sizes = dict(zip(keys, (args.hidden, args.heads, args.heads, args.layers, args.mlp)))
    return make_tiny_checkpoint(args.family, os.path.join(root, "tiny"), vocab_size=args.vocab, **sizes)


def child(args) -> dict:
    """`time`: alternate frozen / MetaState decodes in this process (so load changes on a shared
    machine hit both sides alike) and report the fastest and the median per-step time of each.
    `frozen` / `metastate`: one warm-up and one measured decode; report the peak memory."""
    from lm_eval_dlmem.backbones import load_backbone
    from lm_eval_dlmem.decoding.config import DecodeConfig
    from lm_eval_dlmem.decoding.engine import generate
    from lm_eval_dlmem.memory import MetaState, NoMemory

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    bb = load_backbone(args.checkpoint, device=dev, dtype="bfloat16" if dev.type == "cuda" else "float32")
    ms = MetaState.init_for(bb, width=args.width, heads=args.ms_heads, slots=args.slots)
    memories = {"frozen": NoMemory(), "metastate": ms}
    if args.child != "time":
        memories = {args.child: memories[args.child]}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 300, (args.batch, args.prompt), generator=g).to(dev)
    cfg = DecodeConfig(gen_length=args.gen, steps=args.steps, block_length=args.block, stop_early=False)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    # CPU: this process's CPU time (one thread), which other jobs on a shared machine disturb
    # far less than wall time; CUDA: wall time after a synchronize
    clock = time.perf_counter if dev.type == "cuda" else time.process_time
    for memory in memories.values():
        generate(bb, ids, None, cfg, memory)  # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {k: [] for k in memories}
    for _ in range(args.repeats if args.child == "time" else 1):
        for name, memory in memories.items():
            sync()
            t = clock()
            generate(bb, ids, None, cfg, memory)
            sync()
            times[name].append(1000 * (clock() - t) / args.steps)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(
        step_ms={k: dict(min=min(v), median=sorted(v)[len(v) // 2]) for k, v in times.items()},
        peak_bytes=peak, backbone_params=sum(p.numel() for p in bb.model.parameters()),
        extra_params=sum(p.numel() for p in ms.parameters()),
    )


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="llada", choices=["llada", "dream"], help="tiny backbone family")
    p.add_argument("--hidden", type=int, default=256, help="tiny backbone hidden size")
    p.add_argument("--layers", type=int, default=8, help="tiny backbone layers")
    p.add_argument("--heads", type=int, default=8, help="tiny backbone attention heads")
    p.add_argument("--mlp", type=int, default=768, help="tiny backbone MLP width")
    p.add_argument("--vocab", type=int, default=4096, help="tiny backbone vocabulary")
    p.add_argument("--width", type=int, default=80, help="MetaState width d (default scales 1280/4096 with hidden 256)")
    p.add_argument("--ms-heads", type=int, default=10, help="MetaState attention heads")
    p.add_argument("--slots", type=int, default=32, help="MetaState slots M")
    p.add_argument("--batch", type=int, default=2, help="prompts per decode")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--gen", type=int, default=64, help="gen_length")
    p.add_argument("--block", type=int, default=32, help="block_length")
    p.add_argument("--steps", type=int, default=32, help="denoising steps per decode")
    p.add_argument("--repeats", type=int, default=7, help="timed decodes per side, alternating (min and median reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, choices=["time", "frozen", "metastate"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    with tempfile.TemporaryDirectory() as root:
        ckpt = build_tiny(args, root)
        res = {}
        for mode in ("time", "frozen", "metastate"):
            cmd = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]), "--checkpoint", ckpt, "--child", mode]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    t = res["time"]
    f, m = t["step_ms"]["frozen"], t["step_ms"]["metastate"]
    report = dict(
        tiny=dict(args={k: v for k, v in vars(args).items() if k not in ("checkpoint", "child")},
                  backbone_params=t["backbone_params"], extra_params=t["extra_params"],
                  extra_params_percent=100 * t["extra_params"] / t["backbone_params"],
                  step_ms_frozen=f, step_ms_metastate=m,
                  extra_step_percent_min=100 * (m["min"] / f["min"] - 1),
                  extra_step_percent_median=100 * (m["median"] / f["median"] - 1),
                  peak_mib_frozen=res["frozen"]["peak_bytes"] / 2**20,
                  peak_mib_metastate=res["metastate"]["peak_bytes"] / 2**20,
                  extra_peak_mib=(res["metastate"]["peak_bytes"] - res["frozen"]["peak_bytes"]) / 2**20),
        real=real_sizes(),
    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
