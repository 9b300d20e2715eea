"""Outer PEFT LoRA adapters (MemDLM's outer weights): load a released adapter onto a backbone, or
add a fresh one for training (LoRA on every linear layer of the decoder blocks, r 32, alpha 64,
dropout 0.05).

The adapters are plain PEFT LoRA checkpoints (`adapter_config.json` + `adapter_model.safetensors`)
keyed by the official parameter names, so `JarvisPei/LLaDA-MoE-7B-A1B-Base-MemDLM` and adapters
written by `lm-eval-dlmem train memdlm` load the same way, over a float or a 4-bit base. An
adapter changes the backbone's modules, so it is loaded here, with the backbone;
`memory.adapters.seeded_adapter_dropout` drives its dropout during MemDLM's inner loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

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
        from .loading import check_weight_files

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
    from .loading import refuse_key_mismatch

    refuse_key_mismatch(
        f"adapter={adapter!r} does not match the modules it adapts",
        (("LoRA weights missing (those modules would stay unadapted)", load_result.missing_keys),
         ("adapter weights that match no module (would be ignored)", load_result.unexpected_keys)),
        fix="Check that adapter_model.safetensors holds the weights of the modules in its adapter_config.json "
            "target_modules (PEFT names), or pass strict_weights=False to load it anyway.",
        strict=strict, warn=log.warning, error=AdapterKeysError,
    )


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
