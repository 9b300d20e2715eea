"""Peak-memory model of a run: what a backbone, its cache, its activations and its memory method
need at the worst moment of a decode or likelihood batch, from config.json alone.

    peak    = weights [+ MetaState parameters] + WORKSPACE + B * per_row        (linear in B)
    per_row = max(R * max(block's live tensors + cache, LM head on the active block),
                  MemDLM inner loop) + R * (MetaState state | MemDLM fast weights)

R = 1 row per request, 2 under classifier-free guidance. Sizes: P prompt, G generation,
L = P + G canvas, n block length, C hidden, F feed-forward width a token passes through (MoE:
top-k experts plus the shared ones), H heads, Hkv key/value heads, D head dim, V vocabulary,
N layers.

The weights are exact (the model built on the meta device and its parameters counted); the
per-row terms count the tensors the code keeps alive, with the live-tensor counts below checked
against measured peaks (the H200 rows of benchmarks/results/gpu_check_h200.md within 2%,
`benchmarks/memory_check.py` on CPU; benchmarks/README.md). `batch_size=auto` starts at
`largest_batch(free memory)`; the harness keeps halving on out-of-memory as the safety net.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backbones.spec import get_spec

GIB = 1024 ** 3

# Live tensors at a layer's peak, in units of [R, l, C], [R, l, Hkv*D] and [R, l, F] in the
# compute dtype: residual, normed input, q, the RoPE temporaries, k and v repeated to every head,
# attention output / k and v as projected / gate (its activation), up and their product. Fitted
# to measured peaks (benchmarks/memory_check.py); SDPA's fused kernels (CPU flash, CUDA flash /
# memory-efficient) never hold [H, l, ctx] scores.
LIVE_HIDDEN = 6
LIVE_KV = 2
LIVE_FFN = 3
# Batch-independent bytes of a decode or likelihood call (canvas, masks, allocator and kernel
# workspace): measured 6 MiB on CPU.
WORKSPACE = 8 * 2 ** 20
# LM head at one decode step, bytes per logit on top of the logits themselves: the strategies'
# float32 softmax and its confidences.
HEAD_EXTRA_BYTES = 8
# The likelihood's float32 log-softmax of the logits (plus their float32 copy below float32).
LIKELIHOOD_HEAD_BYTES = 4
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
                   ffn_live=ffn_width(config, live=True))


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


def layer_bytes(shape: Shape, tokens: int, precision: str, backward: bool = False) -> int:
    """One row's live tensors inside one block forwarding `tokens` positions: LIVE_HIDDEN [l, C],
    LIVE_KV [l, Hkv*D] and LIVE_FFN [l, F] tensors in the compute dtype (F: `ffn_live` in a
    forward, all routed experts' `ffn` when a backward keeps them)."""
    ffn = shape.ffn if backward or not shape.ffn_live else shape.ffn_live
    kv = shape.kv_heads * shape.head_dim
    return compute_bytes(precision) * tokens * (LIVE_HIDDEN * shape.hidden + LIVE_KV * kv + LIVE_FFN * ffn)


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
    forwarded row (state, fast weights), and the MemDLM inner loop's geometry.

    Args:
        resident: bytes held for the whole run (MetaState's parameters).
        per_row: bytes per row kept across a decode (MetaState slots, MemDLM fast weights with
            their gradient and SGD update).
        fast_layers: blocks the inner loop backpropagates through (0: no inner loop).
        mask_fraction: fraction of prompt tokens the inner loop's loss covers (pre-anchor states).
    """

    resident: int = 0
    per_row: int = 0
    fast_layers: int = 0
    mask_fraction: float = 0.0

    @classmethod
    def of(cls, memory) -> "MemoryCost":
        """The cost of a built memory (`NoMemory`, `MetaState`, `FastWeightMemory`, or one wrapped
        by the harness), read off its modules and config."""
        inner = getattr(memory, "inner", memory)
        if hasattr(inner, "slot_init"):  # MetaState: fp32 parameters, [M, d] state per row
            resident = sum(p.numel() * p.element_size() for p in inner.parameters())
            cfg = inner.config
            return cls(resident=resident, per_row=4 * cfg.slots * cfg.width * 3)
        if hasattr(inner, "first_layer") and inner.config.inner_steps > 0:
            r, cfg = inner.config.inner_rank, inner.config
            fast = sum(r * (m.in_features + m.out_features) for m in inner.layers)
            blocks = len(inner.backbone.layers) - inner.first_layer
            return cls(per_row=4 * fast * 3, fast_layers=blocks,
                       mask_fraction=min(1.0, cfg.inner_mask_ratio * cfg.pre_anchor_scale))
        return cls()


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
    """Bytes one request adds at the peak of a decode. The worst forward is a full-canvas one
    (every step without a cache; each block's first step with one); its peak is inside a block
    or at the LM head on the active block, whichever is larger (they are never alive together),
    plus the cache over the canvas. The MemDLM inner loop runs before decoding, so the larger of
    the two counts; the memory method's per-row state is held throughout."""
    L, rows = run.canvas, run.rows_per_request
    block = min(run.block_length, run.gen_length or 1)
    layer = layer_bytes(shape, L, run.precision)
    if run.cache != "none":  # the block's own keys/values are the ones the cache keeps
        layer += cache_bytes(shape, L, run.precision) - LIVE_KV * L * shape.kv_heads * shape.head_dim * \
            compute_bytes(run.precision)
    step = max(layer, head_bytes(shape, block, run.precision))
    return max(rows * step, inner_loop_row_bytes(shape, run)) + rows * run.memory.per_row


def inner_loop_row_bytes(shape: Shape, run: RunPlan) -> int:
    """One request's MemDLM inner loop on the prompt (`checkpointing` on, the released default):
    each fast block's input kept for the backward, then either one block recomputed with its
    gradient tensors (twice a forward's, every routed expert's at once) or the float32 logits,
    softmax and gradient of the masked tokens' cross-entropy [P * mask_fraction, V], whichever
    is larger."""
    cost = run.memory
    if not cost.fast_layers:
        return 0
    P = run.prompt
    kept = cost.fast_layers * P * shape.hidden * compute_bytes(run.precision)
    block = 2 * layer_bytes(shape, P, run.precision, backward=True)
    nll = 3 * 4 * math.ceil(P * cost.mask_fraction) * shape.vocab
    return kept + max(block, nll)


def likelihood_row_bytes(shape: Shape, run: RunPlan) -> int:
    """Bytes of one Monte Carlo row of a likelihood forward: a full forward of prompt plus
    continuation (`gen_length` here), its peak inside a block or at the float32 logits and
    log-softmax over the continuation."""
    step = max(layer_bytes(shape, run.canvas, run.precision),
               head_bytes(shape, max(1, run.gen_length), run.precision,
                          extra=LIKELIHOOD_HEAD_BYTES + (4 if compute_bytes(run.precision) < 4 else 0)))
    return run.rows_per_request * (step + run.memory.per_row)


def resident_bytes(shape: Shape, run: RunPlan) -> int:
    """What the run holds before any batch: weights and the memory method's parameters."""
    return weight_bytes(shape, run.precision) + run.memory.resident


def decode_peak(shape: Shape, run: RunPlan, batch: int) -> int:
    """Predicted peak bytes of decoding a batch of `batch` requests."""
    check_positive(batch_size=batch)
    return resident_bytes(shape, run) + WORKSPACE + batch * decode_row_bytes(shape, run)


def likelihood_peak(shape: Shape, run: RunPlan) -> int:
    """Predicted peak bytes of a likelihood forward of `mc_batch_size` rows."""
    return resident_bytes(shape, run) + WORKSPACE + run.mc_batch_size * likelihood_row_bytes(shape, run)


def largest_batch(shape: Shape, run: RunPlan, free_bytes: int, headroom: float = 0.9, cap: int | None = None) -> int:
    """The largest decode batch whose per-row bytes fit `headroom` of `free_bytes` (memory free
    with the model already loaded); at least 1 (the out-of-memory backoff has the last word),
    at most `cap`."""
    n = max(1, (int(free_bytes * headroom) - WORKSPACE) // decode_row_bytes(shape, run))
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
    return (f"memory plan: {name}, {run.precision}, weights {weight_bytes(shape, run.precision) / GIB:.2f} GiB, "
            f"{decode_row_bytes(shape, run) / 2**20:.1f} MiB per request (canvas {run.canvas}, cache={run.cache}"
            f"{', cfg x2' if run.cfg else ''}), free {free / GIB:.1f} GiB -> batch_size {batch}")


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
