"""LLaDA-MoE-7B-A1B: an OLMoE-style sparse MoE (softmax router, top-k experts, optional shared
expert), per-head qk RMSNorm, partial RoPE, fully bidirectional.

The official config says `model_type: "llada"` like dense LLaDA-8B; `loading.detect_family` tells
them apart by the MoE keys. Parameter names follow the official checkpoint
(`model.layers.N.mlp.gate`, `mlp.experts.E.{gate,up,down}_proj`, `shared_expert.*`, `lm_head`).
Routing follows the released code: softmax in float32, optional additive expert bias, top-k
weights *not* renormalised (the released block hard-codes `norm_topk_prob = False`).
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig

from .common import init_config, LlamaBody, DlmPreTrainedModel, LlamaLayout, plain_rope, GatedMLP, RMSNorm, Rotary, SelfAttention


class LLaDAMoEConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(
        self,
        vocab_size=-1,
        hidden_size=-1,
        dense_intermediate_size=-1,
        expert_intermediate_size=-1,
        shared_expert_intermediate_size=-1,
        num_hidden_layers=-1,
        num_attention_heads=-1,
        num_key_value_heads=None,
        hidden_act="silu",
        max_position_embeddings=4096,
        initializer_range=0.02,
        rms_norm_eps=1e-05,
        use_cache=False,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=50279,
        tie_word_embeddings=False,
        rope_theta=-1,
        partial_rotary_factor=-1,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        clip_qkv=None,
        num_experts_per_tok=-1,
        num_experts=-1,
        output_router_logits=False,
        router_aux_loss_coef=0.01,
        norm_topk_prob=None,
        qk_layernorm=None,
        moe_layer_freq=(),
        moe_router_enable_expert_bias=None,
        moe_router_score_function=None,
        routed_scaling_factor=1,
        router_num_group=-2,
        router_topk_group=-2,
        **kwargs,
    ):
        init_config(self, {**locals(), "moe_layer_freq": list(moe_layer_freq)}, "LLaDAMoEModelLM",
                    base_keys=("pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings"))

    def check_supported(self) -> None:
        problems = []
        if self.hidden_act != "silu":
            problems.append(f"hidden_act={self.hidden_act!r}")
        if self.clip_qkv is not None:
            problems.append(f"clip_qkv={self.clip_qkv}")
        if not plain_rope(self):
            problems.append(f"rope_scaling={self.rope_scaling}")
        if self.moe_router_score_function not in (None, "softmax"):
            problems.append(f"moe_router_score_function={self.moe_router_score_function!r}")
        if len(self.moe_layer_freq) not in (0, self.num_hidden_layers):
            problems.append(f"moe_layer_freq has {len(self.moe_layer_freq)} entries for {self.num_hidden_layers} layers")
        if problems:
            raise ValueError(
                "This LLaDA-MoE config uses options the released LLaDA-MoE-7B-A1B does not: "
                + ", ".join(problems) + ". Only its layout is supported (hidden_act='silu', no clip_qkv, "
                "plain RoPE, softmax router); load a LLaDA-MoE-7B-A1B checkpoint or fix config.json."
            )

    def is_moe_layer(self, i: int) -> bool:
        return not self.moe_layer_freq or self.moe_layer_freq[i] != 0


def official_config(spec, vocab_size: int, sizes: dict) -> dict:
    """config.json of an inclusionAI LLaDA-MoE-7B-A1B checkpoint (official keys, auto_map,
    model_type) with `sizes` and the ids of the resolved `spec`; every layer is an MoE layer."""
    base = dict(
        architectures=["LLaDAMoEModelLM"], model_type="llada",
        auto_map={"AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
                  "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                  "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
        attention_bias=False, attention_dropout=0.0, clip_qkv=None, hidden_act="silu",
        initializer_range=0.02, max_position_embeddings=8192, moe_layer_freq=[1] * sizes["num_hidden_layers"],
        moe_router_enable_expert_bias=None, moe_router_score_function=None, norm_topk_prob=None,
        output_router_logits=False, partial_rotary_factor=1, qk_layernorm=True, rms_norm_eps=1e-5,
        rope_scaling=None, rope_theta=50000, router_aux_loss_coef=0.01, tie_word_embeddings=False,
        use_cache=False, vocab_size=vocab_size, eos_token_id=spec.eos_id, pad_token_id=spec.eos_id,
    )
    return {**base, **sizes}


# While an expert runs: (token indices [N_e] into the flattened [B*l] input, l). Per-row adapters
# inside experts (MemDLM fast weights) read it to find each token's batch row; the backbone never
# does. A ContextVar costs nothing when unused and is set again when checkpointing recomputes.
EXPERT_TOKENS: ContextVar[tuple[torch.Tensor, int] | None] = ContextVar("expert_tokens", default=None)


class SparseMoE(nn.Module):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            GatedMLP(config.hidden_size, config.expert_intermediate_size) for _ in range(config.num_experts)
        )
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        else:
            self.expert_bias = None

    def route(self, x: torch.Tensor):
        """x [N, C] -> weights [N, k] (x.dtype), expert ids [N, k]."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        if self.expert_bias is not None:
            probs = probs + self.expert_bias
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.route(x)
        out = torch.zeros_like(x)
        # Sort token-slots by expert once, then run each expert on its contiguous slice.
        flat = experts.flatten()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        token_of_slot = order // self.top_k
        slots = order.split(counts)
        tokens = token_of_slot.split(counts)
        w = weights.flatten()
        for e, (slot, tok) in enumerate(zip(slots, tokens)):
            if tok.numel():
                scope = EXPERT_TOKENS.set((tok, shape[-2] if len(shape) == 3 else 1))
                try:
                    y = self.experts[e](x[tok]) * w[slot, None]
                finally:
                    EXPERT_TOKENS.reset(scope)
                out.index_add_(0, tok, y.to(x.dtype))
        return out.reshape(shape)


class LLaDAMoEDecoderLayer(nn.Module):
    def __init__(self, config: LLaDAMoEConfig, layer_idx: int):
        super().__init__()
        C = config.hidden_size
        self.self_attn = SelfAttention(
            C, config.num_attention_heads, config.num_key_value_heads, layer_idx,
            qkv_bias=bool(config.attention_bias), o_bias=bool(config.attention_bias),
            qk_norm_eps=config.rms_norm_eps if config.qk_layernorm else None,
        )
        moe = config.is_moe_layer(layer_idx)
        self.mlp = SparseMoE(config) if moe else GatedMLP(C, config.dense_intermediate_size)
        if moe and config.shared_expert_intermediate_size not in (None, -1, 0):
            self.shared_expert = GatedMLP(C, config.shared_expert_intermediate_size)
        self.input_layernorm = RMSNorm(C, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(C, config.rms_norm_eps)

    def forward(self, x, cos, sin, key_mask, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask, cache, start)
        h = self.post_attention_layernorm(x)
        out = self.mlp(h)
        if hasattr(self, "shared_expert"):
            out = out + self.shared_expert(h)
        return x + out


class LLaDAMoEModel(LlamaBody):
    layer_class = LLaDAMoEDecoderLayer


class LLaDAMoEModelLM(LlamaLayout, DlmPreTrainedModel):
    config_class = LLaDAMoEConfig
    _no_split_modules = ["LLaDAMoEDecoderLayer"]

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        self.model = LLaDAMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        head_dim = config.hidden_size // config.num_attention_heads
        factor = config.partial_rotary_factor if config.partial_rotary_factor and config.partial_rotary_factor > 0 else 1.0
        self.rotary = Rotary(int(head_dim * factor), config.rope_theta)
        self.post_init()
