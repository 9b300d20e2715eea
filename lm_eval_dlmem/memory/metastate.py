"""MetaState: a small persistent working memory carried across the denoising steps of a frozen dLLM.

A diffusion LM recomputes all its activations at every step from the hard token canvas; what it
"thought" at the previous step is thrown away. MetaState keeps a fixed-size state S of M slots
(width d, independent of the sequence length) per request and couples it to the frozen backbone:

    c   = TimeConditioner(t)                      t: mask ratio of the generation region, [B]
    H_w' = H_w + tanh(g) * Injector(LN(H_w), S, c) write layer l_w, during every forward
    X   = Mixer(S, LN(H_r), c)                    read layer l_r, M slots attend over tokens
    S   = Updater(X, S, c)                         GRU per slot, after every forward

The Injector writes the state built up to the previous forward; the Mixer reads this forward's
activations and the Updater folds them into the state used by the next forward. `g` (one gate
per channel) starts at zero, so an untrained MetaState is the frozen backbone bit for bit. The time
conditioner (sinusoidal features of t -> MLP) is shared; each module turns it into its own
AdaLN scale/shift (zero-initialised) on the slot-side LayerNorm.

Where it reads and writes (hooks on `backbone.layers[l_r]` / `[l_w]`, installed by `begin`,
removed by `end`): on whatever positions the backbone forwards. Without a cache that is the whole
canvas (prompt + generation region). With cache=prefix/dual, the block-refresh forward covers the
whole canvas; the steps in between forward only the active window (the suffix from the block
start for prefix, the block for dual): the Mixer then reads only the window's activations and the
Injector writes only into the window; the other positions keep the keys/values cached at the
last refresh, which were computed with the injection of that time. Padding is never read.

Shapes: B rows, L canvas, l forwarded positions, C backbone hidden size, M slots, d width.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Memory, NoMemory, StepInfo

CONFIG_NAME = "metastate_config.json"
WEIGHTS_NAME = "metastate.safetensors"
FORMAT = "lm_eval_dlmem.metastate"


@dataclass
class MetaStateConfig:
    """Sizes of the MetaState modules. Defaults land near 0.6% of LLaDA-8B and Dream-7B
    (see docs/metastate.md for the counts).

    Args:
        slots: M, number of memory slots.
        width: d, memory width (all attention inside MetaState runs at this width).
        heads: attention heads of the Mixer and Injector; must divide `width`.
        read_layer: decoder layer whose output the Mixer reads; negative counts from the end;
            None = about 3/4 of the depth.
        write_layer: decoder layer whose output the Injector adds to; None = about 1/4 depth.
        time_dim: sinusoidal features of the mask ratio fed to the time conditioner MLP.
        norm_eps: LayerNorm epsilon.
        init_std: std of the initial slot embeddings and of the projection weights.
    """

    slots: int = 32
    width: int = 1280
    heads: int = 10
    read_layer: int | None = None
    write_layer: int | None = None
    time_dim: int = 256
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("slots", "width", "heads", "time_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"MetaStateConfig.{name}={getattr(self, name)} must be a positive integer.")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}; pick heads that divide it.")
        if self.time_dim % 2:
            raise ValueError(f"time_dim={self.time_dim} must be even (sin and cos halves).")

    def resolved(self, num_layers: int) -> "MetaStateConfig":
        """The same config with read/write layers as concrete indices in [0, num_layers)."""
        read = round(0.75 * (num_layers - 1)) if self.read_layer is None else self.read_layer
        write = round(0.25 * (num_layers - 1)) if self.write_layer is None else self.write_layer
        out = []
        for name, i in (("read_layer", read), ("write_layer", write)):
            if not -num_layers <= i < num_layers:
                raise ValueError(f"{name}={i} is outside the backbone's {num_layers} layers (0..{num_layers - 1}).")
            out.append(i % num_layers)
        return dataclasses.replace(self, read_layer=out[0], write_layer=out[1])


def sinusoid_freqs(dim: int, device) -> torch.Tensor:
    """[dim / 2] frequencies of `sinusoid` (a constant: `MetaState` builds it once per session)."""
    half = dim // 2
    return torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / half)


def sinusoid(t: torch.Tensor, dim: int, freqs: torch.Tensor | None = None) -> torch.Tensor:
    """t [B] in [0, 1] -> [B, dim] sin/cos features (DDPM-style, t scaled to 0..1000).
    freqs: `sinusoid_freqs(dim, t.device)`, passed in when the caller keeps it."""
    freqs = sinusoid_freqs(dim, t.device) if freqs is None else freqs
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class AdaLN(nn.Module):
    """LayerNorm whose scale/shift come from the time code c [B, d]: LN(x) (1 + scale) + shift.

    `mod` (c -> [scale; shift]) is not called here: `MetaState.time_code` runs the three AdaLNs'
    `mod`s as one matmul per forward and hands each its `Modulation`.
    """

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps, elementwise_affine=False)
        self.mod = nn.Linear(d, 2 * d)
        nn.init.zeros_(self.mod.weight)  # starts as a plain LayerNorm
        nn.init.zeros_(self.mod.bias)

    def forward(self, x, m: "Modulation"):  # x [B, n, d]
        return self.modulate(self.norm(x), m)

    def modulation(self, c) -> "Modulation":
        """c [B, d] -> this AdaLN's `Modulation` on its own (`MetaState.time_code` fuses three)."""
        scale, shift = self.mod(c)[:, None].chunk(2, dim=-1)
        return Modulation(1 + scale, shift)

    @staticmethod
    def modulate(normed, m: "Modulation"):
        """normed = LN(x) [B, n, d] (computed once when two AdaLNs normalise the same x)."""
        return normed * m.scale + m.shift


class Modulation(NamedTuple):
    """One AdaLN's modulation for this forward: scale = 1 + the `mod` scale half, shift; [B, 1, d]."""

    scale: torch.Tensor
    shift: torch.Tensor


class TimeCode(NamedTuple):
    """The time code c [B, d] of one forward and what it gives each module: their AdaLN modulations."""

    c: torch.Tensor
    mixer: Modulation
    updater: Modulation
    injector: Modulation


@dataclass
class Fused:
    """MetaState's weights as one forward uses them: projections that read the same input
    concatenated into one matmul, and constants computed once. At batch 1 on a GPU a forward's
    time goes to launching kernels (benchmarks/op_count.py), so each op saved here counts.

    Shapes: d width, C backbone hidden size, T time_dim.
    """

    freqs: torch.Tensor  # [T / 2] sinusoid frequencies
    mod_weight: torch.Tensor  # [6d, d] the AdaLN `mod`s of Mixer, Updater, Injector: 3 scales, then 3 shifts
    mod_bias: torch.Tensor  # [6d]
    mixer_kv: torch.Tensor  # [2d, C] Mixer k; v
    injector_kv: torch.Tensor  # [2d, d] Injector k; v
    gate: torch.Tensor  # [C] tanh(Injector gate)


def _tile(x: torch.Tensor, r: int) -> torch.Tensor:
    """x repeated r times along dim 0 (no copy when r == 1)."""
    return x if r == 1 else x.repeat(r, *[1] * (x.dim() - 1))


def attend(q, k, v, heads: int, key_mask=None):
    """Multi-head attention: q [B, n, d], k/v [B, m, d], key_mask [B, m] bool -> [B, n, d]."""
    split = lambda x: x.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731  [B, h, n, d/h]
    mask = key_mask[:, None, None, :] if key_mask is not None else None
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).flatten(-2)


class TimeConditioner(nn.Module):
    """Shared code of where the denoising is: t -> sinusoid -> MLP -> c [B, d]."""

    def __init__(self, cfg: MetaStateConfig):
        super().__init__()
        self.dim = cfg.time_dim
        self.fc1 = nn.Linear(cfg.time_dim, cfg.width)
        self.fc2 = nn.Linear(cfg.width, cfg.width)

    def forward(self, t, freqs=None):  # t [B], freqs [time_dim / 2] (see `sinusoid`)
        return self.fc2(F.silu(self.fc1(sinusoid(t, self.dim, freqs))))


class Mixer(nn.Module):
    """Slots read the token activations: queries from AdaLN(S, c), keys/values from LN(H)."""

    def __init__(self, cfg: MetaStateConfig, hidden: int):
        super().__init__()
        d, self.heads = cfg.width, cfg.heads
        self.norm_s = AdaLN(d, cfg.norm_eps)
        self.norm_h = nn.LayerNorm(hidden, eps=cfg.norm_eps, elementwise_affine=False)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(hidden, d, bias=False)
        self.v = nn.Linear(hidden, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, state_ln, h, key_mask, m: Modulation, kv_weight):
        """state_ln = LN(S) [B, M, d], h [B, l, C], key_mask [B, l] bool or None (every key),
        kv_weight [2d, C] = [k; v] weights (`Fused.mixer_kv`) -> X [B, M, d]."""
        k, v = F.linear(self.norm_h(h), kv_weight).chunk(2, dim=-1)
        out = attend(self.q(AdaLN.modulate(state_ln, m)), k, v, self.heads, key_mask)
        return self.o(out)


class Updater(nn.Module):
    """GRU cell applied to every slot (shared weights): S' = (1 - z) S + z tanh(W_h [X; r S])."""

    def __init__(self, cfg: MetaStateConfig):
        super().__init__()
        d = cfg.width
        self.norm_x = AdaLN(d, cfg.norm_eps)
        self.gates = nn.Linear(2 * d, 2 * d)  # update z and reset r
        self.cand = nn.Linear(2 * d, d)

    def forward(self, x, state, m: Modulation):  # x, state [B, M, d]
        x = self.norm_x(x, m)
        z, r = torch.sigmoid(self.gates(torch.cat([x, state], dim=-1))).chunk(2, dim=-1)
        cand = torch.tanh(self.cand(torch.cat([x, r * state], dim=-1)))
        return (1 - z) * state + z * cand


class Injector(nn.Module):
    """Tokens read the slots: queries from LN(H), keys/values from AdaLN(S, c); the result is
    projected to the backbone width and added through a per-channel tanh gate that starts at 0."""

    def __init__(self, cfg: MetaStateConfig, hidden: int):
        super().__init__()
        d, self.heads = cfg.width, cfg.heads
        self.norm_h = nn.LayerNorm(hidden, eps=cfg.norm_eps, elementwise_affine=False)
        self.norm_s = AdaLN(d, cfg.norm_eps)
        self.q = nn.Linear(hidden, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, hidden, bias=False)
        self.gate = nn.Parameter(torch.zeros(hidden))

    def forward(self, h, state_ln, m: Modulation, kv_weight, gate):
        """h [B, l, C], state_ln = LN(S) [B, M, d], kv_weight [2d, d] = [k; v] weights
        (`Fused.injector_kv`), gate [C] = tanh(self.gate) -> delta [B, l, C]."""
        k, v = F.linear(AdaLN.modulate(state_ln, m), kv_weight).chunk(2, dim=-1)
        out = attend(self.q(self.norm_h(h)), k, v, self.heads)
        return gate * self.o(out)


class MetaState(Memory, nn.Module):
    """The MetaState memory for one backbone shape (family, hidden size, layer count).

    Use `init_for(backbone)` for a fresh one, `from_pretrained(dir)` for a trained one. As a
    `Memory` it is driven through `session` / `step` (which call begin / before_forward /
    after_forward / end) and `select`; as an `nn.Module` it holds only the trainable MetaState
    parameters, never the backbone's.
    """

    def __init__(self, config: MetaStateConfig, hidden_size: int, num_layers: int, family: str | None = None):
        nn.Module.__init__(self)
        self.config = config.resolved(num_layers)
        self.hidden_size, self.num_layers, self.family = int(hidden_size), int(num_layers), family
        cfg = self.config
        self.slot_init = nn.Parameter(torch.randn(cfg.slots, cfg.width) * cfg.init_std)
        self.time = TimeConditioner(cfg)
        self.mixer = Mixer(cfg, hidden_size)
        self.updater = Updater(cfg)
        self.injector = Injector(cfg, hidden_size)
        adaln = {id(m.mod) for m in self.modules() if isinstance(m, AdaLN)}  # these stay zero
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m) not in adaln:
                nn.init.normal_(m.weight, std=cfg.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self._hooks: list = []
        self._reset()

    # ---- construction and checkpoints -------------------------------------------------------

    @classmethod
    def init_for(cls, backbone, **config_overrides) -> "MetaState":
        """A fresh MetaState (gate at zero: the frozen model exactly) sized for `backbone`.

        Args:
            backbone: a loaded `Backbone`.
            **config_overrides: `MetaStateConfig` fields (slots, width, heads, read_layer, ...).

        Returns:
            MetaState in float32 on the backbone's device.
        """
        fields = {f.name for f in dataclasses.fields(MetaStateConfig)}
        unknown = sorted(set(config_overrides) - fields)
        if unknown:
            raise ValueError(f"Unknown MetaState option(s) {unknown}; valid ones are {sorted(fields)}.")
        cfg = MetaStateConfig(**config_overrides)
        c = backbone.config
        return cls(cfg, c.hidden_size, c.num_hidden_layers, backbone.family).to(backbone.device)

    def save_pretrained(self, path) -> None:
        """Write `metastate.safetensors` and `metastate_config.json` (family, hidden size,
        layers, module config) into directory `path`."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        meta = dict(format=FORMAT, version=1, family=self.family, hidden_size=self.hidden_size,
                    num_hidden_layers=self.num_layers, module=dataclasses.asdict(self.config))
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path_or_hub_id, backbone=None) -> "MetaState":
        """Load a MetaState saved by `save_pretrained` (local directory or hub id).

        Args:
            path_or_hub_id: directory with metastate_config.json + metastate.safetensors, or a hub id.
            backbone: when given, the checkpoint must fit it (family, hidden size, layers) and is
                moved to its device.
        """
        from safetensors.torch import load_file

        path = _resolve_dir(str(path_or_hub_id))
        with open(os.path.join(path, CONFIG_NAME)) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} holds format={meta.get('format')!r}, not a MetaState checkpoint ({FORMAT}).")
        module = cls(MetaStateConfig(**meta["module"]), meta["hidden_size"], meta["num_hidden_layers"], meta.get("family"))
        module.load_state_dict(load_file(os.path.join(path, WEIGHTS_NAME)), strict=True)
        if backbone is not None:
            module.check_fits(backbone)
            module.to(backbone.device)
        return module

    def check_fits(self, backbone) -> None:
        """Raise ValueError naming both shapes when this MetaState was made for another backbone."""
        c = backbone.config
        mine = (self.family, self.hidden_size, self.num_layers)
        theirs = (backbone.family, int(c.hidden_size), int(c.num_hidden_layers))
        if mine[1:] != theirs[1:] or (mine[0] is not None and mine[0] != theirs[0]):
            raise ValueError(
                f"This MetaState was made for a {mine[0]} backbone with hidden size {mine[1]} and {mine[2]} layers, "
                f"but the backbone is {theirs[0]} with hidden size {theirs[1]} and {theirs[2]} layers. "
                "Load the backbone it was trained for, or train one for this backbone "
                "(lm-eval-dlmem train metastate --backbone ...)."
            )

    # ---- the Memory protocol --------------------------------------------------------------

    def _reset(self):
        self.state = None  # [B, M, d]
        self._mask = None  # [B, L] bool, real tokens of the canvas
        self._padded = False  # the canvas has padding (else the Mixer needs no key mask)
        self._fused = None  # `Fused` of this session's no-gradient forwards
        self._cond = None  # `TimeCode` of the forward in flight
        self._state_ln = None  # [B, M, d] LN(state) of the forward in flight (Injector and Mixer)
        self._w = None  # `Fused` of the forward in flight
        self._info = None
        self._read = None  # [B, l, C] read-layer output of the forward in flight

    def begin(self, backbone, input_ids, attention_mask, prompt_mask, seeds=None) -> None:
        """Reset the state to the learned initial slots for every row and install the hooks."""
        self.end()
        self.check_fits(backbone)
        B, L = input_ids.shape
        dev = self.slot_init.device
        self.state = self.slot_init[None].expand(B, -1, -1).to(dev)
        mask = attention_mask if attention_mask is not None else torch.ones(B, L, dtype=torch.bool)
        self._mask = mask.to(dev).bool()
        self._padded = not bool(self._mask.all())
        layers = backbone.layers
        # write first: with read_layer == write_layer the Mixer sees the injected output
        self._hooks = [
            layers[self.config.write_layer].register_forward_hook(self._write_hook),
            layers[self.config.read_layer].register_forward_hook(self._read_hook),
        ]

    def before_forward(self, info: StepInfo) -> None:
        self._info = info
        t = torch.as_tensor(info.mask_ratio, dtype=torch.float32, device=self.slot_init.device).reshape(-1)
        B = self.state.shape[0]
        if t.numel() != 1:
            self._rows(t.numel())  # B rows, or B rows per copy of a guidance batch (conditional first)
        self._w = self.fused()
        self._cond = self.time_code(t.expand(B) if t.numel() == 1 else t[:B], self._w)
        # the Mixer and the Injector normalise the same state (their AdaLN LayerNorms are equal)
        self._state_ln = self.mixer.norm_s.norm(self.state)

    def after_forward(self, info: StepInfo) -> None:
        if self._read is not None:
            h, key_mask = self._read
            x = self.mixer(self._state_ln, h, key_mask, self._cond.mixer, self._w.mixer_kv)
            state = self.updater(x, self.state, self._cond.updater)
            if info.visible is not None:  # a row waiting for its batch-mates keeps its state
                live = info.visible[: state.shape[0]].any(-1).to(state.device)
                state = torch.where(live[:, None, None], state, self.state)
            self.state = state
        self._info, self._read, self._state_ln, self._w = None, None, None, None

    def select(self, rows: torch.Tensor) -> None:
        rows = torch.as_tensor(rows, device=self.slot_init.device).long()
        self.state = self.state.index_select(0, rows)
        self._mask = self._mask.index_select(0, rows)
        if self._cond is not None:
            pick = lambda x: x.index_select(0, rows)  # noqa: E731
            self._cond = TimeCode(pick(self._cond.c), *(Modulation(*map(pick, m)) for m in self._cond[1:]))

    def detach_state(self) -> None:
        """Cut the gradient path into the state built so far (truncated BPTT in training)."""
        if self.state is not None:
            self.state = self.state.detach()

    def end(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._reset()

    # ---- per-forward inputs -------------------------------------------------------------------

    def fused(self) -> Fused:
        """The `Fused` weights for the forward about to run. Built once per session for forwards
        without gradient (decoding, scoring), so they cost no op per forward; rebuilt at every
        forward that records a gradient (training), so the gradient reaches the parameters and
        an optimizer step between sessions is always seen."""
        if torch.is_grad_enabled():
            return self._fuse()
        if self._fused is None:
            self._fused = self._fuse()
        return self._fused

    def _fused_sources(self):
        """The parameters `Fused` is built from, for `_fuse` and `fused_bytes` alike: the three
        AdaLN `mod`s (Mixer, Updater, Injector), the Mixer's and the Injector's (k, v), the gate."""
        mods = (self.mixer.norm_s.mod, self.updater.norm_x.mod, self.injector.norm_s.mod)
        kv = ((self.mixer.k.weight, self.mixer.v.weight), (self.injector.k.weight, self.injector.v.weight))
        return mods, kv, self.injector.gate

    def _fuse(self) -> Fused:
        mods, (mixer_kv, injector_kv), gate = self._fused_sources()
        weights = [m.weight.chunk(2, dim=0) for m in mods]  # (scale, shift) rows of each
        biases = [m.bias.chunk(2, dim=0) for m in mods]
        return Fused(
            freqs=sinusoid_freqs(self.config.time_dim, self.slot_init.device),
            mod_weight=torch.cat([w[0] for w in weights] + [w[1] for w in weights]),
            mod_bias=torch.cat([b[0] for b in biases] + [b[1] for b in biases]),
            mixer_kv=torch.cat(mixer_kv),
            injector_kv=torch.cat(injector_kv),
            gate=torch.tanh(gate),
        )

    def fused_bytes(self) -> int:
        """Bytes of the `Fused` tensors a session holds (counted, not built): what the memory
        model adds for them (`memory_plan.MemoryCost.session`)."""
        mods, kv, gate = self._fused_sources()
        parts = [p for m in mods for p in (m.weight, m.bias)] + [w for pair in kv for w in pair] + [gate]
        size = self.slot_init.element_size()
        return size * (sum(p.numel() for p in parts) + self.config.time_dim // 2)

    def time_code(self, t: torch.Tensor, w: Fused) -> TimeCode:
        """t [B] mask ratios -> each module's AdaLN modulation: c = TimeConditioner(t) [B, d],
        then the three AdaLN `mod`s of c as one matmul ([B, 6d]: 3 scales, then 3 shifts)."""
        c = self.time(t, w.freqs)
        scales, shifts = F.linear(c, w.mod_weight, w.mod_bias)[:, None].chunk(2, dim=-1)  # [B, 1, 3d] each
        scales = (1 + scales).chunk(3, dim=-1)
        return TimeCode(c, *(Modulation(a, b) for a, b in zip(scales, shifts.chunk(3, dim=-1))))

    # ---- hooks ------------------------------------------------------------------------------

    def _rows(self, n: int) -> int:
        """Copies of the batch in a forward of n rows (2 when a guidance pass is concatenated)."""
        B = self.state.shape[0]
        if n % B:
            raise RuntimeError(f"MetaState holds {B} rows but the backbone forwarded {n}; call select() when rows change.")
        return n // B

    def _span(self, l: int) -> tuple[int, int]:
        """Canvas positions of the l forwarded activations (Dream's shift may forward one extra)."""
        L = self._mask.shape[1]
        if l == L:
            return 0, L
        end = self._info.window[1]
        if not 0 <= end - l < end <= L:
            raise RuntimeError(f"Cannot place {l} forwarded positions in window {self._info.window} of a {L}-token canvas.")
        return end - l, end

    def _read_hook(self, module, args, output):
        if self._info is None:
            return None  # a forward outside before/after_forward: leave it alone
        B = self.state.shape[0]
        # with a guidance pass appended, the conditional rows come first
        self._read = (output[:B].to(self.slot_init.device, self.slot_init.dtype), self._key_mask(output.shape[1]))
        return None

    def _key_mask(self, l: int) -> torch.Tensor | None:
        """[B, l] bool: the forwarded positions the Mixer reads; None when it reads them all
        (no padding, no `StepInfo.visible`: a mask of ones would cost ops and change nothing)."""
        visible = self._info.visible
        s, e = self._span(l)
        if not self._padded and visible is None:
            return None
        key_mask = self._mask[:, s:e]
        if visible is not None:  # only what the row forwards when decoded alone
            key_mask = key_mask & visible[: key_mask.shape[0], s:e].to(key_mask.device)
        # a row with no real token in the window would give NaN attention; let it read everything
        return key_mask | ~key_mask.any(-1, keepdim=True)

    def _write_hook(self, module, args, output):
        if self._info is None:
            return None
        r = self._rows(output.shape[0])
        h = output.to(self.slot_init.device, self.slot_init.dtype)
        # under guidance (r = 2) the modulation is computed over the forwarded rows, as it always
        # was: a matmul over 2B rows may round differently from one over B rows
        m = self._cond.injector if r == 1 else self.injector.norm_s.modulation(self._cond.c.repeat(r, 1))
        delta = self.injector(h, _tile(self._state_ln, r), m, self._w.injector_kv, self._w.gate)
        return output + delta.to(output.device, output.dtype)

    # ---- sizes ------------------------------------------------------------------------------

    @staticmethod
    def parameter_count(hidden_size: int, num_layers: int, **config_overrides) -> int:
        """Trainable parameters for a backbone of this shape, counted on the meta device."""
        with torch.device("meta"):
            module = MetaState(MetaStateConfig(**config_overrides), hidden_size, num_layers)
        return sum(p.numel() for p in module.parameters())


def _resolve_dir(spec: str) -> str:
    """A local directory, an embedded name (`tiny-llada-metastate`), or a hub snapshot of the MetaState files."""
    from ..embedded import resolve_embedded

    spec = resolve_embedded(spec) or os.path.expanduser(spec)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, CONFIG_NAME)):
            raise FileNotFoundError(f"{spec!r} has no {CONFIG_NAME}; point metastate= at a directory written by save_pretrained.")
        return spec
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    except Exception as e:  # hub errors come in many types; the message says what to do
        raise FileNotFoundError(
            f"MetaState checkpoint {spec!r} is neither a local directory nor reachable on the Hugging Face Hub "
            f"({type(e).__name__}). Pass a directory written by MetaState.save_pretrained or `lm-eval-dlmem train metastate`."
        ) from e


def load_memory_for(spec: str | None, backbone) -> Memory:
    """The memory named by a model arg: "none"/None -> NoMemory(), else a MetaState checkpoint
    (path or hub id) checked against `backbone`."""
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return NoMemory()
    return MetaState.from_pretrained(spec, backbone)
