"""Which masked positions of the active block to commit at one step, and with which tokens.

A strategy is an object of the `Strategy` protocol, registered by name in `REGISTRY` (the names
`DecodeConfig.strategy` accepts): `counts` gives a block's per-step commit counts, and `commit` maps
the block's logits `[B, n, V]` (n = block length, logits[:, j] predicts block position j), its
mask `[B, n]` (True where still masked), the step's count k and a `StepContext` to
`(tokens [B, n], commit [B, n] bool)`; the loop writes `tokens` where `commit` is set. Adding a
strategy is one class and one entry in `REGISTRY`. A strategy that cannot be a per-step commit
over shared columns (LLaDA2.x block diffusion: per-row block geometry, token editing) sets
`owns_loop` and decodes the batch in its own `generate`; `engine.generate` dispatches to it.

- `llada_commit`: ML-GSAI/LLaDA `generate()`: Gumbel-max in float64, confidence = probability of
  the chosen token (`low_confidence`) or uniform noise (`random`), top-k with the schedule's k.
- `dream_commit`: HKUNLP/Dream `diffusion_generate()`: `origin` (independent unmasking with
  probability 1 - s/t) or confidence top-k (`maskgit_plus`, `topk_margin`, `entropy`), optional
  position sampling with `alg_temp`, token sampling with temperature / top_p / top_k.
- `threshold_commit`: Fast-dLLM parallel decoding: every masked position whose confidence is
  >= threshold, and at least the schedule's k (>= 1) best ones, so the block ends in time.

Randomness comes from `RowRandom`: one generator per row, drawn row by row, so a row's tokens do
not depend on which other rows share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .schedule import dream_transfer_counts, dream_transfer_probability, llada_transfer_counts


class RowRandom:
    """One `torch.Generator` per batch row; every draw is made row by row."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds: list[int], device) -> "RowRandom":
        return cls([torch.Generator(device=device).manual_seed(int(s)) for s in seeds])

    def __len__(self) -> int:
        return len(self.generators)

    def select(self, rows: list[int]) -> "RowRandom":
        return RowRandom([self.generators[r] for r in rows])

    def uniform(self, shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
        """U[0, 1) of shape [B, *shape]."""
        return torch.stack(
            [torch.rand(shape, generator=g, device=device, dtype=dtype) for g in self.generators]
        )

    def uniform_slices(self, lengths: list[int], starts: list[int], n: int, device) -> torch.Tensor:
        """[B, n]: row j draws U[0, 1) over its whole unpadded canvas (`lengths[j]`, as the
        reference's `torch.rand((B, L))` does for an unpadded row) and keeps `starts[j]:+n`."""
        return torch.stack(
            [torch.rand(length, generator=g, device=device)[s : s + n]
             for g, length, s in zip(self.generators, lengths, starts)]
        )

    def gumbel_argmax(self, logits: torch.Tensor, temperature: float, exclude: int) -> torch.Tensor:
        """argmax of LLaDA's `add_gumbel_noise(logits, T)`: exp(l) / (-log u)^T in float64,
        i.e. a sample of softmax(l / T); temperature 0 is the plain argmax. logits [B, n, V].
        Token `exclude` (the mask id) is never chosen: see `argmax_without`."""
        if temperature == 0:
            return argmax_without(logits, exclude)
        logits = logits.to(torch.float64)
        noise = self.uniform(tuple(logits.shape[1:]), logits.device, torch.float64)
        scores = logits.exp() / (-torch.log(noise)) ** temperature
        scores[..., exclude] = -torch.inf
        return scores.argmax(-1)

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per position from probs [B, n, V] -> [B, n]."""
        return torch.stack(
            [torch.multinomial(p.float(), 1, generator=g).squeeze(-1) for p, g in zip(probs, self.generators)]
        )

    def choose(self, weights: torch.Tensor, k: int) -> torch.Tensor:
        """k distinct positions per row, drawn with probability `weights` [B, n] -> [B, k]."""
        return torch.stack(
            [torch.multinomial(w.float(), k, generator=g) for w, g in zip(weights, self.generators)]
        )


def argmax_without(scores: torch.Tensor, token: int, values: bool = False):
    """argmax over the last dim of `scores` [..., V] ignoring column `token`.

    The references take the plain argmax, so a model that scores the mask token highest
    "commits" a mask that stays masked. We skip that column instead, leaving every other number
    as the reference computes it (the softmax is not renormalised): whenever the reference does
    not pick the mask token the result is identical. The column is restored afterwards.
    Returns indices, or (values, indices) with `values=True`.
    """
    saved = scores[..., token].clone()
    scores[..., token] = -torch.inf
    best = scores.max(dim=-1)
    scores[..., token] = saved
    return (best.values, best.indices) if values else best.indices


def topk_mask(confidence: torch.Tensor, k: int, spans=None) -> torch.Tensor:
    """[B, n] bool: the k most confident positions of each row (k shared by the rows).

    `spans` [(canvas_length, block_start)] per row makes ties break as in the references, which
    run `topk` over a whole canvas row with -inf outside the block: torch's tie order depends on
    the row's length, and ties are common (a bf16 softmax often rounds several confidences to
    exactly 1). Each row uses its own *unpadded* length, so a row's choice never depends on the
    batch it is in.
    """
    commit = torch.zeros_like(confidence, dtype=torch.bool)
    if k <= 0:
        return commit
    if spans is None:
        return commit.scatter_(-1, torch.topk(confidence, k, dim=-1).indices, True)
    n = confidence.shape[-1]
    for row, (length, start) in enumerate(spans):
        full = confidence.new_full((length,), -torch.inf)
        full[start : start + n] = confidence[row]
        chosen = torch.zeros(length, dtype=torch.bool, device=confidence.device)
        chosen[torch.topk(full, k).indices] = True  # no data-dependent shapes: no host sync
        commit[row] = chosen[start : start + n]
    return commit


def topk_rows(confidence: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[B, n] bool: the `counts[b]` most confident positions of row b by `torch.topk` over the
    row, the tie order of samplers that loop over rows (LLaDA2.x block diffusion, the NLL
    analysis' sequential trajectory). A count <= 0 chooses nothing."""
    commit = torch.zeros_like(confidence, dtype=torch.bool)
    for row, k in enumerate(counts):
        if k > 0:
            commit[row, torch.topk(confidence[row], k).indices] = True
    return commit


def rank_mask(confidence: torch.Tensor, counts: torch.Tensor, allowed: torch.Tensor | None = None,
              stable: bool = True) -> torch.Tensor:
    """[B, n] bool: the `counts[b]` most confident positions of row b (counts [B] on device),
    without a host sync (threshold decoding, MetaState's unroll).

    `allowed` [B, n] bool: only allowed positions are ranked and chosen (a count above a row's
    allowed positions chooses them all). `stable`: ties go to the earlier position; False keeps
    the order torch's default sort leaves them in (what MetaState training has always used)."""
    if allowed is not None:
        confidence = confidence.masked_fill(~allowed, -torch.inf)
    order = confidence.argsort(dim=-1, descending=True, stable=stable)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    chosen = ranks < counts[:, None]
    return chosen if allowed is None else chosen & allowed


def suppress(logits: torch.Tensor, token_ids) -> torch.Tensor:
    """Set the logits of `token_ids` to -inf in place (ids that are None are skipped)."""
    for t in token_ids:
        if t is not None:
            logits[..., t] = -torch.inf
    return logits


def low_confidence(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """LLaDA's low-confidence score [B, n]: softmax probability of each position's chosen token
    (in the logits' dtype), -inf where the position is no longer masked (never chosen)."""
    confidence = F.softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    return confidence.masked_fill(~masked, -torch.inf)


def eos_eot_confidence_logits(logits: torch.Tensor, spec, temperature: float) -> torch.Tensor:
    """The logits LLaDA's `confidence_eos_eot_inf=True` actually feeds its softmax.

    The reference writes `logits_with_noise[:, :, EOS] = logits[:, :, EoT] = -inf` after the
    argmax. At temperature 0 `logits_with_noise` *is* `logits`, so both EOS and EoT leave the
    softmax; at temperature > 0 it is a separate float64 tensor, so only EoT does. The chosen
    tokens are unchanged; a chosen EOS/EoT just gets confidence 0 (committed last).
    """
    ids = (spec.eos_id, spec.eot_id) if temperature == 0 else (spec.eot_id,)
    return suppress(logits.clone(), ids)


def llada_commit(logits, masked, k: int, config, spec, rng: RowRandom,
                 draw_uniform=None, spans=None):
    """One step of LLaDA's sampler on the active block.

    Args:
        logits: [B, n, V] block logits (after CFG); modified in place by `logits_eos_inf`.
        masked: [B, n] True where the block is still masked.
        k: positions to commit per row (the schedule's count for this step).
        config: `temperature`, `remasking`, `logits_eos_inf`, `confidence_eos_eot_inf`.
        spec: family ids (`eos_id`, `eot_id`).
        rng: per-row generators.
        draw_uniform: `() -> [B, n]` noise for `remasking="random"`.
        spans: per-row (canvas length, block start) for reference tie-breaking (`topk_mask`).

    Returns:
        tokens [B, n], commit [B, n] bool.
    """
    if config.logits_eos_inf:
        suppress(logits, (spec.eos_id,))
    x0 = rng.gumbel_argmax(nucleus(logits, config), config.temperature, spec.mask_id)
    if config.remasking == "low_confidence":
        conf_logits = logits
        if config.confidence_eos_eot_inf:
            conf_logits = eos_eot_confidence_logits(logits, spec, config.temperature)
        confidence = low_confidence(conf_logits, x0, masked)
    else:
        confidence = draw_uniform().masked_fill(~masked, -torch.inf)
    return x0, topk_mask(confidence, k, spans)


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (always the best one);
    the rest get the dtype's lowest value, as Dream's sampler does."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = F.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop = torch.zeros_like(cum, dtype=torch.bool)
    drop[..., 1:] = cum[..., :-1] > top_p  # shifted right: the token that crosses top_p stays
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), torch.finfo(logits.dtype).min)


def nucleus(logits: torch.Tensor, config) -> torch.Tensor:
    """The logits a temperature draw samples from, after the task's (or model args') `top_p` /
    `top_k`. The official LLaDA `generate()` has neither, so with both unset this is the
    identity; at temperature 0 the argmax always survives the filters, so greedy decoding is
    unchanged. The confidence that ranks positions stays on the unfiltered logits."""
    if config.temperature == 0:
        return logits
    if config.top_p is not None and config.top_p < 1:
        logits = filter_top_p(logits, config.top_p)
    if config.top_k is not None:
        logits = filter_top_k(logits, config.top_k)
    return logits


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def dream_sample(logits, config, rng: RowRandom, mask_id: int):
    """Dream's token sampling: temperature, top_p, top_k, softmax, then a categorical draw (or
    the argmax at temperature 0), never the mask token. Returns probs [B, n, V], tokens [B, n],
    p(token) [B, n]."""
    if config.temperature > 0:
        logits = logits / config.temperature
    if config.top_p is not None and config.top_p < 1:
        logits = filter_top_p(logits, config.top_p)
    if config.top_k is not None:
        logits = filter_top_k(logits, config.top_k)
    probs = F.softmax(logits, dim=-1)
    if config.temperature > 0:
        x0 = rng.categorical(probs.index_fill(-1, torch.tensor([mask_id], device=probs.device), 0))
        return probs, x0, probs.gather(-1, x0[..., None]).squeeze(-1)
    top, x0 = argmax_without(probs, mask_id, values=True)
    return probs, x0, top


def dream_confidence(probs, top, alg: str) -> torch.Tensor:
    """[B, n] confidence of Dream's algorithms (higher is surer)."""
    if alg == "maskgit_plus":
        return top
    if alg == "topk_margin":
        best2 = torch.topk(probs, 2, dim=-1).values
        return best2[..., 0] - best2[..., 1]
    if alg == "entropy":  # negative entropy
        return (probs * torch.log(probs + 1e-10)).sum(-1)
    raise ValueError(f"alg={alg!r} has no confidence; use maskgit_plus, topk_margin or entropy.")


def dream_commit(logits, masked, k: int, p_transfer, config, spec, rng: RowRandom,
                 spans=None):
    """One step of Dream's sampler on the active block.

    Args:
        logits: [B, n, V] block logits (already shifted: logits[:, j] predicts position j).
        masked: [B, n] True where still masked.
        k: positions to commit per row (confidence algorithms).
        p_transfer: unmasking probability of this step (`alg="origin"`).
        config: `alg`, `alg_temp`, `temperature`, `top_p`, `top_k`.
        spec: family ids (`mask_id`).
        rng: per-row generators.
        spans: per-row (canvas length, block start) for reference tie-breaking (`topk_mask`).

    Returns:
        tokens [B, n], commit [B, n] bool.
    """
    probs, x0, top = dream_sample(logits, config, rng, spec.mask_id)
    if config.alg == "origin":
        # each masked position flips a coin; the draws cover the row's masked positions only
        commit = torch.zeros_like(masked)
        for row, g in enumerate(rng.generators):
            where = masked[row].nonzero().squeeze(-1)
            coins = torch.rand(where.numel(), generator=g, device=masked.device)
            commit[row, where[coins < p_transfer]] = True
        return x0, commit
    confidence = dream_confidence(probs, top, config.alg).masked_fill(~masked, -torch.inf)
    if k == 0 or not config.alg_temp:
        return x0, topk_mask(confidence, k, spans)
    chosen = rng.choose(F.softmax(confidence / config.alg_temp, dim=-1), k)
    return x0, torch.zeros_like(masked).scatter_(-1, chosen, True)


def threshold_commit(logits, masked, k: int, config, spec, rng: RowRandom):
    """Fast-dLLM confidence-threshold parallel decoding on the active block.

    Commits every masked position whose confidence (probability of its chosen token, float32)
    is >= `config.threshold`, and at least the `k` most confident ones (the LLaDA schedule's
    count, >= 1 while anything is masked), so a block never needs more than its step budget.

    Returns:
        tokens [B, n], commit [B, n] bool.
    """
    if config.logits_eos_inf:
        suppress(logits, (spec.eos_id,))
    # A row whose block is already done waits for its batch-mates: it must not consume its
    # generator meanwhile, or its later samples would depend on who it is batched with.
    active = masked.any(-1).nonzero().squeeze(-1).tolist()
    x0 = argmax_without(logits, spec.mask_id)
    if active:
        x0[active] = rng.select(active).gumbel_argmax(nucleus(logits[active], config), config.temperature,
                                                        spec.mask_id)
    conf_logits = logits.float()
    if config.confidence_eos_eot_inf:
        conf_logits = eos_eot_confidence_logits(conf_logits, spec, config.temperature)
    confidence = low_confidence(conf_logits, x0, masked)
    n_masked = masked.sum(-1)
    counts = (confidence >= config.threshold).sum(-1).clamp_min(max(k, 1)).minimum(n_masked)
    return x0, rank_mask(confidence, counts)


@dataclass
class StepContext:
    """What a commit sees besides the logits, fixed for one block.

    Attributes:
        config: the `DecodeConfig`.
        spec: the family's ids (`mask_id`, `eos_id`, `eot_id`).
        rng: the rows' generators.
        spans: per row (unpadded canvas length, block start) for reference tie-breaking.
        steps: the block's step count.
    """

    config: object
    spec: object
    rng: RowRandom
    spans: list[tuple[int, int]]
    steps: int


class Strategy(Protocol):
    """How a block is decoded: `counts` per step, then one `commit` per step.

    Attributes:
        stops_when_unmasked: the loop skips a block's remaining steps once nothing is masked.
        block_causal: the strategy decodes with block-causal attention (LLaDA2.x samplers); a
            family whose `FamilySpec.block_causal` differs is refused (`check_strategy_fits`).
        default_threshold: the confidence threshold `DecodeConfig(threshold=None)` resolves to.
        owns_loop: False: `engine.generate`'s block loop calls `counts` / `commit`. True: the
            strategy decodes the whole batch itself in `generate(backbone, input_ids,
            attention_mask, config, memory, *, seeds, stop_sequences)` with `engine.generate`'s
            contract (block diffusion lays each row's blocks out from its own prompt start and
            edits placed tokens, which a per-step commit over shared columns cannot express).
    """

    stops_when_unmasked: bool
    block_causal: bool
    default_threshold: float
    owns_loop: bool

    def counts(self, n: int, steps: int, config) -> list[int]: ...

    def commit(self, logits, masked, k: int, step: int, ctx: StepContext): ...


class CommitStrategy:
    """Defaults of the strategies that only commit inside `engine.generate`'s loop."""

    stops_when_unmasked = False
    block_causal = False
    default_threshold = 0.9
    owns_loop = False


class LLaDAStrategy(CommitStrategy):
    """ML-GSAI/LLaDA: the linear schedule's count, low-confidence or random remasking."""

    stops_when_unmasked = False

    def counts(self, n, steps, config):
        return llada_transfer_counts(n, steps)

    def commit(self, logits, masked, k, step, ctx):
        # `random` remasking: each row's noise over its unpadded canvas, as the reference draws
        draw = lambda: ctx.rng.uniform_slices(*zip(*ctx.spans), masked.shape[1], masked.device)  # noqa: E731
        return llada_commit(logits, masked, k, ctx.config, ctx.spec, ctx.rng, draw, ctx.spans)


class DreamStrategy(CommitStrategy):
    """HKUNLP/Dream: its float32 schedule, `origin` coins or confidence top-k."""

    stops_when_unmasked = False

    def counts(self, n, steps, config):
        return dream_transfer_counts(n, steps, config.eps)

    def commit(self, logits, masked, k, step, ctx):
        p = dream_transfer_probability(step, ctx.steps, ctx.config.eps) if ctx.config.alg == "origin" else None
        return dream_commit(logits, masked, k, p, ctx.config, ctx.spec, ctx.rng, ctx.spans)


class ThresholdStrategy(CommitStrategy):
    """Fast-dLLM: everything above the threshold, at least the LLaDA schedule's count."""

    stops_when_unmasked = True

    def counts(self, n, steps, config):
        return llada_transfer_counts(n, steps)

    def commit(self, logits, masked, k, step, ctx):
        return threshold_commit(logits, masked, k, ctx.config, ctx.spec, ctx.rng)


class BlockDiffusionStrategy:
    """LLaDA2.x's samplers (`decoding/block_diffusion.py`): they own their loop (`owns_loop`),
    attend block-causally and default to the official threshold 0.95.

    Args:
        edits: False: LLaDA2.0's `LLaDA2Sampler` (per-block step budget, threshold commits or the
            even schedule's count); True: LLaDA2.1's `LLaDA21Sampler` (at least one commit per
            step, then the editing phase: `editing_threshold`, `max_post_steps`).
    """

    stops_when_unmasked = True
    block_causal = True
    default_threshold = 0.95
    owns_loop = True

    def __init__(self, edits: bool):
        self.edits = edits

    def counts(self, n, steps, config):
        raise NotImplementedError("block-diffusion strategies decode in their own loop (`generate`).")

    def commit(self, logits, masked, k, step, ctx):
        raise NotImplementedError("block-diffusion strategies decode in their own loop (`generate`).")

    def generate(self, backbone, input_ids, attention_mask, config, memory=None, *, seeds, stop_sequences=None):
        from .block_diffusion import generate_blocks  # it imports this module

        return generate_blocks(backbone, input_ids, attention_mask, config, memory, seeds=seeds,
                               stop_sequences=stop_sequences, edits=self.edits)


REGISTRY: dict[str, Strategy] = {
    "llada": LLaDAStrategy(),
    "dream": DreamStrategy(),
    "threshold": ThresholdStrategy(),
    "llada2": BlockDiffusionStrategy(edits=False),
    "llada21": BlockDiffusionStrategy(edits=True),
}


def fitting_strategies(spec) -> list[str]:
    """Registered strategy names whose attention pattern is the family's."""
    return [name for name, strategy in REGISTRY.items() if strategy.block_causal == spec.block_causal]


def check_strategy_fits(strategy: str, spec, arg: str = "strategy") -> None:
    """Refuse a strategy whose attention pattern is not the family's: a bidirectional strategy on
    a block-causal backbone (LLaDA2.x) would silently decode with attention it was not trained
    for; a block-diffusion one on a bidirectional backbone has no block-causal attention to use.

    Raises:
        ValueError: naming `arg`, the family and the strategies that fit it.
    """
    if REGISTRY[strategy].block_causal == spec.block_causal:
        return
    kind = "block-causal" if spec.block_causal else "bidirectional"
    wants = "block-causal" if REGISTRY[strategy].block_causal else "bidirectional"
    raise ValueError(
        f"{arg}={strategy} decodes with {wants} attention, but this {spec.name} checkpoint attends "
        f"{kind}ly; use {arg}= one of {', '.join(fitting_strategies(spec))}."
    )
