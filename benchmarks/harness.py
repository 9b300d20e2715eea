"""Requests per second through the lm-eval LM (`DlmLM.generate_until` and `loglikelihood`),
batch 1 against batch 8 and against the official code's way, in one run, on the embedded trained
`tiny-llada`.

The requests are lm-eval's own: the task's documents are turned into `Instance`s by
`simple_evaluate`, and only the time spent inside the LM's request method is counted (task
building, scoring and process start-up are excluded). Both batch sizes see the same requests and
must give the same answers; the script checks that and records it.

Reference-style pass (in the batch-1 run, on the same `Instance`s and the same loaded model, one
request at a time, as the official evaluator `eval_llada.py` runs them): `generate_until` through
`decode.reference_style` (ML-GSAI `generate()`: no cache, full-vocabulary logits at every
position, low-confidence remasking, no early exit) with the gen_length / block_length / steps of
the LM's resolved decode config, its answer cut by the task's `until` as the LM cuts it;
`loglikelihood` through `decode.official_style_loglikelihood` (the official Monte Carlo loop,
same mc_num, stratum and per-request seed as the LM). It runs the LM's backbone without its memory:
MetaState or the MemDLM inner loop would show as disagreement. Agreement with it is reported, not required:
with the defaults (no cache, one token per step) the answers should be identical, with fast args
(cache=dual, threshold) they may legitimately differ.

    python benchmarks/harness.py --no-reference        # ~3 minutes on 2 CPU cores (batch 1 and 8 only)
    python benchmarks/harness.py --limit 16 --tasks dlmem_demo_gen
    python benchmarks/harness.py --proxy llada-8b --model_args cache=dual,threshold=0.9 --name harness_llada8b \
        --limit 16 --threads 1 --clock cpu             # ~10 minutes, most of it the reference-style pass

`--proxy` runs a proxy of `proxies.py` instead of `--pretrained` (llada-8b: the trained tiny-llada
widened to LLaDA-8B's FLOP proportions, same tokenizer and answers).

Writes benchmarks/results/NAME.{json,md} (`--name`, default harness; `--out` another directory).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxies  # noqa: E402
import torch  # noqa: E402
from decode import official_style_loglikelihood, reference_style  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TASKS = "dlmem_babilong_qa1_0k,dlmem_ruler_niah_single_1_1k,dlmem_demo_mc"


# --clock: wall time, or this process's CPU time (with one math thread, what a request computes;
# other jobs on a shared machine disturb it less than wall time)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class Timed:
    """Times an LM's request methods in place (lm-eval needs the LM object itself): seconds and
    requests per method, and the requests (`Instance`s) and answers in request order."""

    METHODS = ("generate_until", "loglikelihood")

    def __init__(self, lm, clock=time.perf_counter):
        self.lm, self.clock, self.seconds, self.requests, self.answers, self.instances = lm, clock, {}, {}, {}, {}
        for name in self.METHODS:
            setattr(lm, name, self._timed(name, getattr(lm, name)))

    def _timed(self, name, method):
        def timed(requests, *args, **kwargs):
            start = self.clock()
            out = method(requests, *args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - start
            self.requests[name] = self.requests.get(name, 0) + len(requests)
            self.answers.setdefault(name, []).extend(out)
            self.instances.setdefault(name, []).extend(requests)
            return out

        return timed


# ---- the reference-style pass (the official code's way, on the same requests) -------------------

def our_stratum() -> int:
    """The likelihood stratum the LM scores with: the harness leaves `loglikelihood`'s default."""
    from lm_eval_dlmem.decoding.likelihood import loglikelihood

    return inspect.signature(loglikelihood).parameters["stratum"].default


def check_reference_family(spec) -> None:
    """The reference functions are LLaDA's (no logit shift, bidirectional attention)."""
    if spec.logit_shift or spec.block_causal:
        raise ValueError(f"--reference: {spec.name} checkpoints do not decode or score like LLaDA's official "
                         "generate() / eval_llada.py; benchmark a LLaDA or LLaDA-MoE checkpoint or pass "
                         "--no-reference.")


def check_reference_config(config) -> None:
    """ML-GSAI generate() as `reference_style` runs it: temperature 0, low-confidence remasking, no
    guidance, no EOS rules; a decode setting outside that has no reference-style counterpart."""
    unsupported = [f"{name}={getattr(config, name)}" for name, ok in (
        ("strategy", ("llada", "threshold")), ("remasking", ("low_confidence",)), ("temperature", (0.0,)),
        ("cfg_scale", (0.0,)), ("logits_eos_inf", (False,)), ("confidence_eos_eot_inf", (False,)))
        if getattr(config, name) not in ok]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} (model args or the task's gen_kwargs) has no reference-style "
                         "counterpart (ML-GSAI generate() at temperature 0, low-confidence remasking); drop it "
                         "or pass --no-reference.")


def reference_generate(lm, requests) -> list[str]:
    """generate_until answers the official way: one request at a time, unpadded, through
    `decode.reference_style` with the gen_length / block_length / steps of the LM's plan for the
    request's gen_kwargs (prompt fitted as the LM fits it), the row cut as the LM cuts it
    (`GenerationRequests.answer`: stop ids, then the task's `until`)."""
    answers = []
    with torch.inference_mode():
        for req in requests:
            context, gen_kwargs = req.args
            plan = lm.generation.plan(gen_kwargs)
            if plan is None:  # nothing to generate: the LM answers "" too
                answers.append("")
                continue
            c = plan.config
            check_reference_config(c)
            ids, attn = lm.generation.batch([lm.tok_encode(context)], plan, lm.prefix_token_id, lm.device)
            x, _ = reference_style(lm.backbone, ids, attn, c.gen_length, c.block_length, None, steps=c.steps)
            answers.append(lm.generation.answer(x[0, ids.shape[1]:][:plan.limit].tolist(), plan.until))
    lm.generation.warn_truncated()
    return answers


def reference_loglikelihood(lm, requests) -> list[float]:
    """loglikelihood the official way: lm-eval's own pair encoding (`TemplateLM.loglikelihood`), each
    pair fitted as the LM fits it and scored alone by `decode.official_style_loglikelihood` with the
    LM's mc_num, stratum and request seed (so both draw the same masks)."""
    from lm_eval_dlmem.batching import fit_pair

    mc_num = lm.args.mc_num
    stratum = min(our_stratum(), mc_num)
    if mc_num % stratum:
        raise ValueError(f"mc_num={mc_num}: the official loop draws whole strata of {stratum} samples; pass a "
                         f"multiple of {stratum} or --no-reference.")

    def score(pairs, disable_tqdm=False):
        out = []
        for (ctx, cont), ctx_ids, cont_ids in pairs:
            prefix, target = fit_pair(ctx_ids, cont_ids, lm.max_length)
            gen = torch.Generator().manual_seed(lm.request_seed(ctx, cont))
            out.append((official_style_loglikelihood(lm.backbone, prefix, target, mc_num, stratum, gen), None))
        return out

    lm._loglikelihood_tokens = score  # lm-eval's encoding of the pairs, then the official loop
    try:
        with torch.inference_mode():
            return [ll for ll, _ in type(lm).loglikelihood(lm, requests, disable_tqdm=True)]
    finally:
        del lm._loglikelihood_tokens


REFERENCE = {"generate_until": reference_generate, "loglikelihood": reference_loglikelihood}


def reference_pass(lm, instances: dict, clock=time.perf_counter) -> dict:
    """Per method: seconds, requests, answers and documents of the reference pass over `instances`
    (the requests the LM was timed on)."""
    check_reference_family(lm.spec)
    out = {}
    for name, method in REFERENCE.items():
        if not instances.get(name):
            continue
        start = clock()
        answers = method(lm, instances[name])
        out[name] = {"seconds": clock() - start, "requests": len(instances[name]), "answers": answers,
                     "docs": [(r.task_name, r.doc_id) for r in instances[name]]}
    return out


def answer_tokens(lm, answers: list[str]) -> list[list[int]]:
    return [lm.tok_encode(a, add_special_tokens=False) for a in answers]


def run(batch_size: int, args, reference: bool = False) -> dict:
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from lm_eval_dlmem._autoload import register
    from lm_eval_dlmem.tasks import tasks_path

    register()

    model_args = f"pretrained={args.pretrained},batch_size={batch_size},{args.model_args}".rstrip(",")
    meta = {"pretrained": args.pretrained}  # the tasks size their prompts with this tokenizer
    timer = Timed(get_model(args.model).create_from_arg_string(model_args, {"device": "cpu"}), CLOCKS[args.clock])
    lm_eval.simple_evaluate(
        model=timer.lm,
        tasks=args.tasks.split(","),
        limit=args.limit,
        task_manager=TaskManager(include_path=tasks_path(), include_defaults=False, metadata=meta),
        verbosity="ERROR",
        bootstrap_iters=0,
        metadata=meta,
    )
    out = {"batch_size": batch_size, "seconds": timer.seconds, "requests": timer.requests, "answers": timer.answers,
           "answer_tokens": answer_tokens(timer.lm, timer.answers.get("generate_until", []))}
    if reference:
        out["reference"] = ref = reference_pass(timer.lm, timer.instances, CLOCKS[args.clock])
        if "generate_until" in ref:
            ref["generate_until"]["answer_tokens"] = answer_tokens(timer.lm, ref["generate_until"]["answers"])
    return out


def generate_agreement(ours: list[list[int]], ref: list[list[int]], ours_text: list[str], ref_text: list[str]) -> dict:
    """Identical answers (text), and identical answer tokens: both answers tokenized, compared
    position by position over the longer of the two."""
    total = sum(max(len(a), len(b)) for a, b in zip(ours, ref))
    return {"same_answers": sum(a == b for a, b in zip(ours_text, ref_text)), "of": len(ref_text),
            "same_tokens": sum(x == y for a, b in zip(ours, ref) for x, y in zip(a, b)) / total if total else 1.0}


def loglikelihood_agreement(ours: list[float], ref: list[float], docs: list) -> dict:
    """max |delta| of the log-likelihoods, and per document (its choices = its requests, in order)
    whether the highest-scoring choice is the same."""
    by_doc: dict = {}
    for i, doc in enumerate(docs):
        by_doc.setdefault(tuple(doc), []).append(i)
    argmax = lambda lls, idx: max(idx, key=lambda i: lls[i])  # noqa: E731
    return {"max_abs_delta": max(abs(a - b) for a, b in zip(ours, ref)),
            "same_choice": sum(argmax(ours, idx) == argmax(ref, idx) for idx in by_doc.values()),
            "documents": len(by_doc)}


def agreement(method: str, run: dict, ref: dict) -> dict:
    """A run's agreement with the reference pass on `method`."""
    if method == "generate_until":
        return generate_agreement(run["answer_tokens"], ref["answer_tokens"], run["answers"][method], ref["answers"])
    return loglikelihood_agreement([ll for ll, _ in run["answers"][method]], ref["answers"], ref["docs"])


def summarize(runs: list[dict], args) -> dict:
    rows = []
    reference = next((r["reference"] for r in runs if "reference" in r), {})
    for method in Timed.METHODS:
        per_batch = {r["batch_size"]: r for r in runs if method in r["seconds"]}
        if not per_batch:
            continue
        ref = reference.get(method)
        ref_rps = ref["requests"] / ref["seconds"] if ref else None
        if ref:
            rows.append({"method": method, "run": "reference-style", "batch_size": 1, "requests": ref["requests"],
                         "seconds": round(ref["seconds"], 2), "requests_per_s": round(ref_rps, 2), "x_reference": 1.0})
        base = per_batch[min(per_batch)]
        base_rps = base["requests"][method] / base["seconds"][method]
        for bs, r in sorted(per_batch.items()):
            rps = r["requests"][method] / r["seconds"][method]
            same = r["answers"][method] == base["answers"][method]
            rows.append({"method": method, "run": "ours", "batch_size": bs, "requests": r["requests"][method],
                         "seconds": round(r["seconds"][method], 2), "requests_per_s": round(rps, 2),
                         "x_reference": round(rps / ref_rps, 2) if ref else None,
                         "speedup": round(rps / base_rps, 2), "same_answers_as_batch_1": same,
                         "agreement": agreement(method, r, ref) if ref else None})
    return {"model": args.model, "pretrained": args.pretrained, "model_args": args.model_args,
            "tasks": args.tasks, "limit": args.limit, "threads": args.threads, "clock": args.clock, "note": args.note,
            "command": args.command, "rows": rows}


def agreement_text(method: str, a: dict | None) -> str:
    if a is None:
        return ""
    if method == "generate_until":
        return f"answers {a['same_answers']}/{a['of']}, tokens {a['same_tokens']:.1%}"
    return f"max abs delta {a['max_abs_delta']:.1e}, choice {a['same_choice']}/{a['documents']} documents"


def markdown(res: dict) -> str:
    extra = f",{res['model_args']}" if res["model_args"] else " (preset defaults)"
    clock = "process CPU" if res["clock"] == "cpu" else "wall"
    lines = [f"`{res['model']}`, pretrained={res['pretrained']}{extra}; tasks {res['tasks']}, "
             f"limit {res['limit']}; {res['threads']} math threads; seconds of {clock} time."
             + (f" {res['note']}" if res["note"] else ""),
             "", f"Command: `{res['command']}`. Reference-style: the official code's way on the same requests and "
             "model, one request at a time (generate_until: ML-GSAI `generate()` with the LM's gen_length / "
             "block_length / steps, no cache, full-vocabulary logits, no early exit; loglikelihood: the "
             "`eval_llada.py` Monte Carlo loop, same mc_num and masks).", "",
             "| method | run | batch | requests | seconds | requests/s | x reference-style | x batch 1 | "
             "same answers as batch 1 | agreement with reference-style |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in res["rows"]:
        ours = r["run"] == "ours"
        lines.append(f"| {r['method']} | {r['run']} | {r['batch_size']} | {r['requests']} | {r['seconds']} | "
                     f"{r['requests_per_s']} | {'' if r['x_reference'] is None else r['x_reference']} | "
                     f"{r['speedup'] if ours else ''} | "
                     f"{('yes' if r['same_answers_as_batch_1'] else 'NO') if ours else ''} | "
                     f"{agreement_text(r['method'], r.get('agreement'))} |")
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
    p.add_argument("--clock", choices=CLOCKS, default="wall",
                   help="time requests by wall time or by this process's CPU time (steadier on a shared machine)")
    p.add_argument("--name", default="harness", help="results file stem under --out")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for NAME.json and NAME.md")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the official code's way on the same requests (in the first run) and report "
                        "agreement with it")
    p.add_argument("--note", default="", help="a sentence for the results header (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/harness.py", *(sys.argv[1:] if argv is None else argv)])

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.proxy:
            args.pretrained = proxies.build(args.proxy, os.path.join(tmp, args.proxy))
        sizes = [int(bs) for bs in args.batch_sizes.split(",")]
        runs = [run(bs, args, reference=args.reference and i == 0) for i, bs in enumerate(sizes)]
    if args.proxy:
        args.pretrained = f"proxy {args.proxy}"
    res = summarize(runs, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
