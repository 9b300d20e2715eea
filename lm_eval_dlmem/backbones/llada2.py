"""LLaDA2.x (LLaDA2.0-mini/flash, LLaDA2.1-mini): a Ling-2.0 sparse MoE trained for block diffusion.

Notable features, all as in the released modeling code:
- fused `query_key_value` projection with GQA, per-head RMSNorm on q and k *before* RoPE,
  partial rotary (the first `head_dim * partial_rotary_factor` channels), output `dense`;
- MoE layers after `first_k_dense_replace` dense ones: a sigmoid router in float32 that picks
  experts on `scores + expert_bias` inside the best `topk_group` of `n_group` groups (a group
  scores the sum of its two best experts), weights = the unbiased scores of the picks,
  renormalised and multiplied by `routed_scaling_factor`, plus always-on shared experts;
- no logit shift: logits[:, i] predicts token i.

Attention is bidirectional by default (what the official forward does without a mask, and what
MemDLM trains with). Passing `block_length=n` to `forward` selects the block-causal pattern the
samplers decode with: blocks of n tokens aligned to each row's first real token, bidirectional
inside a block, causal across blocks. Keys/values of a finished block then never change, so the
`DiffusionCache` is exact for it (not an approximation as for the bidirectional families).

`model_type` in the wild: `llada2_moe` (hub, dllm 2.0), `llada21_moe` (dllm 2.1),
`llada2_moe_21` (MemDLM); all load into `LLaDA2MoeConfig`. Parameter names follow the official
checkpoint (`model.word_embeddings`, `model.layers.N.attention.query_key_value`,
`mlp.gate.weight`, `mlp.gate.expert_bias`, `mlp.experts.E.*`, `mlp.shared_experts.*`, `lm_head`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig

from .common import init_config, AttentionMixin, DlmPreTrainedModel, GatedMLP, LlamaLayout, RMSNorm, Rotary, plain_rope
from .llada_moe import EXPERT_TOKENS



class LLaDA2MoeConfig(PretrainedConfig):
    """The official `LLaDA2MoeConfig` keys with the official defaults (a config.json that omits a
    key gets what the official class gives it, e.g. `use_bias=True`, `partial_rotary_factor=0.5`).

    `num_key_value_heads=0` (the 2.0 class's default) means one key/value head per query head, as
    the 2.1 class resolves it. Hub-only keys the official code ignores (`score_function`,
    `norm_topk_prob`, `moe_router_enable_expert_bias`, `router_dtype`, ...) are kept as attributes;
    `check_supported` refuses values that contradict what the official code does with them.
    """

    model_type = "llada2_moe"

    def __init__(
        self,
        vocab_size=30592,
        hidden_size=1024,
        intermediate_size=None,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=0,
        hidden_act="silu",
        use_qkv_bias=False,
        use_qk_norm=True,
        use_bias=True,
        rms_norm_eps=1e-05,
        norm_head=False,
        tie_word_embeddings=False,
        embedding_dropout=0.1,
        attention_dropout=0.1,
        output_dropout=0.1,
        initializer_range=0.02,
        max_position_embeddings=16384,
        rope_theta=10000.0,
        use_cache=True,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
        rope_scaling=None,
        pad_token_id=126081,
        num_experts=16,
        num_shared_experts=0,
        num_experts_per_tok=2,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        moe_intermediate_size=None,
        first_k_dense_replace=0,
        head_dim=None,
        output_router_logits=False,
        partial_rotary_factor=0.5,
        **kwargs,
    ):
        init_config(self, {**locals(), "head_dim": head_dim or hidden_size // num_attention_heads},
                    "LLaDA2MoeModelLM")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts is not None and i >= self.first_k_dense_replace

    def check_supported(self) -> None:
        """Refuse, with the key named, what the official forward would not compute as configured."""
        problems = []
        if self.hidden_act != "silu":
            problems.append(f"hidden_act={self.hidden_act!r} (only 'silu')")
        if not plain_rope(self):
            problems.append(f"rope_scaling={self.rope_scaling} (only plain RoPE)")
        if self.tie_word_embeddings:
            problems.append("tie_word_embeddings=true (the released models untie the LM head)")
        if getattr(self, "score_function", None) not in (None, "sigmoid"):
            problems.append(f"score_function={self.score_function!r} (the official router is 'sigmoid')")
        if getattr(self, "norm_topk_prob", None) is False:
            problems.append("norm_topk_prob=false (the official router renormalises the top-k weights)")
        if self.num_experts is not None:
            groups_ok = self.n_group and self.num_experts % self.n_group == 0 and self.num_experts // self.n_group >= 2
            if not groups_ok:
                problems.append(f"num_experts={self.num_experts} with n_group={self.n_group} (each group needs >= 2 experts)")
            elif not 0 < self.topk_group <= self.n_group:
                problems.append(f"topk_group={self.topk_group} (must be in 1..n_group={self.n_group})")
        if problems:
            raise ValueError(
                "This LLaDA2.x config uses options the released LLaDA2.0/2.1 models do not: "
                + "; ".join(problems) + ". Fix config.json or load a released LLaDA2.x checkpoint."
            )


def official_config(spec, vocab_size: int, sizes: dict) -> dict:
    """config.json of an inclusionAI LLaDA2.x-mini checkpoint (official keys, auto_map,
    model_type) with `sizes` and the ids of the resolved `spec`, including the keys only the hub
    file has (`score_function`, `norm_topk_prob`, `router_dtype`, ...), which the official code
    ignores."""
    base = dict(
        architectures=["LLaDA2MoeModelLM"], model_type="llada2_moe",
        auto_map={"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                  "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                  "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        attention_dropout=0.0, embedding_dropout=0.0, output_dropout=0.0, hidden_act="silu",
        initializer_range=0.02, max_position_embeddings=32768, max_window_layers=20,
        moe_router_enable_expert_bias=True, norm_head=False, norm_softmax=False, norm_topk_prob=True,
        output_router_logits=False, partial_rotary_factor=0.5, rms_norm_eps=1e-6, rope_scaling=None,
        rope_theta=600000, routed_scaling_factor=2.5, router_dtype="fp32", score_function="sigmoid",
        tie_word_embeddings=False, torch_dtype="bfloat16", use_bias=False, use_cache=False,
        use_qk_norm=True, use_qkv_bias=False, use_rmsnorm=True, use_sliding_window=False,
        vocab_size=vocab_size, eos_token_id=spec.eos_id, pad_token_id=spec.eos_id,
    )
    return {**base, **sizes}


class LLaDA2Attention(AttentionMixin, nn.Module):
    """Official names: fused `query_key_value` ([H + 2G] * D outputs, q heads first), per-head
    `query_layernorm` / `key_layernorm`, output `dense`. RoPE tables are cast to the model dtype
    before rotating, as the official rotary embedding returns them."""

    rope_full_precision = False
    qk_norm_names = ("query_layernorm", "key_layernorm")

    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        H, G, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim, self.layer_idx = H, G, D, layer_idx
        self.query_key_value = nn.Linear(config.hidden_size, (H + 2 * G) * D, bias=config.use_qkv_bias)
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(D, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(D, config.rms_norm_eps)
        self.dense = nn.Linear(H * D, config.hidden_size, bias=config.use_bias)

    def _project(self, x):
        D = self.head_dim
        return self.query_key_value(x).split([self.n_heads * D, self.n_kv_heads * D, self.n_kv_heads * D], dim=-1)

    def _out(self, x):
        return self.dense(x)


class LLaDA2Gate(nn.Module):
    """The official router: `weight` [E, C] (a bare parameter, so 4-bit loading leaves it in full
    precision as the official model does) and the `expert_bias` buffer stored in the checkpoint."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def select(self, biased: torch.Tensor) -> torch.Tensor:
        """Group-limited top-k. biased [N, E] -> expert ids [N, k] (best first)."""
        N, E = biased.shape
        groups = biased.view(N, self.n_group, -1)
        group_scores = groups.topk(2, dim=-1).values.sum(-1)  # [N, n_group]
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        keep = keep[:, :, None].expand(N, self.n_group, E // self.n_group).reshape(N, E)
        return biased.masked_fill(~keep, float("-inf")).topk(self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, C] -> weights [N, k] float32, expert ids [N, k]."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # [N, E] float32
        experts = self.select(scores + self.expert_bias)
        weights = scores.gather(1, experts)
        if self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, experts


class LLaDA2SparseMoE(nn.Module):
    """Routed experts + shared experts. The weighted sum over a token's k experts runs in float32
    and is cast back, as in the official block; `EXPERT_TOKENS` is set while an expert runs so
    per-row adapters inside experts (MemDLM fast weights) can find each token's batch row."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        C, I = config.hidden_size, config.moe_intermediate_size
        self.top_k = config.num_experts_per_tok
        self.experts = nn.ModuleList(GatedMLP(C, I) for _ in range(config.num_experts))
        self.gate = LLaDA2Gate(config)
        if config.num_shared_experts:
            self.shared_experts = GatedMLP(C, I * config.num_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [N, C]
        weights, experts = self.gate(h)  # [N, k]
        flat = experts.flatten()  # slot s = token s // k, its (s % k)-th expert
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        out = h.new_zeros(flat.numel(), shape[-1])  # [N * k, C] one row per slot
        row_len = shape[-2] if len(shape) == 3 else 1
        for e, slot in enumerate(order.split(counts)):
            if slot.numel():
                tok = slot // self.top_k
                scope = EXPERT_TOKENS.set((tok, row_len))
                try:
                    out[slot] = self.experts[e](h[tok]).to(h.dtype)
                finally:
                    EXPERT_TOKENS.reset(scope)
        y = (out.view(*weights.shape, -1).float() * weights[..., None]).sum(1).to(x.dtype)
        y = y.reshape(shape)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(x)
        return y


class LLaDA2DecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        C = config.hidden_size
        self.attention = LLaDA2Attention(config, layer_idx)
        moe = config.is_moe_layer(layer_idx)
        self.mlp = LLaDA2SparseMoE(config) if moe else GatedMLP(C, config.intermediate_size)
        self.input_layernorm = RMSNorm(C, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(C, config.rms_norm_eps)

    def forward(self, x, cos, sin, key_mask, cache, start):
        x = x + self.attention(self.input_layernorm(x), cos, sin, key_mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA2Model(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        pad = config.pad_token_id
        padding_idx = pad if pad is not None and 0 <= pad < config.vocab_size else None
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx)
        self.layers = nn.ModuleList(LLaDA2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def block_causal_mask(attention_mask, start: int, length: int, keys: int, block_length: int, device):
    """Bool SDPA mask [B|1, 1, length, keys]: query q may see key p iff p is a real token and
    block(p) <= block(q), blocks of `block_length` counted from each row's first real token.

    Left padding is the only padding (the decoder's contract), so a row's first real token is the
    argmax of its mask. Pad queries are put in block 0 so they still see real keys (their outputs
    are never used; a fully masked row would turn into NaNs that reach real rows through V).
    """
    if attention_mask is None:
        first = torch.zeros(1, 1, dtype=torch.long, device=device)
        real = None
    else:
        attention_mask = attention_mask.to(device).bool()
        first = attention_mask.long().argmax(-1, keepdim=True)  # [B, 1]
        real = attention_mask[:, None, None, :keys]
    q = torch.arange(start, start + length, device=device)[None] - first  # [B, l]
    k = torch.arange(keys, device=device)[None] - first  # [B, keys]
    q_block = torch.div(q, block_length, rounding_mode="floor").clamp_min(0)
    k_block = torch.div(k, block_length, rounding_mode="floor")
    allowed = (k_block[:, None, :] <= q_block[:, :, None])[:, None]  # [B, 1, l, keys]
    return allowed if real is None else allowed & real


class LLaDA2MoeModelLM(LlamaLayout, DlmPreTrainedModel):
    config_class = LLaDA2MoeConfig
    _no_split_modules = ["LLaDA2DecoderLayer"]
    embedding_name = "word_embeddings"
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    # a padded row alone starts at position 0, as the official samplers' unpadded rows do
    position_ids_from_mask = True

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config.rotary_dim, config.rope_theta)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LLaDA2Gate):
            module.weight.data.normal_(0.0, self.config.initializer_range)
            module.expert_bias.zero_()

    def _attention_mask(self, attention_mask, start, length, keys, block_length):
        if block_length is None:
            return super()._attention_mask(attention_mask, start, length, keys, None)
        if int(block_length) <= 0:
            raise ValueError(f"block_length={block_length} must be a positive number of tokens.")
        return block_causal_mask(attention_mask, start, length, keys, int(block_length), self.lm_head.weight.device)
