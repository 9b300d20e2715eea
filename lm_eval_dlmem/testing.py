"""Tiny checkpoints in the official on-disk formats, for tests, demos and benchmarks.

`make_tiny_checkpoint(family, path)` writes what a hub snapshot of the real model holds:
config.json with the official keys and model_type, model.safetensors with the official parameter
names (random weights, deterministic by seed), and a fast tokenizer built offline with the
`tokenizers` library that carries the family's special tokens, mask token and chat template.
"""

from __future__ import annotations

import os

import torch

from .backbones.spec import FAMILIES, get_spec

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

# The tiny sizes of the built-in families by name (benchmarks read it; code reads `FamilySpec.tiny_sizes`).
TINY_SIZES = {name: dict(spec.tiny_sizes) for name, spec in FAMILIES.items()}


def build_tokenizer(family: str, bpe_vocab: int = 384, total_vocab: int | None = None):
    """A byte-level BPE fast tokenizer with the family's special tokens and chat template.

    `total_vocab` pads the vocabulary with unused reserved tokens (for LM-head-realistic sizes).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .training.tokenizer import fast_tokenizer

    spec = get_spec(family)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line], trainer=trainer)
    fast = fast_tokenizer(tok, spec, spec.special_tokens)
    if total_vocab and total_vocab > len(fast):
        fast.add_tokens([f"<|reserved_{i}|>" for i in range(total_vocab - len(fast))], special_tokens=True)
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
    return get_spec(family).resolve(tokenizer).official_config_dict(vocab_size, sizes)


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
    spec = get_spec(family)
    check_tiny_sizes(family, {**spec.tiny_sizes, **sizes})
    if vocab_size is not None and vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be a positive integer (or None for the tokenizer's size).")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer(family, total_vocab=vocab_size)
    vocab = vocab_size or -(-len(tokenizer) // 64) * 64
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} tokens).")
    config_dict = tiny_config(family, vocab, tokenizer, **sizes)
    cls = spec.load_class()
    config = cls.config_class(**config_dict)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        # routers' expert biases start at zero; random ones make the biased selection matter
        # (LLaDA2.x; the tiny LLaDA-MoE has no expert_bias, so its weights are unchanged)
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.normal_(0.0, 0.1)
    model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
