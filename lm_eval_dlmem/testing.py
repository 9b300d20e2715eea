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
    # layer 0 dense, layer 1 MoE; 8 experts in 4 groups of which 2 are searched, as in the
    # released 256-expert / 8-group / top-4-group layout
    "llada2": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32,
                   num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                   num_shared_experts=1, first_k_dense_replace=1),
}

# Special tokens of each family, in the order they are added after the byte-level vocabulary.
_SPECIALS = {
    "llada": ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>",
              "<|end_header_id|>", "<|eot_id|>"],
    "dream": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"],
    "llada_moe": ["<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"],
    "llada2": ["<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"],
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
    elif family == "llada2":
        base = _llada2_config(vocab_size, spec)
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


def _llada2_config(vocab_size: int, spec) -> dict:
    """The keys of the hub's LLaDA2.x-mini config.json, including those only the hub file has
    (`score_function`, `norm_topk_prob`, `router_dtype`, ...), which the official code ignores."""
    return dict(
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
        family: `llada`, `dream`, `llada_moe` or `llada2`.
        path: output directory (created).
        seed: weights are drawn from torch's generator seeded with this.
        vocab_size: model vocabulary; the tokenizer is padded with reserved tokens to match.
            Default: the tokenizer's size rounded up to a multiple of 64.
        dtype: dtype the weights are stored in.
        **sizes: overrides of the official config keys (e.g. `d_model=128` for LLaDA,
            `hidden_size=128` for Dream/MoE/LLaDA2, `n_layers` / `num_hidden_layers`).
    """
    from .backbones.loading import model_class
    from .backbones.llada import LLaDAConfig
    from .backbones.dream import DreamConfig
    from .backbones.llada_moe import LLaDAMoEConfig
    from .backbones.llada2 import LLaDA2MoeConfig

    get_spec(family)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer(family, total_vocab=vocab_size)
    vocab = vocab_size or -(-len(tokenizer) // 64) * 64
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} tokens).")
    config_dict = tiny_config(family, vocab, tokenizer, **sizes)
    config_cls = {"llada": LLaDAConfig, "dream": DreamConfig, "llada_moe": LLaDAMoEConfig,
                  "llada2": LLaDA2MoeConfig}[family]
    config = config_cls(**config_dict)
    torch.manual_seed(seed)
    model = model_class(family)(config)
    with torch.no_grad():
        # routers' expert biases start at zero; random ones make the biased selection matter
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.normal_(0.0, 0.1)
    model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
