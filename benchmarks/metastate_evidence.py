"""Evidence that MetaState learns: on a tiny LLaDA-format backbone on CPU, a few minutes of
`lm-eval-dlmem train metastate` bring the held-out K-step denoising loss below the frozen
backbone's.

    python benchmarks/metastate_evidence.py --out /tmp/ms-evidence                    # ~30 min on 2 shared CPU cores
    python benchmarks/metastate_evidence.py --out /tmp/ms-random --pretrain-steps 0 --steps 300

Synthetic prompt/response data (copy a word list; retrieve the value of a key among several)
is written as JSONL, a train and a disjoint held-out file. With `--pretrain-steps` the tiny
backbone is first trained (all weights, plain masked-diffusion loss) so the frozen baseline is a
working dLLM rather than random weights; the backbone is then frozen and only MetaState trains.
Both numbers come from the trainer's own log: `eval_frozen` (NoMemory, step 0) and the final
`eval_metastate`, on the same held-out examples with the same masks and start steps. A third,
`metastate_no_carry`, evaluates the trained MetaState with its state reset after every forward:
the part of the gain that needs the state carried across steps is the gap between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

from lm_eval_dlmem.memory.base import MemoryWrapper

WORDS = ("apple banana cherry table chair window river mountain forest ocean "
         "green blue yellow one two three four five six seven").split()
KEYS = "ABCDEFGH"


def make_pair(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        seq = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))
        return {"prompt": f"Repeat: {seq}", "response": seq}
    keys = rng.sample(KEYS, 4)
    values = [rng.choice(WORDS) for _ in keys]
    facts = " ".join(f"{k} is {v}." for k, v in zip(keys, values))
    i = rng.randrange(len(keys))
    return {"prompt": f"{facts} What is {keys[i]}?", "response": f"{keys[i]} is {values[i]}."}


def write_data(out: str, n_train: int, n_eval: int) -> tuple[str, str]:
    paths = []
    for name, n, seed in (("train", n_train, 0), ("heldout", n_eval, 1)):
        rng = random.Random(f"metastate-evidence-{seed}")
        path = os.path.join(out, f"{name}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(make_pair(rng)) + "\n" for _ in range(n))
        paths.append(path)
    return paths[0], paths[1]


def pretrain(ckpt: str, data: str, steps: int, out: str, batch_size: int = 16, lr: float = 1e-3) -> str:
    """Train the whole tiny backbone with the masked-diffusion loss on the response (mask ratio
    t ~ U(0, 1], CE on masked positions); returns the saved checkpoint directory."""
    from lm_eval_dlmem.backbones import load_backbone
    from lm_eval_dlmem.training.data import collate, load_pairs, tokenize_pairs

    bb = load_backbone(ckpt)
    examples = tokenize_pairs(load_pairs(data), bb.tokenizer, max_length=128)
    opt = torch.optim.AdamW(bb.model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    bb.model.train()
    for step in range(steps):
        rows = torch.randint(len(examples), (batch_size,), generator=g).tolist()
        batch = collate([examples[i] for i in rows], bb.spec.eos_id)
        x0, resp = batch["input_ids"], ~batch["prompt_mask"]
        t = torch.rand(batch_size, 1, generator=g).clamp_min(0.05)
        masked = resp & (torch.rand(x0.shape, generator=g) < t)
        logits = bb.logits(torch.where(masked, bb.spec.mask_id, x0))
        loss = F.cross_entropy(logits[masked], x0[masked])
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step}: masked-token CE {loss.item():.3f}", flush=True)
    bb.model.eval()
    path = os.path.join(out, "backbone-pretrained")
    bb.model.save_pretrained(path)
    bb.tokenizer.save_pretrained(path)
    return path


class NoCarry(MemoryWrapper):
    """Ablation: the trained MetaState with its state reset to the learned initial slots after
    every forward, so nothing is carried between denoising steps (the Injector still writes)."""

    def __init__(self, metastate):
        super().__init__(metastate)  # begin, before_forward, select, end: unchanged
        self.ms = metastate

    def after_forward(self, info):
        self.ms.after_forward(info)
        self.ms.state = self.ms.slot_init[None].expand(self.ms.state.shape[0], -1, -1)


def no_carry_loss(ckpt: str, run: str, heldout: str, args) -> float:
    from lm_eval_dlmem.backbones import load_backbone
    from lm_eval_dlmem.memory import MetaState
    from lm_eval_dlmem.training.data import collate, load_pairs, tokenize_pairs
    from lm_eval_dlmem.training.metastate import UnrollConfig, evaluate

    bb = load_backbone(ckpt)
    examples = tokenize_pairs(load_pairs(heldout), bb.tokenizer, max_length=1024)
    batches = [collate(examples[i : i + 16], bb.spec.eos_id) for i in range(0, len(examples), 16)]
    memory = NoCarry(MetaState.from_pretrained(run, bb))
    return evaluate(bb, memory, batches, UnrollConfig(args.unroll_steps, args.denoise_steps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="working directory (data, checkpoints, logs)")
    p.add_argument("--pretrain-steps", type=int, default=800, help="train the tiny backbone first (0 = random weights)")
    p.add_argument("--steps", type=int, default=1500, help="MetaState optimizer steps")
    p.add_argument("--unroll-steps", type=int, default=4, help="K")
    p.add_argument("--denoise-steps", type=int, default=8, help="T")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    from lm_eval_dlmem.testing import make_tiny_checkpoint
    from lm_eval_dlmem.training.metastate import main as train_metastate

    ckpt = make_tiny_checkpoint("llada", os.path.join(args.out, "backbone"), seed=0,
                                d_model=128, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=256)
    train, heldout = write_data(args.out, 4000, 128)
    t0 = time.time()
    if args.pretrain_steps:
        ckpt = pretrain(ckpt, train, args.pretrain_steps, args.out)
    t1 = time.time()
    run = os.path.join(args.out, "metastate")
    cmd = ["--backbone", ckpt, "--data", train, "--eval-data", heldout, "--output-dir", run,
           "--slots", "16", "--width", "64", "--heads", "4", "--unroll-steps", str(args.unroll_steps),
           "--denoise-steps", str(args.denoise_steps), "--batch-size", "16", "--max-steps", str(args.steps),
           "--lr", "3e-3", "--warmup-steps", "20", "--eval-every", "250", "--save-every", "0", "--cpu"]
    print("lm-eval-dlmem train metastate " + " ".join(cmd), flush=True)
    train_metastate(cmd)
    log = [json.loads(line) for line in open(os.path.join(run, "train_log.jsonl"))]
    frozen = log[0]["eval_frozen"]
    curve = [(r["step"], r["eval_metastate"]) for r in log if "eval_metastate" in r]
    result = dict(frozen=frozen, metastate=curve[-1][1], metastate_no_carry=no_carry_loss(ckpt, run, heldout, args),
                  curve=curve, pretrain_steps=args.pretrain_steps,
                  pretrain_s=round(t1 - t0, 1), metastate_train_s=round(time.time() - t1, 1))
    print(json.dumps(result, indent=2))
    with open(os.path.join(args.out, "evidence.json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
