"""The differences between transformers 4.x (4.56+) and 5.x that our code meets, in one place.

- Tokenizers saved by 5.x write their extra special tokens as a list under `extra_special_tokens`
  (the embedded tiny checkpoints, `train tiny-default`, `make-tiny`); 4.x reads that key as a
  dict of named tokens and fails (`'list' object has no attribute 'keys'`), so under 4.x the list
  is handed over as 4.x's `additional_special_tokens`.
- `add_special_tokens(..., replace_...=False)` keeps the existing extra tokens: the keyword is
  `replace_extra_special_tokens` in 5.x and `replace_additional_special_tokens` in 4.x.
"""

from __future__ import annotations

import json
import os

import transformers

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".", 1)[0])


def tokenizer_load_kwargs(path: str) -> dict:
    """Extra `from_pretrained` kwargs that let this transformers read the tokenizer in `path`."""
    if TRANSFORMERS_MAJOR >= 5:
        return {}
    config = os.path.join(os.path.expanduser(str(path)), "tokenizer_config.json")
    if not os.path.isfile(config):
        return {}  # a hub id: hub tokenizers are written in the 4.x format, which 5.x reads too
    with open(config, encoding="utf-8") as f:
        extra = json.load(f).get("extra_special_tokens")
    if not isinstance(extra, list):
        return {}
    return {"extra_special_tokens": {}, "additional_special_tokens": extra}


def add_special_tokens_keeping(tokenizer, tokens: list[str]) -> None:
    """Register `tokens` as special tokens, keeping the tokenizer's existing extra ones."""
    keep = "replace_extra_special_tokens" if TRANSFORMERS_MAJOR >= 5 else "replace_additional_special_tokens"
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, **{keep: False})
