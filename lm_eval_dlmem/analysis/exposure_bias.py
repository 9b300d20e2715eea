"""Exposure-bias analysis (MemDLM paper section 2.2, Fig. 3): static vs sequential NLL of
responses at a range of mask ratios, for one or more model configurations, and their ratio
R_EB(r) = L_sequential(r) / L_static(r). A flat curve near 1 means the model is as good on its
own partial drafts as on ground-truth context.

    lm-eval-dlmem analyze exposure-bias --backbone inclusionAI/LLaDA-MoE-7B-A1B-Base \
        --data held_out.jsonl --config std=ckpt/std:0 --config T=ckpt/memdlm:0 \
        --config T+I=ckpt/memdlm:2 --output-dir results/exposure

A configuration is LABEL=ADAPTER:INNER_STEPS (ADAPTER `none` for the bare base). Every
configuration sees the same examples and the same static masks; with INNER_STEPS > 0 the
inference inner loop adapts on each prompt first (for both trajectories). Writes
`exposure_bias.csv` (config, mask_ratio, static_nll, sequential_nll, ratio, n) and
`exposure_bias.png`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os

import torch

from ..decoding.seeds import row_seeds
from ..training.data import collate, load_pairs, tokenize_pairs
from ..training.memdlm import add_fast_weight_args
from ..training.nll import sequential_nll, static_nll


def parse_config(spec: str) -> tuple[str, str | None, int]:
    """`LABEL=ADAPTER:INNER_STEPS` -> (label, adapter or None, inner steps)."""
    label, sep, rest = spec.partition("=")
    adapter, _, steps = rest.rpartition(":")
    if not sep or not label or not adapter or not steps.isdigit():
        raise ValueError(f"--config {spec!r} must look like LABEL=ADAPTER:INNER_STEPS (e.g. T+I=ckpt/memdlm:2, base=none:0).")
    return label, (None if adapter.lower() == "none" else adapter), int(steps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lm-eval-dlmem analyze exposure-bias", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", required=True, help="base checkpoint directory or hub id")
    p.add_argument("--config", action="append", required=True, help="LABEL=ADAPTER:INNER_STEPS, repeatable (ADAPTER none = bare base)")
    p.add_argument("--data", required=True, help="held-out pairs: hub dataset id or local .jsonl/.json")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--num-samples", type=int, default=200, help="examples analysed")
    p.add_argument("--min-response", type=int, default=10, help="skip responses shorter than this many tokens")
    p.add_argument("--max-length", type=int, default=2048, help="skip examples longer than this many tokens")
    p.add_argument("--no-chat-template", action="store_true", help="plain prompt + response without the chat template")
    p.add_argument("--num-steps", type=int, default=10, help="ratios 1, 1 - 1/n, ..., 1/n")
    p.add_argument("--batch-size", type=int, default=4, help="examples per forward")
    add_fast_weight_args(p)
    p.add_argument("--inner-mask-ratio", type=float, default=0.2, help="anchor mask ratio on the prompt")
    p.add_argument("--dtype", default="auto", help="model dtype (auto, bfloat16, float32)")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 4-bit base (CUDA)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=42, help="seed of masks and fast weights")
    p.add_argument("--output-dir", required=True, help="where the CSV and PNG go")
    return p


def load_batches(args, tokenizer, device) -> list[dict]:
    pairs = load_pairs(args.data, split=args.split)
    examples = tokenize_pairs(pairs, tokenizer, max_length=args.max_length, chat_template=not args.no_chat_template)
    examples = [e for e in examples if len(e["input_ids"]) - e["prompt_len"] >= args.min_response][: args.num_samples]
    if not examples:
        raise SystemExit("No example has a response of at least --min-response tokens within --max-length.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [{k: v.to(device) for k, v in collate(examples[s:s + args.batch_size], pad).items()}
            for s in range(0, len(examples), args.batch_size)]


def analyse(backbone, batches, ratios, memory, seed: int) -> list[dict]:
    """Mean static / sequential NLL per ratio over all examples."""
    sums = {r: [0.0, 0.0, 0] for r in ratios}
    start = 0
    for batch in batches:
        seeds = row_seeds(seed, batch["input_ids"].shape[0], offset=start)
        start += len(seeds)
        static = static_nll(backbone, batch, ratios, memory=memory, seeds=seeds)
        seq = sequential_nll(backbone, batch, ratios, memory=memory, seeds=seeds)
        for r in ratios:
            if r in seq:
                ok = ~(static[r].isnan() | seq[r].isnan())
                sums[r][0] += float(static[r][ok].sum())
                sums[r][1] += float(seq[r][ok].sum())
                sums[r][2] += int(ok.sum())
    rows = []
    for r, (st, sq, n) in sums.items():
        if n:
            rows.append({"mask_ratio": r, "static_nll": st / n, "sequential_nll": sq / n, "ratio": sq / st, "n": n})
    return rows


def plot(rows: list[dict], path: str) -> None:
    from ..extras import require

    require("matplotlib", "the exposure-bias plot").use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, label in enumerate(dict.fromkeys(r["config"] for r in rows)):
        mine = [r for r in rows if r["config"] == label]
        x, color = [r["mask_ratio"] for r in mine], f"C{i}"  # one colour per configuration
        ax1.plot(x, [r["ratio"] for r in mine], marker="o", color=color, label=label)
        ax2.plot(x, [r["static_nll"] for r in mine], linestyle="--", marker=".", color=color, label=f"{label} static")
        ax2.plot(x, [r["sequential_nll"] for r in mine], marker="o", color=color, label=f"{label} sequential")
    ax1.axhline(1.0, color="grey", linewidth=0.8)
    ax1.set(xlabel="mask ratio", ylabel="R_EB = L_seq / L_static", title="Exposure-bias ratio")
    ax2.set(xlabel="mask ratio", ylabel="NLL of masked response tokens", title="Static vs sequential NLL")
    for ax in (ax1, ax2):
        ax.invert_xaxis()  # left to right = denoising progress
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configs = [parse_config(c) for c in args.config]
    from ..backbones.loading import load_backbone
    from ..memory.adapters import apply_adapter
    from ..memory.fast_weights import FastWeightMemory, MemDLMConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = load_backbone(args.backbone, dtype=args.dtype, device=device, load_in_4bit=args.load_in_4bit)
    batches = load_batches(args, base.tokenizer, base.device)
    ratios = [round(1.0 - k / args.num_steps, 6) for k in range(args.num_steps)]
    rows = []
    for label, adapter, steps in configs:
        backbone = apply_adapter(base, adapter) if adapter else base
        memory = None
        if steps:
            memory = FastWeightMemory(backbone, MemDLMConfig(
                inner_steps=steps, inner_lr=args.inner_lr, inner_rank=args.inner_rank, inner_alpha=args.inner_alpha,
                inner_layer_fraction=args.inner_layer_fraction, inner_mask_ratio=args.inner_mask_ratio, seed=args.seed))
        for row in analyse(backbone, batches, ratios, memory, args.seed):
            rows.append({"config": label, **row})
            print(f"{label:>16} r={row['mask_ratio']:.2f} static={row['static_nll']:.4f} "
                  f"sequential={row['sequential_nll']:.4f} ratio={row['ratio']:.4f}")
        if adapter:  # take the adapter's LoRA layers out again: the next configuration starts clean
            base = dataclasses.replace(base, model=backbone.model.unload())
    os.makedirs(args.output_dir, exist_ok=True)
    csv_path = os.path.join(args.output_dir, "exposure_bias.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["config", "mask_ratio", "static_nll", "sequential_nll", "ratio", "n"])
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, os.path.join(args.output_dir, "exposure_bias.png"))
    means = {}
    for r in rows:
        means.setdefault(r["config"], []).append(r["static_nll"])
    for label, values in means.items():
        print(f"{label:>16} mean static NLL over ratios: {sum(values) / len(values):.4f}")
    print(f"wrote {csv_path} and exposure_bias.png")
    return 0 if all(math.isfinite(r["ratio"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
