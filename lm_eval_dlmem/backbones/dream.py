"""Dream-v0-7B (Base / Instruct): the Qwen2.5 layout (GQA, q/k/v biases) made bidirectional.

Dream is initialised from an autoregressive model, so its raw logit at position i predicts token
i+1; `Backbone.logits` undoes that shift, this module returns raw logits like the official code.
Parameter names follow the official checkpoint (`model.layers.N.self_attn.q_proj`, `lm_head`).
Positions for padded rows are `cumsum(mask) - 1`, as in Dream's own sampler.
"""

from __future__ import annotations

import torch.nn as nn
from transformers import PretrainedConfig

from .common import init_config, LlamaBody, DlmPreTrainedModel, LlamaLayout, plain_rope, GatedMLP, RMSNorm, Rotary, SelfAttention


class DreamConfig(PretrainedConfig):
    model_type = "Dream"

    def __init__(
        self,
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="silu",
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=False,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
        attention_dropout=0.0,
        mask_token_id=151666,
        pad_token_id=151643,
        **kwargs,
    ):
        init_config(self, locals(), "DreamModel")

    def check_supported(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"Dream configs with hidden_act={self.hidden_act!r} are not supported; the released models use silu.")
        if not plain_rope(self):
            raise ValueError(
                f"rope_scaling={self.rope_scaling} is not supported; the released Dream models use plain RoPE. "
                "Change rope_theta for NTK-style extension instead."
            )


def official_config(spec, vocab_size: int, sizes: dict) -> dict:
    """config.json of a Dream-org Dream-v0 checkpoint (official keys, auto_map, model_type) with
    `sizes` and the ids of the resolved `spec`."""
    base = dict(
        architectures=["DreamModel"], model_type="Dream",
        auto_map={"AutoConfig": "configuration_dream.DreamConfig",
                  "AutoModel": "modeling_dream.DreamModel"},
        attention_dropout=0.0, bos_token_id=spec.bos_id, eos_token_id=spec.eos_id,
        hidden_act="silu", initializer_range=0.02, mask_token_id=spec.mask_id,
        max_position_embeddings=131072, max_window_layers=28, pad_token_id=spec.eos_id,
        rms_norm_eps=1e-6, rope_scaling=None, rope_theta=1000000.0, sliding_window=131072,
        tie_word_embeddings=False, torch_dtype="float32", use_cache=False,
        use_sliding_window=False, vocab_size=vocab_size,
    )
    return {**base, **sizes}


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        C = config.hidden_size
        self.self_attn = SelfAttention(
            C, config.num_attention_heads, config.num_key_value_heads, layer_idx, qkv_bias=True
        )
        self.mlp = GatedMLP(C, config.intermediate_size)
        self.input_layernorm = RMSNorm(C, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(C, config.rms_norm_eps)

    def forward(self, x, cos, sin, key_mask, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBaseModel(LlamaBody):
    layer_class = DreamDecoderLayer


class DreamModel(LlamaLayout, DlmPreTrainedModel):
    config_class = DreamConfig
    _no_split_modules = ["DreamDecoderLayer"]
    position_ids_from_mask = True

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary = Rotary(head_dim, config.rope_theta)
        self.post_init()
