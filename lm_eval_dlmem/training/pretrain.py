"""Plain masked-diffusion training (MDLM / LLaDA): pre-training from scratch, or SFT.

    lm-eval-dlmem train pretrain --output-dir ckpt/tiny --tokenizer tok/ --d-model 128 --layers 4 \\
        --data synthetic --tasks all --min-tokens 256 --max-tokens 1024 --max-steps 600

Each step draws a batch, picks t ~ U(eps, 1) per row (stratified over the batch, so every batch
spans the noise levels), masks each eligible token with probability t and minimises
sum_masked CE / t, divided by the row's eligible tokens (LLaDA's estimator of the negative ELBO).
`--mode pretrain`: every token is eligible. `--mode sft`: the prompt is never masked, only the
response and the EOS padding after it (so the model learns to fill the generation region with
EOS after the answer, as LLaDA's SFT does).

Data: `--data synthetic` streams `training.synthetic` examples (task mix `--tasks`, lengths in
[--min-tokens, --max-tokens], batch i a pure function of (seed, i), so a resumed run sees the
same data); or a .jsonl/.json file / hub id of prompt/response pairs (`training.data`).
A batch holds about `--batch-tokens` tokens: one target length per batch, rows padded with EOS.

The output directory receives the final model (`pretrained=OUTPUT_DIR` works in lm_eval),
`checkpoint-N/` every --save-every steps (model, tokenizer, optimizer, schedule: --resume) and
`train_log.jsonl` (loss, lr, held-out masked NLL and one-shot answer accuracy per task).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import TrainerSetup, add_schedule_args, cosine_schedule, find_resume
from ..decoding.seeds import step_seed
from .state import restore_trainer_state, save_trainer_state

MODES = ("pretrain", "sft", "mixed")


@dataclass
class MaskConfig:
    """Args:
        mode: `pretrain` (mask any token), `sft` (never mask the prompt), or `mixed`: each row
            is a pretrain row with probability `pretrain_fraction`, else an SFT row. Pretrain
            rows give a loss on every token (repeated haystack text teaches copying), SFT rows
            the exact answer-after-prompt task.
        eps: smallest mask probability; t ~ U(eps, 1).
        pretrain_fraction: share of pretrain rows in `mixed` mode.
    """

    mode: str = "sft"
    eps: float = 1e-3
    pretrain_fraction: float = 0.5

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; choose one of {MODES}.")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps={self.eps} must be in (0, 1).")
        if not 0.0 <= self.pretrain_fraction <= 1.0:
            raise ValueError(f"pretrain_fraction={self.pretrain_fraction} must be in [0, 1].")

    def pretrain_rows(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """[B] bool: rows whose prompt may be masked."""
        if self.mode != "mixed":
            return torch.full((batch,), self.mode == "pretrain")
        return torch.rand(batch, generator=generator) < self.pretrain_fraction


def sample_t(batch: int, eps: float, generator: torch.Generator) -> torch.Tensor:
    """[B] mask probabilities, stratified: one uniform offset, rows spread evenly over (eps, 1)."""
    u = (torch.rand(1, generator=generator) + torch.arange(batch) / batch) % 1.0
    return eps + (1 - eps) * u


def mdlm_loss(model, batch: dict, cfg: MaskConfig, mask_id: int, generator: torch.Generator):
    """The MDLM loss of one batch.

    Args:
        model: a family LM class (`LLaDAModelLM`, ...) returning logits [B, L, V].
        batch: input_ids [B, L], prompt_mask [B, L] bool (True on prompt tokens).
        cfg: mode and eps.
        mask_id: the [MASK] token id.
        generator: CPU generator for t and the masks.

    Returns:
        (loss, number of masked tokens).
    """
    x0 = batch["input_ids"]
    B, L = x0.shape
    free = cfg.pretrain_rows(B, generator).to(x0.device)  # rows whose prompt may be masked
    eligible = ~batch["prompt_mask"] | free[:, None]
    t = sample_t(B, cfg.eps, generator).to(x0.device)
    masked = (torch.rand(B, L, generator=generator).to(x0.device) < t[:, None]) & eligible
    xt = torch.where(masked, mask_id, x0)
    # the LM head runs on masked positions only: hidden [B, L, C] -> [n, C]
    out = model(input_ids=xt, logits_to_keep=slice(0, 0), output_hidden_states=True)
    head = getattr(model, "_orig_mod", model)._head  # works for compiled models too
    logits = head(out.hidden_states[-1][masked])
    ce = F.cross_entropy(logits.float(), x0[masked], reduction="none")  # [n]
    weight = (1.0 / t)[:, None].expand(B, L)[masked] / eligible.sum(1).clamp_min(1)[:, None].expand(B, L)[masked]
    return (ce * weight).sum() / B, int(masked.sum())


@torch.no_grad()
def heldout_metrics(model, batches: list[dict], mask_id: int, seed: int = 1234) -> dict:
    """Held-out numbers that need no decoder.

    `nll`: the SFT masked NLL (the MDLM loss above, averaged over batches, with fixed masks).
    `answer_acc`: one-shot accuracy: the whole response is masked, one forward, argmax; a row
    counts when every answer token (the response before its EOS padding) is right. Per task too.
    `token_acc`: the share of answer tokens right in that one-shot prediction (a smoother signal).
    """
    g = torch.Generator().manual_seed(seed)
    cfg = MaskConfig("sft")
    nll, hits, right, total = [], {}, 0, 0
    for batch in batches:
        nll.append(float(mdlm_loss(model, batch, cfg, mask_id, g)[0]))
        resp = ~batch["prompt_mask"]
        xt = torch.where(resp, mask_id, batch["input_ids"])
        correct = model(input_ids=xt).logits.argmax(-1) == batch["input_ids"]
        right += int((correct & batch["answer_mask"]).sum())
        total += int(batch["answer_mask"].sum())
        ok = (correct | ~batch["answer_mask"]).all(1)
        for task, good in zip(batch["tasks"], ok.tolist()):
            hits.setdefault(task, []).append(good)
    per_task = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    every = [x for v in hits.values() for x in v]
    return {"nll": sum(nll) / max(1, len(nll)), "answer_acc": sum(every) / max(1, len(every)),
            "token_acc": right / max(1, total), "per_task": per_task}


def collate(examples: list[dict], length: int, pad_id: int) -> dict:
    """Right-pad with EOS to `length` (EOS padding is part of the response, as in LLaDA SFT).

    Returns:
        input_ids [B, L] long, prompt_mask [B, L] bool, answer_mask [B, L] bool (response tokens
        before the padding), tasks list[str].
    """
    B = len(examples)
    L = max(length, max(len(e["input_ids"]) for e in examples))
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    prompt = torch.zeros(B, L, dtype=torch.bool)
    answer = torch.zeros(B, L, dtype=torch.bool)
    for i, e in enumerate(examples):
        n, p = len(e["input_ids"]), e["prompt_len"]
        ids[i, :n] = torch.tensor(e["input_ids"])
        prompt[i, :p] = True
        answer[i, p:n] = True
    return {"input_ids": ids, "prompt_mask": prompt, "answer_mask": answer,
            "tasks": [e.get("task", "data") for e in examples]}


class SyntheticBatches:
    """Batch i: one task (drawn by weight) and one target length in [min, max]; rows are built
    to the length and padded to the longest row plus up to `gen_pad` EOS tokens (the generation
    region after the answer); about `batch_tokens` tokens in all. One task per batch keeps the
    padding small: tasks with a long fixed prompt (BABILong's examples, vt's example) never
    stretch a batch of short needle rows. Deterministic in (seed, i)."""

    def __init__(self, cfg, tokenizer, batch_tokens: int, gen_pad: int, pad_id: int):
        self.cfg, self.tok, self.batch_tokens, self.gen_pad, self.pad_id = cfg, tokenizer, batch_tokens, gen_pad, pad_id

    def __getitem__(self, i: int) -> dict:
        from .synthetic import build_example

        rng = random.Random(f"batch/{self.cfg.seed}/{i}")
        names = sorted(self.cfg.tasks)
        task = rng.choices(names, [self.cfg.tasks[n] for n in names])[0]
        target = rng.randint(self.cfg.min_tokens, self.cfg.max_tokens)
        pad = rng.randint(0, self.gen_pad)
        first = build_example(task, i * 1000, target, self.tok, self.cfg.seed)
        length = len(first["input_ids"]) + pad  # the task's minimum may exceed the target
        rows = [first] + [build_example(task, i * 1000 + r, target, self.tok, self.cfg.seed)
                          for r in range(1, max(1, self.batch_tokens // length))]
        return collate(rows, max(len(r["input_ids"]) for r in rows) + pad, self.pad_id)


class PairBatches:
    """Batches of tokenized prompt/response pairs from a file or hub id (shuffled per epoch)."""

    def __init__(self, examples: list[dict], batch_size: int, gen_pad: int, pad_id: int, seed: int):
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} training pairs are fewer than one batch of {batch_size}.")
        self.examples, self.bs, self.gen_pad, self.pad_id, self.seed = examples, batch_size, gen_pad, pad_id, seed
        self.per_epoch = len(examples) // batch_size

    def __getitem__(self, i: int) -> dict:
        epoch, j = divmod(i, self.per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
        rows = [self.examples[k] for k in order[j * self.bs:(j + 1) * self.bs].tolist()]
        return collate(rows, max(len(r["input_ids"]) for r in rows) + self.gen_pad, self.pad_id)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lm-eval-dlmem train pretrain", description=__doc__.split("\n\n")[0])
    # model
    p.add_argument("--init-from", default=None, help="start from this checkpoint (SFT, or more pre-training)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for a new model (see training.tokenizer)")
    p.add_argument("--d-model", type=int, default=128, help="hidden size of a new model")
    p.add_argument("--layers", type=int, default=4, help="decoder blocks of a new model")
    p.add_argument("--heads", type=int, default=4, help="attention heads of a new model")
    p.add_argument("--mlp-hidden", type=int, default=None, help="SwiGLU width of a new model (default 3 x d-model)")
    p.add_argument("--rope-theta", type=float, default=10000.0, help="RoPE base of a new model")
    p.add_argument("--vocab-size", type=int, default=None, help="model vocabulary (default: tokenizer size rounded up to 64)")
    # objective
    p.add_argument("--mode", choices=MODES, default="sft",
                   help="pretrain: mask any token; sft: never mask the prompt; mixed: a share of pretrain rows")
    p.add_argument("--pretrain-fraction", type=float, default=0.5, help="share of pretrain rows in --mode mixed")
    p.add_argument("--eps", type=float, default=1e-3, help="smallest mask probability")
    # data
    p.add_argument("--data", default="synthetic", help="`synthetic`, or a .jsonl/.json file / hub id of prompt/response pairs")
    p.add_argument("--tasks", default="all", help="synthetic task mix, e.g. niah_noise:2,vt,babi_qa1 (see training.synthetic)")
    p.add_argument("--min-tokens", type=int, default=256, help="shortest synthetic example (prompt + answer tokens)")
    p.add_argument("--max-tokens", type=int, default=1024, help="longest synthetic example")
    p.add_argument("--data-seed", type=int, default=0, help="synthetic data seed (held-out data uses data-seed + 1000)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per synthetic batch (rows = batch-tokens // length)")
    p.add_argument("--gen-pad", type=int, default=32, help="up to this many EOS tokens appended after each batch's answers")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch for pair data")
    p.add_argument("--max-length", type=int, default=1024, help="drop pairs longer than this (pair data)")
    p.add_argument("--no-chat-template", action="store_true", help="pair data: plain prompt + response, no chat template")
    # optimisation
    add_schedule_args(p, max_steps=600, lr=2e-3, warmup_steps=30, weight_decay=0.1)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the masks")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu",
                   help="where the model trains: cpu (default) or cuda[:N]; masks and data are drawn on the CPU either way, "
                        "so a run sees the same masks on both (the weights differ by the device's float rounding)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (dynamic shapes: one compile of a minute or two, then ~2-3x faster steps on CPU)")
    # checkpoints and logging
    p.add_argument("--output-dir", required=True, help="final model, checkpoint-N/ and train_log.jsonl go here")
    p.add_argument("--save-every", type=int, default=100, help="write checkpoint-N every N steps (0 = only at the end)")
    p.add_argument("--eval-every", type=int, default=100, help="held-out metrics every N steps (0 = only at the end)")
    p.add_argument("--eval-size", type=int, default=8, help="held-out examples per synthetic task")
    p.add_argument("--eval-tokens", type=int, default=512, help="length of the held-out synthetic examples")
    p.add_argument("--resume", default=None, help="checkpoint-N directory, or 'latest' in --output-dir")
    return p


def new_model(args, tokenizer):
    """A randomly initialised LLaDA model with the official config keys, sized by the args."""
    from ..backbones.llada import LLaDAConfig, LLaDAModelLM
    from ..testing import tiny_config

    vocab = args.vocab_size or -(-len(tokenizer) // 64) * 64
    if vocab < len(tokenizer):
        raise ValueError(f"--vocab-size {vocab} is smaller than the tokenizer ({len(tokenizer)} tokens).")
    if args.d_model % args.heads:
        raise ValueError(f"--d-model {args.d_model} is not divisible by --heads {args.heads}.")
    sizes = dict(d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.heads, n_layers=args.layers,
                 mlp_hidden_size=args.mlp_hidden or 3 * args.d_model, rope_theta=args.rope_theta,
                 max_sequence_length=4096)
    torch.manual_seed(args.seed)
    return LLaDAModelLM(LLaDAConfig(**tiny_config("llada", vocab, tokenizer, **sizes)))


def load_model(path: str):
    """(model in float32, tokenizer) from a checkpoint directory."""
    from ..backbones.loading import load_backbone

    backbone = load_backbone(path, dtype="float32", device="cpu")
    return backbone.model, backbone.tokenizer


def make_data(args, tokenizer, pad_id: int):
    """(training batches indexable by step, held-out batches)."""
    if args.data == "synthetic":
        from .synthetic import SyntheticConfig, build_example, parse_tasks

        cfg = SyntheticConfig(parse_tasks(args.tasks), args.min_tokens, args.max_tokens, args.data_seed)
        held = [build_example(t, i, args.eval_tokens, tokenizer, args.data_seed + 1000)
                for t in sorted(cfg.tasks) for i in range(args.eval_size)]
        evals = [collate(held[i:i + 8], args.eval_tokens + args.gen_pad, pad_id) for i in range(0, len(held), 8)]
        return SyntheticBatches(cfg, tokenizer, args.batch_tokens, args.gen_pad, pad_id), evals
    from .data import load_pairs, tokenize_pairs

    examples = tokenize_pairs(load_pairs(args.data), tokenizer, max_length=args.max_length,
                              chat_template=not args.no_chat_template)
    held, train = examples[: args.eval_size], examples[args.eval_size:]
    evals = [collate(held[i:i + 8], 0, pad_id) for i in range(0, len(held), 8)]
    return PairBatches(train, args.batch_size, args.gen_pad, pad_id, args.seed), evals


def save(path: str, model, tokenizer, optimizer=None, scheduler=None, step: int = 0, args=None) -> None:
    """Model (safetensors + config.json) and tokenizer; with an optimizer, the trainer state too."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if optimizer is not None:
        save_trainer_state(path, optimizer, scheduler, step, args)


@dataclass(kw_only=True)
class PretrainSetup(TrainerSetup):
    """`TrainerSetup` plus the tokenizer the model was built with."""

    tokenizer: object


def setup(args) -> PretrainSetup:
    """The model (new, `--init-from`, or resumed), its tokenizer, optimizer and schedule."""
    if args.threads:
        torch.set_num_threads(args.threads)
    resume = find_resume(args.resume, args.output_dir)
    if resume or args.init_from:
        model, tokenizer = load_model(resume or args.init_from)
    elif args.tokenizer:
        from ..backbones.loading import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        model = new_model(args, tokenizer)
    else:
        raise ValueError("Pass --tokenizer DIR to train a new model, or --init-from CHECKPOINT to continue one.")
    model.to(training_device(args.device)).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    scheduler = cosine_schedule(optimizer, args.warmup_steps, args.max_steps, args.min_lr_ratio)
    step = restore_trainer_state(resume, optimizer, scheduler) if resume else 0
    return PretrainSetup(model, optimizer, scheduler, step, resume, tokenizer=tokenizer)


def training_device(name: str) -> torch.device:
    """`--device` as a torch.device; a CUDA device this machine does not have is one clear error."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device name: use cpu or cuda[:N] ({e}).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU visible to torch; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda[:N] are supported.")
    return device


def on_device(batch: dict, device) -> dict:
    """The batch's tensors moved to `device` (task names and other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(model, optimizer, scheduler, batch, cfg, mask_id, step, args, forward=None) -> float:
    """One optimizer step; `forward` is the (possibly compiled) callable running `model`."""
    generator = torch.Generator().manual_seed(step_seed(args.seed, step))
    loss, _ = mdlm_loss(model if forward is None else forward, batch, cfg, mask_id, generator)
    loss.backward()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    from ..backbones.spec import LLADA

    args = build_parser().parse_args(argv)
    cfg = MaskConfig(args.mode, args.eps, args.pretrain_fraction)
    run = setup(args)
    model, tokenizer, optimizer, scheduler, step = run.model, run.tokenizer, run.optimizer, run.scheduler, run.step
    spec = LLADA.resolve(tokenizer)
    batches, evals = make_data(args, tokenizer, spec.eos_id)
    device = next(model.parameters()).device
    evals = [on_device(b, device) for b in evals]
    os.makedirs(args.output_dir, exist_ok=True)
    log = open(os.path.join(args.output_dir, "train_log.jsonl"), "a")

    def evaluate():
        model.eval()
        metrics = heldout_metrics(model, evals, spec.mask_id)
        model.train()
        log.write(json.dumps({"step": step, **metrics}) + "\n")
        log.flush()
        return metrics

    forward = torch.compile(model, dynamic=True) if args.compile else model
    bar = tqdm(total=args.max_steps, initial=step, desc=f"{args.mode}", dynamic_ncols=True)
    start, cpu_start, ema = time.time(), time.process_time(), None
    while step < args.max_steps:
        loss = train_step(model, optimizer, scheduler, on_device(batches[step], device), cfg, spec.mask_id, step, args,
                          forward)
        step += 1
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        log.write(json.dumps({"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                              "elapsed_s": round(time.time() - start, 1),
                              "cpu_s": round(time.process_time() - cpu_start, 1)}) + "\n")
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            m = evaluate()
            bar.write(f"step {step}: held-out nll {m['nll']:.3f}, one-shot answer acc {m['answer_acc']:.2f}, "
                      f"answer token acc {m['token_acc']:.2f}")
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            save(os.path.join(args.output_dir, f"checkpoint-{step}"), model, tokenizer, optimizer, scheduler, step, args)
    bar.close()
    m = evaluate()
    save(args.output_dir, model, tokenizer)
    log.close()
    print(f"held-out masked NLL {m['nll']:.4f}, one-shot answer accuracy {m['answer_acc']:.3f} "
          f"({', '.join(f'{k} {v:.2f}' for k, v in m['per_task'].items())}); saved {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
