"""Train a MetaState on a frozen dLLM with K-step unrolled denoising.

    lm-eval-dlmem train metastate --backbone GSAI-ML/LLaDA-8B-Instruct --data pairs.jsonl \\
        --output-dir ckpt/ms-llada --unroll-steps 4 --denoise-steps 32

One training example is a prompt/response pair (the prompt is never masked). The unroll places
the response somewhere on a `denoise_steps`-step linear schedule (a random start step s0, so
every phase of decoding is seen): a random subset of ceil(R (T - s0) / T) response tokens is
masked, then K consecutive denoising steps run as at inference with one block and no cache
(every forward reads and writes the whole canvas): forward with the memory,
commit the most confident masked positions with the backbone's argmax predictions (LLaDA's
low-confidence remasking; the choice carries no gradient), carry the state. The loss is the
masked-token cross-entropy of each step summed over the K steps, back-propagated through the
state (BPTT over the K forwards). Only MetaState parameters train; the backbone is frozen (bf16,
or 4-bit with --load-in-4bit, on CUDA; float32 on CPU).

`--match-decode gen_length=256,block_length=32,steps=256,cache=dual` trains along the
trajectory the evaluation decodes instead (`decode_unroll.py`): semi-autoregressive blocks,
the strategy's own commits, the cache mode's read/write windows; K consecutive forwards from a
random point of that trajectory (crossing block boundaries), `--truncate-every` for truncated
BPTT. `--gradient-checkpointing` recomputes the frozen blocks in backward.

Multi-GPU: `accelerate launch -m lm_eval_dlmem.cli train metastate ...` (data parallel).
The output directory holds the final MetaState (`metastate=OUTPUT_DIR` in lm_eval model args),
`checkpoint-N/` every --save-every steps (weights + optimizer state, for --resume) and
`train_log.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import TrainerSetup, add_batch_args, add_schedule_args, cosine_schedule, find_resume
from ..decoding.seeds import step_seed
from ..decoding.forward import forward_step
from ..decoding.strategies import rank_mask
from ..memory.base import NoMemory
from .state import restore_trainer_state, save_trainer_state


@dataclass
class UnrollConfig:
    """Args:
        unroll_steps: K, consecutive denoising steps per example (the BPTT length).
        denoise_steps: T, steps of the full schedule the K steps are cut from (the inference
            `steps` for one response; each step commits about R / T tokens).
        pad_as_response: the right padding (EOS) is part of the response, attended and
            predicted, as in LLaDA's SFT: at inference the generation region after the answer
            is EOS too. False: padding is neither attended nor predicted.
        decode: with a `DecodeConfig`, train along its decoding trajectory (`--match-decode`):
            K is then a window of its forwards and `denoise_steps` is unused.
        truncate_every: `--match-decode`: detach the state every this many forwards (0 = never).
    """

    unroll_steps: int = 4
    denoise_steps: int = 16
    pad_as_response: bool = True
    decode: object = field(default=None)
    truncate_every: int = 0

    def __post_init__(self):
        if self.decode is not None:
            from .decode_unroll import check_trajectory_config, trajectory_forwards

            check_trajectory_config(self.decode)
            total = trajectory_forwards(self.decode)
            if not 1 <= self.unroll_steps <= total:
                raise ValueError(f"--unroll-steps {self.unroll_steps} must be between 1 and the {total} forwards of "
                                 "the --match-decode trajectory (its steps).")
            if self.truncate_every < 0:
                raise ValueError(f"--truncate-every {self.truncate_every} must be >= 0 (0 = never).")
        elif self.truncate_every:
            raise ValueError("--truncate-every needs --match-decode (the default unroll is short: K forwards).")
        elif not 1 <= self.unroll_steps <= self.denoise_steps:
            raise ValueError(f"Need 1 <= unroll_steps ({self.unroll_steps}) <= denoise_steps ({self.denoise_steps}).")


def masked_count(resp_len: torch.Tensor, step, total: int) -> torch.Tensor:
    """Tokens still masked after `step` of `total` linear-schedule steps: ceil(R (T - s) / T)."""
    return torch.div(resp_len * (total - step) + total - 1, total, rounding_mode="floor")


def response_mask(batch: dict, cfg: UnrollConfig):
    """(attention mask, response mask) [B, L]: what is attended, what is masked and predicted."""
    attn = batch["attention_mask"]
    if cfg.pad_as_response:
        attn = torch.ones_like(attn)
    return attn, attn.bool() & ~batch["prompt_mask"].bool()


def unrolled_loss(backbone, memory, batch: dict, cfg: UnrollConfig, generator: torch.Generator):
    """Run K denoising steps from a partly masked response; return (sum of per-step CE, [K] CE).

    Args:
        backbone: the frozen `Backbone`.
        memory: a `Memory` (MetaState, or NoMemory for the frozen baseline).
        batch: `collate` output on the backbone's device: input_ids, attention_mask, prompt_mask [B, L].
        cfg: K and T.
        generator: CPU generator for the start step and the masked subset (reproducible eval).
    """
    x0 = batch["input_ids"]
    attn, resp = response_mask(batch, cfg)
    B, L = x0.shape
    K, T = cfg.unroll_steps, cfg.denoise_steps
    resp_len = resp.sum(1)
    s0 = torch.randint(0, T - K + 1, (B,), generator=generator).to(x0.device)
    noise = torch.rand(B, L, generator=generator).to(x0.device)
    masked = rank_mask(noise, masked_count(resp_len, s0, T), allowed=resp, stable=False)
    x = torch.where(masked, backbone.spec.mask_id, x0)
    a = int(resp.float().argmax(1).min())  # logits only from the earliest response position
    losses = []
    with memory.session(backbone, x, attn, batch["prompt_mask"]):
        for k in range(K):
            ratio = masked.sum(1) / resp_len.clamp_min(1)
            logits = forward_step(backbone, memory, x, attn, step=k, mask_ratio=ratio, keep=(a, L))  # [B, L - a, V]
            m = masked[:, a:]
            if m.any():
                losses.append(F.cross_entropy(logits[m].float(), x0[:, a:][m]))
            with torch.no_grad():  # the backbone's own low-confidence unmasking
                conf, pred = logits.detach().float().softmax(-1).max(-1)
                n = masked_count(resp_len, s0 + k, T) - masked_count(resp_len, s0 + k + 1, T)
                commit = F.pad(rank_mask(conf, n, allowed=m, stable=False), (a, 0), value=False)
                x = torch.where(commit, F.pad(pred, (a, 0)), x)
                masked = masked & ~commit
    per_step = torch.stack(losses) if losses else x0.new_zeros(1, dtype=torch.float32, requires_grad=True)
    return per_step.sum(), per_step


class UnrolledDenoiser(nn.Module):
    """The trainable unit handed to accelerate: MetaState as its only submodule, so DDP syncs
    exactly the MetaState gradients; `forward(batch, seed)` returns the K-step loss."""

    def __init__(self, metastate, backbone, cfg: UnrollConfig):
        super().__init__()
        self.metastate = metastate
        self.backbone = backbone  # a plain dataclass: its parameters are not registered here
        self.cfg = cfg

    def forward(self, batch: dict, seed: int):
        g = torch.Generator().manual_seed(seed)
        if self.cfg.decode is not None:
            return match_decode_loss(self.backbone, self.metastate, batch, self.cfg, g)
        return unrolled_loss(self.backbone, self.metastate, batch, self.cfg, g)


def match_decode_loss(backbone, memory, batch: dict, cfg: UnrollConfig, generator: torch.Generator):
    """`--match-decode`: K forwards from a random start s0 of the decoding trajectory; returns
    (sum over the K forwards of each one's token-mean CE, per-forward summed CE)."""
    from .decode_unroll import Window, trajectory_forwards, trajectory_loss

    B = batch["input_ids"].shape[0]
    s0 = int(torch.randint(0, trajectory_forwards(cfg.decode) - cfg.unroll_steps + 1, (1,), generator=generator))
    seeds = torch.randint(0, 2**31 - 1, (B,), generator=generator).tolist()
    window = Window(s0, cfg.unroll_steps, cfg.truncate_every)
    _, per_forward, tokens = trajectory_loss(backbone, memory, batch, cfg.decode, window, seeds)
    counts = torch.tensor(tokens, device=per_forward.device, dtype=per_forward.dtype).clamp_min(1)
    return (per_forward / counts).sum(), per_forward


@torch.no_grad()
def evaluate_trajectory(backbone, memory, batches, cfg: UnrollConfig, seed: int = 1234, accelerator=None) -> float:
    """`--match-decode` held-out loss: the token-mean CE over every masked position of the
    active block at every forward of the whole decoding trajectory (the evaluation decode, with
    the data as targets)."""
    from .decode_unroll import Window, trajectory_forwards, trajectory_loss

    total = torch.zeros(2, dtype=torch.float64)
    window = Window(0, trajectory_forwards(cfg.decode))
    for i, batch in enumerate(batches):
        seeds = [seed + i * 1000 + r for r in range(batch["input_ids"].shape[0])]
        loss, _, tokens = trajectory_loss(backbone, memory, batch, cfg.decode, window, seeds)
        total += torch.tensor([float(loss), float(sum(tokens))], dtype=torch.float64)
    if accelerator is not None:
        total = accelerator.reduce(total.to(accelerator.device), "sum").cpu()
    return float(total[0] / total[1].clamp_min(1))


@torch.no_grad()
def evaluate(backbone, memory, batches, cfg: UnrollConfig, seed: int = 1234, accelerator=None) -> float:
    """Held-out K-step denoising loss: per step, the token-mean CE over all batches; summed over K.
    The same seed gives the same starts and masks, so MetaState and the frozen model are compared
    on identical inputs. With `--match-decode`: `evaluate_trajectory`."""
    if cfg.decode is not None:
        return evaluate_trajectory(backbone, memory, batches, cfg, seed, accelerator)
    total = torch.zeros(2, cfg.unroll_steps, dtype=torch.float64)
    for i, batch in enumerate(batches):
        g = torch.Generator().manual_seed(seed + i)
        _, per_step = unrolled_loss(backbone, memory, batch, cfg, g)
        n = response_mask(batch, cfg)[1].sum().item()
        total[0, : len(per_step)] += per_step.double().cpu() * n  # weight by response tokens
        total[1, : len(per_step)] += n
    if accelerator is not None:
        total = accelerator.reduce(total.to(accelerator.device), "sum").cpu()
    return float((total[0] / total[1].clamp_min(1)).sum())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lm-eval-dlmem train metastate", description=__doc__.split("\n\n")[0])
    # model
    p.add_argument("--backbone", required=True, help="frozen backbone: checkpoint directory or hub id")
    p.add_argument("--dtype", default="auto", help="backbone dtype: auto (bf16 on CUDA, float32 on CPU), bfloat16, float32")
    p.add_argument("--load-in-4bit", action="store_true", help="load the frozen backbone in 4-bit NF4 (CUDA only)")
    # MetaState
    p.add_argument("--init-from", default=None, help="start from this MetaState checkpoint instead of a fresh one")
    p.add_argument("--slots", type=int, default=None, help="memory slots M (default: MetaStateConfig.slots)")
    p.add_argument("--width", type=int, default=None, help="memory width d (default: MetaStateConfig.width)")
    p.add_argument("--heads", type=int, default=None, help="attention heads of Mixer/Injector")
    p.add_argument("--read-layer", type=int, default=None, help="layer the Mixer reads (default ~3/4 depth)")
    p.add_argument("--write-layer", type=int, default=None, help="layer the Injector writes (default ~1/4 depth)")
    # data
    p.add_argument("--data", required=True, help="hub dataset id or local .jsonl/.json of prompt/response pairs")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--limit", type=int, default=None, help="use at most this many training pairs")
    p.add_argument("--eval-data", default=None, help="held-out pairs (default: hold out --eval-size training pairs)")
    p.add_argument("--eval-size", type=int, default=64, help="pairs held out for evaluation when --eval-data is not given")
    p.add_argument("--max-length", type=int, default=1024, help="drop pairs longer than this many tokens")
    p.add_argument("--no-chat-template", action="store_true", help="concatenate prompt and response without the chat template")
    # unrolling
    p.add_argument("--unroll-steps", type=int, default=4, help="K: denoising steps unrolled per example")
    p.add_argument("--denoise-steps", type=int, default=16, help="T: steps of the schedule the K steps are cut from")
    p.add_argument("--ignore-padding", action="store_true", help="do not treat the EOS right padding as response to predict")
    p.add_argument("--match-decode", default=None, metavar="FIELD=VALUE,...",
                   help="train along the decoding trajectory of this DecodeConfig (the decode model args of the "
                        "evaluation, e.g. gen_length=256,block_length=32,steps=256,cache=dual); K = --unroll-steps "
                        "consecutive forwards of it")
    p.add_argument("--truncate-every", type=int, default=0,
                   help="--match-decode: detach the state every N forwards of the K (truncated BPTT; 0 = never)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the frozen backbone's blocks in backward (less activation memory, ~1 more forward)")
    # optimisation
    add_schedule_args(p, max_steps=1000, lr=3e-4, warmup_steps=50, weight_decay=0.01)
    add_batch_args(p, batch_size=4)
    p.add_argument("--seed", type=int, default=0, help="seed of data order, masks and init")
    # checkpoints and logging
    p.add_argument("--output-dir", required=True, help="where the final MetaState, checkpoints and log go")
    p.add_argument("--save-every", type=int, default=200, help="write checkpoint-N every N steps (0 = only at the end)")
    p.add_argument("--eval-every", type=int, default=200, help="held-out loss every N steps (0 = only at start and end)")
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from, or 'latest' in --output-dir")
    p.add_argument("--cpu", action="store_true", help="force CPU even when CUDA is available")
    return p


def unroll_config(args) -> UnrollConfig:
    """The `UnrollConfig` of the command line (with the `--match-decode` DecodeConfig parsed)."""
    decode = None
    if args.match_decode:
        from .decode_unroll import parse_decode

        decode = parse_decode(args.match_decode)
    return UnrollConfig(args.unroll_steps, args.denoise_steps, not args.ignore_padding, decode, args.truncate_every)


def batch_maker(ucfg: UnrollConfig, pad_id: int):
    """examples -> a batch in the unroll's layout: right-padded (`collate`) or, with
    `--match-decode`, the decode loop's left-padded prompts and generation region."""
    from .data import collate
    from .decode_unroll import decode_batch

    if ucfg.decode is None:
        return lambda examples: collate(examples, pad_id)
    return lambda examples: decode_batch(examples, ucfg.decode.gen_length, pad_id, not ucfg.pad_as_response)


def fitting(examples, ucfg: UnrollConfig, name: str):
    """With `--match-decode`, the examples whose response fits gen_length (the count dropped is
    printed; none left is an error)."""
    if ucfg.decode is None:
        return examples
    from .decode_unroll import fits_generation

    kept = fits_generation(examples, ucfg.decode.gen_length)
    if not kept:
        raise ValueError(f"No {name} response fits --match-decode gen_length={ucfg.decode.gen_length}; raise it.")
    if len(kept) < len(examples):
        print(f"--match-decode: dropped {len(examples) - len(kept)} of {len(examples)} {name} pairs whose "
              f"response is longer than gen_length={ucfg.decode.gen_length}.")
    return kept


def load_examples(args, tokenizer):
    """Tokenized training and held-out examples (lists of {input_ids, prompt_len})."""
    from .data import load_pairs, tokenize_pairs

    tok = lambda pairs: tokenize_pairs(pairs, tokenizer, max_length=args.max_length,  # noqa: E731
                                       chat_template=not args.no_chat_template)
    train = tok(load_pairs(args.data, split=args.split, limit=args.limit))
    if args.eval_data:
        return train, tok(load_pairs(args.eval_data, split=args.split))
    if len(train) <= args.eval_size:
        raise ValueError(f"{len(train)} training pairs cannot spare --eval-size {args.eval_size}; lower it or pass --eval-data.")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    return [train[i] for i in order[args.eval_size:]], [train[i] for i in order[: args.eval_size]]


class Batches:
    """Deterministic micro-batches: batch i of process `rank` comes from a per-epoch permutation
    seeded by (seed, epoch), so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, examples, batch_size, pad_id, seed, rank=0, world=1, device="cpu", make_batch=None):
        self.examples, self.bs, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.make_batch = make_batch
        self.rank, self.world, self.device = rank, world, device
        self.per_epoch = len(examples) // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"{len(examples)} examples are fewer than one batch ({batch_size} x {world} processes).")

    def __getitem__(self, i: int) -> dict:
        from .data import collate

        epoch, j = divmod(i, self.per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
        start = (j * self.world + self.rank) * self.bs
        chosen = [self.examples[k] for k in order[start : start + self.bs].tolist()]
        batch = self.make_batch(chosen) if self.make_batch else collate(chosen, self.pad_id)
        return to_device(batch, self.device)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def eval_batches(examples, batch_size, pad_id, accelerator, make_batch=None) -> list[dict]:
    from .data import collate

    make_batch = make_batch or (lambda chunk: collate(chunk, pad_id))
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    return [to_device(make_batch(mine[i : i + batch_size]), accelerator.device) for i in range(0, len(mine), batch_size)]


def make_optimizer(module, args):
    """AdamW; weight decay on projection matrices only (not gates, biases, slot embeddings)."""
    decay = [p for n, p in module.named_parameters() if p.ndim >= 2 and n != "slot_init"]
    rest = [p for n, p in module.named_parameters() if not (p.ndim >= 2 and n != "slot_init")]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def save_checkpoint(path, metastate, optimizer, scheduler, step, args) -> None:
    metastate.save_pretrained(path)
    save_trainer_state(path, optimizer, scheduler, step, args)


@dataclass(kw_only=True)
class MetaStateSetup(TrainerSetup):
    """`TrainerSetup` (model: the accelerate-prepared `UnrolledDenoiser`) plus the accelerator,
    the frozen backbone and the MetaState being trained."""

    accelerator: object
    backbone: object
    metastate: object


def setup(args) -> MetaStateSetup:
    """Accelerator, frozen backbone, MetaState, optimizer, schedule (and the resumed step)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from ..backbones.loading import load_backbone
    from ..memory.metastate import MetaState

    # with K = 1 (or the state detached every forward) the Mixer/Updater output never reaches the
    # loss: DDP must allow unused parameters
    ddp = DistributedDataParallelKwargs(find_unused_parameters=args.unroll_steps == 1 or args.truncate_every == 1)
    acc = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=args.cpu, kwargs_handlers=[ddp])
    on_cuda = acc.device.type == "cuda"
    if args.load_in_4bit and not on_cuda:
        raise ValueError("--load-in-4bit needs a CUDA device (bitsandbytes); drop it to train in float32 on CPU.")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_cuda else "float32")
    backbone = load_backbone(args.backbone, dtype=dtype, device=acc.device, load_in_4bit=args.load_in_4bit)
    backbone.model.requires_grad_(False)
    torch.manual_seed(args.seed)
    if args.init_from:
        ms = MetaState.from_pretrained(args.init_from, backbone)
    else:
        sizes = dict(slots=args.slots, width=args.width, heads=args.heads,
                     read_layer=args.read_layer, write_layer=args.write_layer)
        ms = MetaState.init_for(backbone, **{k: v for k, v in sizes.items() if v is not None})
    optimizer = make_optimizer(ms, args)
    scheduler = cosine_schedule(optimizer, args.warmup_steps, args.max_steps, args.min_lr_ratio)
    step = 0
    resume = find_resume(args.resume, args.output_dir)
    if resume:
        ms.load_state_dict(MetaState.from_pretrained(resume).state_dict())
        step = restore_trainer_state(resume, optimizer, scheduler)
    if args.gradient_checkpointing:
        from .checkpointing import check_checkpointing, checkpoint_blocks

        check_checkpointing(unroll_config(args).decode)
        checkpoint_blocks(backbone)
    model, optimizer = acc.prepare(UnrolledDenoiser(ms, backbone, unroll_config(args)), optimizer)
    return MetaStateSetup(model, optimizer, scheduler, step, resume, accelerator=acc, backbone=backbone, metastate=ms)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ucfg = unroll_config(args)
    run = setup(args)
    acc, backbone, ms, model = run.accelerator, run.backbone, run.metastate, run.model
    optimizer, scheduler, step, resume = run.optimizer, run.scheduler, run.step, run.resume
    train, held_out = load_examples(args, backbone.tokenizer)
    train, held_out = fitting(train, ucfg, "training"), fitting(held_out, ucfg, "held-out")
    pad_id = backbone.spec.eos_id  # EOS padding, as the generation region is filled at inference
    make = batch_maker(ucfg, pad_id)
    batches = Batches(train, args.batch_size, pad_id, args.seed, acc.process_index, acc.num_processes, acc.device, make)
    evals = eval_batches(held_out, args.batch_size, pad_id, acc, make)
    os.makedirs(args.output_dir, exist_ok=True)
    log = open(os.path.join(args.output_dir, "train_log.jsonl"), "a") if acc.is_main_process else None

    def record(**row):
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()

    if not resume:
        record(step=0, eval_frozen=evaluate(backbone, NoMemory(), evals, ucfg, accelerator=acc),
               eval_metastate=evaluate(backbone, ms, evals, ucfg, accelerator=acc))
    from tqdm.auto import tqdm

    bar = tqdm(total=args.max_steps, initial=step, disable=not acc.is_main_process, desc="metastate")
    while step < args.max_steps:
        model.train()
        total = 0.0
        for a in range(args.grad_accum):
            i = step * args.grad_accum + a
            with acc.accumulate(model):
                loss, _ = model(batches[i], seed=step_seed(args.seed, i, acc.process_index, acc.num_processes))
                acc.backward(loss)
                total += loss.item() / args.grad_accum
                if acc.sync_gradients and args.grad_clip > 0:
                    acc.clip_grad_norm_(ms.parameters(), args.grad_clip)
                optimizer.step()
                optimizer.zero_grad()
        scheduler.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        record(step=step, loss=total, lr=scheduler.get_last_lr()[0])
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            record(step=step, eval_metastate=evaluate(backbone, ms, evals, ucfg, accelerator=acc))
        if args.save_every and step % args.save_every == 0 and acc.is_main_process:
            save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{step}"), ms, optimizer, scheduler, step, args)
        acc.wait_for_everyone()
    bar.close()
    final = evaluate(backbone, ms, evals, ucfg, accelerator=acc)
    record(step=step, eval_metastate=final)
    if acc.is_main_process:
        ms.save_pretrained(args.output_dir)
        what = "trajectory" if ucfg.decode is not None else f"{ucfg.unroll_steps}-step"
        print(f"held-out {what} loss: metastate {final:.4f}; saved {args.output_dir}")
    if log:
        log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
