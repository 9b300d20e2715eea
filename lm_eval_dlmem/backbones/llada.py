"""LLaDA-8B (Base / Instruct / 1.5): an OLMo-style Llama block stack, fully bidirectional.

Parameter names follow the official checkpoint (`model.transformer.blocks.N.q_proj`, `ff_proj`
= gate, `up_proj`, `ff_out` = down, `attn_out`, `attn_norm`, `ff_norm`, `model.transformer.ff_out`
= LM head), so GSAI-ML safetensors and PEFT adapters trained on them load unchanged. Note the
PEFT trap of the original: `ff_out` names both the MLP down-projection and the LM head.
RoPE is applied to float32 copies of q/k (`rope_full_precision`), positions are 0..L-1.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig

from .common import AttentionMixin, DlmPreTrainedModel, RMSNorm, Rotary

# The official LLaDAConfig is a flat copy of OLMo's ModelConfig; these are its keys and defaults.
_LLADA_DEFAULTS = dict(
    d_model=768, n_heads=12, n_kv_heads=None, n_layers=12, mlp_ratio=4, mlp_hidden_size=None,
    activation_type="swiglu", block_type="sequential", block_group_size=1, alibi=False,
    alibi_bias_max=8.0, rope=False, rope_full_precision=True, flash_attention=False,
    attention_dropout=0.1, multi_query_attention=None, attention_layer_norm=False,
    residual_dropout=0.1, embedding_dropout=0.1, input_emb_norm=False, layer_norm_type="default",
    layer_norm_with_affine=True, rms_norm_eps=1e-05, attention_layer_norm_with_affine=True,
    max_sequence_length=1024, rope_theta=10000.0, include_qkv_bias=False, include_bias=False,
    bias_for_layer_norm=None, scale_logits=False, vocab_size=50257, embedding_size=50304,
    weight_tying=True, mask_token_id=50256, init_device=None, init_fn="normal",
    init_std=0.02, init_cutoff_factor=None, precision=None,
)


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(self, use_cache: bool = False, **kwargs):
        for key, default in _LLADA_DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        kwargs.setdefault("eos_token_id", 50256)
        kwargs.setdefault("pad_token_id", 50256)
        kwargs.setdefault("architectures", ["LLaDAModelLM"])
        kwargs.setdefault("tie_word_embeddings", bool(self.weight_tying))
        super().__init__(**kwargs)
        self.use_cache = use_cache

    # HF-style aliases so generic code (PEFT, accelerate, our memory modules) can read sizes.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def check_supported(self) -> None:
        unsupported = {
            "block_type": (self.block_type, "llama"),
            "layer_norm_type": (self.layer_norm_type, "rms"),
            "rope": (self.rope, True),
            "alibi": (self.alibi, False),
            "attention_layer_norm": (self.attention_layer_norm, False),
            "input_emb_norm": (self.input_emb_norm, False),
            "block_group_size": (self.block_group_size, 1),
        }
        bad = {k: v for k, (v, want) in unsupported.items() if v != want}
        if self.activation_type != "silu":
            bad["activation_type"] = self.activation_type
        if bad:
            raise ValueError(
                f"This LLaDA config uses variants the released LLaDA-8B models do not use: {bad}. "
                "Only the LLaDA-8B layout (block_type=llama, rms norm, rope, silu MLP) is supported."
            )


def official_config(spec, vocab_size: int, sizes: dict) -> dict:
    """config.json of a GSAI-ML LLaDA-8B checkpoint (official keys, auto_map, model_type) with
    `sizes` (OLMo names: d_model, n_layers, ...) and the ids of the resolved `spec`."""
    base = dict(
        architectures=["LLaDAModelLM"], model_type="llada",
        auto_map={"AutoConfig": "configuration_llada.LLaDAConfig",
                  "AutoModel": "modeling_llada.LLaDAModelLM",
                  "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        activation_type="silu", alibi=False, alibi_bias_max=8.0, attention_dropout=0.0,
        attention_layer_norm=False, attention_layer_norm_with_affine=True,
        bias_for_layer_norm=False, block_group_size=1, block_type="llama",
        embedding_dropout=0.0, embedding_size=vocab_size, flash_attention=False,
        include_bias=False, include_qkv_bias=False, init_cutoff_factor=None,
        init_device="meta", init_fn="mitchell", init_std=0.02, input_emb_norm=False,
        layer_norm_type="rms", layer_norm_with_affine=True, max_sequence_length=4096,
        mlp_ratio=4, multi_query_attention=None, precision="amp_bf16", residual_dropout=0.0,
        rms_norm_eps=1e-5, rope=True, rope_full_precision=True, rope_theta=500000.0,
        scale_logits=False, use_cache=False, vocab_size=vocab_size, weight_tying=False,
        eos_token_id=spec.eos_id, pad_token_id=spec.eos_id, mask_token_id=spec.mask_id,
    )
    return {**base, **sizes}


class LLaDABlock(AttentionMixin, nn.Module):
    rope_full_precision = True

    def __init__(self, config: LLaDAConfig, layer_idx: int):
        super().__init__()
        C, H = config.d_model, config.n_heads
        G = config.num_key_value_heads
        D = C // H
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)
        self.attn_norm = RMSNorm(C, config.rms_norm_eps)
        self.ff_norm = RMSNorm(C, config.rms_norm_eps)
        self.q_proj = nn.Linear(C, C, bias=qkv_bias)
        self.k_proj = nn.Linear(C, G * D, bias=qkv_bias)
        self.v_proj = nn.Linear(C, G * D, bias=qkv_bias)
        self.attn_out = nn.Linear(C, C, bias=config.include_bias)
        F_ = config.mlp_hidden_size or config.mlp_ratio * C
        self.ff_proj = nn.Linear(C, F_, bias=config.include_bias)
        self.up_proj = nn.Linear(C, F_, bias=config.include_bias)
        self.ff_out = nn.Linear(F_, C, bias=config.include_bias)
        self.n_heads, self.n_kv_heads, self.head_dim = H, G, D
        self.layer_idx = layer_idx

    def _project(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def _out(self, x):
        return self.attn_out(x)

    def mlp(self, x):
        return self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))

    def forward(self, x, cos, sin, key_mask, cache, start):
        x = x + self.attend(self.attn_norm(x), cos, sin, key_mask, cache, start)
        return x + self.mlp(self.ff_norm(x))


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        parts = dict(
            wte=nn.Embedding(config.embedding_size or config.vocab_size, config.d_model),
            blocks=nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
        )
        if not config.weight_tying:
            parts["ff_out"] = nn.Linear(
                config.d_model, config.embedding_size or config.vocab_size, bias=config.include_bias
            )
        self.transformer = nn.ModuleDict(parts)


class LLaDAModelLM(DlmPreTrainedModel):
    config_class = LLaDAConfig
    _no_split_modules = ["LLaDABlock"]

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.rotary = Rotary(config.d_model // config.n_heads, config.rope_theta)
        self.post_init()

    def _embed(self, input_ids):
        return self.model.transformer.wte(input_ids)

    def _blocks(self):
        return self.model.transformer.blocks

    def _final_norm(self, x):
        return self.model.transformer.ln_f(x)

    def _head(self, x):
        t = self.model.transformer
        logits = F.linear(x, t.wte.weight) if self.config.weight_tying else t.ff_out(x)
        if self.config.scale_logits:
            logits = logits * (1 / self.config.d_model**0.5)
        return logits

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def set_output_embeddings(self, value):
        self.model.transformer.ff_out = value

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.transformer.blocks
