"""Outer PEFT LoRA adapters for MemDLM: load a released adapter onto a backbone, or add a fresh one
for training (LoRA on every linear layer of the decoder blocks, r 32, alpha 64, dropout 0.05).

The adapters are plain PEFT LoRA checkpoints (`adapter_config.json` + `adapter_model.safetensors`)
keyed by the official parameter names, so `JarvisPei/LLaDA-MoE-7B-A1B-Base-MemDLM` and adapters
written by `lm-eval-dlmem train memdlm` load the same way, over a float or a 4-bit base.
`seeded_adapter_dropout` turns the adapter's LoRA dropout on for the inference inner loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterKeysError(ValueError):
    """The adapter's weights do not cover the modules its config puts LoRA on."""


def apply_adapter(backbone, adapter: str, *, revision: str | None = None, strict: bool = True):
    """Apply a PEFT LoRA adapter (the outer MemDLM weights) to a backbone.

    Args:
        backbone: a loaded `Backbone` (float or bitsandbytes 4-bit).
        adapter: local adapter directory or Hub id.
        revision: Hub revision of the adapter.
        strict: refuse an adapter whose weights leave injected LoRA modules without weights
            (renamed keys, weights for only some blocks) or hold weights no module takes; False
            loads it with a warning naming them.

    Returns:
        A new `Backbone` whose `.model` is the `PeftModel` (the base modules are modified in
        place, as PEFT does); `.layers` still reaches the decoder blocks.
    """
    try:
        from peft import PeftConfig, PeftModel
    except ImportError as e:  # pragma: no cover - peft is a dependency
        raise ImportError("adapter= needs peft: pip install peft") from e
    from ..embedded import resolve_embedded

    adapter = resolve_embedded(adapter) or adapter
    if os.path.sep in adapter and not os.path.isdir(os.path.expanduser(adapter)):
        raise FileNotFoundError(f"adapter={adapter!r} is not a directory; pass a PEFT adapter directory or Hub id.")
    adapter = os.path.expanduser(adapter)
    if os.path.isdir(adapter):  # a local directory: name its missing or broken file, never try the Hub
        from ..backbones.loading import check_weight_files

        check_weight_files(adapter, f"adapter={adapter}", ADAPTER_WEIGHT_FILES)
    try:
        config = PeftConfig.from_pretrained(adapter, revision=revision)
    except Exception as e:  # hub/file errors come in many types; the message says what to do
        raise FileNotFoundError(
            f"Could not read adapter_config.json from {adapter!r} ({type(e).__name__}: {e}). "
            "Pass a PEFT LoRA adapter directory or Hub id (network needed for Hub ids)."
        ) from e
    # A task-specific PeftModel (e.g. CAUSAL_LM) re-plumbs forward() for autoregressive models;
    # our backbones only need the adapted modules, so the plain PeftModel is always used.
    config.task_type = None
    config.inference_mode = True
    # what PeftModel.from_pretrained does, keeping load_adapter's result (from_pretrained only warns)
    model = PeftModel(backbone.model, config)
    result = model.load_adapter(adapter, "default", revision=revision)
    check_adapter_keys(result, adapter, strict)
    model.eval()
    return dataclasses.replace(backbone, model=model)


def check_adapter_keys(load_result, adapter: str, strict: bool = True) -> None:
    """Refuse an adapter that loads as a partial or complete no-op.

    PEFT injects LoRA into every module `target_modules` matches, with B = 0, then copies in the
    file's tensors: a module whose tensors are missing stays the identity (renamed keys: the
    frozen model; block-0-only keys: half applied), and tensors no module takes are dropped.
    `load_result` is `PeftModel.load_adapter`'s (missing keys already limited to this adapter's).
    """
    from ..backbones.loading import key_list

    problems = [f"{len(keys)} {what}: {key_list(keys)}" for what, keys in (
        ("LoRA weights missing (those modules would stay unadapted)", load_result.missing_keys),
        ("adapter weights that match no module (would be ignored)", load_result.unexpected_keys),
    ) if keys]
    if not problems:
        return
    report = f"adapter={adapter!r} does not match the modules it adapts: {'; '.join(problems)}."
    if not strict:
        log.warning("%s Loading anyway (strict_weights=False).", report)
        return
    raise AdapterKeysError(f"{report} Check that adapter_model.safetensors holds the weights of the modules in "
                           "its adapter_config.json target_modules (PEFT names), or pass strict_weights=False to "
                           "load it anyway.")


def linear_targets(model: nn.Module) -> str:
    """A PEFT `target_modules` regex over every linear layer inside the decoder blocks.

    This is PEFT's `all-linear` minus anything outside the blocks, spelled out so that LLaDA's
    LM head (`model.transformer.ff_out`) is excluded while its MLP down-projection, also named
    `ff_out`, is kept. Layer and expert indices are generalised to `\\d+`.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    patterns = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and re.search(r"\.\d+\.", name):
            patterns.add(re.sub(r"\.\d+(?=\.|$)", ".<N>", name))  # model.layers.<N>.mlp.gate_proj
    if not patterns:
        raise ValueError("The model has no linear layers inside numbered decoder blocks to put LoRA on.")
    alternatives = (re.escape(p).replace("<N>", r"\d+") for p in sorted(patterns))
    return "^(?:" + "|".join(alternatives) + ")$"


def add_outer_lora(backbone, *, r: int = 32, alpha: float = 64.0, dropout: float = 0.05):
    """Wrap a backbone in a fresh, trainable outer LoRA (MemDLM's released recipe).

    Args:
        backbone: a loaded `Backbone`; for a 4-bit base call
            `peft.prepare_model_for_kbit_training` on `backbone.model` first.
        r / alpha / dropout: LoRA rank, scaling numerator and dropout.

    Returns:
        A new `Backbone` whose `.model` is the trainable `PeftModel`.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
        target_modules=linear_targets(backbone.model),
    )
    model = get_peft_model(backbone.model, config)
    return dataclasses.replace(backbone, model=model)


# ---- the outer adapter's dropout during the inference inner loop ------------------------------
# The released evaluator runs its inner loop with the model in train() mode (it switches gradient
# checkpointing on that way), so the outer LoRA's dropout (0.05) is active while the fast weights
# adapt, and only then. Here the dropout modules are swapped for `SeededDropout` for the inner loop
# only: same p, but the mask is a hash of (row seed, layer, stage, token position, feature), so a
# row's result does not depend on its batch, a rerun is identical, and a checkpointed block
# recomputes the very same mask in the backward.

_M32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values < 2**32."""
    h = (((h >> 16) ^ h) * 0x45D9F3B) & _M32
    h = (((h >> 16) ^ h) * 0x45D9F3B) & _M32
    return (h >> 16) ^ h


class DropoutRows:
    """Which row and position each token of a LoRA input belongs to, and the rows' seeds.

    Args:
        seeds: [B] per-row seeds (any ints).
        offsets: [B] index of each row's first real token (left padding is not counted, so
            positions and masks do not depend on the batch's longest prompt).
    """

    def __init__(self, seeds: list[int], offsets: torch.Tensor):
        self.seeds = torch.tensor([int(s) & _M32 ^ (int(s) >> 32) & _M32 for s in seeds], device=offsets.device)
        self.offsets = offsets.long()
        self.stage = 0

    def locate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row [N], position [N]) of the N tokens of x, flattened to [N, features]."""
        from ..backbones.llada_moe import EXPERT_TOKENS

        B, device = self.seeds.shape[0], x.device
        if x.dim() == 3:  # [B, L, C]
            idx = torch.arange(x.shape[0] * x.shape[1], device=device)
            seq_len = x.shape[1]
        elif EXPERT_TOKENS.get() is not None:  # [N_e, C]: the tokens routed to one expert
            idx, seq_len = EXPERT_TOKENS.get()
        else:  # [B * L, C], e.g. the MoE router's input
            idx, seq_len = torch.arange(x.shape[0], device=device), x.shape[0] // B
        row = torch.div(idx, seq_len, rounding_mode="floor") % B
        return row, idx % seq_len - self.offsets.to(device)[row]


class SeededDropout(nn.Module):
    """Inverted dropout with probability p whose keep mask is a hash (see above), never the
    global RNG. `salt` tells the adapter's dropout modules apart."""

    def __init__(self, p: float, salt: int, rows: DropoutRows):
        super().__init__()
        self.p, self.salt, self.rows = p, salt, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        row, pos = self.rows.locate(x)
        flat = x.reshape(-1, x.shape[-1])
        base = _mix32((self.rows.seeds.to(x.device) + self.salt * 0x9E3779B1 + self.rows.stage * 0x85EBCA6B) & _M32)
        token = _mix32(base[row] ^ (pos & _M32))  # [N]
        feature = _mix32(torch.arange(flat.shape[1], device=x.device) + 0x27D4EB2F)  # [C]
        keep = _mix32(token[:, None] ^ feature[None, :]) >= int(self.p * 2**32)
        return (flat * keep.to(flat.dtype) / (1.0 - self.p)).view_as(x)


@contextlib.contextmanager
def seeded_adapter_dropout(model: nn.Module, seeds: list[int], offsets: torch.Tensor):
    """Within the block, every PEFT LoRA dropout of `model` (p > 0) is a `SeededDropout`, active
    whatever the train/eval mode. Yields the `DropoutRows` (set `.stage` per inner step), or None
    when the model has no LoRA dropout (no outer adapter, or dropout 0). Always restores."""
    found = [(m.lora_dropout, k, d) for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
             for k, d in m.lora_dropout.items() if isinstance(d, nn.Dropout) and d.p > 0]
    rows = DropoutRows(seeds, offsets) if found else None
    try:
        for salt, (holder, key, drop) in enumerate(found):
            holder[key] = SeededDropout(drop.p, salt, rows)
        yield rows
    finally:
        for holder, key, drop in found:
            holder[key] = drop
