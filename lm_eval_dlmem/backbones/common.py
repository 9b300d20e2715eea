"""Building blocks shared by the three backbones: RMSNorm, RoPE, bidirectional SDPA attention
with the diffusion KV cache, and the forward scaffolding every family's LM class uses.

Shapes: B batch, L canvas length (prompt + generation), l forwarded length (L, or a window of it
when a cache is used), H query heads, G key/value heads, D head dim, C hidden size, V vocab.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.x renamed the output's cache field from `past_key_values` to `cache`; building an
# output with the old name logs "`past_key_values`/`cache_params` are deprecated" on every run.
OUTPUT_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
                      else "past_key_values")


def plain_rope(config) -> bool:
    """True when the config asks for unscaled RoPE (transformers 5 may fold `rope_theta` into a
    `rope_scaling`/`rope_parameters` dict with rope_type "default")."""
    scaling = getattr(config, "rope_scaling", None) or {}
    return scaling.get("rope_type", scaling.get("type", "default")) == "default"


def init_config(config: PretrainedConfig, fields: dict, architecture: str,
                base_keys: tuple[str, ...] = ("pad_token_id", "tie_word_embeddings")) -> None:
    """The `__init__` body of the HF-layout family configs (Dream, LLaDA-MoE, LLaDA2.x).

    `fields` is the family `__init__`'s `locals()`: its named arguments (official names and
    defaults) become attributes, except `base_keys` and the free `kwargs`, which go to
    `PretrainedConfig.__init__`, and `use_cache`, set after it (the base class would overwrite it).
    As in the official classes, `num_key_value_heads` 0/None means one key/value head per query
    head, `rope_scaling` is stored only when given, and `architectures` defaults to `architecture`.
    """
    fields = {k: v for k, v in fields.items() if k not in ("self", "__class__")}
    kwargs = fields.pop("kwargs")
    base = {k: fields.pop(k) for k in base_keys}
    use_cache = fields.pop("use_cache")
    if fields["rope_scaling"] is None:
        del fields["rope_scaling"]
    fields["num_key_value_heads"] = fields["num_key_value_heads"] or fields["num_attention_heads"]
    for name, value in fields.items():
        setattr(config, name, value)
    kwargs.setdefault("architectures", [architecture])
    PretrainedConfig.__init__(config, **base, **kwargs)
    config.use_cache = use_cache


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as all three official models do."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """RoPE tables over the first `dim` channels of each head (`dim < D` for partial rotary).
    See `apply_rotary` for the two precision modes.

    The inverse frequencies are recomputed in float32 on every call rather than kept in a
    buffer: transformers 5 builds models on the meta device and leaves non-persistent buffers
    uninitialised after `from_pretrained`, and `model.to(bfloat16)` would round a buffer. The
    table has dim/2 entries, so this costs nothing next to one layer.
    """

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim = dim
        self.theta = float(theta)

    def inv_freq(self, device) -> torch.Tensor:
        exponent = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        return 1.0 / (self.theta**exponent)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, l] -> cos, sin [B, 1, l, dim] in float32
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos()[:, None], emb.sin()[:, None]


def apply_rotary(q, k, cos, sin, full_precision: bool):
    """Rotate q/k [B, H|G, l, D] by cos/sin [B, 1, l, dim]; channels past `dim` pass through."""
    dtype = q.dtype
    if full_precision:
        q, k = q.float(), k.float()
    else:
        cos, sin = cos.to(dtype), sin.to(dtype)
    dim = cos.shape[-1]
    return _rotate(q, cos, sin, dim).to(dtype), _rotate(k, cos, sin, dim).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
    if dim < x.shape[-1]:  # partial rotary: the channels past `dim` pass through
        return torch.cat((_rotate(x[..., :dim], cos, sin, dim), x[..., dim:]), dim=-1)
    # full rotary: no split of x (two view ops less per call, at every layer of every forward)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class DiffusionCache:
    """Key/value buffers over the whole canvas, one pair per layer: [B, G, L, D].

    Filled by a full forward (`use_cache=True` on an empty cache). A later forward of a window
    `[start, start + l)` writes that window's fresh keys/values into the buffers in place and
    attends over the whole buffer. With `l = L - start` this is Fast-dLLM's prefix cache
    (cached prefix + freshly computed suffix); with `l = block` it is the dual cache (cached
    prefix and suffix, fresh block). In-place writes make it an inference-only structure.

    `fresh` ([B, L] bool, or None = all): canvas positions whose keys/values a windowed forward
    may overwrite; elsewhere the cached ones stay and are attended. The block-diffusion loop sets
    it to each row's own block, so a row whose batch-mates widen the window keeps what it would
    have cached alone (its finished columns re-forwarded under a memory that changes per step,
    MetaState, would otherwise be overwritten with other values).
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.fresh: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        if layer == len(self.keys):
            if start != 0:
                raise ValueError("An empty DiffusionCache must be filled by a full forward (start=0).")
            self.keys.append(k)
            self.values.append(v)
            return k, v
        keys, values = self.keys[layer], self.values[layer]
        end = start + k.shape[2]
        if self.fresh is not None:
            fresh = self.fresh[:, None, start:end, None].to(k.device)  # [B, 1, l, 1]
            k, v = torch.where(fresh, k, keys[:, :, start:end]), torch.where(fresh, v, values[:, :, start:end])
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys, values


def sdpa(q, k, v, key_mask):
    """Bidirectional attention. q [B,H,l,D], k/v [B,G,Lk,D], key_mask [B,1,1,Lk] bool or None."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)


class AttentionMixin:
    """Projections are created by the family classes under their official names; this mixin
    holds the shared computation: project, optional qk-norm, RoPE, cache, SDPA, output proj."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    layer_idx: int
    rope_full_precision: bool  # LLaDA rotates float32 copies of q/k; HF models cast cos/sin down
    qk_norm_names: tuple[str, str] | None = None  # the per-head q/k RMSNorm modules, when the family has them

    def _project(self, x):  # -> q [B,l,H*D], k, v [B,l,G*D]
        raise NotImplementedError

    def _out(self, x):
        raise NotImplementedError

    def _qk_norm(self, q, k):
        if self.qk_norm_names is None or not hasattr(self, self.qk_norm_names[0]):
            return q, k
        q_norm, k_norm = (getattr(self, name) for name in self.qk_norm_names)
        # the norm runs per head over D channels: [B, l, H*D] -> [B, l, H, D] -> back
        q = q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        k = k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        return q, k

    def attend(self, x, cos, sin, key_mask, cache, start):
        B, l, _ = x.shape
        q, k, v = self._project(x)
        q, k = self._qk_norm(q, k)
        q = q.view(B, l, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, l, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, l, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin, self.rope_full_precision)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, start)
        out = sdpa(q, k, v, key_mask)
        return self._out(out.transpose(1, 2).reshape(B, l, self.n_heads * self.head_dim))

    def forward(self, x, cos, sin, key_mask, cache, start):  # a block with its own forward calls `attend`
        return self.attend(x, cos, sin, key_mask, cache, start)


class SelfAttention(AttentionMixin, nn.Module):
    """HF naming (`self_attn.q_proj/k_proj/v_proj/o_proj`, optional per-head `q_norm`/`k_norm`)."""

    rope_full_precision = False
    qk_norm_names = ("q_norm", "k_norm")

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, layer_idx: int, *,
                 qkv_bias: bool, o_bias: bool = False, qk_norm_eps: float | None = None):
        super().__init__()
        D = hidden // n_heads
        self.n_heads, self.n_kv_heads, self.head_dim, self.layer_idx = n_heads, n_kv_heads, D, layer_idx
        self.q_proj = nn.Linear(hidden, n_heads * D, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * D, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, n_kv_heads * D, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * D, hidden, bias=o_bias)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(D, qk_norm_eps)
            self.k_norm = RMSNorm(D, qk_norm_eps)

    def _project(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def _out(self, x):
        return self.o_proj(x)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward with HF names: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, L] 1/0 mask over keys -> [B, 1, 1, L] bool for SDPA (pad queries still see real keys)."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


def default_positions(attention_mask, start: int, length: int, from_mask: bool, device):
    """Position ids [B or 1, l] for the window [start, start + length) of the canvas."""
    if from_mask and attention_mask is not None:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return pos[:, start : start + length]
    return torch.arange(start, start + length, device=device)[None]


class LlamaBody(nn.Module):
    """The `model.` part of a Llama-layout checkpoint (Dream, LLaDA-MoE): `embed_tokens`,
    `layers.N` (one `layer_class(config, N)` per layer), `norm`."""

    layer_class: type[nn.Module]

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaLayout:
    """Module layout of checkpoints named the Llama way (`model.<embeddings>`, `model.layers`,
    `model.norm`, `lm_head`), as the official Dream, LLaDA-MoE and LLaDA2.x checkpoints are: the
    accessors through which `DlmPreTrainedModel` and transformers reach the parts.
    `embedding_name` is the embedding module's name under `model` (LLaDA2.x: `word_embeddings`)."""

    embedding_name = "embed_tokens"

    def _embed(self, input_ids):
        return self.get_input_embeddings()(input_ids)

    def _blocks(self):
        return self.model.layers

    def _final_norm(self, x):
        return self.model.norm(x)

    def _head(self, x):
        return self.lm_head(x)

    def get_input_embeddings(self):
        return getattr(self.model, self.embedding_name)

    def set_input_embeddings(self, value):
        setattr(self.model, self.embedding_name, value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers


class DlmPreTrainedModel(PreTrainedModel):
    """Forward scaffolding shared by the families. Subclasses provide `_embed`, `_blocks`,
    `_final_norm`, `_head`, `rotary` and set `position_ids_from_mask`; their config class provides
    `check_supported()`. `Backbone` reaches them through its public `hidden_states` / `final_norm` / `head`.

    forward(input_ids [B, l], attention_mask [B, L] over the *whole* canvas, position_ids,
    past_key_values: DiffusionCache, use_cache, cache_position: int start of the window,
    logits_to_keep: int (last n) or slice (positions within the window), block_length: int for
    block-causal families (LLaDA2.x), None for bidirectional attention).
    """

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _tied_weights_keys = None
    position_ids_from_mask = False

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        config.check_supported()  # every family config refuses, by key, what its official code would not run
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether a block runs under activation checkpointing.

        PEFT's `PeftModel.__init__` reads this name on every adapter load; transformers 5.x made
        it a deprecated alias that raises a FutureWarning (an error under `python -W error`).
        Answered here directly, the same way transformers' `is_activation_checkpointing` does.
        """
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", None) or getattr(self.config, "init_std", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DiffusionCache | None = None,
        use_cache: bool = False,
        cache_position: int | None = None,
        logits_to_keep: int | slice | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs,
    ):
        if kwargs.get("labels") is not None:
            raise ValueError("Diffusion backbones do not compute a loss in forward; pass no `labels`.")
        x = self._embed(input_ids) if inputs_embeds is None else inputs_embeds
        start = int(cache_position or 0)
        cache = past_key_values
        if cache is None and use_cache:
            cache = DiffusionCache()
        hidden = [] if output_hidden_states else None
        recompute = None
        if self.gradient_checkpointing and self.training:
            recompute = lambda block, *args: self._gradient_checkpointing_func(block.__call__, *args)  # noqa: E731
        x = self.run_layers(x, attention_mask, position_ids=position_ids, cache=cache, start=start,
                            recompute=recompute, collect=hidden, block_length=kwargs.get("block_length"))
        x = self._final_norm(x)
        if hidden is not None:
            hidden.append(x)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, slice):
            x = x[:, logits_to_keep]
        logits = self._head(x)
        if not return_dict:
            return (logits, cache)
        return CausalLMOutputWithPast(
            logits=logits,
            hidden_states=tuple(hidden) if hidden is not None else None,
            **{OUTPUT_CACHE_FIELD: cache},
        )

    def run_layers(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        start_layer: int = 0,
        end_layer: int | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DiffusionCache | None = None,
        start: int = 0,
        recompute=None,
        collect: list | None = None,
        block_length: int | None = None,
    ) -> torch.Tensor:
        """Run decoder blocks `start_layer .. end_layer - 1` on x; the one block loop of the model.

        Args:
            x: [B, l, C] the embeddings, or the output of block `start_layer - 1`.
            attention_mask: [B, L] over the whole canvas (1 real, 0 left padding), or None.
            position_ids: [B or 1, l]; default from the window start (and the mask, for families
                that set `position_ids_from_mask`).
            cache / start: the `DiffusionCache` and the canvas position of x's first column.
            recompute: `fn(block, x, cos, sin, key_mask, None, start)` that runs a block under
                activation checkpointing (the cache is not used then), or None.
            collect: when a list, each block's input is appended to it.
            block_length: block-causal attention with blocks of this many tokens from each row's
                first real token (families that override `_attention_mask`, LLaDA2.x); None
                attends bidirectionally.

        Returns:
            [B, l, C] the output of block `end_layer - 1`, before the final norm.
        """
        if position_ids is None:
            position_ids = default_positions(attention_mask, start, x.shape[1], self.position_ids_from_mask, x.device)
        cos, sin = self.rotary(position_ids)
        keys = attention_mask.shape[1] if attention_mask is not None else (
            cache.length if cache is not None and len(cache) else start + x.shape[1])
        key_mask = self._attention_mask(attention_mask, start, x.shape[1], keys, block_length)
        for block in list(self._blocks())[start_layer:end_layer]:
            if collect is not None:
                collect.append(x)
            if recompute is not None:
                x = recompute(block, x, cos, sin, key_mask, None, start)
            else:
                x = block(x, cos, sin, key_mask, cache, start)
        return x

    def _attention_mask(self, attention_mask, start: int, length: int, keys: int, block_length: int | None):
        """SDPA mask for queries [start, start + length) over `keys` key positions: here every
        real key (bidirectional families); block-causal families override it."""
        if block_length is not None:
            raise ValueError(
                f"block_length={block_length} was passed to {type(self).__name__}, which attends "
                "bidirectionally; block-causal attention is a LLaDA2.x option. Pass block_length=None."
            )
        return key_padding_mask(attention_mask)

    # transformers' generate() is autoregressive; diffusion decoding lives in lm_eval_dlmem.decoding.
    def generate(self, *args, **kwargs):
        raise NotImplementedError(
            "Diffusion LMs do not decode left to right; use lm_eval_dlmem.generate(backbone, ...)."
        )
