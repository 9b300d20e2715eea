"""Peak-memory model of a run: what a backbone, its cache, its activations and its memory method
need at the worst moment of a decode or likelihood batch, from config.json alone.

    peak    = weights [+ MetaState parameters] [+ session] + WORKSPACE + B * per_row   (linear in B)
    per_row = max(full forward, window forward, LM head, MemDLM inner loop) + memory state
    full forward   = R * (max(attention, feed-forward) + cache) [+ previous step's logits]
    attention      = 3 [l, C] held + q, k, v + RoPE temporaries (float32 copies for LLaDA)
    feed-forward   = 4 [l, C] held + 3 [l, F]

R = 1 row per request, 2 under classifier-free guidance. Sizes: P prompt, G generation,
L = P + G canvas, n block length, C hidden, F feed-forward width a token passes through (MoE:
top-k experts plus the shared ones), H heads, Hkv key/value heads, D head dim, V vocabulary,
N layers. The [l, C] tensors held inside a block: the embedding output (kept by the model's
forward), the block's input (kept by the block loop), the residual after attention and the
normed input of the sub-layer.

Where each term comes from (measured with `benchmarks/memory_check.py`, module by module):
- the decode loop keeps a step's logits [B, n, V] alive through the next forward (`none` cache:
  every step is a full forward); guided logits are [B, ...], not [2B, ...]; a block's first
  step starts a fresh `decode_block` call, so a cache refresh has no previous logits;
- a cache holds keys/values at Hkv heads; the refreshing forward's own k and v are the cache's;
- the likelihood scores the masked continuation positions only: its float32 log-softmax covers
  (b + 1) / 2b of them for a stratum of b rows;
- MetaState builds fused copies of some weights when a session starts (`session`: the
  concatenated projections of `MetaState.fused`, fewer ops per forward) and holds them to its end;
- MemDLM holds one copy of its fast weights per row while decoding; its inner loop holds
  two (weights, gradients) in each stage, next to the masked tokens' cross-entropy.

The weights are exact (the model built on the meta device and its parameters counted); the
activations count the tensors the code keeps alive, checked against measured peaks (the H200
rows of benchmarks/results/gpu_check_h200.md within 1%, `benchmarks/memory_check.py` on CPU in
float32 within 10%; benchmarks/README.md). Not yet covered: bfloat16 MoE layers on CPU, which
hold about twice the bytes counted here. `batch_size=auto` starts at `largest_batch(free memory)`;
the harness keeps halving on out-of-memory as the safety net.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backbones.spec import get_spec

GIB = 1024 ** 3

# [l, C] tensors alive inside a block (see the module docstring): 3 in attention (embedding
# output, block input, normed input), 4 in the feed-forward (plus the residual after attention);
# the feed-forward's own: the gate's activation, up and their product.
HELD_ATTENTION = 3
HELD_FFN = 4
LIVE_FFN = 3
# RoPE of one [l, H*D] tensor: x * cos, the rotated half concatenated, times sin (their sum
# replaces the first), in float32 for LLaDA (`rope_full_precision`), else the compute dtype.
ROPE_TEMPS = 3
# Batch-independent bytes of a decode or likelihood call (canvas, masks, allocator and kernel
# workspace): measured 6 MiB on CPU.
WORKSPACE = 8 * 2 ** 20
# LM head at one decode step, bytes per logit on top of the logits themselves: the strategies'
# float32 softmax and its confidences.
HEAD_EXTRA_BYTES = 8
# The likelihood's cross-entropy on the masked positions: their float32 logits gathered and their
# log-softmax.
LIKELIHOOD_MASKED_BYTES = 8
# MemDLM's cross-entropy backward over the masked tokens: log-softmax kept, its gradient and the
# logits' gradient [N, V] in float32.
NLL_BACKWARD_TENSORS = 3
# bitsandbytes NF4 with double quantisation (what `load_in_4bit` builds): 4 bits per weight, one
# 8-bit absmax per 64 weights and one float32 absmax per 256 blocks of 64.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
NF4_BYTES_SINGLE = 0.5 + 4 / 64  # without double quantisation: ~0.56 bytes per weight
INT8_BYTES = 1 + 4 / 4096  # LLM.int8: one byte per weight, a float32 scale per output row (~4k wide)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZED = {"nf4": NF4_BYTES, "int8": INT8_BYTES}
PRECISIONS = (*DTYPE_BYTES, *QUANTIZED)
CACHES = ("none", "prefix", "dual")


# The released checkpoints' sizes (config.json keys; shared reference: backbones.md, 1.1):
# name -> (family, vocab, sizes). `Shape.released(name)` plans for them without the weights.
RELEASED = {
    "LLaDA-8B-Instruct": ("llada", 126464, dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32,
                                                 mlp_hidden_size=12288, max_sequence_length=4096)),
    "Dream-v0-Instruct-7B": ("dream", 152064, dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                                   num_hidden_layers=28, intermediate_size=18944)),
    "LLaDA-MoE-7B-A1B": ("llada_moe", 157184, dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
                                                   num_hidden_layers=16, expert_intermediate_size=1024,
                                                   dense_intermediate_size=8192, num_experts=64,
                                                   num_experts_per_tok=8)),
    "LLaDA2.1-mini": ("llada2", 157184, dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
                                             head_dim=128, num_hidden_layers=20, intermediate_size=5120,
                                             moe_intermediate_size=512, num_experts=256, num_experts_per_tok=8,
                                             n_group=8, topk_group=4, num_shared_experts=1,
                                             first_k_dense_replace=1)),
}


@dataclass(frozen=True)
class Shape:
    """The sizes of a backbone that memory depends on.

    Args:
        params: every parameter.
        quantizable: parameters of the `nn.Linear` layers inside the blocks (what NF4 turns into
            4 bits; embeddings, norms and the LM head stay in the compute dtype).
        hidden / layers / heads / kv_heads / head_dim / vocab: C, N, H, Hkv, D, V.
        ffn: F, the feed-forward width one token passes through at the widest layer (MoE: its
            top-k experts and the shared ones): what a backward keeps for every expert at once.
        ffn_live: the feed-forward width alive at once in a forward: dense F; MoE experts run one
            after the other on their share of the tokens (k / E of them with balanced routing).
        rope_fp32: the attention rotates float32 copies of q and k (LLaDA's `rope_full_precision`).
    """

    params: int
    quantizable: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    ffn_live: int = 0
    rope_fp32: bool = False

    @classmethod
    def from_config(cls, config: dict, family: str) -> "Shape":
        """Shape of the checkpoint whose config.json is `config` (a dict), family `family`."""
        spec = get_spec(family)
        keys = spec.size_keys
        model = _meta_model(spec, config)
        params = sum(p.numel() for p in model.parameters())
        head = model.get_output_embeddings()
        quantizable = sum(m.weight.numel() for m in model.modules()
                          if isinstance(m, torch.nn.Linear) and m is not head)
        hidden, heads = int(config[keys.hidden]), int(config[keys.heads])
        return cls(params=params, quantizable=quantizable, hidden=hidden, layers=int(config[keys.layers]),
                   heads=heads, kv_heads=int(config.get(keys.kv_heads) or heads),
                   head_dim=int(config.get("head_dim") or hidden // heads), ffn=ffn_width(config),
                   vocab=int(config.get("embedding_size") or config["vocab_size"]),
                   ffn_live=ffn_width(config, live=True),
                   rope_fp32=any(getattr(m, "rope_full_precision", False) for m in model.modules()))


    @classmethod
    def released(cls, name: str) -> "Shape":
        """Shape of a released checkpoint named in `RELEASED`."""
        check_choice("model", name, RELEASED)
        family, vocab, sizes = RELEASED[name]
        return cls.from_config(get_spec(family).official_config_dict(vocab, sizes), family)


def _meta_model(spec, config: dict):
    """The family's model built on the meta device: exact parameter shapes, no memory."""
    cls = spec.load_class()
    with torch.device("meta"):
        return cls(cls.config_class(**config))


def ffn_width(config: dict, live: bool = False) -> int:
    """F: the widest feed-forward a token passes through, from the config.json size keys.
    Dense: the MLP width. MoE: top-k experts plus the shared expert(s) (`live`: the routed part
    scaled by k / E, one expert's share of the tokens at a time); a dense first layer
    (`first_k_dense_replace`, LLaDA2.x) counts when wider."""
    dense = config.get("mlp_hidden_size") or config.get("intermediate_size") or 0
    experts = config.get("num_experts") or 0
    if not experts:
        return int(dense)
    expert = config.get("expert_intermediate_size") or config.get("moe_intermediate_size") or 0
    shared = config.get("shared_expert_intermediate_size") or 0
    shared = shared if shared > 0 else (config.get("num_shared_experts") or 0) * expert
    k = int(config["num_experts_per_tok"])
    routed = (k * expert // experts if live else k * expert) + shared
    return max(routed, int(dense) if config.get("first_k_dense_replace") else 0)


def weight_bytes(shape: Shape, precision: str) -> int:
    """Bytes of the loaded weights: `precision` float32 / bfloat16 / float16, or nf4 / int8
    (bitsandbytes: the linear layers in the blocks quantised, the rest in bfloat16)."""
    check_choice("dtype", precision, PRECISIONS)
    if precision in QUANTIZED:
        rest = shape.params - shape.quantizable
        return int(shape.quantizable * QUANTIZED[precision] + rest * DTYPE_BYTES["bfloat16"])
    return shape.params * DTYPE_BYTES[precision]


def compute_bytes(precision: str) -> int:
    """Bytes per activation element: the quantised precisions compute in bfloat16."""
    return DTYPE_BYTES["bfloat16" if precision in QUANTIZED else precision]


def cache_bytes(shape: Shape, canvas: int, precision: str) -> int:
    """One row's `DiffusionCache` (prefix and dual alike keep keys and values over the whole
    canvas): 2 N L Hkv D elements."""
    return 2 * shape.layers * canvas * shape.kv_heads * shape.head_dim * compute_bytes(precision)


def layer_bytes(shape: Shape, tokens: int, precision: str, backward: bool = False, cached: bool = False) -> int:
    """One row's live tensors inside one block forwarding `tokens` positions: the larger of the
    attention's and the feed-forward's (`attention_bytes`, `ffn_bytes`). `cached`: the forward
    fills a cache, which holds this layer's rotated k and its v (counted by `cache_bytes`)."""
    return max(attention_bytes(shape, tokens, precision, cached), ffn_bytes(shape, tokens, precision, backward))


def attention_bytes(shape: Shape, tokens: int, precision: str, cached: bool = False) -> int:
    """One row's attention at its peak, RoPE: HELD_ATTENTION [l, C], q [l, Q], k and v [l, K]
    (Q = H*D, K = Hkv*D), then rotating q (ROPE_TEMPS [l, Q]) or k (rotated q kept, ROPE_TEMPS
    [l, K]); with float32 RoPE below float32, the float32 copies of q and k on top. SDPA's fused
    kernels never hold [H, l, ctx] scores, and its inputs (q, k rotated, k and v repeated to H
    heads under GQA) and output stay below the RoPE peak unless Hkv << H."""
    c = compute_bytes(precision)
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    rope = 4 if shape.rope_fp32 else c
    copies = (q + kv) * 4 if shape.rope_fp32 and c < 4 else 0
    rotate = max(ROPE_TEMPS * rope * q, c * q + ROPE_TEMPS * rope * kv)
    sdpa = (q + kv) * c + repeat_bytes(shape, 1, precision) + q * c
    own = (q if cached else q + 2 * kv) * c  # a filled cache holds this layer's k and v
    return tokens * (HELD_ATTENTION * shape.hidden * c + own + max(copies + rotate, sdpa))


def repeat_bytes(shape: Shape, keys: int, precision: str) -> int:
    """One row's keys and values repeated from Hkv to H heads for SDPA (GQA only) over `keys`
    positions: a windowed step against a cache repeats the whole canvas's."""
    if shape.kv_heads >= shape.heads:
        return 0
    return 2 * keys * shape.heads * shape.head_dim * compute_bytes(precision)


def ffn_bytes(shape: Shape, tokens: int, precision: str, backward: bool = False) -> int:
    """One row's feed-forward at its peak (the product of the gate's activation and up):
    HELD_FFN [l, C] and LIVE_FFN [l, F] (F: `ffn_live` in a forward, all routed experts' `ffn`
    when a backward keeps them)."""
    ffn = shape.ffn if backward or not shape.ffn_live else shape.ffn_live
    return compute_bytes(precision) * tokens * (HELD_FFN * shape.hidden + LIVE_FFN * ffn)


def head_bytes(shape: Shape, positions: int, precision: str, extra: int = HEAD_EXTRA_BYTES) -> int:
    """One row's logits [l, V] in the compute dtype plus `extra` bytes per logit for what the
    strategy or likelihood derives from them."""
    return positions * shape.vocab * (compute_bytes(precision) + extra)


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}.")


def check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer.")


@dataclass(frozen=True)
class MemoryCost:
    """What a memory method adds: `resident` bytes once (its parameters), `per_row` bytes per
    request held through a decode (state, fast weights), and the MemDLM inner loop's geometry.

    Args:
        resident: bytes held for the whole run (MetaState's parameters).
        session: bytes built when a session starts and held to its end, whatever the batch
            (MetaState's fused weights, `MetaState.fused_bytes`).
        per_row: bytes per request kept across a decode (MetaState slots, one copy of MemDLM's
            fast weights).
        fast_layers: blocks the inner loop backpropagates through (0: no inner loop).
        mask_fraction: fraction of prompt tokens the first stage's loss covers (the pre-anchor
            state when there are two stages or more, else the anchor).
        anchor_fraction: fraction the later stages' loss covers (the anchor); 0 with one stage.
    """

    resident: int = 0
    session: int = 0
    per_row: int = 0
    fast_layers: int = 0
    mask_fraction: float = 0.0
    anchor_fraction: float = 0.0

    @classmethod
    def of(cls, memory) -> "MemoryCost":
        """The cost of a built memory (`NoMemory`, `MetaState`, `FastWeightMemory`, or one wrapped
        by the harness), read off its modules and config."""
        inner = getattr(memory, "inner", memory)
        if hasattr(inner, "slot_init"):  # MetaState: fp32 parameters, [M, d] state per row
            resident = sum(p.numel() * p.element_size() for p in inner.parameters())
            cfg = inner.config
            return cls(resident=resident, session=inner.fused_bytes(), per_row=4 * cfg.slots * cfg.width * 3)
        if hasattr(inner, "first_layer") and inner.config.inner_steps > 0:
            return cls._fast_weights(inner)
        return cls()

    @classmethod
    def _fast_weights(cls, memory) -> "MemoryCost":
        """MemDLM: one row's fast LoRA [r, in] + [out, r] on every target projection, counted
        from the targets the memory would wrap (it wraps them only inside a session), in the
        embedding's dtype (what `reset` builds them in)."""
        from .memory.fast_weights import TARGETS

        cfg = memory.config
        backbone = memory.backbone
        targets = [getattr(parent, name) for parent, name, _ in TARGETS[cfg.inner_targets](backbone, cfg.inner_layer_fraction)]
        linear = [getattr(m, "base_layer", m) for m in targets]
        elements = sum(cfg.inner_rank * (m.in_features + m.out_features) for m in linear)
        dtype = backbone.base_model.get_input_embeddings().weight.dtype
        anchor = cfg.inner_mask_ratio
        pre = min(1.0, anchor * cfg.pre_anchor_scale) if cfg.inner_steps > 1 else anchor
        return cls(per_row=elements * dtype.itemsize, fast_layers=len(backbone.layers) - memory.first_layer,
                   mask_fraction=pre, anchor_fraction=anchor if cfg.inner_steps > 1 else 0.0)


@dataclass(frozen=True)
class RunPlan:
    """The run settings memory depends on.

    Args:
        precision: float32, bfloat16, float16 or nf4 (4-bit weights, bfloat16 compute).
        prompt / gen_length / block_length: P, G, n.
        cache: none, prefix or dual.
        cfg: classifier-free guidance on (every forward carries twice the rows).
        mc_batch_size: likelihood rows per forward (`likelihood_peak`).
        memory: `MemoryCost` of the memory method.
    """

    precision: str = "bfloat16"
    prompt: int = 512
    gen_length: int = 128
    block_length: int = 32
    cache: str = "none"
    cfg: bool = False
    mc_batch_size: int = 32
    memory: MemoryCost = MemoryCost()

    def __post_init__(self):
        check_choice("dtype", self.precision, PRECISIONS)
        check_choice("cache", self.cache, CACHES)
        check_positive(prompt=self.prompt, block_length=self.block_length, mc_batch_size=self.mc_batch_size)
        if not isinstance(self.gen_length, int) or self.gen_length < 0:
            raise ValueError(f"gen_length={self.gen_length!r} must be a non-negative integer.")

    @property
    def canvas(self) -> int:
        return self.prompt + self.gen_length

    @property
    def rows_per_request(self) -> int:
        """Rows one request forwards: 2 under guidance (conditional and unconditional)."""
        return 2 if self.cfg else 1


def decode_row_bytes(shape: Shape, run: RunPlan) -> int:
    """Bytes one request adds at the peak of a decode: the largest of a full-canvas forward
    (every step without a cache, a block's first step with one), a windowed forward against the
    cache, the LM head on the active block, and the MemDLM inner loop (it runs before decoding);
    plus the memory method's per-request state, held throughout."""
    step = max(full_forward_row_bytes(shape, run), window_forward_row_bytes(shape, run), decode_head_bytes(shape, run))
    return max(step, inner_loop_row_bytes(shape, run)) + run.memory.per_row


def _block(run: RunPlan) -> int:
    return min(run.block_length, run.gen_length or 1)


def previous_logits_bytes(shape: Shape, run: RunPlan) -> int:
    """The previous step's logits [n, V] of one request (after guidance: one row), which the
    decode loop still holds while it forwards the next step of the same block."""
    return _block(run) * shape.vocab * compute_bytes(run.precision)


def full_forward_row_bytes(shape: Shape, run: RunPlan) -> int:
    """One request's full-canvas forward: R rows of a block's live tensors over L positions and,
    with a cache, the cache it fills; without a cache every step of a block after the first is
    one, so the previous step's logits are alive too."""
    cached = run.cache != "none"
    row = layer_bytes(shape, run.canvas, run.precision, cached=cached)
    if cached:
        return run.rows_per_request * (row + cache_bytes(shape, run.canvas, run.precision))
    return run.rows_per_request * row + previous_logits_bytes(shape, run)


def window_forward_row_bytes(shape: Shape, run: RunPlan) -> int:
    """One request's later step with a cache: R rows forwarding the window (`prefix`: the
    block and everything after it, at most G; `dual`: the block) against the cache, with the
    previous step's logits alive; under GQA, SDPA repeats the cached keys and values."""
    if run.cache == "none":
        return 0
    window = max(1, run.gen_length) if run.cache == "prefix" else _block(run)
    row = layer_bytes(shape, window, run.precision) + cache_bytes(shape, run.canvas, run.precision) \
        + repeat_bytes(shape, run.canvas, run.precision)
    return run.rows_per_request * row + previous_logits_bytes(shape, run)


def decode_head_bytes(shape: Shape, run: RunPlan) -> int:
    """One request's LM head on the active block: the fresh logits of its R rows, guidance's two
    [n, V] temporaries and, without a cache, the previous step's logits; or the strategy's
    float32 softmax and confidences (HEAD_EXTRA_BYTES a logit) on the guided logits."""
    c = compute_bytes(run.precision)
    forward = run.rows_per_request * c + (2 * c if run.cfg else 0) + (c if run.cache == "none" else 0)
    return _block(run) * shape.vocab * max(forward, c + HEAD_EXTRA_BYTES)


def inner_loop_row_bytes(shape: Shape, run: RunPlan) -> int:
    """One request's MemDLM inner loop on the prompt (`checkpointing` on, the released default):
    each fast block's input kept for the backward, then either one block recomputed with its
    gradient tensors (twice a forward's, every routed expert's at once) or the masked tokens'
    cross-entropy backward (NLL_BACKWARD_TENSORS float32 [N, V]), whichever is larger; with
    the fast weights: two copies in each stage (weights, their gradients; a stage frees the
    previous one's before its forward); the later stages' loss covers the anchor only."""
    cost = run.memory
    if not cost.fast_layers:
        return 0
    P = run.prompt
    kept = cost.fast_layers * P * shape.hidden * compute_bytes(run.precision)
    block = 2 * layer_bytes(shape, P, run.precision, backward=True)

    def stage(fraction: float, copies: int) -> int:
        nll = NLL_BACKWARD_TENSORS * 4 * math.ceil(P * fraction) * shape.vocab
        return kept + max(block, nll) + copies * cost.per_row

    first = stage(cost.mask_fraction, 2)
    later = stage(cost.anchor_fraction, 2) if cost.anchor_fraction else 0
    return max(first, later) - cost.per_row  # the held copy is `per_row` in decode_row_bytes


def likelihood_masked_fraction(run: RunPlan) -> float:
    """The largest share of continuation positions one likelihood forward masks: its
    `mc_batch_size` = b rows are one stratum, whose mask counts step evenly through 1..T, so at
    most T (b + 1) / 2 of the b T positions."""
    b = run.mc_batch_size
    return (b + 1) / (2 * b)


def likelihood_row_bytes(shape: Shape, run: RunPlan) -> int:
    """Bytes of one Monte Carlo row of a likelihood forward: a full forward of prompt plus
    continuation (`gen_length` here), its peak inside a block or at the LM head over the
    continuation: the logits (R rows; below float32 their float32 copy; under guidance two
    float32 temporaries), then the cross-entropy of the masked positions."""
    c = compute_bytes(run.precision)
    R = run.rows_per_request
    logits = max(R * (c + (4 if c < 4 else 0)), R * 4 + (8 if run.cfg else 0))
    ce = 4 + LIKELIHOOD_MASKED_BYTES * likelihood_masked_fraction(run)
    head = int(max(1, run.gen_length) * shape.vocab * max(logits, ce))
    return max(R * layer_bytes(shape, run.canvas, run.precision), head) + R * run.memory.per_row


def resident_bytes(shape: Shape, run: RunPlan) -> int:
    """What the run holds before any batch: weights and the memory method's parameters."""
    return weight_bytes(shape, run.precision) + run.memory.resident


def decode_peak(shape: Shape, run: RunPlan, batch: int) -> int:
    """Predicted peak bytes of decoding a batch of `batch` requests."""
    check_positive(batch_size=batch)
    return resident_bytes(shape, run) + run.memory.session + WORKSPACE + batch * decode_row_bytes(shape, run)


def likelihood_peak(shape: Shape, run: RunPlan) -> int:
    """Predicted peak bytes of a likelihood forward of `mc_batch_size` rows."""
    return (resident_bytes(shape, run) + run.memory.session + WORKSPACE
            + run.mc_batch_size * likelihood_row_bytes(shape, run))


def largest_batch(shape: Shape, run: RunPlan, free_bytes: int, headroom: float = 0.9, cap: int | None = None) -> int:
    """The largest decode batch whose per-row bytes fit `headroom` of `free_bytes` (memory free
    with the model already loaded); at least 1 (the out-of-memory backoff has the last word),
    at most `cap`."""
    n = max(1, (int(free_bytes * headroom) - WORKSPACE - run.memory.session) // decode_row_bytes(shape, run))
    return min(n, cap) if cap else n


def free_bytes(device) -> int:
    """Memory free for activations on `device`: CUDA's free memory, else the available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def plan_line(name: str, run: RunPlan, shape: Shape, free: int, batch: int) -> str:
    """The one-line plan printed before a run."""
    return (f"memory plan: {name}, {run.precision}, weights {human_bytes(weight_bytes(shape, run.precision))}, "
            f"{human_bytes(decode_row_bytes(shape, run))} per request (canvas {run.canvas}, cache={run.cache}"
            f"{', cfg x2' if run.cfg else ''}), free {human_bytes(free)} -> batch_size {batch}")


def human_bytes(n: int) -> str:
    """1.5 GiB / 41.8 MiB: GiB from 1 GiB up, MiB below (a tiny model's weights are not 0.00 GiB)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def precision_of(backbone, load_in_4bit: bool = False, load_in_8bit: bool = False) -> str:
    """The `RunPlan.precision` of a loaded backbone."""
    if load_in_4bit or load_in_8bit:
        return "nf4" if load_in_4bit else "int8"
    dtype = next(p for p in backbone.model.parameters() if p.is_floating_point()).dtype
    return str(dtype).replace("torch.", "")


def harness_batch(backbone, memory, args, max_length: int, device, name: str) -> tuple[int, str]:
    """The harness's decode batch size and its one-line plan.

    `batch_size=auto`: the predicted largest batch for the worst canvas of the run (`max_length`
    tokens, `cache` and guidance as set), capped by `max_batch_size`; a fixed batch size is kept
    and only reported. `args` is the harness's `ModelArgs`.
    """
    from .decoding.config import DecodeConfig

    gen = args.gen_length or DecodeConfig.gen_length
    run = RunPlan(precision=precision_of(backbone, args.load_in_4bit, args.load_in_8bit),
                  prompt=max(1, max_length - gen), gen_length=gen,
                  block_length=args.block_length or gen, cache=args.cache,
                  cfg=args.cfg_scale > 0, mc_batch_size=args.mc_batch_size, memory=MemoryCost.of(memory))
    shape = Shape.from_config(backbone.config.to_dict(), backbone.family)
    free = free_bytes(device)
    requested = str(args.batch_size)
    if requested.startswith("auto"):
        batch = largest_batch(shape, run, free, cap=args.max_batch_size)
    else:
        batch = int(float(requested))
    return batch, plan_line(name, run, shape, free, batch)
