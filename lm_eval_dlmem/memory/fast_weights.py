"""MemDLM fast weights: per-request LoRA on the FFNs of the last layers, fitted by a short SGD
inner loop on a masked-denoising loss over the prompt before decoding (Pei et al. 2026).

    y = base(x) + (alpha / r) * x A_s^T B_s^T        A_s [r, in], B_s [out, r] for set s

Every row of a batch owns a set s of fast weights (tensors [S, r, in] / [S, out, r], row i uses
set i % S), so a batch adapts like its rows one by one. Targets (`inner_targets`) in the last
`inner_layer_fraction` of the blocks: `released` (default) matches the names gate_proj/up_proj/
down_proj where the released `InnerLoRAManager` looks for them (LLaDA-MoE: every
`mlp.experts[e].*_proj`, not the layer's `shared_expert`, which the released code looks for as
`mlp.shared_experts`; LLaDA2.x: every expert and `mlp.shared_experts`, whose name the
released code does match, and a dense block's `mlp.*_proj`; dense LLaDA-8B: only the block's
`up_proj`; Dream: `mlp.*_proj`); `ffn` takes every FFN projection (adds LLaDA-MoE's
`shared_expert.*` and LLaDA's `ff_proj`/`ff_out`; the shared expert's place is the spec's
`shared_expert`). A projection that an outer PEFT LoRA already wraps gets the fast weights on
its `.base_layer`, so the outer LoRA sits on top, as in the released code. Wrappers keep the
original module as `base_layer`; removing
them puts the original objects back. Experts see a gathered subset of tokens; the backbone's
`EXPERT_TOKENS` context variable tells their wrappers each token's row.

Inner loop (`begin`, on entering `session`): per row, an anchor mask draws each prompt token with
p = inner_mask_ratio; the pre-anchor adds random extra masks up to `pre_anchor_scale` times as many
(nested); stage k denoises state k to the clean prompt (pre-anchor first, anchor last), plain SGD
with each fast tensor's gradient clipped per row to norm `inner_grad_clip`, token-normalised
cross-entropy.
Only the fast layers need gradients: the blocks before them run under no_grad once per stage and
the boundary hidden state is detached. With an outer adapter its LoRA dropout is active during
the inner loop (`inner_adapter_dropout`), as in the released evaluator, which adapts in train() mode.

Shapes: B rows, L prompt canvas, C hidden, V vocab, S fast-weight sets, r rank.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..backbones.llada_moe import EXPERT_TOKENS
from ..backbones.adapters import apply_adapter  # noqa: F401  (deprecated path: import from backbones.adapters)
from ..decoding.seeds import memory_seed
from .adapters import seeded_adapter_dropout
from .anchor import anchor_states, prompt_anchor
from .base import Memory

LOSS_WEIGHTS = ("uniform", "scheduler")
RELEASED_NAMES = ("gate_proj", "up_proj", "down_proj")  # the released mem_inner_target_modules


@dataclass
class MemDLMConfig:
    """Inner-loop settings; defaults are the released code's (`memdlm/memory.py`, eval side).

    Args:
        inner_steps: SGD steps (= mask states, pre-anchor -> anchor); 0 disables adaptation.
        inner_lr: SGD learning rate.
        inner_rank / inner_alpha: fast LoRA rank and scaling numerator (scale alpha / rank).
        inner_layer_fraction: fraction of the last blocks that get fast weights
            (blocks int(n * (1 - fraction)) .. n-1).
        inner_mask_ratio: anchor mask probability for each prompt token at inference.
        pre_anchor_scale: the pre-anchor masks this many times the anchor's ratio (capped at 1).
        inner_grad_clip: per-tensor (per row) gradient norm clip; 0 disables.
        seed: mixed with each row's seed for its masks and fast-weight init.
        loss_weight: `uniform` (inference default) or `scheduler` (1/t, training).
        checkpointing: recompute the fast blocks in the backward (released default) to save
            activation memory on long prompts.
        inner_targets: `released` (the released code's name matching: LLaDA-MoE experts without the
            shared expert, dense LLaDA only `up_proj`) or `ffn` (every FFN projection).
        inner_adapter_dropout: keep an outer adapter's LoRA dropout active during the inference inner
            loop (`begin`), as the released evaluator does (it adapts in train() mode); False
            adapts dropout-free. Training's inner loop follows the model's own mode.
    """

    inner_steps: int = 2
    inner_lr: float = 0.1
    inner_rank: int = 32
    inner_alpha: float = 64.0
    inner_layer_fraction: float = 0.1
    inner_mask_ratio: float = 0.2
    pre_anchor_scale: float = 1.5
    inner_grad_clip: float = 1.0
    seed: int = 0
    loss_weight: str = "uniform"
    checkpointing: bool = True
    inner_targets: str = "released"
    inner_adapter_dropout: bool = True

    def __post_init__(self):
        if self.inner_steps < 0:
            raise ValueError(f"inner_steps={self.inner_steps} must be >= 0 (0 disables adaptation).")
        if self.inner_rank <= 0:
            raise ValueError(f"inner_rank={self.inner_rank} must be > 0.")
        if not 0.0 < self.inner_layer_fraction <= 1.0:
            raise ValueError(f"inner_layer_fraction={self.inner_layer_fraction} must be in (0, 1].")
        if not 0.0 < self.inner_mask_ratio <= 1.0:
            raise ValueError(f"inner_mask_ratio={self.inner_mask_ratio} must be in (0, 1].")
        if self.pre_anchor_scale < 1.0:
            raise ValueError(f"pre_anchor_scale={self.pre_anchor_scale} must be >= 1 (the pre-anchor contains the anchor).")
        if self.inner_lr < 0 or self.inner_grad_clip < 0:
            raise ValueError("inner_lr and inner_grad_clip must be >= 0.")
        if self.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight={self.loss_weight!r}; choose one of {LOSS_WEIGHTS}.")
        if self.inner_targets not in TARGETS:
            raise ValueError(f"inner_targets={self.inner_targets!r}; choose one of {tuple(TARGETS)}.")


class FastLoRA(nn.Module):
    """`base_layer(x) + scaling * x A^T B^T` with one (A, B) per fast-weight set.

    `fast_A` [S, r, in] and `fast_B` [S, out, r] are plain tensors (not parameters: they are
    per-request state, never saved or seen by an optimiser); None means the identity.
    """

    def __init__(self, base_layer: nn.Module, scaling: float, in_expert: bool):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = scaling
        self.in_expert = in_expert
        self.fast_A: torch.Tensor | None = None
        self.fast_B: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.fast_A is None:
            return out
        x = x.to(self.fast_A.dtype)
        delta = self._expert_delta(x) if self.in_expert else self._row_delta(x)
        return out + self.scaling * delta.to(out.dtype)

    def _row_delta(self, x: torch.Tensor) -> torch.Tensor:
        # x [N, l, in] with N a multiple of S (e.g. 2S under classifier-free guidance).
        S = self.fast_A.shape[0]
        if x.dim() != 3 or x.shape[0] % S:
            raise RuntimeError(
                f"Fast weights hold {S} row sets but the layer got input {tuple(x.shape)}; "
                "call memory.begin() with the batch that is being forwarded."
            )
        xs = x.reshape(x.shape[0] // S, S, x.shape[1], x.shape[2])  # row k*S + s uses set s
        h = xs @ self.fast_A.transpose(1, 2)  # [k, S, l, r]
        return (h @ self.fast_B.transpose(1, 2)).reshape(*x.shape[:2], -1)

    def _expert_delta(self, x: torch.Tensor) -> torch.Tensor:
        # x [N_e, in]: the tokens routed to this expert, gathered over all rows.
        A, B = self.fast_A, self.fast_B
        S, r = A.shape[0], A.shape[1]
        if S == 1:
            return (x @ A[0].T) @ B[0].T
        scope = EXPERT_TOKENS.get()
        if scope is None:
            raise RuntimeError("A fast-weight expert projection ran outside SparseMoE; its tokens' rows are unknown.")
        tokens, seq_len = scope
        rows = torch.div(tokens, seq_len, rounding_mode="floor") % S
        # All sets in one matmul, then zero every set but the token's own: exact, and cheap
        # while S * r stays below the expert width.
        h = (x @ A.reshape(S * r, -1).T).view(-1, S, r)
        h = h * F.one_hot(rows, S).to(h.dtype)[..., None]
        return h.reshape(-1, S * r) @ B.transpose(1, 2).reshape(S * r, -1)


def ffn_projections(backbone, fraction: float) -> list[tuple[nn.Module, str, bool]]:
    """(parent module, attribute, is inside an expert) for every FFN projection of the last
    `fraction` of the blocks, in a fixed order (the order fast weights are drawn in)."""
    layers = backbone.layers
    names = backbone.spec.ffn_names
    first = max(0, int(len(layers) * (1.0 - fraction)))
    found = []
    for layer in list(layers)[first:]:
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):  # the block holds the FFN itself (LLaDA-8B)
            groups = [(layer, False)]
        elif hasattr(mlp, "experts"):
            groups = [(expert, True) for expert in mlp.experts]
        else:
            groups = [(mlp, False)]
        shared = _submodule(layer, backbone.spec.shared_expert)
        if shared is not None:
            groups.append((shared, False))
        found += [(parent, name, expert) for parent, expert in groups for name in names if hasattr(parent, name)]
    if not found:
        raise ValueError("No FFN projections found in the last layers; this backbone layout is not supported.")
    return found


def _submodule(module: nn.Module, path: str | None) -> nn.Module | None:
    """`module.a.b` for path "a.b", or None when the path is None or absent (a block without
    shared experts)."""
    if not path:
        return None
    for name in path.split("."):
        module = getattr(module, name, None)
    return module if isinstance(module, nn.Module) else None


def released_projections(backbone, fraction: float) -> list[tuple[nn.Module, str, bool]]:
    """The projections the released `InnerLoRAManager._inject` wraps, by its name matching: in a
    block whose `mlp` has `experts`, each expert's gate/up/down_proj (and `mlp.shared_experts`'s,
    a name LLaDA-MoE does not use: its shared expert sits on the block as `shared_expert`);
    otherwise those names on `mlp`, `self_attn` (`attention`) and the block itself. So dense
    LLaDA-8B (`ff_proj`, `up_proj`, `ff_out` on the block) gets only `up_proj`."""
    layers = backbone.layers
    first = max(0, int(len(layers) * (1.0 - fraction)))
    found = []
    for layer in list(layers)[first:]:
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, nn.Module) and hasattr(mlp, "experts"):
            groups = [(expert, True) for expert in mlp.experts]
            groups += [(mlp.shared_experts, False)] if hasattr(mlp, "shared_experts") else []
        else:
            attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
            groups = [(m, False) for m in (mlp, attn, layer) if isinstance(m, nn.Module)]
        found += [(parent, name, expert) for parent, expert in groups for name in RELEASED_NAMES
                  if isinstance(getattr(parent, name, None), nn.Module)]
    if not found:
        raise ValueError("No gate_proj/up_proj/down_proj found in the last layers (inner_targets=released); "
                         "try inner_targets=ffn.")
    return found


TARGETS = {"released": released_projections, "ffn": ffn_projections}


class FastWeightMemory(Memory):
    """MemDLM inference-time adaptation behind the `Memory` protocol.

    `begin` installs fresh fast weights for every row and runs the inner loop on the prompt
    tokens; decoding then runs with them; `select` follows the decoder's row changes; `end`
    restores the original modules. With `inner_steps=0` nothing is installed: the model is
    exactly the frozen (or adapter-only) backbone. Training drives `install`/`reset`/`adapt`.
    """

    def __init__(self, backbone, config: MemDLMConfig):
        self.backbone = backbone
        self.config = config
        self.layers: list[FastLoRA] = []
        self._restore: list[tuple[nn.Module, str, nn.Module]] = []
        self.first_layer = max(0, int(len(backbone.layers) * (1.0 - config.inner_layer_fraction)))
        self.last_losses: list[torch.Tensor] = []  # per stage, per set (after the last adapt)
        self._kept: dict | None = None  # inside adapt_once: (seed, prompt) -> per-layer (A, B)
        self.adaptations = 0  # rows that ran the inner loop (reused rows do not count)
        self._dropout = None  # the outer adapter's seeded dropout, while `begin` adapts

    # ---- the Memory protocol ------------------------------------------------------------------
    def begin(self, backbone, input_ids, attention_mask, prompt_mask, seeds=None) -> None:
        """Install fast weights for the rows and run the inner loop on their prompts. Inside
        `adapt_once()`, a row whose (seed, prompt) an earlier `begin` of the scope adapted reuses
        those weights, and only the other rows run the inner loop.

        The memory works on the backbone it was built for (`self.backbone`, whose modules hold the
        fast weights); the session's `backbone` is only checked to be that one (or share its model).
        """
        if backbone is not self.backbone and backbone.model is not self.backbone.model:
            raise ValueError("FastWeightMemory.begin got a different backbone than the one it was built for.")
        if self._kept is None or self.config.inner_steps == 0:
            return self._adapt_rows(input_ids, attention_mask, prompt_mask, seeds)
        seeds = list(seeds) if seeds is not None else [0] * input_ids.shape[0]
        keys = self._row_keys(input_ids, attention_mask, prompt_mask, seeds)
        new_rows = [keys.index(k) for k in dict.fromkeys(keys) if k not in self._kept]  # first row per key
        fresh = {}
        if new_rows:
            rows = torch.tensor(new_rows, device=input_ids.device)
            pick = (lambda t: None if t is None else t.index_select(0, rows.to(t.device)))
            self._adapt_rows(input_ids[rows], pick(attention_mask), prompt_mask[rows],
                             [seeds[i] for i in new_rows])
            fresh = {keys[i]: [(l.fast_A[j], l.fast_B[j]) for l in self.layers] for j, i in enumerate(new_rows)}
        kept = {k: fresh[k] if k in fresh else self._kept[k] for k in keys}
        self.end()
        self.install()
        for n, layer in enumerate(self.layers):
            layer.fast_A = torch.stack([kept[k][n][0] for k in keys])
            layer.fast_B = torch.stack([kept[k][n][1] for k in keys])
        self._kept = kept  # only this batch's rows: the next one shares at most a boundary request

    @contextmanager
    def adapt_once(self):
        """Scope in which each (seed, prompt) runs the inner loop once: the Monte Carlo
        likelihood forwards one request's samples in several batches, and the released
        evaluator adapts once per request, not once per forward."""
        self._kept = {}
        try:
            yield self
        finally:
            self._kept = None

    @staticmethod
    def _row_keys(input_ids, attention_mask, prompt_mask, seeds) -> list[tuple]:
        """(seed, prompt token ids) per row: what the inner loop of a row depends on."""
        prompt = prompt_mask.bool() if attention_mask is None else prompt_mask.bool() & attention_mask.bool()
        return [(int(s), tuple(ids[m].tolist())) for s, ids, m in zip(seeds, input_ids, prompt)]

    def _adapt_rows(self, input_ids, attention_mask, prompt_mask, seeds=None) -> None:
        self.end()
        if self.config.inner_steps == 0:
            return
        self.adaptations += input_ids.shape[0]
        # The harness decodes under inference_mode; the inner loop needs autograd, so it leaves
        # it and works on ordinary copies of the inputs.
        with torch.inference_mode(False), torch.enable_grad():
            ids, attn, maskable = self._prompt_inputs(input_ids, attention_mask, prompt_mask)
            B = ids.shape[0]
            seeds = list(seeds) if seeds is not None else [0] * B
            gens = [self._generator(s, ids.device) for s in seeds]
            self.install()
            self.reset(gens)
            anchor = prompt_anchor(maskable, self.config.inner_mask_ratio, gens)
            states = anchor_states(maskable, anchor, self.config.inner_steps, self.config.pre_anchor_scale, gens)
            if not self.config.inner_adapter_dropout:
                self.adapt(ids, attn, states, maskable)
                return
            row_seeds = [memory_seed(self.config.seed, s) for s in seeds]
            first = attn.argmax(1) if attn.shape[1] else torch.zeros(B, dtype=torch.long, device=ids.device)
            with seeded_adapter_dropout(self.backbone.model, row_seeds, first) as self._dropout:
                try:
                    self.adapt(ids, attn, states, maskable)
                finally:
                    self._dropout = None

    def select(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            if layer.fast_A is not None and layer.fast_A.shape[0] > 1:
                layer.fast_A = layer.fast_A.index_select(0, rows.to(layer.fast_A.device))
                layer.fast_B = layer.fast_B.index_select(0, rows.to(layer.fast_B.device))

    def end(self) -> None:
        self.remove()

    # ---- fast-weight modules ------------------------------------------------------------------
    def install(self) -> None:
        """Wrap the target projections (idempotent)."""
        if self.layers:
            return
        scaling = self.config.inner_alpha / self.config.inner_rank
        for parent, name, in_expert in TARGETS[self.config.inner_targets](self.backbone, self.config.inner_layer_fraction):
            module = getattr(parent, name)
            holder, attr = (module, "base_layer") if hasattr(module, "base_layer") else (parent, name)
            original = getattr(holder, attr)
            if isinstance(original, FastLoRA):
                raise RuntimeError("Fast weights are already installed on this backbone by another memory.")
            wrapper = FastLoRA(original, scaling, in_expert)
            setattr(holder, attr, wrapper)
            self._restore.append((holder, attr, original))
            self.layers.append(wrapper)

    def remove(self) -> None:
        """Put the original module objects back."""
        for holder, attr, original in reversed(self._restore):
            setattr(holder, attr, original)
        self._restore.clear()
        self.layers.clear()

    def reset(self, generators: list[torch.Generator]) -> None:
        """Fresh fast weights, one set per generator: A ~ kaiming-uniform(a=sqrt(5)) =
        U(-1/sqrt(in), 1/sqrt(in)), B = 0 (so a fresh set is the identity)."""
        dtype = self.backbone.base_model.get_input_embeddings().weight.dtype
        r = self.config.inner_rank
        sizes = [r * layer.in_features for layer in self.layers]
        device = generators[0].device
        flat = torch.stack([torch.rand(sum(sizes), generator=g, device=device) for g in generators])
        for layer, chunk in zip(self.layers, flat.split(sizes, dim=1)):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.fast_A = ((chunk * 2 - 1) * bound).view(len(generators), r, -1).to(dtype)
            layer.fast_B = torch.zeros(len(generators), layer.out_features, r, device=device, dtype=dtype)

    def _generator(self, seed: int, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(memory_seed(self.config.seed, seed))

    # ---- the inner loop -----------------------------------------------------------------------
    def adapt(self, x0, attention_mask, states: list[torch.Tensor], maskable: torch.Tensor) -> list[torch.Tensor]:
        """One SGD step per mask state on the installed fast weights.

        Args:
            x0: [B, L] clean tokens (the targets).
            attention_mask: [B, L] 1 on tokens the forward may attend to, or None.
            states: bool [B, L] masks, pre-anchor first, anchor last (nested).
            maskable: bool [B, L] positions that may be masked (for the 1/t weight).

        Returns:
            per stage, the loss of each fast-weight set [S] (detached), also in `last_losses`.
        """
        losses = []
        for stage, masked in enumerate(states):
            if self._dropout is not None:
                self._dropout.stage = stage
            if not masked.any():  # nothing to denoise (e.g. an empty prompt): no step
                losses.append(torch.zeros(self.layers[0].fast_A.shape[0], device=x0.device))
                continue
            params = [t.detach().requires_grad_(True) for layer in self.layers for t in (layer.fast_A, layer.fast_B)]
            for i, layer in enumerate(self.layers):
                layer.fast_A, layer.fast_B = params[2 * i], params[2 * i + 1]
            per_set = self.stage_loss(x0, attention_mask, masked, maskable)
            grads = torch.autograd.grad(per_set.sum(), params, allow_unused=True)
            with torch.no_grad():
                updated = [self._sgd(p, g) for p, g in zip(params, grads)]
            for i, layer in enumerate(self.layers):
                layer.fast_A, layer.fast_B = updated[2 * i], updated[2 * i + 1]
            # free this stage's gradients and leaf copies before the next stage's forward: kept,
            # they would be one more set of fast weights alive through its backward
            del params, grads, updated
            losses.append(per_set.detach())
        self.last_losses = losses
        return losses

    def _sgd(self, p: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        p = p.detach()
        if g is None:
            return p
        if self.config.inner_grad_clip > 0:
            norm = g.float().flatten(1).norm(dim=1)  # per set: each row's own tensor
            factor = torch.where(norm > self.config.inner_grad_clip, self.config.inner_grad_clip / (norm + 1e-12), 1.0)
            g = g * factor.to(g.dtype)[:, None, None]
        return p - self.config.inner_lr * g

    def stage_loss(self, x0, attention_mask, masked, maskable) -> torch.Tensor:
        """Token-normalised masked cross-entropy of each fast-weight set, [S]."""
        backbone = self.backbone
        S = self.layers[0].fast_A.shape[0]
        hidden = self.hidden(torch.where(masked, backbone.spec.mask_id, x0), attention_mask)
        rows, cols = masked.nonzero(as_tuple=True)
        first = attention_mask.argmax(1)[rows] if attention_mask is not None else torch.zeros_like(cols)
        src = backbone.source_positions(cols, first)
        nll = chunked_nll(backbone.head, hidden[rows, src], x0[rows, cols])
        if self.config.loss_weight == "scheduler":  # 1/t with t the row's current mask ratio
            t = masked.sum(1).float() / maskable.sum(1).clamp_min(1).float()
            nll = nll / t.clamp_min(1e-3)[rows]
        sets = rows % S
        total = torch.zeros(S, device=nll.device).index_add(0, sets, nll)
        count = torch.zeros(S, device=nll.device).index_add(0, sets, torch.ones_like(nll))
        return total / count.clamp_min(1)

    def hidden(self, input_ids: torch.Tensor, attention_mask) -> torch.Tensor:
        """Final-norm hidden states [B, L, C]; gradients flow only through the fast blocks."""
        backbone = self.backbone
        with torch.no_grad():
            x = backbone.hidden_states(input_ids, attention_mask, end_layer=self.first_layer)
        x = backbone.hidden_states(None, attention_mask, start_layer=self.first_layer, hidden=x.detach(),
                                   checkpoint=self.config.checkpointing)
        return backbone.final_norm(x)

    def _prompt_inputs(self, input_ids, attention_mask, prompt_mask):
        """The prompt part of a canvas: ids/attention [B, P] and the maskable prompt tokens."""
        prompt_mask = prompt_mask.bool()
        if attention_mask is not None:
            prompt_mask = prompt_mask & attention_mask.bool()
        cols = prompt_mask.any(0).nonzero()
        P = int(cols.max()) + 1 if cols.numel() else 0
        ids = input_ids[:, :P].clone()
        attn = prompt_mask[:, :P].long()
        maskable = prompt_mask[:, :P] & (ids != self.backbone.spec.mask_id)
        return ids, attn, maskable.clone()


def chunked_nll(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Cross-entropy of head(hidden) [N, V] against targets [N] in float32, a chunk of rows at a
    time; with grad, each chunk's logits are recomputed in the backward instead of kept
    (a 32K-token prompt at V = 157K would otherwise hold gigabytes of logits)."""

    def nll(h, y):
        return F.cross_entropy(head(h).float(), y, reduction="none")

    if hidden.shape[0] <= chunk:
        return nll(hidden, targets)
    parts = []
    for h, y in zip(hidden.split(chunk), targets.split(chunk)):
        parts.append(checkpoint(nll, h, y, use_reentrant=False) if h.requires_grad else nll(h, y))
    return torch.cat(parts)
