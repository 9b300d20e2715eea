"""Released-size checkpoints on CPU: random-init weights with the exact shapes of LLaDA-8B-Instruct,
Dream-v0-Instruct-7B, LLaDA-MoE-7B-A1B and LLaDA2.1-mini, run through the public API.

    nice -n 19 python benchmarks/fullsize.py                      # every shape, one at a time
    nice -n 19 python benchmarks/fullsize.py --models LLaDA-MoE-7B-A1B
    python benchmarks/fullsize.py --dry-run                       # the same steps on a small shape

Per shape, in its own process (its peak resident set is its own):

1. write the checkpoint as the hub serves it: bfloat16 safetensors shards of at most
   `--shard-gib` with `model.safetensors.index.json`, config.json and a tokenizer of the model's
   vocabulary size, one tensor at a time (never the whole model in memory);
2. `load_backbone(dtype="bfloat16")`: time, resident set and peak resident set against the
   weight bytes (`memory_plan.weight_bytes`);
3. one forward of a 64-token prompt; `generate` of 8 tokens (one block, 2 denoising steps) in
   each cache mode; the same with MetaState at its default size attached; MemDLM's inner loop
   (1 SGD step) on the MoE shapes; one multiple-choice likelihood request (two continuations);
4. per step: time and the peak resident set over the loaded model, against the memory model's
   prediction for that step.

The checkpoint is deleted after its shape (each is 14-32 GiB). `free -g` is printed before each
shape; a shape whose weights do not fit the available memory is reported and skipped.
Results: benchmarks/results/fullsize.json and fullsize.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from memory_check import MALLOC_ENV, reset_peak, rss  # noqa: E402

GIB = 1024 ** 3
# A small shape for --dry-run (and tests): the same code path in seconds.
DRY = {"tiny-llada_moe": ("llada_moe", 4096, dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
                                                   num_hidden_layers=2, expert_intermediate_size=64,
                                                   dense_intermediate_size=256, num_experts=8, num_experts_per_tok=2))}


# ---- writing a checkpoint shard by shard ------------------------------------------------------------

POOL_SIZE = 1 << 26  # 64M values


def random_pool(seed: int = 0) -> torch.Tensor:
    """N(0, 0.02) values in bfloat16, the source of every random weight."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(POOL_SIZE, generator=g) * 0.02).to(torch.bfloat16)


def init_tensor(name: str, shape, module_type: str, pool: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random bfloat16 tensor for parameter `name`: norm weights 1, biases 0, everything else
    copied from `pool` starting at a random offset (drawing 7-16 billion normals would take most
    of the run on 2 shared cores; copying runs at memory speed)."""
    if "Norm" in module_type or name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    i = 0
    while i < flat.numel():
        start = int(torch.randint(0, POOL_SIZE // 2, (1,), generator=gen))
        n = min(POOL_SIZE - start, flat.numel() - i)
        flat[i:i + n] = pool[start:start + n]
        i += n
    return out


def tensor_plan(family: str, config: dict) -> list[tuple[str, tuple, str]]:
    """(name, shape, owning module type) of every tensor the checkpoint holds, from the model
    built on the meta device."""
    from lm_eval_dlmem.memory_plan import _meta_model
    from lm_eval_dlmem.backbones.spec import get_spec

    model = _meta_model(get_spec(family), config)
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    return [(name, tuple(t.shape), types.get(name.rpartition(".")[0], ""))
            for name, t in model.state_dict().items()]


def write_checkpoint(path: str, family: str, vocab: int, sizes: dict, shard_bytes: int, seed: int = 0) -> dict:
    """Write config.json, tokenizer, bfloat16 shards and the index; returns {files, bytes, seconds}."""
    from safetensors.torch import save_file

    from lm_eval_dlmem.backbones.spec import get_spec
    from lm_eval_dlmem.testing import build_tokenizer

    t0 = time.perf_counter()
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer(family, total_vocab=vocab)
    config = get_spec(family).resolve(tokenizer).official_config_dict(vocab, sizes)
    config["torch_dtype"] = "bfloat16"
    plan = tensor_plan(family, config)
    shards, size = [[]], 0
    for item in plan:  # cut into shards of at most shard_bytes
        n = 2 * int(torch.Size(item[1]).numel())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    gen, pool = torch.Generator().manual_seed(seed), random_pool(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: init_tensor(name, shape, kind, pool, gen) for name, shape, kind in shard}
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
        gc.collect()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save_pretrained(path)
    return dict(files=len(shards), bytes=total, seconds=time.perf_counter() - t0)


# ---- the steps --------------------------------------------------------------------------------------

class Steps:
    """Runs named steps, each with its time and the peak resident set it added over the loaded
    model; a failing step is recorded with its error and the next ones still run."""

    def __init__(self, out: dict):
        self.out = out
        self.base = 0

    def run(self, name: str, fn, predicted: int | None = None):
        gc.collect()
        before = rss("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        row = dict(step=name)
        try:
            note = fn()
            row.update(ok=True, note=note or "")
        except Exception as e:  # a full-size failure is a finding, recorded for the report
            row.update(ok=False, note=f"{type(e).__name__}: {e}"[:300])
        row.update(seconds=time.perf_counter() - t0, peak_over_before=rss("VmHWM") - before, rss_after=rss("VmRSS"))
        if predicted is not None:
            row["predicted"] = predicted
        self.out["steps"].append(row)
        print(json.dumps(row), flush=True)
        if os.environ.get("FULLSIZE_LOG"):
            with open(os.environ["FULLSIZE_LOG"], "a") as f:
                f.write(json.dumps(dict(row, model=self.out["model"])) + "\n")
        return row


def run_shape(name: str, family: str, vocab: int, sizes: dict, root: str, shard_bytes: int,
              load_only: bool = False) -> dict:
    """Every step on one shape, in this process."""
    from lm_eval_dlmem import DecodeConfig, load_backbone
    from lm_eval_dlmem import memory_plan as mp
    from lm_eval_dlmem.decoding.engine import generate
    from lm_eval_dlmem.decoding.likelihood import loglikelihood
    from lm_eval_dlmem.memory import FastWeightMemory, MemDLMConfig, MetaState

    torch.set_num_threads(int(os.environ.get("FULLSIZE_THREADS", "2")))
    out = dict(model=name, family=family, steps=[])
    path = os.path.join(root, name)
    steps = Steps(out)
    state = {}
    try:
        w = steps.run("write checkpoint", lambda: write_checkpoint(path, family, vocab, sizes, shard_bytes))
        if not w["ok"]:
            return out
        config = json.load(open(os.path.join(path, "config.json")))
        shape = mp.Shape.from_config(config, family)
        weights = mp.weight_bytes(shape, "bfloat16")
        out.update(params=shape.params, weight_bytes=weights)
        start_rss = rss("VmRSS")

        def load():
            state["bb"] = load_backbone(path, dtype="bfloat16")
            return f"resident set +{(rss('VmRSS') - start_rss) / GIB:.2f} GiB"
        row = steps.run("load_backbone(dtype=bfloat16)", load, predicted=weights)
        if not row["ok"]:
            return out
        bb = state["bb"]
        P, G = 64, 8
        ids = torch.randint(1000, vocab - 1000, (1, P), generator=torch.Generator().manual_seed(0))
        strategy = bb.spec.default_strategy or "llada"

        def plan(cache="none", memory=None):
            return mp.RunPlan(prompt=P, gen_length=G, block_length=G, cache=cache,
                              memory=mp.MemoryCost.of(memory) if memory is not None else mp.MemoryCost())

        with torch.inference_mode():
            steps.run("forward, 64-token prompt", lambda: tuple(bb.logits(ids).shape).__str__(),
                      predicted=max(mp.layer_bytes(shape, P, "bfloat16"), mp.head_bytes(shape, P, "bfloat16", 0)))
            if load_only:
                return out
            for cache in ("none", "prefix", "dual"):
                config = DecodeConfig(gen_length=G, block_length=G, steps=2, cache=cache, strategy=strategy,
                                      stop_early=False)
                steps.run(f"generate 8 tokens, 2 steps, cache={cache}",
                          lambda: str(generate(bb, ids, None, config)[0].tolist()),
                          predicted=mp.decode_row_bytes(shape, plan(cache)))
            config = DecodeConfig(gen_length=G, block_length=G, steps=2, strategy=strategy, stop_early=False)

            def metastate():
                memory = MetaState.init_for(bb)
                state["ms"] = mp.MemoryCost.of(memory)
                return (f"{state['ms'].resident / 2**20:.0f} MiB of MetaState parameters (fp32); "
                        + str(generate(bb, ids, None, config, memory)[0].tolist()))
            ms = mp.MemoryCost.of(MetaState.init_for(bb))  # its size, for the prediction
            steps.run("generate with MetaState (default size)", metastate,
                      predicted=ms.resident + mp.decode_row_bytes(shape, dataclasses.replace(plan(), memory=ms)))
            pairs = [(ids[0, :P].tolist(), ids[0, :3].tolist()), (ids[0, :P].tolist(), ids[0, 3:6].tolist())]
            steps.run("likelihood: one multiple-choice request (2 continuations, mc_num 4)",
                      lambda: str([round(ll, 2) for ll, _ in loglikelihood(bb, pairs, mc_num=4, batch_size=4)]),
                      predicted=4 * mp.likelihood_row_bytes(shape, mp.RunPlan(prompt=P, gen_length=3)))
        if "num_experts" in sizes:  # MemDLM's released setting is the MoE
            memory = FastWeightMemory(bb, MemDLMConfig(inner_steps=1))

            def memdlm():
                with torch.no_grad():
                    generate(bb, ids, None, config, memory)
                return f"inner_steps=1, released targets, {memory.config.inner_layer_fraction} of the layers"
            steps.run("MemDLM inner loop (1 step) + generate", memdlm,
                      predicted=mp.decode_row_bytes(shape, plan(memory=memory)))
    finally:
        state.clear()
        gc.collect()
        shutil.rmtree(path, ignore_errors=True)
    return out


# ---- driver -----------------------------------------------------------------------------------------

def shapes(dry: bool) -> dict:
    from lm_eval_dlmem.memory_plan import RELEASED

    return DRY if dry else RELEASED


def available_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / GIB


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"\n### {r['model']} ({r['family']}, {r.get('params', 0) / 1e9:.2f}B parameters, "
                     f"bf16 weights {r.get('weight_bytes', 0) / GIB:.2f} GiB)\n")
        if r.get("skipped"):
            lines.append(f"skipped: {r['skipped']}\n")
            continue
        lines.append("| step | ok | seconds | peak RSS over before (GiB) | predicted (GiB) | note |\n"
                     "|---|---|---:|---:|---:|---|")
        for s in r["steps"]:
            pred = f"{s['predicted'] / GIB:.3f}" if s.get("predicted") else ""
            note = str(s["note"]).replace("|", "/")[:160]
            lines.append(f"| {s['step']} | {'yes' if s['ok'] else 'FAILED'} | {s['seconds']:.1f} "
                         f"| {s['peak_over_before'] / GIB:.3f} | {pred} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", help="shape names (default: all)")
    p.add_argument("--dry-run", action="store_true", help="a small MoE shape through the same steps")
    p.add_argument("--root", default="/tmp/dlmem-fullsize", help="where checkpoints are written (then deleted)")
    p.add_argument("--shard-gib", type=float, default=4.0, help="largest safetensors shard")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "fullsize"),
                   help="results prefix (.json, .md); --dry-run writes nothing")
    p.add_argument("--load-only", action="store_true",
                   help="write, load and one forward only (an 8B bf16 forward takes minutes on 2 shared cores)")
    p.add_argument("--beyond-ram", action="store_true",
                   help="run shapes whose weights exceed the available RAM (they stay memory-mapped; a MoE "
                        "touches only its routed experts)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: run this shape, print its JSON
    args = p.parse_args(argv)
    table = shapes(args.dry_run)
    if args.one:
        family, vocab, sizes = table[args.one]
        result = run_shape(args.one, family, vocab, sizes, args.root, int(args.shard_gib * GIB), args.load_only)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    names = args.models or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(table)}.")
    results = []
    for name in names:
        from lm_eval_dlmem import memory_plan as mp

        family, vocab, sizes = table[name]
        weights = mp.weight_bytes(mp.Shape.from_config(
            __import__("lm_eval_dlmem.backbones.spec", fromlist=["x"]).get_spec(family).official_config_dict(vocab, sizes),
            family), "bfloat16")
        subprocess.run(["free", "-g"])
        if weights / GIB + 1.0 > available_gib() and not args.beyond_ram:
            results.append(dict(model=name, family=family, weight_bytes=weights,
                                skipped=f"{weights / GIB:.1f} GiB of weights, {available_gib():.1f} GiB available"))
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--root", args.root,
               "--shard-gib", str(args.shard_gib)] + (["--dry-run"] if args.dry_run else []) + (
                   ["--load-only"] if args.load_only else [])
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **MALLOC_ENV})
        sys.stdout.write(proc.stdout)
        found = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        results.append(found[0] if found else dict(model=name, family=family, weight_bytes=weights,
                                                   skipped=f"process ended with {proc.returncode} "
                                                           "(killed for memory?)", steps=[]))
    md = markdown(results)
    print(md)
    if not args.dry_run:
        with open(args.out + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write("Released shapes, random init, bfloat16, CPU; command: nice -n 19 python benchmarks/fullsize.py"
                    + (f" --models {' '.join(names)}" if args.models else "")
                    + (" --load-only" if args.load_only else "") + "\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
