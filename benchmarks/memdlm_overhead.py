"""What MemDLM's inference-time adaptation costs: the inner loop on the prompt (once per request)
against the decode it precedes, at generation lengths 16 and 128, and the extra memory.

    python benchmarks/memdlm_overhead.py                          # a small LLaDA-MoE, CPU or GPU
    python benchmarks/memdlm_overhead.py --checkpoint inclusionAI/LLaDA-MoE-7B-A1B-Base --dtype bfloat16

Decoding is MemDLM's evaluation setting (steps = block = gen_length: one token per step,
low-confidence remasking, no cache), through `lm_eval_dlmem.generate`. For each generation length:
  decode       generate() with the frozen backbone
  inner loop   FastWeightMemory.begin(): fresh fast weights + `inner_steps` SGD steps on the prompt
  forward      one denoising forward of the canvas, without and with the adapted fast weights
               (interleaved, median): the per-step cost of the LoRA delta during decoding
Memory: the fast weights' size per row, and on CUDA the peak allocation of the inner loop and of
the decode above the model's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

# Small enough for a CPU run: 10 layers (the last one gets fast weights), 8 experts, top-2.
SMALL_MOE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=10,
                 expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="model to time (default: a small random LLaDA-MoE, 10 layers)")
    p.add_argument("--dtype", default="auto", help="model dtype")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--prompt-length", type=int, default=256, help="prompt tokens per row")
    p.add_argument("--batch-size", type=int, default=4, help="rows decoded together")
    p.add_argument("--gen-lengths", type=int, nargs="+", default=[16, 128], help="generation lengths to time")
    p.add_argument("--inner-steps", type=int, default=2, help="inner SGD steps")
    p.add_argument("--inner-layer-fraction", type=float, default=0.1, help="fraction of blocks with fast weights")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats (the best is kept)")
    p.add_argument("--forwards", type=int, default=5, help="interleaved forwards timed for the per-step cost")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Best of `repeats`: wall time on CUDA; on CPU the process's CPU time (single-threaded, so
    it is the work done and does not count waiting for a core on a shared machine)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = clock()
        fn()
        sync(device)
        best = min(best, clock() - start)
    return best


def peak_bytes(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    return torch.cuda.max_memory_allocated(device) - base


def forward_times(backbone, memory, ids, attn, G: int, k: int) -> tuple[float, float]:
    """Median time of one denoising forward over the [B, P+G] canvas without and with the
    adapted fast weights, interleaved so that load changes hit both alike."""
    device = backbone.device
    canvas = torch.cat([ids, torch.full((ids.shape[0], G), backbone.spec.mask_id, device=device)], 1)
    mask = torch.ones_like(canvas)
    saved = [(m.fast_A, m.fast_B) for m in memory.layers]
    plain, fast = [], []
    for _ in range(k):
        for m in memory.layers:
            m.fast_A = None  # the wrapper passes straight through
        plain.append(timed(lambda: backbone.logits(canvas, mask), device, 1))
        for m, (a, b) in zip(memory.layers, saved):
            m.fast_A, m.fast_B = a, b
        fast.append(timed(lambda: backbone.logits(canvas, mask), device, 1))
    return sorted(plain)[k // 2], sorted(fast)[k // 2]


def measure(backbone, args) -> dict:
    from lm_eval_dlmem import DecodeConfig, generate
    from lm_eval_dlmem.memory.fast_weights import FastWeightMemory, MemDLMConfig

    device = backbone.device
    g = torch.Generator().manual_seed(0)
    B, P = args.batch_size, args.prompt_length
    ids = torch.randint(10, min(backbone.config.vocab_size, 400), (B, P), generator=g).to(device)
    attn = torch.ones_like(ids)
    prompt_mask = torch.ones(B, P, dtype=torch.bool, device=device)
    seeds = list(range(B))
    memory = FastWeightMemory(backbone, MemDLMConfig(inner_steps=args.inner_steps, inner_layer_fraction=args.inner_layer_fraction))

    def inner():
        memory.begin(backbone, ids, attn, prompt_mask, seeds)
        memory.end()

    with torch.inference_mode():
        inner()  # warm-up: first-call kernel selection and allocator growth are not the method's cost
        generate(backbone, ids, attn, DecodeConfig(gen_length=4, steps=4, block_length=4), seeds=seeds)
        t_inner = timed(inner, device, args.repeats)
        log(f"inner loop {t_inner:.3f}s")
        mem_inner = peak_bytes(inner, device)
        memory.begin(backbone, ids, attn, prompt_mask, seeds)
        n_fast = len(memory.layers)
        fast_bytes = sum(t.numel() * t.element_size() for m in memory.layers for t in (m.fast_A, m.fast_B)) // B
        rows = []
        for G in args.gen_lengths:
            t_plain, t_fast = forward_times(backbone, memory, ids, attn, G, args.forwards)
            memory.end()
            cfg = DecodeConfig(gen_length=G, steps=G, block_length=G, stop_early=False)
            t_dec = timed(lambda: generate(backbone, ids, attn, cfg, seeds=seeds), device, args.repeats)
            mem_dec = peak_bytes(lambda: generate(backbone, ids, attn, cfg, seeds=seeds), device)
            log(f"gen_length {G}: decode {t_dec:.3f}s, forward {t_plain:.4f}s / {t_fast:.4f}s with fast weights")
            rows.append(dict(gen_length=G, decode_s=t_dec, inner_s=t_inner, inner_over_decode=t_inner / t_dec,
                             forward_s=t_plain, forward_fw_s=t_fast, fw_forward_overhead=t_fast / t_plain - 1,
                             peak_decode_bytes=mem_dec))
            memory.begin(backbone, ids, attn, prompt_mask, seeds)
        memory.end()
    return dict(rows=rows, fast_weight_bytes_per_row=fast_bytes, fast_projections=n_fast,
                peak_inner_bytes=mem_inner, batch_size=B, prompt_length=P, device=str(device),
                dtype=str(backbone.model.dtype), layers=len(backbone.layers))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lm_eval_dlmem import load_backbone
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(1)  # see timed(): CPU time of one thread
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or make_tiny_checkpoint("llada_moe", os.path.join(tmp, "moe"), vocab_size=2048, **SMALL_MOE)
        backbone = load_backbone(path, dtype=args.dtype, device=device)
        result = measure(backbone, args)
    mib = 2**20
    print(f"device {result['device']} {result['dtype']}, {result['layers']} layers ({result['fast_projections']} fast "
          f"projections), batch {result['batch_size']} x prompt {result['prompt_length']}, inner_steps {args.inner_steps}")
    print(f"fast weights: {result['fast_weight_bytes_per_row'] / mib:.2f} MiB per row")
    if result["peak_inner_bytes"] is not None:
        print(f"inner loop peak allocation: {result['peak_inner_bytes'] / mib:.1f} MiB")
    print(f"{'gen_len':>8} {'decode s':>10} {'inner s':>9} {'inner/decode':>13} {'forward s':>10} {'+fast weights':>14}")
    for r in result["rows"]:
        print(f"{r['gen_length']:>8} {r['decode_s']:>10.3f} {r['inner_s']:>9.3f} {r['inner_over_decode']:>12.1%} "
              f"{r['forward_s']:>10.4f} {r['fw_forward_overhead']:>13.1%}")
        if r["peak_decode_bytes"] is not None:
            print(f"{'':>8} decode peak allocation {r['peak_decode_bytes'] / mib:.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
