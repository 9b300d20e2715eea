"""Every per-family fact, as data: special tokens, logit shift, chat template, model class,
config.json names, context length, BOS and FFN conventions, and what a tiny test checkpoint needs.

Code elsewhere reads these fields instead of testing the family name, so adding a family is its
model module, its `FamilySpec` here, and its tests. The ids below are the official checkpoints' ids. A `FamilySpec` is resolved against the actual
tokenizer at load time (`FamilySpec.resolve`), so tiny test checkpoints with small vocabularies
work through the same code: tokens are looked up by *string*, the official id is only a fallback.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

DREAM_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LING_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<role>SYSTEM</role>detailed thinking off<|role_end|>"
    "{% endif %}"
    "{% for message in messages %}"
    "{% set role = {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT'}[message['role']] %}"
    "<role>{{ role }}</role>{{ message['content'] }}<|role_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)

# LLaDA2.x ships the Ling-2.0 template (tools omitted here): the system turn always exists and
# carries the thinking switch, a user-given system prompt goes in front of it.
LLADA2_CHAT_TEMPLATE = (
    "<role>SYSTEM</role>"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n' }}{% endif %}"
    "detailed thinking off<|role_end|>"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<role>HUMAN</role>{{ message['content'] }}<|role_end|>"
    "{% elif message['role'] == 'system' and not loop.first %}<role>SYSTEM</role>{{ message['content'] }}<|role_end|>"
    "{% elif message['role'] == 'assistant' %}<role>ASSISTANT</role>{{ message['content'] }}<|role_end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)


class SizeKeys(NamedTuple):
    """config.json names of the sizes every family has (LLaDA keeps OLMo's names)."""

    hidden: str
    heads: str
    kv_heads: str
    layers: str


@dataclass(frozen=True)
class FamilySpec:
    """What differs between backbone families, as data.

    Args:
        name: family key (`llada`, `dream`, `llada_moe`, `llada2`).
        mask_token / mask_id: the [MASK] token string and the official checkpoint's id.
        eos_token / eos_id: end of text.
        eot_token / eot_id: end of turn (chat models), or None.
        bos_token: beginning of text, prepended when the tokenizer does not add it itself.
        logit_shift: True when logits[i] of the raw model predicts token i+1 (Dream, AR-initialised).
            Only `Backbone` reads it (`logits`, `align`, `source_positions`, `forwarded`).
        chat_template: used when the tokenizer ships none (LLaDA Base, tiny checkpoints).
        template_tokens: special tokens the chat template needs as single tokens.
        size_keys: config.json names of hidden size, attention heads, key/value heads, layers.
        config_keys: keys every config.json of the family holds: a config without them is not
            of this family, whatever `family=` says (its class would fill in 7B-size defaults).
        model_class: `module:Class` of the model in `lm_eval_dlmem.backbones`, imported lazily
            (`load_class`) so that reading a spec imports no modeling code.
        official_config: `module:function` in `lm_eval_dlmem.backbones` returning the official
            config.json keys for `(resolved spec, vocab_size, sizes)` (used by tiny checkpoints).
        special_tokens: the official tokenizer's special tokens, in the order a tiny tokenizer
            adds them after its byte-level vocabulary.
        tiny_sizes: config.json sizes of the tiny test checkpoint (`testing.make_tiny_checkpoint`).
        default_max_length: context length when config.json names none in `max_length_keys`
            (Dream's README: 2048; its max_position_embeddings is RoPE's range, not a trained length).
        max_length_keys: config.json keys holding the trained context length, first present wins.
        bos_by_default: prepend `bos_token` to every request when `add_bos_token` is not given
            (Dream's tokenizer does not add it, its training data starts with it).
        ffn_names: the (gate, up, down) projection names of the family's feed-forward blocks
            (MemDLM `inner_targets=ffn` puts fast weights on them).
        shared_expert: dotted path from a decoder block to its always-on shared-expert FFN, or
            None (LLaDA-MoE keeps it on the block as `shared_expert`, LLaDA2.x inside the MoE
            as `mlp.shared_experts`); MemDLM `inner_targets=ffn` adds its projections.
        model_types / architectures: config.json `model_type` strings and `architectures` entries
            that name this family unambiguously (`detect_family` checks them before the MoE-key
            rules that tell LLaDA from LLaDA-MoE).
        block_causal: attention is block-causal while decoding (LLaDA2.x): the decoder passes its
            block length to the forward; without one the forward attends bidirectionally.
        default_strategy: the decoding strategy the harness uses when neither the preset nor
            `strategy=` names one; None = the harness default (`llada`).
        default_block_length: a block-causal family's trained block length, used when
            `block_length=` is unset (decoding and the block-wise likelihood); None = one block.
    """

    name: str
    mask_token: str
    mask_id: int
    eos_token: str
    eos_id: int
    eot_token: str | None
    eot_id: int | None
    bos_token: str | None
    bos_id: int | None
    logit_shift: bool
    chat_template: str
    template_tokens: tuple[str, ...] = field(default_factory=tuple)
    size_keys: SizeKeys = SizeKeys("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    config_keys: tuple[str, ...] = ()
    model_class: str = ""
    official_config: str = ""
    special_tokens: tuple[str, ...] = ()
    tiny_sizes: Mapping[str, Any] = field(default_factory=dict, hash=False)
    default_max_length: int = 4096
    max_length_keys: tuple[str, ...] = ("max_sequence_length",)
    bos_by_default: bool = False
    ffn_names: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    shared_expert: str | None = None
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    block_causal: bool = False
    default_strategy: str | None = None
    default_block_length: int | None = None

    def resolve(self, tokenizer) -> "FamilySpec":
        """Return a copy whose ids are the ones `tokenizer` really uses for the token strings."""
        vocab = tokenizer.get_vocab()

        def lookup(token, default):
            if token is None:
                return None
            return vocab.get(token, default)

        mask_id = lookup(self.mask_token, self.mask_id)
        eos_id = lookup(self.eos_token, self.eos_id)
        if self.mask_token not in vocab and self.mask_id >= len(vocab) + 1024:
            raise ValueError(
                f"The tokenizer has no {self.mask_token!r} token and the official mask id {self.mask_id} "
                f"is outside its vocabulary ({len(vocab)} tokens); this tokenizer does not belong to a "
                f"{self.name} checkpoint. Load the tokenizer that ships with the model."
            )
        return dataclasses.replace(
            self,
            mask_id=mask_id,
            eos_id=eos_id,
            eot_id=lookup(self.eot_token, self.eot_id),
            bos_id=lookup(self.bos_token, self.bos_id),
        )

    def load_class(self):
        """The family's `PreTrainedModel` subclass (imported on first use)."""
        return _import(self.model_class)

    def official_config_dict(self, vocab_size: int, sizes: Mapping[str, Any]) -> dict:
        """config.json contents with the official keys and model_type; `sizes` override any key."""
        return _import(self.official_config)(self, vocab_size, {**self.tiny_sizes, **sizes})

    def max_length(self, config) -> int:
        """The context length a checkpoint was trained for: the first of `max_length_keys` that
        its config sets, else `default_max_length`."""
        for key in self.max_length_keys:
            if getattr(config, key, None):
                return int(getattr(config, key))
        return self.default_max_length

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end a generation (EOS, and EoT for chat models)."""
        return tuple(i for i in (self.eos_id, self.eot_id) if i is not None)


LLADA = FamilySpec(
    name="llada",
    mask_token="<|mdm_mask|>",
    mask_id=126336,
    eos_token="<|endoftext|>",
    eos_id=126081,
    eot_token="<|eot_id|>",
    eot_id=126348,
    bos_token="<|startoftext|>",
    bos_id=126080,
    logit_shift=False,
    chat_template=LLADA_CHAT_TEMPLATE,
    template_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    size_keys=SizeKeys("d_model", "n_heads", "n_kv_heads", "n_layers"),
    config_keys=("d_model", "n_heads", "n_layers"),
    model_class="llada:LLaDAModelLM",
    official_config="llada:official_config",
    special_tokens=("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>"),
    tiny_sizes=dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=128),
    default_max_length=4096,
    ffn_names=("ff_proj", "up_proj", "ff_out"),  # on the block itself: ff_out is the down projection
)

DREAM = FamilySpec(
    name="dream",
    mask_token="<|mask|>",
    mask_id=151666,
    eos_token="<|endoftext|>",
    eos_id=151643,
    eot_token="<|im_end|>",
    eot_id=151645,
    bos_token="<|beginoftext|>",
    bos_id=151665,
    logit_shift=True,
    chat_template=DREAM_CHAT_TEMPLATE,
    template_tokens=("<|im_start|>", "<|im_end|>"),
    config_keys=("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"),
    model_class="dream:DreamModel",
    official_config="dream:official_config",
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"),
    tiny_sizes=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=2, intermediate_size=128),
    default_max_length=2048,
    bos_by_default=True,
)

# LLaDA-MoE and LLaDA2.x share the Ling tokenizer: the same ids, no BOS, the same role markers.
_LING_TOKENS = dict(
    mask_token="<|mask|>",
    mask_id=156895,
    eos_token="<|endoftext|>",
    eos_id=156892,
    eot_token="<|role_end|>",
    eot_id=None,
    bos_token=None,
    bos_id=None,
    logit_shift=False,
    template_tokens=("<role>", "</role>", "<|role_end|>"),
    special_tokens=("<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"),
)

LLADA_MOE = FamilySpec(
    name="llada_moe",
    **_LING_TOKENS,
    chat_template=LING_CHAT_TEMPLATE,
    config_keys=("hidden_size", "num_attention_heads", "num_hidden_layers", "num_experts"),
    model_class="llada_moe:LLaDAMoEModelLM",
    official_config="llada_moe:official_config",
    tiny_sizes=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                    num_hidden_layers=2, expert_intermediate_size=32, dense_intermediate_size=128,
                    num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=None),
    default_max_length=8192,
    max_length_keys=("max_sequence_length", "max_position_embeddings"),
    shared_expert="shared_expert",
)

LLADA2 = FamilySpec(
    name="llada2",
    **_LING_TOKENS,
    chat_template=LLADA2_CHAT_TEMPLATE,
    config_keys=("hidden_size", "num_attention_heads", "num_hidden_layers", "num_experts",
                 "moe_intermediate_size"),
    model_class="llada2:LLaDA2MoeModelLM",
    official_config="llada2:official_config",
    # layer 0 dense, layer 1 MoE; 8 experts in 4 groups of which 2 are searched, as in the
    # released 256-expert / 8-group / top-4-group layout
    tiny_sizes=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32,
                    num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                    num_shared_experts=1, first_k_dense_replace=1),
    # the released configs' max_position_embeddings (32768 for LLaDA2.0-mini / 2.1-mini)
    default_max_length=32768,
    max_length_keys=("max_position_embeddings",),
    shared_expert="mlp.shared_experts",
    model_types=("llada2_moe", "llada21_moe", "llada2_moe_21"),
    architectures=("LLaDA2MoeModelLM",),
    block_causal=True,
    default_strategy="llada2",
    default_block_length=32,  # the official samplers' block_size, and MemDLM's eval
)

FAMILIES: dict[str, FamilySpec] = {s.name: s for s in (LLADA, DREAM, LLADA_MOE, LLADA2)}


def _import(path: str):
    """`module:name` inside `lm_eval_dlmem.backbones` -> the object."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def get_spec(family: str) -> FamilySpec:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(
            f"Unknown backbone family {family!r}; choose one of {sorted(FAMILIES)}."
        ) from None
