"""Record, then compare, every number the package produces on tiny checkpoints: a guard for
refactors that must not change behaviour (same tokens, same log-likelihoods, bit for bit).

    python benchmarks/bit_identity.py --save /tmp/before.json     # on the old code
    python benchmarks/bit_identity.py --compare /tmp/before.json  # on the new code

Runs the lm-eval adapter (`DlmLM`) end to end on random tiny LLaDA / Dream / LLaDA-MoE
checkpoints and on the embedded trained `tiny-llada` with its MetaState and MemDLM adapter:
generate_until in each strategy and cache mode (greedy, sampled, with CFG, with `repeats`),
loglikelihood (with and without `check_greedy`, with `likelihood_cfg`) and
loglikelihood_rolling. Single-threaded float32 on CPU, so the comparison is exact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

PROMPTS = [
    "Mary moved to the bathroom. John went to the hallway.\nQuestion: Where is Mary?\nAnswer:",
    "One of the special magic numbers for apple is: 4821. What is the number for apple?",
    "Hi",
]
CONTINUATIONS = [" bathroom", " 4821.", " there friend"]
ROLLING = ["The quick brown fox jumps over the lazy dog. " * 6, "A short text."]

# (name, model args, gen_kwargs) for generate_until
DECODE_CASES = [
    ("llada", {"strategy": "llada", "block_length": 8}, {"max_gen_toks": 16}),
    ("llada-random-remask", {"strategy": "llada", "block_length": 8, "remasking": "random"}, {"max_gen_toks": 16}),
    ("llada-sampled", {"strategy": "llada", "block_length": 8}, {"max_gen_toks": 16, "do_sample": True, "temperature": 0.8}),
    ("llada-cfg", {"strategy": "llada", "block_length": 8, "cfg_scale": 1.5}, {"max_gen_toks": 8}),
    ("dream-entropy", {"strategy": "dream", "alg": "entropy"}, {"max_gen_toks": 12}),
    ("dream-maskgit-sampled", {"strategy": "dream", "alg": "maskgit_plus"},
     {"max_gen_toks": 12, "do_sample": True, "temperature": 0.7, "top_p": 0.9}),
    ("threshold-dual", {"strategy": "threshold", "threshold": 0.3, "block_length": 8, "cache": "dual"}, {"max_gen_toks": 16}),
    ("threshold-prefix-sampled", {"strategy": "threshold", "threshold": 0.3, "block_length": 8, "cache": "prefix"},
     {"max_gen_toks": 16, "do_sample": True, "temperature": 1.0}),
    ("llada-dual-steps", {"strategy": "llada", "block_length": 8, "cache": "dual", "steps": 8}, {"max_gen_toks": 16}),
]
LIKELIHOOD_CASES = [
    ("mc", {"mc_num": 8, "mc_batch_size": 4}),
    ("mc-greedy", {"mc_num": 4, "mc_batch_size": 4, "check_greedy": True}),
    ("mc-cfg", {"mc_num": 4, "mc_batch_size": 2, "likelihood_cfg": 0.5}),
]


def instances(kind, args_list, repeats=1):
    from lm_eval.api.instance import Instance

    out = []
    for i, args in enumerate(args_list):
        for _ in range(repeats):
            out.append(Instance(kind, doc={}, arguments=args, idx=0, metadata=("t", i, repeats)))
    return out


def run_lm(lm, decode_cases=DECODE_CASES) -> dict:
    record = {}
    base = {k: getattr(lm.args, k) for k in vars(lm.args)} if hasattr(lm.args, "__dict__") else {}
    for name, margs, gen in decode_cases:
        saved = {k: getattr(lm.args, k) for k in margs}
        for k, v in margs.items():
            setattr(lm.args, k, v)
        try:
            reqs = instances("generate_until", [(p, {"until": ["\n\n"], **gen}) for p in PROMPTS],
                             repeats=2 if gen.get("do_sample") else 1)
            record[f"gen/{name}"] = lm.generate_until(reqs, disable_tqdm=True)
        except Exception as e:  # a case a family cannot run is recorded as its error
            record[f"gen/{name}"] = f"ERROR {type(e).__name__}: {e}"
        finally:
            for k, v in saved.items():
                setattr(lm.args, k, v)
    for name, margs in LIKELIHOOD_CASES:
        saved = {k: getattr(lm.args, k) for k in margs}
        for k, v in margs.items():
            setattr(lm.args, k, v)
        try:
            res = lm.loglikelihood(instances("loglikelihood", list(zip(PROMPTS, CONTINUATIONS))), disable_tqdm=True)
            record[f"ll/{name}"] = [[repr(float(a)), bool(b)] for a, b in res]
        finally:
            for k, v in saved.items():
                setattr(lm.args, k, v)
    res = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in ROLLING]), disable_tqdm=True)
    record["rolling"] = [repr(float(x)) for x in res]
    del base
    return record


def record_all() -> dict:
    from lm_eval_dlmem.harness import DlmLM
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fam in ("llada", "dream", "llada_moe"):
            path = make_tiny_checkpoint(fam, os.path.join(tmp, fam), seed=0)
            lm = DlmLM(pretrained=str(path), device="cpu", max_length=96)
            out[fam] = run_lm(lm)
        variants = {
            "tiny-llada": {},
            "tiny-llada+metastate": {"metastate": "tiny-llada-metastate"},
            "tiny-llada+memdlm": {"adapter": "tiny-llada-memdlm", "inner_steps": 2, "inner_targets": "ffn"},
            "tiny-llada+memdlm-released": {"adapter": "tiny-llada-memdlm", "inner_steps": 1},
        }
        for name, extra in variants.items():
            lm = DlmLM(pretrained="tiny-llada", device="cpu", max_length=128, **extra)
            out[name] = run_lm(lm)
    return out


def diff(before: dict, after: dict, path="") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        lines = [f"{path}/{k}: only in one run" for k in set(before) ^ set(after)]
        for k in sorted(set(before) & set(after)):
            lines += diff(before[k], after[k], f"{path}/{k}")
        return lines
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="write the record to this JSON file")
    group.add_argument("--compare", help="compare against a record written by --save")
    args = ap.parse_args()
    record = record_all()
    n = sum(len(v) for v in record.values())
    if args.save:
        with open(args.save, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        print(f"recorded {n} results over {len(record)} models to {args.save}")
        return 0
    with open(args.compare) as f:
        before = json.load(f)
    lines = diff(before, json.loads(json.dumps(record)))
    for line in lines:
        print(line)
    print(f"{n} results over {len(record)} models: " + ("bit-identical" if not lines else f"{len(lines)} differ"))
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
