"""Which MetaState training mode serves the evaluation decode better, on the embedded tiny model.

    python benchmarks/metastate_training_modes.py --out runs/ms-modes [--steps 200] [--threads 1]

On the frozen embedded `tiny-llada` (the base the shipped `tiny-llada-metastate` was trained on)
and the tiny default's memory tasks (`tiny_default.MEMORY_TASKS`, seed 0; `--tokens` long, shorter
than the tiny default's 512-1024 so that both runs fit a few minutes of a shared CPU), train two
MetaStates with the tiny default's recipe (`tiny_default.metastate_command`: 16 slots, width
128, K = 4, batch 4, lr 5e-3, the same number of optimizer steps):

- `unroll`: the default K-step unroll (T = 16 full-sequence steps, random masking);
- `match`: `--match-decode` with the evaluation DecodeConfig below (K = 4 consecutive forwards
  of the decode trajectory, from a random point of it).

Then, for the frozen base and both MetaStates: the default held-out K-step loss, the held-out
trajectory loss under the evaluation DecodeConfig (`evaluate_trajectory`), and greedy held-out
accuracy decoding with that DecodeConfig (`tiny_default.score`, the tiny default's metrics).
Writes OUT/modes.json and prints a table. The shipped embedded checkpoint is not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import time

EVAL_DECODE = "gen_length=32,block_length=8,steps=32,cache=dual"


def memory_data(out: str, tokenizer, tokens: tuple[int, int], n_train: int, n_eval: int) -> None:
    """OUT/memory_{train,eval}.jsonl as `tiny_default.memory_data` writes them, at `tokens` length."""
    from lm_eval_dlmem.training.synthetic import SyntheticConfig, iter_examples, parse_tasks
    from lm_eval_dlmem.training.tiny_default import MEMORY_TASKS

    for name, n, seed in (("train", n_train, 2), ("eval", n_eval, 3)):
        cfg = SyntheticConfig(parse_tasks(MEMORY_TASKS), tokens[0], tokens[1], seed)
        with open(os.path.join(out, f"memory_{name}.jsonl"), "w") as f:
            for ex, _ in zip(iter_examples(cfg, tokenizer), range(n)):
                f.write(json.dumps({"prompt": ex["prompt"], "response": ex["answer"], "task": ex["task"]}) + "\n")


def train(out: str, mode: str, steps: int) -> float:
    """One `train metastate` run; returns its wall time in seconds."""
    from lm_eval_dlmem.training import metastate, tiny_default

    argv = tiny_default.metastate_command(out, 0)
    argv[argv.index("--backbone") + 1] = "tiny-llada"
    argv[argv.index("--output-dir") + 1] = os.path.join(out, mode)
    argv[argv.index("--max-steps") + 1] = str(steps)
    argv[argv.index("--save-every") + 1] = "0"
    argv[argv.index("--eval-every") + 1] = "0"  # held-out losses at the start and the end only
    if mode == "match":
        argv += ["--match-decode", EVAL_DECODE]
    t = time.time()
    if not os.path.isfile(os.path.join(out, mode, "metastate.safetensors")):
        metastate.main(argv)
    return time.time() - t


def accuracy(backbone, memory, examples, config, batch_size=8) -> tuple[float, float, int]:
    """Decoding with `config`: (mean held-out task score 0-100, answer token accuracy in %: the
    share of response tokens, its EOS included, decoded at their exact position, n)."""
    from lm_eval_dlmem.training.tiny_default import decoded_answers, score

    scores, hits, total = [], 0, 0
    for e, row, text in decoded_answers(backbone, memory, examples, config, batch_size):
        scores.append(score(e, text))
        ref = e["input_ids"][e["prompt_len"]:]
        hits += sum(a == b for a, b in zip(row, ref))
        total += len(ref)
    return round(sum(scores) / len(scores), 2), round(100 * hits / total, 2), len(scores)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", default="160,320", help="min,max example length in tokens")
    p.add_argument("--train-size", type=int, default=1000)
    p.add_argument("--eval-size", type=int, default=40)
    p.add_argument("--modes", default="unroll,match", help="which runs to train (the rest are read back)")
    p.add_argument("--eval-only", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from lm_eval_dlmem.backbones.loading import load_backbone
    from lm_eval_dlmem.memory import MetaState, NoMemory
    from lm_eval_dlmem.training import metastate as trainer
    from lm_eval_dlmem.training.data import collate, load_pairs, tokenize_pairs
    from lm_eval_dlmem.training.decode_unroll import parse_decode

    base = load_backbone("tiny-llada", dtype="float32")
    os.makedirs(args.out, exist_ok=True)
    if not os.path.isfile(os.path.join(args.out, "memory_eval.jsonl")):
        lo, hi = (int(x) for x in args.tokens.split(","))
        memory_data(args.out, base.tokenizer, (lo, hi), args.train_size, args.eval_size)
    times = {}
    if not args.eval_only:
        for mode in filter(None, args.modes.split(",")):
            times[mode] = train(args.out, mode, args.steps)
    rows = [json.loads(line) for line in open(os.path.join(args.out, "memory_eval.jsonl"))]
    tok = tokenize_pairs(load_pairs(os.path.join(args.out, "memory_eval.jsonl")), base.tokenizer,
                         max_length=1100, chat_template=False)
    examples = [{**e, "task": r["task"], "answer": r["response"], "prompt": r["prompt"]} for e, r in zip(tok, rows)]
    unroll = trainer.UnrollConfig(4, 16)
    decode = parse_decode(EVAL_DECODE)
    match = trainer.UnrollConfig(4, 16, decode=decode)
    kept = trainer.fitting(examples, match, "held-out")
    pad = base.spec.eos_id
    unroll_batches = [collate(kept[i : i + 4], pad) for i in range(0, len(kept), 4)]
    match_batches = [trainer.batch_maker(match, pad)(kept[i : i + 4]) for i in range(0, len(kept), 4)]
    greedy = parse_decode(EVAL_DECODE + ",stop_early=true")
    report = {"eval_decode": EVAL_DECODE, "held_out": len(kept), "train_seconds": times, "models": {}}
    for name in ("frozen", "unroll", "match"):
        if name == "frozen":
            memory = NoMemory()
        elif os.path.isdir(os.path.join(args.out, name)):
            memory = MetaState.from_pretrained(os.path.join(args.out, name), base)
        else:
            continue
        report["models"][name] = {
            "kstep_loss": round(trainer.evaluate(base, memory, unroll_batches, unroll), 4),
            "trajectory_loss": round(trainer.evaluate(base, memory, match_batches, match), 4),
            "accuracy": accuracy(base, memory, kept, greedy),
        }
        print(name, report["models"][name], flush=True)
    with open(os.path.join(args.out, "modes.json"), "w") as f:
        json.dump(report, f, indent=2)
    print("| model | held-out 4-step loss (default unroll) | held-out trajectory loss (eval decode) "
          "| task score | answer token accuracy |")
    for name, r in report["models"].items():
        score, tokens, n = r["accuracy"]
        print(f"| {name} | {r['kstep_loss']:.4f} | {r['trajectory_loss']:.4f} | {score:.1f} (n={n}) | {tokens:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
