"""The tiny default's tokenizer: a small byte-level BPE with LLaDA's special tokens and chat template.

Byte-level, so any text encodes (no unknown tokens), and digits are split one per token before
the BPE runs, so a 7-digit needle value is always 7 tokens a model can copy one by one. The six
special tokens come first, in LLaDA's order (`<|startoftext|>` 0, `<|endoftext|>` 1,
`<|mdm_mask|>` 2, `<|start_header_id|>` 3, `<|end_header_id|>` 4, `<|eot_id|>` 5), and the chat
template is LLaDA's, so `FamilySpec.resolve` finds every id by name.
"""

from __future__ import annotations

from typing import Iterable

from ..backbones.spec import LLADA

LLADA_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, model_max_length: int = 4096):
    """Train the BPE on `texts` and wrap it as a transformers fast tokenizer.

    Args:
        texts: training corpus (a few thousand synthetic documents is plenty).
        vocab_size: total vocabulary, specials and the 256 byte symbols included.
        model_max_length: recorded in the tokenizer config.

    Returns:
        `PreTrainedTokenizerFast` with bos/eos/pad/mask set, LLaDA's chat template, left padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 512:
        raise ValueError(f"vocab_size={vocab_size} is too small: 256 byte symbols + specials need >= 512.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(LLADA_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return fast_tokenizer(tok, LLADA, LLADA_SPECIALS, model_max_length=model_max_length)


def fast_tokenizer(tok, spec, specials, **kwargs):
    """A trained `tokenizers.Tokenizer` as the family's transformers fast tokenizer: its BOS / EOS /
    mask tokens (EOS also pads), the other `specials` as additional special tokens, its chat
    template, left padding (the decoder's prompt layout). `kwargs` go to `PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos_token,
        eos_token=spec.eos_token,
        pad_token=spec.eos_token,
        mask_token=spec.mask_token,
        additional_special_tokens=[t for t in specials if t not in (spec.bos_token, spec.eos_token, spec.mask_token)],
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    fast.chat_template = spec.chat_template
    fast.padding_side = "left"
    return fast
