"""Tiny checkpoints in the official on-disk formats, for tests, demos and benchmarks.

`make_tiny_checkpoint(family, path)` writes what a hub snapshot of the real model holds:
config.json with the official keys and model_type, model.safetensors with the official parameter
names (random weights, deterministic by seed), and a fast tokenizer built offline with the
`tokenizers` library that carries the family's special tokens, mask token and chat template.
"""

from __future__ import annotations

import os

import torch

from .backbones.spec import get_spec

# A small English corpus for the byte-level BPE merges: enough that words become a few tokens.
_CORPUS = """
The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.
One of the special magic numbers for the key is: 1234567. What is the special magic number?
Mary moved to the bathroom. John went to the hallway. Daniel travelled to the office.
Sandra journeyed to the garden. Where is Mary? Mary is in the bathroom. The answer is
the kitchen. The bedroom is north of the garden. Fred gave the football to Bill.
VAR ABCDE = 12345 VAR FGHIJ = VAR ABCDE Question: Find all variables that are assigned the value.
Answer the question based on the given documents. Only give me the answer and do not output
any other words. Below is a numbered list of words. Memorize the ones that appear most often.
apple banana cherry table chair window river mountain forest ocean people person location
first second third fourth fifth zero one two three four five six seven eight nine ten
"""

TINY_SIZES = {
    "llada": dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=128),
    "dream": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, intermediate_size=128),
    "llada_moe": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                      num_hidden_layers=2, expert_intermediate_size=32, dense_intermediate_size=128,
                      num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=None),
}

# Special tokens of each family, in the order they are added after the byte-level vocabulary.
_SPECIALS = {
    "llada": ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>",
              "<|end_header_id|>", "<|eot_id|>"],
    "dream": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"],
    "llada_moe": ["<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"],
}


def build_tokenizer(family: str, bpe_vocab: int = 384, total_vocab: int | None = None):
    """A byte-level BPE fast tokenizer with the family's special tokens and chat template.

    `total_vocab` pads the vocabulary with unused reserved tokens (for LM-head-realistic sizes).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = get_spec(family)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line], trainer=trainer)
    specials = _SPECIALS[family]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos_token,
        eos_token=spec.eos_token,
        pad_token=spec.eos_token,
        mask_token=spec.mask_token,
        additional_special_tokens=[t for t in specials if t not in (spec.bos_token, spec.eos_token, spec.mask_token)],
        clean_up_tokenization_spaces=False,
    )
    if total_vocab and total_vocab > len(fast):
        fast.add_tokens([f"<|reserved_{i}|>" for i in range(total_vocab - len(fast))], special_tokens=True)
    fast.chat_template = spec.chat_template
    fast.padding_side = "left"
    return fast


def check_tiny_sizes(family: str, sizes: dict, labels: dict | None = None) -> None:
    """Refuse sizes the family's modules cannot be built or run with, before anything is written:
    a checkpoint made with them would load and then fail deep inside attention.

    Args:
        family: `llada`, `dream` or `llada_moe`.
        sizes: config keys and values (TINY_SIZES merged with the overrides).
        labels: how the user spelled a key (e.g. `{"d_model": "--hidden"}`), for the message.

    Raises:
        ValueError: a size (hidden, heads, layers, `*_size`, `num_*`, `n_*`) is not a positive
            integer, the hidden size does not split into the heads at an even head dim (rotary
            embeddings rotate pairs), or the heads do not split into the key/value heads.
    """
    labels = labels or {}

    def name(key: str) -> str:
        return labels.get(key, key)

    keys = get_spec(family).size_keys
    for key, value in sizes.items():
        counts = key in keys or key.startswith(("n_", "num_")) or key.endswith("_size")
        if counts and value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{name(key)}={value!r} must be a positive integer.")
    hidden, heads = sizes[keys.hidden], sizes[keys.heads]
    kv_heads = sizes.get(keys.kv_heads) or heads
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(
            f"{name(keys.hidden)}={hidden} does not split into {name(keys.heads)}={heads} attention heads of an "
            f"even size (rotary embeddings rotate pairs of each head's dims); use a multiple of {2 * heads}, "
            f"e.g. {16 * heads}."
        )
    if heads % kv_heads:
        raise ValueError(f"{name(keys.heads)}={heads} attention heads do not split into "
                         f"{name(keys.kv_heads)}={kv_heads} key/value heads; use a divisor of {heads}.")


def tiny_config(family: str, vocab_size: int, tokenizer, **sizes) -> dict:
    """config.json contents with the official keys for `family`, tiny sizes."""
    spec = get_spec(family).resolve(tokenizer)
    s = {**TINY_SIZES[family], **sizes}
    if family == "llada":
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
    elif family == "dream":
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
    else:
        n_layers = s["num_hidden_layers"]
        base = dict(
            architectures=["LLaDAMoEModelLM"], model_type="llada",
            auto_map={"AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
                      "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                      "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
            attention_bias=False, attention_dropout=0.0, clip_qkv=None, hidden_act="silu",
            initializer_range=0.02, max_position_embeddings=8192, moe_layer_freq=[1] * n_layers,
            moe_router_enable_expert_bias=None, moe_router_score_function=None, norm_topk_prob=None,
            output_router_logits=False, partial_rotary_factor=1, qk_layernorm=True, rms_norm_eps=1e-5,
            rope_scaling=None, rope_theta=50000, router_aux_loss_coef=0.01, tie_word_embeddings=False,
            use_cache=False, vocab_size=vocab_size, eos_token_id=spec.eos_id, pad_token_id=spec.eos_id,
        )
    # `sizes` may override any official key (rope_theta, partial_rotary_factor, moe_layer_freq, ...)
    return {**base, **s}


def make_tiny_checkpoint(
    family: str,
    path: str | os.PathLike,
    seed: int = 0,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    **sizes,
) -> str:
    """Write a tiny official-format checkpoint directory for `family` and return its path.

    Args:
        family: `llada`, `dream` or `llada_moe`.
        path: output directory (created).
        seed: weights are drawn from torch's generator seeded with this.
        vocab_size: model vocabulary; the tokenizer is padded with reserved tokens to match.
            Default: the tokenizer's size rounded up to a multiple of 64.
        dtype: dtype the weights are stored in.
        **sizes: overrides of the official config keys (e.g. `d_model=128` for LLaDA,
            `hidden_size=128` for Dream/MoE, `n_layers` / `num_hidden_layers`).
    """
    from .backbones.loading import model_class
    from .backbones.llada import LLaDAConfig
    from .backbones.dream import DreamConfig
    from .backbones.llada_moe import LLaDAMoEConfig

    get_spec(family)
    check_tiny_sizes(family, {**TINY_SIZES[family], **sizes})
    if vocab_size is not None and vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be a positive integer (or None for the tokenizer's size).")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer(family, total_vocab=vocab_size)
    vocab = vocab_size or -(-len(tokenizer) // 64) * 64
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} tokens).")
    config_dict = tiny_config(family, vocab, tokenizer, **sizes)
    config_cls = {"llada": LLaDAConfig, "dream": DreamConfig, "llada_moe": LLaDAMoEConfig}[family]
    config = config_cls(**config_dict)
    torch.manual_seed(seed)
    model = model_class(family)(config).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
