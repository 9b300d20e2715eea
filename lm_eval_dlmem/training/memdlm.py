"""Train MemDLM's outer LoRA with the released bi-level recipe, or standard MDLM SFT (`--baseline`).

    lm-eval-dlmem train memdlm --backbone inclusionAI/LLaDA-MoE-7B-A1B-Base \
        --data Yukang/LongAlpaca-12k --max-length 4096 --output-dir ckpt/memdlm
    accelerate launch -m lm_eval_dlmem.training.memdlm ...        # several GPUs (DDP)

Each micro-batch (B examples, L tokens, prompts never masked):
  1. t ~ eps + (1 - eps) U(0, 1) per example; the anchor x_t masks each response token w.p. t.
  2. (MemDLM) fresh fast weights (A random, B = 0) on the FFNs of the last 10% of blocks; the
     inner loop takes one SGD step on the pre-anchor state (~1.5x the anchor's masks) and one on
     x_t itself, each 1/t-weighted, token-normalised cross-entropy to the clean tokens.
  3. Outer loss on x_t with the fast weights installed: sum over masked (1/t) CE / #response
     tokens; its gradient reaches only the outer LoRA (first order: the fast weights are
     constants), AdamW 2e-5, cosine schedule with 10% warmup.
The base is NF4 4-bit with double quantisation on CUDA (float32 on CPU), outer LoRA on every
linear layer of the blocks (r 32, alpha 64, dropout 0.05). The EOS right padding is part of the
response (the model learns to end), and attention spans the whole padded row, as released.
Data as the released training feeds it by default: over-long examples right-truncated
(`--truncation filter` drops them, as the paper's text says) and batches grouped by length
(`--batching random` for a plain shuffle).
The result is a PEFT adapter directory that `adapter=` / `apply_adapter` loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random

import torch
import torch.nn.functional as F

from ..decoding.seeds import RANK_STRIDE, step_seed
from ..memory.anchor import anchor_states
from ..memory.fast_weights import FastWeightMemory, MemDLMConfig
from .data import collate, load_pairs, tokenize_pairs
from .common import add_batch_args, find_resume
from .nll import static_nll
from .state import restore_trainer_state, save_trainer_state
CONFIG_NAME = "memdlm_training.json"


def add_fast_weight_args(p: argparse.ArgumentParser) -> None:
    """--inner-lr / --inner-rank / --inner-alpha / --inner-layer-fraction with `MemDLMConfig`'s
    defaults (this trainer and the exposure-bias analysis)."""
    d = MemDLMConfig()
    p.add_argument("--inner-lr", type=float, default=d.inner_lr, help="inner SGD learning rate")
    p.add_argument("--inner-rank", type=int, default=d.inner_rank, help="fast LoRA rank")
    p.add_argument("--inner-alpha", type=float, default=d.inner_alpha, help="fast LoRA alpha")
    p.add_argument("--inner-layer-fraction", type=float, default=d.inner_layer_fraction,
                   help="fraction of the last blocks with fast weights")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lm-eval-dlmem train memdlm", description=__doc__.split("\n\n")[0])
    # model
    p.add_argument("--backbone", required=True, help="base checkpoint directory or hub id (any family)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype on CUDA (CPU always trains in float32)")
    p.add_argument("--no-4bit", action="store_true", help="keep the base in --dtype instead of NF4 4-bit")
    p.add_argument("--lora-r", type=int, default=32, help="outer LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=64.0, help="outer LoRA alpha")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="outer LoRA dropout")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in the outer backward")
    # method
    p.add_argument("--baseline", action="store_true", help="standard MDLM SFT: no inner loop (the paper's Std baseline)")
    p.add_argument("--inner-steps", type=int, default=2, help="inner SGD steps (pre-anchor ... anchor)")
    add_fast_weight_args(p)
    p.add_argument("--pre-anchor-scale", type=float, default=1.5, help="pre-anchor mask ratio / anchor mask ratio")
    p.add_argument("--inner-grad-clip", type=float, default=1.0, help="per-tensor gradient norm clip of the inner loop")
    p.add_argument("--inner-targets", choices=["released", "ffn"], default="released",
                   help="fast-weight targets: the released code's name matching (LLaDA-MoE experts without the "
                        "shared expert, dense LLaDA only up_proj) or every FFN projection")
    p.add_argument("--inner-per-example", action="store_true",
                   help="one fast-weight set per example instead of one per micro-batch (released code)")
    p.add_argument("--time-epsilon", type=float, default=1e-3, help="smallest mask ratio t")
    # data
    p.add_argument("--data", required=True, help="hub dataset id (e.g. Yukang/LongAlpaca-12k) or local .jsonl/.json")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--limit", type=int, default=None, help="use at most this many pairs")
    p.add_argument("--eval-data", default=None, help="held-out pairs (default: a --eval-fraction split of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="share of --data held out when --eval-data is absent")
    p.add_argument("--max-length", type=int, default=4096, help="longest example in tokens")
    p.add_argument("--truncation", choices=["filter", "right"], default="right",
                   help="over-long examples: right = cut the response (released code: dllm's default), "
                        "filter = drop them (the paper's text)")
    p.add_argument("--batching", choices=["length", "random"], default="length",
                   help="length = batches of similar length (released code: Trainer group_by_length), "
                        "random = a plain seeded shuffle")
    p.add_argument("--no-chat-template", action="store_true", help="plain prompt + response + EOS without the chat template")
    # optimisation
    p.add_argument("--epochs", type=float, default=5.0, help="passes over the training data")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0 = use --epochs)")
    add_batch_args(p, batch_size=2)
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW peak learning rate")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup share of the steps (then cosine to 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="global gradient norm clip of the outer update (0 = off)")
    p.add_argument("--seed", type=int, default=42, help="seed of the data split, order, masks and fast weights")
    # output
    p.add_argument("--output-dir", required=True, help="final adapter, checkpoints and log")
    p.add_argument("--save-every", type=int, default=0, help="write checkpoint-N every N steps (0 = 10%% of the run)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out NLL every N steps (0 = 10%% of the run)")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation")
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from, or 'latest' in --output-dir")
    p.add_argument("--cpu", action="store_true", help="train on CPU even when CUDA is available")
    return p


def inner_config(args) -> MemDLMConfig:
    return MemDLMConfig(
        inner_steps=args.inner_steps, inner_lr=args.inner_lr, inner_rank=args.inner_rank,
        inner_alpha=args.inner_alpha, inner_layer_fraction=args.inner_layer_fraction,
        pre_anchor_scale=args.pre_anchor_scale, inner_grad_clip=args.inner_grad_clip,
        seed=args.seed, loss_weight="scheduler", inner_targets=args.inner_targets,
    )


def load_model(args, accelerator):
    """Base (4-bit NF4 on CUDA unless --no-4bit) + trainable outer LoRA, as a `Backbone`."""
    cuda = accelerator.device.type == "cuda"
    if not cuda:
        print("[memdlm] no CUDA device: training the base in float32 (4-bit NF4 needs CUDA).")
    return build_model(args, accelerator.device, four_bit=cuda and not args.no_4bit,
                       dtype=args.dtype if cuda else "float32")


def build_model(args, device, *, four_bit: bool, dtype: str):
    """`args.backbone` in `dtype`, or NF4 4-bit (double quantisation, every linear but the LM head;
    a bare-parameter router such as LLaDA2's stays in float) readied by PEFT's
    `prepare_model_for_kbit_training`, as the released training loads it; then a fresh trainable
    outer LoRA. `load_model` picks the settings; tests call this to run the 4-bit path on a CPU."""
    from peft import prepare_model_for_kbit_training

    from ..backbones.loading import load_backbone
    from ..memory.adapters import add_outer_lora

    backbone = load_backbone(args.backbone, dtype=dtype, load_in_4bit=four_bit, device=device)
    if four_bit:
        backbone.model = prepare_model_for_kbit_training(
            backbone.model, use_gradient_checkpointing=args.gradient_checkpointing,
        )
    elif args.gradient_checkpointing:
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone = add_outer_lora(backbone, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    backbone.model.train()
    return backbone


def load_examples(args, tokenizer) -> tuple[list[dict], list[dict]]:
    """Tokenised (train, held-out) examples; the split is seeded and stable."""
    chat = not args.no_chat_template

    def tok(pairs):
        return tokenize_pairs(pairs, tokenizer, max_length=args.max_length, chat_template=chat, truncation=args.truncation)

    pairs = load_pairs(args.data, split=args.split, limit=args.limit)
    if args.eval_data:
        return tok(pairs), tok(load_pairs(args.eval_data, split=args.split))
    random.Random(args.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * args.eval_fraction)) if len(pairs) > 1 else 0
    return tok(pairs[n_eval:]), tok(pairs[:n_eval])


def epoch_batches(examples, batch_size: int, seed: int, epoch: int, rank: int, world: int,
                  batching: str = "random", group: int | None = None) -> list[list[dict]]:
    """This process's micro-batches of one epoch, sharded round-robin.

    `random`: a seeded shuffle. `length`: transformers' `get_length_grouped_indices`, the order
    the released Trainer's `group_by_length` draws (random mega-batches of 50 groups of `group`
    examples, each sorted longest first, the longest group first); `group` is the examples per
    optimizer step of one process (batch x accumulation), as the Trainer sizes it.
    """
    from transformers.trainer_pt_utils import get_length_grouped_indices

    gen = torch.Generator().manual_seed(seed + epoch)
    if batching == "length":
        lengths = [len(e["input_ids"]) for e in examples]
        order = get_length_grouped_indices(lengths, group or batch_size, generator=gen)
    else:
        order = torch.randperm(len(examples), generator=gen).tolist()
    batches = [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    usable = len(batches) - len(batches) % world  # every process takes the same number of steps
    return batches[rank:usable:world]


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """Masks and fast weights of a micro-batch depend only on (seed, step, rank): resumable."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, rank, RANK_STRIDE))


def child_generator(gen: torch.Generator) -> torch.Generator:
    seed = int(torch.randint(2**62, (1,), generator=gen, device=gen.device))
    return torch.Generator(device=gen.device).manual_seed(seed)


def noise(x0, maskable, eps: float, gen):
    """t [B] and the anchor mask [B, L]: each maskable token masked with probability t."""
    t = eps + (1 - eps) * torch.rand(x0.shape[0], generator=gen, device=gen.device).to(x0.device)
    u = torch.rand(x0.shape, generator=gen, device=gen.device).to(x0.device)
    return t, (u < t[:, None]) & maskable


def outer_loss(model, backbone, x0, anchor, t, maskable) -> torch.Tensor:
    """MDLM loss on x_t: sum over masked of (1/t) CE, over the number of response tokens.
    `model` is the (accelerate-prepared) outer model, `backbone` gives the mask id and shift."""
    logits = backbone.align(model(input_ids=torch.where(anchor, backbone.spec.mask_id, x0)).logits)
    rows, cols = anchor.nonzero(as_tuple=True)
    nll = F.cross_entropy(logits[rows, cols].float(), x0[rows, cols], reduction="none")
    return (nll / t[rows]).sum() / maskable.sum().clamp_min(1)


def train_step(model, backbone, memory, batch, args, gen) -> tuple[torch.Tensor, list[float]]:
    """Loss of one micro-batch (inner loop already run) and the inner stage losses."""
    x0 = batch["input_ids"]
    maskable = ~batch["prompt_mask"]  # response + EOS padding
    t, anchor = noise(x0, maskable, args.time_epsilon, gen)
    inner = []
    if memory is not None:
        n_sets = x0.shape[0] if args.inner_per_example else 1
        gens = [gen] if n_sets == 1 else [child_generator(gen) for _ in range(n_sets)]
        memory.reset(gens)
        states = anchor_states(maskable, anchor, args.inner_steps, args.pre_anchor_scale, [gen])
        with torch.enable_grad():
            inner = [float(l.mean()) for l in memory.adapt(x0, None, states, maskable)]
    return outer_loss(model, backbone, x0, anchor, t, maskable), inner


@torch.no_grad()
def evaluate(backbone, examples, args, memory=None) -> float:
    """Held-out masked NLL (mean over masked response tokens at ratios 0.25/0.5/0.75/1.0),
    with the inference inner loop on the prompt when `memory` is given."""
    pad = backbone.spec.eos_id
    device = backbone.device
    was_training = backbone.model.training
    backbone.model.eval()
    values = []
    for s in range(0, min(len(examples), args.eval_batches * args.batch_size), args.batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[s:s + args.batch_size], pad).items()}
        per_ratio = static_nll(backbone, batch, (0.25, 0.5, 0.75, 1.0), memory=memory, seed=args.seed + s)
        values += [float(v.mean()) for v in per_ratio.values()]
    backbone.model.train(was_training)
    return sum(values) / max(len(values), 1)


def save(path: str, backbone, optimizer=None, scheduler=None, step: int = 0, args=None) -> None:
    """The outer adapter in PEFT format, the run's settings, and (for checkpoints) the trainer state."""
    os.makedirs(path, exist_ok=True)
    backbone.model.save_pretrained(path)
    backbone.tokenizer.save_pretrained(path)
    if args is not None:
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump({**vars(args), "step": step}, f, indent=2)
    if optimizer is not None:
        save_trainer_state(path, optimizer, scheduler, step)


def restore(path: str, backbone, optimizer, scheduler) -> int:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(backbone.model, load_file(os.path.join(path, "adapter_model.safetensors")))
    return restore_trainer_state(path, optimizer, scheduler)


class Run:
    """The training loop's state: model, optimiser, data stream and log."""

    def __init__(self, args, accelerator):
        from transformers import get_cosine_schedule_with_warmup

        self.args, self.acc = args, accelerator
        self.backbone = load_model(args, accelerator)
        self.train, self.held = load_examples(args, self.backbone.tokenizer)
        if not self.train:
            raise SystemExit(f"No training example is <= --max-length {args.max_length} tokens; raise it or use --truncation right.")
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.n_micro = len(self.epoch(0))
        if self.n_micro == 0:
            raise SystemExit("Fewer training batches than processes; lower --batch-size or add data.")
        per_epoch = max(1, self.n_micro // args.grad_accum)
        self.total = args.max_steps or max(1, math.ceil(per_epoch * args.epochs))
        self.params = [p for p in self.backbone.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * self.total), self.total)
        self.memory = None if args.baseline else FastWeightMemory(self.backbone, inner_config(args))
        self.model, self.optimizer = accelerator.prepare(self.backbone.model, optimizer)
        self._epoch, self._batches = -1, []
        self.step = 0
        resume = find_resume(args.resume, args.output_dir)
        if resume:
            self.step = restore(resume, self.backbone, self.optimizer, self.scheduler)
            accelerator.print(f"[memdlm] resumed from {resume} at step {self.step}")

    def epoch(self, epoch: int) -> list[list[dict]]:
        a = self.args
        return epoch_batches(self.train, a.batch_size, a.seed, epoch, self.rank, self.world,
                             batching=a.batching, group=a.batch_size * a.grad_accum)

    def micro_batch(self, m: int) -> dict:
        epoch, i = divmod(m, self.n_micro)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = self.epoch(epoch)
        batch = collate(self._batches[i], self.backbone.spec.eos_id)
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    def optimizer_step(self) -> tuple[float, list[float]]:
        args, losses, inner = self.args, [], []
        if self.memory is not None:
            self.memory.install()
        for k in range(args.grad_accum):
            m = self.step * args.grad_accum + k
            gen = step_generator(args.seed, m, self.rank, self.acc.device)
            torch.manual_seed(step_seed(args.seed, m, self.rank, RANK_STRIDE))  # LoRA dropout: resumable too
            with self.acc.accumulate(self.model):
                loss, stages = train_step(self.model, self.backbone, self.memory, self.micro_batch(m), args, gen)
                self.acc.backward(loss)
                if self.acc.sync_gradients and args.max_grad_norm > 0:
                    self.acc.clip_grad_norm_(self.params, args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            inner.append(stages)
        self.scheduler.step()
        self.step += 1
        stages = [sum(s[j] for s in inner) / len(inner) for j in range(len(inner[0]))] if inner[0] else []
        return sum(losses) / len(losses), stages

    def evaluate(self) -> dict:
        """Held-out NLL without fast weights (train-only) and, for MemDLM, with the inference
        inner loop on the prompt (train+inference)."""
        if self.memory is not None:
            self.memory.remove()
        out = {"eval_nll": evaluate(self.backbone, self.held, self.args)}
        if self.memory is not None:
            infer = FastWeightMemory(self.backbone, MemDLMConfig(**{**vars(inner_config(self.args)), "loss_weight": "uniform"}))
            out["eval_nll_adapted"] = evaluate(self.backbone, self.held, self.args, memory=infer)
        return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.baseline and args.inner_steps < 1:
        raise SystemExit("--inner-steps must be >= 1 for MemDLM training (use --baseline for plain MDLM SFT).")
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    accelerator = Accelerator(
        cpu=args.cpu, gradient_accumulation_steps=args.grad_accum,
        # MoE experts no token was routed to get no gradient in a step.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    torch.manual_seed(args.seed)
    run = Run(args, accelerator)
    main_proc = accelerator.is_main_process
    every = max(1, run.total // 10)
    save_every, eval_every = args.save_every or every, args.eval_every or every
    os.makedirs(args.output_dir, exist_ok=True)
    log = open(os.path.join(args.output_dir, "log.jsonl"), "a") if main_proc else None
    bar = tqdm(total=run.total, initial=run.step, disable=not main_proc, desc="memdlm" if run.memory else "mdlm")
    if main_proc and run.step == 0 and run.held:
        # the outer LoRA starts at B = 0: step 0's held-out NLL is the frozen base's, the baseline
        row = {"step": 0, **{f"eval_frozen{k[len('eval'):]}" if k.startswith("eval") else k: v
                             for k, v in run.evaluate().items()}}
        bar.write(" ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith("eval")) + " at step 0")
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
    while run.step < run.total:
        loss, inner = run.optimizer_step()
        row = {"step": run.step, "loss": loss, "inner": inner, "lr": run.scheduler.get_last_lr()[0]}
        bar.set_postfix(outer=f"{loss:.3f}", inner="->".join(f"{v:.3f}" for v in inner) or "-")
        bar.update(1)
        if main_proc and (run.step % eval_every == 0 or run.step == run.total) and run.held:
            row.update(run.evaluate())
            bar.write(" ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith("eval")) + f" at step {run.step}")
        if main_proc and run.step % save_every == 0 and run.step < run.total:
            save(os.path.join(args.output_dir, f"checkpoint-{run.step}"), run.backbone, run.optimizer, run.scheduler, run.step, args)
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
        accelerator.wait_for_everyone()
    bar.close()
    if run.memory is not None:
        run.memory.remove()
    if main_proc:
        save(args.output_dir, run.backbone, step=run.step, args=args)
        log.close()
        print(f"[memdlm] adapter written to {args.output_dir} (use adapter={args.output_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
