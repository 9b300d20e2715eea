"""MetaState training along the decoding trajectory (`train metastate --match-decode`).

The default unroll (`metastate.unrolled_loss`) runs K full-sequence forwards over a randomly
masked response: the trajectory of one block without a cache. This module trains through the
trajectory the evaluation decodes instead, by driving the decode loop's own code with gradients
enabled for the memory:

    canvas = [left-padded prompt | mask * gen_length]        engine.Canvas, engine.session_masks
    for each block:  engine.decode_block(...)                 the strategy's counts and commits,
        forward = TrajectoryForward(BlockForward(...))        the cache mode's read/write windows

`TrajectoryForward` wraps the decode loop's `BlockForward`: it runs forwards s0 .. s0 + K - 1
of the trajectory with gradients (the earlier ones under `no_grad`: they only carry the state
and the canvas to s0), adds each of those forwards' cross-entropy on the active block's masked
positions against the data, detaches the state every `truncate_every` forwards (truncated BPTT)
and hands the decode loop detached logits, so the strategy commits exactly as it would at
evaluation (the model's own tokens; no gradient through the choice). The K forwards may cross
block boundaries (the state is carried, the cache refreshed, as in decoding). Once forward
s0 + K - 1 has run the trajectory stops (`WindowDone`).

Cache modes under gradients: `GradCache` is the decode loop's `DiffusionCache` with out-of-place
window writes, so the refresh forward's keys/values (computed with the injection of that time)
stay valid for backward and gradients flow through them, as the values flow at evaluation.

Shapes: B rows, P padded prompt length, G = gen_length, n = block length, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones.common import DiffusionCache
from ..decoding.config import DecodeConfig
from ..decoding.engine import Canvas, decode_block, left_pad, session_masks
from ..decoding.forward import BlockForward
from ..decoding.strategies import REGISTRY, RowRandom, check_strategy_fits


class GradCache(DiffusionCache):
    """`DiffusionCache` whose window writes make new buffers instead of writing in place, so the
    buffers an earlier forward attended over (saved for backward) are never modified."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        if layer == len(self.keys):
            return super().update(layer, k, v, start)
        end = start + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        self.keys[layer] = torch.cat([keys[:, :, :start], k, keys[:, :, end:]], dim=2)
        self.values[layer] = torch.cat([values[:, :, :start], v, values[:, :, end:]], dim=2)
        return self.keys[layer], self.values[layer]

    def detach_(self) -> None:
        """Cut the gradient path through the cached keys/values (truncated BPTT)."""
        self.keys = [k.detach() for k in self.keys]
        self.values = [v.detach() for v in self.values]


class TrainBlockForward(BlockForward):
    """The decode loop's `BlockForward` with a gradient-safe cache."""

    cache_class = GradCache


@dataclass
class Window:
    """Which forwards of the trajectory train.

    Args:
        start: s0, index of the first forward with gradients (the earlier ones only advance
            the canvas and the state, under no_grad).
        steps: K, forwards with gradients (BPTT length); the trajectory stops after them.
        truncate_every: detach the memory state (and the cached keys/values) every this many
            forwards inside the window; 0 back-propagates through all K.
    """

    start: int
    steps: int
    truncate_every: int = 0


class WindowDone(Exception):
    """Raised by `TrajectoryForward` after the last forward of the window: ends the trajectory."""


class TrajectoryForward:
    """`BlockForward` plus the training window: the decode loop calls it like a `BlockForward`.

    Args:
        inner: the `TrainBlockForward` of the trajectory.
        memory: the memory whose session is open (`detach_state` is called when truncating).
        target: [B, P + G] the data canvas (prompt, then response padded with EOS).
        valid: [B, P + G] bool, positions whose token counts in the loss.
        window: the `Window`.
    """

    def __init__(self, inner: BlockForward, memory, target, valid, window: Window):
        self.inner, self.memory, self.target, self.valid, self.window = inner, memory, target, valid, window
        self.mask_id = inner.mask_id
        self.losses: list[torch.Tensor] = []  # per trained forward: summed CE over its tokens
        self.tokens: list[int] = []  # per trained forward: tokens in the CE

    def __call__(self, x, attn, block: tuple[int, int], refresh: bool) -> torch.Tensor:
        k = self.inner.step - self.window.start  # position inside the window (< 0: burn-in)
        train = 0 <= k < self.window.steps
        if train and k and self.window.truncate_every and k % self.window.truncate_every == 0 and torch.is_grad_enabled():
            self.truncate()
        with torch.set_grad_enabled(train and torch.is_grad_enabled()):
            logits = self.inner(x, attn, block, refresh)  # [B, n, V]
        if train:
            self.add_loss(logits, x, block)
        if k == self.window.steps - 1:
            raise WindowDone
        return logits.detach()

    def add_loss(self, logits, x, block) -> None:
        """CE of the block's still-masked (and valid) positions against the data, summed."""
        s, e = block
        m = (x[:, s:e] == self.mask_id) & self.valid[:, s:e]
        self.tokens.append(int(m.sum()))
        self.losses.append(F.cross_entropy(logits[m].float(), self.target[:, s:e][m], reduction="sum"))

    def truncate(self) -> None:
        self.memory.detach_state()
        if isinstance(self.inner.cache, GradCache):
            self.inner.cache.detach_()


def decode_batch(examples: list[dict], gen_length: int, pad_id: int, ignore_padding: bool = False) -> dict:
    """Examples from `tokenize_pairs` -> the decode loop's layout.

    Returns:
        {"input_ids": [B, P] left-padded prompts, "attention_mask": [B, P] or None (no padding),
         "response": [B, G] the response right-padded with `pad_id` (EOS), "valid": [B, G] bool,
         True on the response (and on the padding unless `ignore_padding`)}.
    """
    too_long = [len(e["input_ids"]) - e["prompt_len"] for e in examples if len(e["input_ids"]) - e["prompt_len"] > gen_length]
    if too_long:
        raise ValueError(f"A response of {max(too_long)} tokens does not fit gen_length={gen_length}; "
                         "raise --gen-length or filter the data (`fits_generation`).")
    ids, attn = left_pad([e["input_ids"][: e["prompt_len"]] for e in examples], pad_id)
    response = torch.full((len(examples), gen_length), pad_id, dtype=torch.long)
    valid = torch.full((len(examples), gen_length), not ignore_padding)
    for i, e in enumerate(examples):
        r = e["input_ids"][e["prompt_len"]:]
        response[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, : len(r)] = True
    return {"input_ids": ids, "attention_mask": attn, "response": response, "valid": valid}


def fits_generation(examples: list[dict], gen_length: int) -> list[dict]:
    """The examples whose response fits the generation region."""
    return [e for e in examples if len(e["input_ids"]) - e["prompt_len"] <= gen_length]


def check_trajectory_config(config: DecodeConfig, spec=None) -> None:
    """Refuse decode settings the trajectory cannot follow, naming the option."""
    if REGISTRY[config.strategy].owns_loop:
        raise ValueError(f"--strategy {config.strategy} decodes in its own block-diffusion loop, which "
                         "--match-decode does not drive; use llada, dream or threshold.")
    if spec is not None:
        check_strategy_fits(config.strategy, spec, arg="--strategy")


def trajectory_forwards(config: DecodeConfig) -> int:
    """Forwards of a full decode: `steps` (steps // num_blocks per block; `threshold` may stop a
    block early, so this is its most)."""
    return (config.steps // config.num_blocks) * config.num_blocks


def trajectory_loss(backbone, memory, batch: dict, config: DecodeConfig, window: Window, seeds: list[int]):
    """Decode `batch` with `config` up to the end of `window`, the window's forwards with gradients.

    Args:
        backbone: the frozen `Backbone`.
        memory: the `Memory` (MetaState, or NoMemory for the frozen baseline).
        batch: `decode_batch` output on the backbone's device.
        config: the evaluation's `DecodeConfig` (gen_length = the batch's response width).
        window: which forwards train.
        seeds: one per row: the strategy's per-row generators (sampling, random remasking).

    Returns:
        (summed CE [] of the window's forwards, per-forward summed CE [k], per-forward token counts [k]).
    """
    check_trajectory_config(config, backbone.spec)
    spec = backbone.spec
    ids, attn = batch["input_ids"], batch["attention_mask"]
    B, P = ids.shape
    G, n = config.gen_length, config.block_length
    canvas = Canvas.build(ids, attn, G, spec.mask_id)
    target = torch.cat([ids, batch["response"]], dim=1)
    valid = torch.cat([torch.zeros_like(ids, dtype=torch.bool), batch["valid"]], dim=1)
    forward = TrajectoryForward(TrainBlockForward(backbone, config, memory, P), memory, target, valid, window)
    rng = RowRandom.from_seeds(seeds, ids.device)
    attn_full, prompt_mask = session_masks(canvas.x, canvas.attn, P)
    try:
        with memory.session(backbone, canvas.x, attn_full, prompt_mask, seeds):
            for b in range(config.num_blocks):
                decode_block(canvas, rng, forward, config, spec, (P + b * n, P + (b + 1) * n))
    except WindowDone:
        pass
    if not forward.losses:  # the trajectory ended (threshold) before the window
        zero = torch.zeros((), device=ids.device, requires_grad=torch.is_grad_enabled())
        return zero, zero[None], [0]
    per_forward = torch.stack(forward.losses)
    return per_forward.sum(), per_forward, forward.tokens


def parse_decode(text: str, flag: str = "--match-decode") -> DecodeConfig:
    """`gen_length=256,block_length=32,steps=256,cache=dual` (the decode part of the lm_eval
    model args the MetaState will be evaluated with) -> `DecodeConfig`; any field may be given,
    the rest keep DecodeConfig's defaults. `stop_early` is off: training decodes every block."""
    import dataclasses
    import typing

    from ..model_args import _cast

    hints = typing.get_type_hints(DecodeConfig)
    values = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in hints:
            fields = ", ".join(f.name for f in dataclasses.fields(DecodeConfig))
            raise ValueError(f"{flag} {text!r}: {item!r} is not a DecodeConfig field=value; fields: {fields}.")
        values[key] = _cast(f"{flag} {key}", value.strip(), hints[key])
    try:
        return DecodeConfig(**{**values, "stop_early": False})
    except ValueError as e:
        raise ValueError(f"{flag} {text!r}: {e}") from None
