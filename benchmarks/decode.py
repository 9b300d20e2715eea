"""Decode and likelihood throughput on a CPU-sized proxy of a released model (`proxies.py`).

    python benchmarks/decode.py                       # llada-8b proxy: trained, LLaDA-8B FLOP shares
    python benchmarks/decode.py --proxy llada-moe     # LLaDA-MoE-7B-A1B proportions, random weights
    python benchmarks/decode.py --proxy head-heavy    # the earlier 47M model: head 55% of the FLOPs
    python benchmarks/decode.py --quick               # a smoke run (small model, short canvas)

What runs (generation length 256, block 32, batch 1 and 8, the embedded demo task's prompts):

- reference-style: ML-GSAI/LLaDA `generate()` as written: cache none, one token per step, a full
  forward with full-vocabulary logits at every position and a softmax over all of them. Every step
  costs the same, so it is timed over its first `--ref-steps` steps.
- cache=dual: Fast-dLLM's dual cache (full forward once per block, then the block only), LLaDA
  low-confidence schedule, one token per step, LM head on the block only. Every block costs the
  same, so it is timed over its first `--dual-blocks` blocks (of the 256-token canvas).
- dual + threshold 0.9: Fast-dLLM parallel decoding on top (`strategy=threshold`).
- the latter with MetaState (`MetaState.init_for`, width 64: ~0.4% of the backbone's parameters,
  the paper's budget) and with the MemDLM inner loop (`FastWeightMemory`, released defaults: 2 SGD
  steps on the prompt).

Each case runs in its own process (peak resident memory is per case) with one math thread;
tokens/s use the process CPU time, which other jobs on a shared machine disturb less than wall
time (wall time is recorded too). Ratios are against reference-style at the same batch size,
from the same run. Also: token agreement of the fast modes with reference-style on the demo task
(its own setting: 8 new tokens, one 32-token block), and likelihood requests/s of
`decoding.likelihood.loglikelihood` over all requests at once against one request at a time, both
the official evaluator's way (full-vocabulary logits, every sample forwarded) and ours. Results go
to benchmarks/results/decode.json and decode.md.

The weights are random. `--init-std 0.6` (default) makes threshold-0.9 decoding commit about
2.6 tokens per forward, inside the 2-4 that Fast-dLLM reports for LLaDA on GSM8K; with the usual
0.02 a random model is never confident and the threshold commits one token per step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from lm_eval_dlmem.memory.base import MemoryWrapper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxies  # noqa: E402

QUICK_MODEL = dict(vocab_size=32768, d_model=128, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=256)
# MetaState at the paper's parameter budget for this backbone (~0.4% of its parameters); the
# defaults (width 1280) are sized for LLaDA-8B and would be 65% of a 47M-parameter model.
METASTATE = dict(width=64, heads=4, time_dim=32)
MODES = ["reference-style", "cache=dual", "dual+threshold", "dual+threshold+MetaState", "dual+threshold+MemDLM"]


def demo_prompts() -> list[str]:
    from lm_eval_dlmem.tasks.demo import FACTS

    return [f"{c}\nQuestion: {q}\nAnswer:" for c, q, _ in FACTS]


def mc_requests(tokenizer) -> list[tuple[list[int], list[int]]]:
    """The demo multiple-choice task's (context, choice) pairs, as the harness encodes them."""
    from lm_eval_dlmem.tasks.demo import load_mc

    reqs = []
    for doc in load_mc()["test"]:
        ctx = tokenizer.encode(f"{doc['context']}\nQuestion: {doc['question']}\nAnswer:")
        reqs += [(ctx, tokenizer.encode(" " + c)) for c in doc["choices"]]
    return reqs


# ---- the cases (each runs in a fresh process) ---------------------------------------------------

def reference_style(backbone, ids, attn, gen_length, block_length, max_steps, steps=None):
    """ML-GSAI/LLaDA generate() at temperature 0, stopped after max_steps (None: never).

    steps: total denoising steps, split evenly over the blocks (default gen_length: one token per
    step); a block's step i commits the official `get_num_transfer_tokens` count. attn None: no
    attention mask is passed, as the official evaluator calls it (one unpadded prompt at a time).
    """
    mask = backbone.spec.mask_id
    B, P = ids.shape
    per_block = (steps or gen_length) // (gen_length // block_length)
    counts = [block_length // per_block + (i < block_length % per_block) for i in range(per_block)]
    x = torch.cat([ids, torch.full((B, gen_length), mask)], 1)
    if attn is not None:
        attn = torch.cat([attn, torch.ones(B, gen_length, dtype=attn.dtype)], 1)
    done = 0
    for b in range(gen_length // block_length):
        end = P + (b + 1) * block_length
        for count in counts:
            logits = backbone.model(x, attention_mask=attn).logits  # [B, L, V] at every position
            x0 = logits.argmax(-1)
            p = torch.softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            p[:, end:] = -torch.inf
            conf = torch.where(x == mask, p, -torch.inf)
            pick = conf.topk(count, dim=-1).indices
            x.scatter_(1, pick, x0.gather(1, pick))
            done += 1
            if done == max_steps:
                return x, done
    return x, done


def decode_config(mode: str, gen_length: int, block_length: int):
    from lm_eval_dlmem import DecodeConfig

    common = dict(gen_length=gen_length, block_length=block_length, steps=gen_length, stop_early=False)
    if mode == "cache=dual":
        return DecodeConfig(strategy="llada", cache="dual", **common)
    return DecodeConfig(strategy="threshold", threshold=0.9, cache="dual", **common)


def make_memory(mode: str, backbone):
    if mode.endswith("MetaState"):
        from lm_eval_dlmem.memory import MetaState

        return MetaState.init_for(backbone, **METASTATE)
    if mode.endswith("MemDLM"):
        from lm_eval_dlmem.memory import FastWeightMemory, MemDLMConfig

        return FastWeightMemory(backbone, MemDLMConfig())
    return None


class Stop(Exception):
    pass


class Counter(MemoryWrapper):
    """A memory that counts forwards (around a real one when given) and, with `limit`, stops the
    decode after that many forwards (modes whose blocks all cost the same are timed on a prefix)."""

    def __init__(self, inner=None, limit=None):
        super().__init__(inner)
        self.forwards, self.limit = 0, limit

    def before_forward(self, info):
        if self.forwards == self.limit:
            raise Stop
        self.forwards += 1
        self.inner.before_forward(info)


def run_decode(case: dict) -> dict:
    from lm_eval_dlmem import load_backbone
    from lm_eval_dlmem.decoding.engine import generate

    torch.set_num_threads(case["threads"])
    bb = load_backbone(case["model"])
    enc = bb.tokenizer(demo_prompts()[: case["batch"]], return_tensors="pt", padding=True)
    ids, attn = enc.input_ids, enc.attention_mask
    rss_loaded = peak_rss_mb()
    G, n = case["gen_length"], case["block_length"]
    with torch.inference_mode():
        if case["mode"] == "reference-style":
            reference_style(bb, ids, attn, G, n, 1)  # warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            _, steps = reference_style(bb, ids, attn, G, n, case["ref_steps"])
            tokens, forwards = steps * case["batch"], steps
        else:
            # one token per step: every block costs the same, so time the first `dual_blocks`
            limit = case["dual_blocks"] * n if case["mode"] == "cache=dual" else None
            memory = Counter(make_memory(case["mode"], bb), limit)
            config = decode_config(case["mode"], G, n)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                tokens = generate(bb, ids, attn, config, memory).numel()
            except Stop:
                tokens = memory.forwards * case["batch"]
            forwards = memory.forwards
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    timed = {"reference-style": f"first {forwards} of {G} steps",
             "cache=dual": f"first {forwards // n} of {G // n} blocks"}.get(case["mode"], "whole run")
    return dict(case, timed=timed, tokens=tokens, forwards=forwards, wall_s=wall, cpu_s=cpu, tok_per_s=tokens / cpu,
                tok_per_s_wall=tokens / wall, peak_rss_mb=peak_rss_mb(), loaded_rss_mb=rss_loaded)


def run_agreement(case: dict) -> dict:
    """Token agreement with reference-style (= generate with cache none: token-identical to the
    official sampler) on the demo task's own setting."""
    from lm_eval_dlmem import DecodeConfig, load_backbone
    from lm_eval_dlmem.decoding.engine import generate

    torch.set_num_threads(case["threads"])
    bb = load_backbone(case["model"])
    enc = bb.tokenizer(demo_prompts(), return_tensors="pt", padding=True)
    G, n, scored = case["gen_length"], case["block_length"], case["scored"]
    base = dict(gen_length=G, block_length=n, steps=G, stop_early=False)
    modes = {"cache=prefix": dict(cache="prefix"), "cache=dual": dict(cache="dual"),
             "dual+threshold": dict(cache="dual", strategy="threshold", threshold=0.9)}
    with torch.inference_mode():
        ref = generate(bb, enc.input_ids, enc.attention_mask, DecodeConfig(**base))
        out = {}
        for name, kw in modes.items():
            got = generate(bb, enc.input_ids, enc.attention_mask, DecodeConfig(**base, **kw))
            out[name] = dict(first=(got[:, :scored] == ref[:, :scored]).float().mean().item(),
                             all=(got == ref).float().mean().item())
    return dict(case, agreement=out)


def official_style_loglikelihood(bb, prefix, target, mc_num, stratum, gen):
    """eval_llada.py's get_log_likelihood: stratified masks, full-vocab logits at every position."""
    import torch.nn.functional as F

    from lm_eval_dlmem.decoding.likelihood import stratified_masks

    seq = torch.tensor(prefix + target)[None].repeat(stratum, 1)
    losses = []
    for _ in range(mc_num // stratum):
        masks, ratio = stratified_masks(len(target), stratum, gen)
        noisy = seq.clone()
        noisy[:, len(prefix):] = noisy[:, len(prefix):].masked_fill(masks, bb.spec.mask_id)
        m = noisy == bb.spec.mask_id
        logits = bb.model(noisy).logits
        loss = F.cross_entropy(logits[m], seq[m], reduction="none") / ratio[:, None].expand_as(m)[m]
        losses.append((loss.sum() / stratum).item())
    return -sum(losses) / len(losses)


def long_requests(tokenizer) -> list[tuple[list[int], list[int]]]:
    """(question, fact sentence) pairs: continuations of 15-30 tokens, where repeated masks are
    rare and only packing and the head on the continuation help."""
    from lm_eval_dlmem.tasks.demo import FACTS

    return [(tokenizer.encode(f"Question: {q}\nFacts:"), tokenizer.encode(" " + c)) for c, q, _ in FACTS]


def run_likelihood(cases: list[dict]) -> list[dict]:
    from lm_eval_dlmem import load_backbone
    from lm_eval_dlmem.decoding.likelihood import loglikelihood

    torch.set_num_threads(cases[0]["threads"])
    bb = load_backbone(cases[0]["model"])
    out = []
    for case in cases:
        reqs = mc_requests(bb.tokenizer) if case["requests"] == "demo choices" else long_requests(bb.tokenizer)
        mc, stratum = case["mc_num"], min(32, case["mc_num"])
        seeds = list(range(len(reqs)))
        with torch.inference_mode():
            c0 = time.process_time()
            if case["how"] == "official-style, one at a time":
                for (p, t), s in zip(reqs, seeds):
                    official_style_loglikelihood(bb, p, t, mc, stratum, torch.Generator().manual_seed(s))
            elif case["how"] == "ours, one at a time":
                for r, s in zip(reqs, seeds):
                    loglikelihood(bb, [r], mc_num=mc, batch_size=stratum, stratum=stratum, seeds=[s])
            else:
                loglikelihood(bb, reqs, mc_num=mc, batch_size=case["rows"], stratum=stratum, seeds=seeds)
            cpu = time.process_time() - c0
        lengths = [len(t) for _, t in reqs]
        out.append(dict(case, n=len(reqs), cont_tokens=(min(lengths), max(lengths)), cpu_s=cpu,
                        req_per_s=len(reqs) / cpu))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def in_child(pool, fn, case):
    """Run fn(case) in a fresh process (the pool starts one per task): per-case peak memory."""
    return pool.submit(fn, case).result()


# ---- the run ------------------------------------------------------------------------------------

def build_model(args) -> str:
    """The proxy checkpoint (`proxies.py`); --quick: a small random LLaDA."""
    from lm_eval_dlmem import make_tiny_checkpoint

    path = os.path.join(args.workdir, "model")
    if args.quick:
        return make_tiny_checkpoint("llada", path, seed=0, init_std=args.init_std, **QUICK_MODEL)
    return proxies.build(args.proxy, path, init_std=args.init_std)


def decode_cases(args, model) -> list[dict]:
    G = 64 if args.quick else 256
    base = dict(model=model, threads=args.threads, gen_length=G, block_length=32, ref_steps=args.ref_steps,
                dual_blocks=args.dual_blocks)
    modes = MODES if not args.skip_memory else MODES[:3]
    return [dict(base, mode=m, batch=b) for b in (1, 8) for m in modes]


def likelihood_cases(args, model) -> list[dict]:
    cases = []
    for requests, mc in (("demo choices", 1), ("demo choices", args.mc_num), ("long continuations", args.mc_num)):
        base = dict(model=model, threads=args.threads, mc_num=mc, requests=requests)
        cases += [dict(base, how="official-style, one at a time"), dict(base, how="ours, one at a time"),
                  dict(base, how="ours, batched", rows=32)]
    return cases


def summarize(decode, agreement, likelihood, args) -> dict:
    ref = {r["batch"]: r["tok_per_s"] for r in decode if r["mode"] == "reference-style"}
    for r in decode:
        r["speedup"] = r["tok_per_s"] / ref[r["batch"]]
        r["tokens_per_forward"] = r["tokens"] / r["batch"] / r["forwards"]
    by = {(r["mode"], r["batch"]): r for r in decode}
    targets = {}
    if ("dual+threshold", 8) in by:
        targets["dual+threshold >= 5x reference at batch 8"] = by[("dual+threshold", 8)]["speedup"]
    for b in (1, 8):
        if ("dual+threshold+MetaState", b) in by:
            targets[f"MetaState wall-time overhead at batch {b} (<= 10%)"] = (
                by[("dual+threshold", b)]["tok_per_s"] / by[("dual+threshold+MetaState", b)]["tok_per_s"] - 1)
    for key in dict.fromkeys((r["requests"], r["mc_num"]) for r in likelihood):
        rows = {r["how"]: r for r in likelihood if (r["requests"], r["mc_num"]) == key}
        for one in ("official-style, one at a time", "ours, one at a time"):
            rows[one]["batched_speedup"] = rows["ours, batched"]["req_per_s"] / rows[one]["req_per_s"]
        targets[f"likelihood batched >= 4x one at a time ({key[0]}, mc_num={key[1]}, vs official-style)"] = (
            rows["official-style, one at a time"]["batched_speedup"])
    if ("dual+threshold", 8) in by:
        targets["dual+threshold >= 8x reference at batch 8 (issue 17, llada-8b proxy)"] = by[("dual+threshold", 8)]["speedup"]
    return dict(settings=vars(args), proxy=args.proxy if not args.quick else "quick", decode=decode,
                agreement=agreement, likelihood=likelihood, targets=targets)


def markdown(res: dict) -> str:
    shares = res.get("flop_shares")
    lines = [f"Proxy `{res['proxy']}`" + (f" (head {shares['head_share']:.1%} of the linear FLOPs, attention "
                                          f"{shares['attention_vs_linear']:.1%} of them at 300 tokens)" if shares else "")
             + f"; command: `python benchmarks/decode.py --proxy {res['proxy']}`", "",
             "| mode | batch | tokens/s | x reference | tokens per forward | peak RSS (MB) | over loaded model (MB) | timed |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["decode"]:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['tok_per_s']:.1f} | {r['speedup']:.2f} | "
                     f"{r['tokens_per_forward']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] - r['loaded_rss_mb']:.0f} | {r['timed']} |")
    a = res["agreement"]
    lines += ["", f"Token agreement with reference-style on the demo task (8 prompts, {a['gen_length']} tokens, "
              f"block {a['block_length']}; first {a['scored']} = the task's max_gen_toks):", "",
              "| mode | first tokens | all tokens |", "|---|---:|---:|"]
    trained = a.get("trained", {})
    lines[-2:] = ["| mode | first tokens | all tokens | first tokens, trained `tiny-llada` | all tokens, trained `tiny-llada` |",
                  "|---|---:|---:|---:|---:|"]
    for name, v in a["agreement"].items():
        t = trained.get(name)
        extra = f" {t['first']:.3f} | {t['all']:.3f} |" if t else " | |"
        lines.append(f"| {name} | {v['first']:.3f} | {v['all']:.3f} |{extra}")
    lines += ["", "Likelihood requests/s (demo choices: the demo multiple-choice task's (context, choice) "
              "requests; long continuations: (question, fact sentence) pairs):", "",
              "| requests | continuation tokens | mc_num | how | requests/s | batched speedup over it |",
              "|---|---|---:|---|---:|---:|"]
    for r in res["likelihood"]:
        sp = f"{r['batched_speedup']:.2f}" if "batched_speedup" in r else ""
        lo, hi = r["cont_tokens"]
        lines.append(f"| {r['requests']} ({r['n']}) | {lo}-{hi} | {r['mc_num']} | {r['how']} | "
                     f"{r['req_per_s']:.2f} | {sp} |")
    lines += ["", "Targets (issue 7): " + "; ".join(f"{k}: {v:.2f}" for k, v in res["targets"].items())]
    return "\n".join(lines) + "\n"


def update_readme(path: str, table: str, proxy: str) -> None:
    """Put the new table between the README's results heading of `proxy` and the next heading."""
    with open(path) as f:
        text = f.read()
    head = f"### Results, {proxy} proxy (CPU, 2 shared cores, one thread per case)\n"
    if head not in text:
        return
    before, rest = text.split(head, 1)
    after = rest[rest.index("\n### "):] if "\n### " in rest else ""
    with open(path, "w") as f:
        f.write(before + head + "\n" + table + "\n" + after.lstrip("\n"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small model and canvas: a smoke run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per case process")
    p.add_argument("--proxy", choices=proxies.PROXIES, default="llada-8b",
                   help="the model (benchmarks/proxies.py): llada-8b = trained, LLaDA-8B FLOP proportions")
    p.add_argument("--init-std", type=float, default=0.6, help="weight init std of the random proxies")
    p.add_argument("--ref-steps", type=int, default=4, help="reference-style steps timed (each costs the same)")
    p.add_argument("--dual-blocks", type=int, default=2, help="cache=dual blocks timed (each costs the same)")
    p.add_argument("--mc-num", type=int, default=32, help="Monte Carlo samples of the likelihood comparison")
    p.add_argument("--skip-memory", action="store_true", help="leave out the MetaState / MemDLM rows")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="directory for decode.json and decode.md")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    spawn = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as workdir, ProcessPoolExecutor(1, spawn, max_tasks_per_child=1) as pool:
        args.workdir = workdir
        model = build_model(args)
        shares = None if args.quick else proxies.flop_shares(model)
        decode = []
        for case in decode_cases(args, model):
            decode.append(in_child(pool, run_decode, case))
            r = decode[-1]
            print(f"{r['mode']:28s} batch {r['batch']}: {r['tok_per_s']:8.1f} tok/s "
                  f"({r['forwards']} forwards, {r['cpu_s']:.1f} s CPU)", flush=True)
        agreement = in_child(pool, run_agreement, dict(model=model, threads=args.threads, gen_length=32,
                                                 block_length=32, scored=8))
        # the same on the shipped trained tiny LLaDA, where confidences are not those of random weights
        agreement["trained"] = in_child(pool, run_agreement, dict(model="tiny-llada", threads=args.threads,
                                                            gen_length=32, block_length=32, scored=8))["agreement"]
        likelihood = in_child(pool, run_likelihood, likelihood_cases(args, model))
    res = summarize(decode, agreement, likelihood, args)
    res["total_wall_s"] = time.perf_counter() - start
    del res["settings"]["workdir"]
    os.makedirs(args.out, exist_ok=True)
    res["flop_shares"] = shares
    stem = "decode_quick" if args.quick else f"decode_{args.proxy}"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    table = markdown(res)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(table)
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
    if not args.quick and os.path.isfile(readme):
        update_readme(readme, table, args.proxy)
    print("\n" + table + f"\ntotal wall time {res['total_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
