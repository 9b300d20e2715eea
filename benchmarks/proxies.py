"""CPU-sized proxy models whose FLOP proportions are those of the released models, for the speed
benchmarks (decode.py, harness.py).

What makes a CPU speed-up predict a GPU one is where a forward's FLOPs go: the LM head (the part
head slicing and deduplication save) against the blocks, and attention against the linear
layers. Per token, linear FLOPs are 2 x parameters; LLaDA-8B's head (126464 x 4096) is 6.9% of
them, LLaDA-MoE-7B-A1B's (157184 x 2048) 23% of its *active* ones (8 of 64 experts).

- `llada-8b`: the trained tiny-llada (`lm_eval_dlmem/embedded/tiny-llada`, d_model 128, 4 layers,
  vocab 2048, MHA like LLaDA-8B) with its MLP widened from 256 to 2048 units whose output columns
  are zero: the same function (logits equal up to float summation order), so its confidences
  are trained ones and the threshold strategy fires as on a real model, while the head is 7.1%
  of the linear FLOPs. Attention is 9% of the linear FLOPs at a 300-token canvas (LLaDA-8B:
  1.1%): d_model 128 cannot be widened without retraining.
- `llada-moe`: LLaDA-MoE layout, random init (std 0.6 so the threshold sometimes fires): 16
  experts of width 768, top-2 (the released 1/8 active fraction), MHA, vocab 6144: head 23% of
  the active linear FLOPs, attention 9% of them at a 300-token canvas (released: 1.4%).
- `head-heavy`: the earlier benchmark model (vocab 32768 on d_model 512, 4 layers, random, std
  0.6): head 57% of the linear FLOPs, so head-side savings look several times larger than on a
  released model. Kept as a secondary case, labelled.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

PROXIES = ("llada-8b", "llada-moe", "head-heavy")
LLADA_8B_WIDTH = 2048  # widened MLP of the llada-8b proxy
HEAD_HEAVY = dict(vocab_size=32768, d_model=512, n_heads=8, n_kv_heads=8, n_layers=4, mlp_hidden_size=1536)
LLADA_MOE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=4,
                 expert_intermediate_size=768, dense_intermediate_size=1536, num_experts=16, num_experts_per_tok=2)
LLADA_MOE_VOCAB = 6144


def widen_mlp(state: dict, width: int) -> dict:
    """LLaDA blocks' MLP widened to `width` units: new ff_proj/up_proj rows drawn N(0, 0.02), new
    ff_out columns zero, so every block computes exactly what it did."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, t in state.items():
        t = t.float()
        if name.endswith(("ff_proj.weight", "up_proj.weight")) and ".blocks." in name:
            extra = torch.randn(width - t.shape[0], t.shape[1], generator=g) * 0.02
            t = torch.cat([t, extra], 0)
        elif name.endswith("ff_out.weight") and ".blocks." in name:
            t = torch.cat([t, torch.zeros(t.shape[0], width - t.shape[1])], 1)
        out[name] = t.contiguous()
    return out


def build_llada_8b(path: str) -> str:
    """The llada-8b proxy (float32) from the embedded trained tiny-llada."""
    from safetensors.torch import load_file, save_file

    from lm_eval_dlmem.embedded import resolve_embedded

    src = resolve_embedded("tiny-llada")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(src):
        if name != "model.safetensors":
            shutil.copy(os.path.join(src, name), path)
    save_file(widen_mlp(load_file(os.path.join(src, "model.safetensors")), LLADA_8B_WIDTH),
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(mlp_hidden_size=LLADA_8B_WIDTH, dtype="float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path


def build(name: str, path: str, init_std: float = 0.6) -> str:
    """Write proxy `name` to `path` and return it."""
    from lm_eval_dlmem import make_tiny_checkpoint

    if name == "llada-8b":
        return build_llada_8b(path)
    if name == "llada-moe":
        return make_tiny_checkpoint("llada_moe", path, seed=0, vocab_size=LLADA_MOE_VOCAB,
                                    initializer_range=init_std, **LLADA_MOE)
    if name == "head-heavy":
        return make_tiny_checkpoint("llada", path, seed=0, init_std=init_std, **HEAD_HEAVY)
    raise ValueError(f"proxy={name!r} is not one of {PROXIES}.")


def flop_shares(path: str, canvas: int = 300) -> dict:
    """Per-token FLOP proportions of a checkpoint: head share of the (active) linear FLOPs, and
    attention-score FLOPs at `canvas` tokens against the linear ones."""
    from lm_eval_dlmem.backbones.loading import read_config
    from lm_eval_dlmem.memory_plan import Shape
    from lm_eval_dlmem.backbones.loading import detect_family

    config = read_config(path)
    family = detect_family(config)
    s = Shape.from_config(config, family)
    attn_params = s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim * s.hidden
    body = s.layers * (attn_params + 3 * s.hidden * s.ffn)
    head = s.vocab * s.hidden
    scores = s.layers * 2 * canvas * s.heads * s.head_dim
    return dict(head_share=head / (head + body), attention_vs_linear=scores / (head + body),
                gqa=s.heads // s.kv_heads, active_ffn=s.ffn)
