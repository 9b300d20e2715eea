"""Per-family facts the decoder and harness need: special tokens, logit shift, chat template.

The ids below are the official checkpoints' ids. A `FamilySpec` is resolved against the actual
tokenizer at load time (`FamilySpec.resolve`), so tiny test checkpoints with small vocabularies
work through the same code: tokens are looked up by *string*, the official id is only a fallback.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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
        position_ids_from_mask: pass `cumsum(mask)-1` as position ids for padded rows (Dream's sampler
            does; LLaDA's forward takes no position ids, so it stays `arange`).
        chat_template: used when the tokenizer ships none (LLaDA Base, tiny checkpoints).
        template_tokens: special tokens the chat template needs as single tokens.
        model_types / architectures: config.json `model_type` strings and `architectures` entries
            that name this family unambiguously (`detect_family` checks them before the MoE-key
            rules that tell LLaDA from LLaDA-MoE).
        block_causal: attention is block-causal while decoding (LLaDA2.x): the decoder passes its
            block length to the forward; without one the forward attends bidirectionally.
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
    position_ids_from_mask: bool
    chat_template: str
    template_tokens: tuple[str, ...] = field(default_factory=tuple)
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    block_causal: bool = False

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
    position_ids_from_mask=False,
    chat_template=LLADA_CHAT_TEMPLATE,
    template_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
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
    position_ids_from_mask=True,
    chat_template=DREAM_CHAT_TEMPLATE,
    template_tokens=("<|im_start|>", "<|im_end|>"),
)

LLADA_MOE = FamilySpec(
    name="llada_moe",
    mask_token="<|mask|>",
    mask_id=156895,
    eos_token="<|endoftext|>",
    eos_id=156892,
    eot_token="<|role_end|>",
    eot_id=None,
    bos_token=None,
    bos_id=None,
    logit_shift=False,
    position_ids_from_mask=False,
    chat_template=LING_CHAT_TEMPLATE,
    template_tokens=("<role>", "</role>", "<|role_end|>"),
)

LLADA2 = FamilySpec(
    name="llada2",
    mask_token="<|mask|>",
    mask_id=156895,
    eos_token="<|endoftext|>",
    eos_id=156892,
    eot_token="<|role_end|>",
    eot_id=None,
    bos_token=None,
    bos_id=None,
    logit_shift=False,
    position_ids_from_mask=True,
    chat_template=LLADA2_CHAT_TEMPLATE,
    template_tokens=("<role>", "</role>", "<|role_end|>"),
    model_types=("llada2_moe", "llada21_moe", "llada2_moe_21"),
    architectures=("LLaDA2MoeModelLM",),
    block_causal=True,
)

FAMILIES: dict[str, FamilySpec] = {s.name: s for s in (LLADA, DREAM, LLADA_MOE, LLADA2)}


def get_spec(family: str) -> FamilySpec:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(
            f"Unknown backbone family {family!r}; choose one of {sorted(FAMILIES)}."
        ) from None
