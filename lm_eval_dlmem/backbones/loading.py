"""Find the family of a checkpoint, load it with our own classes, and wrap it as a `Backbone`.

No remote code runs: `config.json` is read as JSON, the family is decided from its keys, and the
matching class in this package loads the official safetensors through `from_pretrained` (so
`dtype`, `device_map` and bitsandbytes `quantization_config` behave as for any HF model).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from ..compat import add_special_tokens_keeping, tokenizer_load_kwargs
from .spec import FAMILIES, FamilySpec, get_spec

log = logging.getLogger(__name__)
DTYPES = {
    "auto": "auto", "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
    "fp16": torch.float16, "half": torch.float16,
}


def model_class(family: str):
    """The family's model class (`FamilySpec.model_class`); an unknown family names the valid ones."""
    return get_spec(family).load_class()


def detect_family(config: dict) -> str:
    """Family from a config.json dict. LLaDA and LLaDA-MoE both say `model_type: llada`."""
    family = _declared_family(config)
    if family is not None:
        return family
    fits = [name for name in FAMILIES if _missing_keys(config, name) == []]
    hint = (f"Its keys are those of a {' or '.join(fits)} config: if it is one, pass family={fits[0]}."
            if fits else "Pass a checkpoint of one of those.")
    raise ValueError(
        f"config.json describes model_type={config.get('model_type')!r}, architectures={config.get('architectures')}, "
        f"which is none of the supported families (LLaDA-8B, Dream-v0-7B, LLaDA-MoE-7B-A1B, LLaDA2.x). {hint}"
    )


def _declared_family(config: dict) -> str | None:
    """The family config.json names by model_type / architectures, or None. LLaDA2.x also has
    MoE keys and "LLaDA" in its architecture, so the families that name themselves unambiguously
    (`FamilySpec.model_types` / `architectures`) are matched first."""
    arch = " ".join(config.get("architectures") or [])
    model_type = str(config.get("model_type", "")).lower()
    for spec in FAMILIES.values():
        if model_type in spec.model_types or any(a in spec.architectures for a in config.get("architectures") or []):
            return spec.name
    if "MoE" in arch or "num_experts" in config or "expert_intermediate_size" in config:
        if model_type in ("llada", "lladamoe", "llada_moe") or "LLaDA" in arch:
            return "llada_moe"
    if model_type == "llada" or "LLaDAModelLM" in arch:
        return "llada"
    if model_type == "dream" or "DreamModel" in arch:
        return "dream"
    return None


def _missing_keys(config: dict, family: str) -> list[str]:
    return [k for k in get_spec(family).config_keys if k not in config]


def check_family(config: dict, family: str | None, pretrained: str) -> str:
    """The family to build: `family=` when config.json agrees with it, else detected.

    Checked before any model is built: a model class fills the keys config.json lacks with
    its 7B defaults, so `family=dream` on a LLaDA checkpoint would allocate a full-size Dream.

    Raises:
        ValueError: family= names another family than config.json, or config.json lacks keys
            every config of that family has.
    """
    if family is None:
        return detect_family(config)
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not a supported family; choose one of {', '.join(FAMILIES)} "
                         "(or drop family=: it is read from config.json).")
    declared = _declared_family(config)
    if declared is not None and declared != family:
        raise ValueError(
            f"family={family} does not match {pretrained}: its config.json describes a {declared} checkpoint "
            f"(model_type={config.get('model_type')!r}, architectures={config.get('architectures')}). "
            "Drop family= (the family is read from config.json) or point pretrained= at a "
            f"{family} checkpoint."
        )
    missing = _missing_keys(config, family)
    if missing:
        raise ValueError(
            f"family={family}, but the config.json of {pretrained} lacks {', '.join(missing)}, which every "
            f"{family} config has; it is not a {family} checkpoint."
        )
    return family


def read_config(pretrained: str, revision: str | None = None) -> dict:
    """config.json of a local directory or hub id, with a clear error when it cannot be found."""
    path = os.path.join(pretrained, "config.json")
    if os.path.isdir(pretrained):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{pretrained!r} is a directory without config.json; point pretrained= at a checkpoint directory.")
        return _read_json_object(path)
    if os.path.sep in pretrained and (pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1):
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is not an existing directory. Check the path "
            "(or use `lm-eval-dlmem make-tiny FAMILY PATH` to create a test checkpoint)."
        )
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(pretrained, "config.json", revision=revision)
    except Exception as e:  # hub errors come in many types; the message says what to do
        raise FileNotFoundError(
            f"Could not find {pretrained!r} locally or on the Hugging Face Hub ({type(e).__name__}). "
            "Pass a local checkpoint directory, or a hub id with network access "
            "(unset HF_HUB_OFFLINE if it is set)."
        ) from e
    return _read_json_object(path)


def _read_json_object(path: str) -> dict:
    """A JSON object from `path`; a file that is not one is named in the error."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OSError(f"{path} is not valid JSON ({e}); restore the checkpoint's config.json.") from None
    if not isinstance(data, dict):
        raise OSError(f"{path} holds a JSON {type(data).__name__}, not an object of config keys; "
                      "restore the checkpoint's config.json.")
    return data


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_weight_files(path: str, label: str, names: tuple[str, ...] = WEIGHT_FILES) -> None:
    """For a local directory: one of `names` exists, and every .safetensors file has a readable
    header, so a missing, truncated or corrupt file is named before from_pretrained fails deep
    inside (safetensors says only "header too large"). Hub ids are left to the hub client.

    Raises:
        FileNotFoundError: none of `names` is in the directory. OSError: a .safetensors file is
            truncated or corrupt.
    """
    if not os.path.isdir(path):
        return
    files = os.listdir(path)
    if not any(n in files for n in names):
        raise FileNotFoundError(f"{label}: {path} holds no weights ({' or '.join(names)}); "
                                "the checkpoint was not fully saved or copied.")
    from safetensors import SafetensorError, safe_open

    for name in sorted(f for f in files if f.endswith(".safetensors")):
        file = os.path.join(path, name)
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise OSError(f"{label}: {file} is not a readable safetensors file ({e}): it is truncated or "
                          "corrupt; copy or download it again.") from None


@dataclass
class Backbone:
    """A loaded dLLM: the model, its tokenizer and its family facts.

    `logits()` is the one contract every caller relies on: `logits[:, i]` predicts token i.
    """

    model: torch.nn.Module
    tokenizer: object
    spec: FamilySpec
    family: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> torch.nn.ModuleList:
        """The decoder blocks, in order (memory modules hook these)."""
        return self.base_model.layers

    @property
    def base_model(self):
        """The underlying family model, unwrapped from a PEFT wrapper if there is one."""
        m = self.model
        while not hasattr(type(m), "layers") and hasattr(m, "base_model") and m.base_model is not m:
            m = m.base_model
            if hasattr(m, "model") and not hasattr(type(m), "layers"):
                m = m.model
        return m

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cache=None,
        window: tuple[int, int] | None = None,
        keep: tuple[int, int] | None = None,
        block_length: int | None = None,
    ) -> torch.Tensor:
        """Logits where position i predicts token i, for every family.

        Args:
            input_ids: [B, L] the whole canvas (prompt + generation region).
            attention_mask: [B, L] 1 for real tokens, 0 for left padding; None = no padding.
            cache: a `DiffusionCache`. Empty: this full forward fills it. Filled: only `window`
                is forwarded and attends to the cached keys/values of the other positions.
            window: (start, end) positions to forward; default the whole canvas.
            keep: (start, end) positions whose logits are returned (the LM head runs only there);
                default the window.
            block_length: block-causal attention with blocks of this many tokens from each row's
                first real token (families with `spec.block_causal`, LLaDA2.x); None attends
                bidirectionally.

        Returns:
            FloatTensor [B, keep_end - keep_start, V] in the model dtype.
        """
        L = input_ids.shape[1]
        s, e = window if window is not None else (0, L)
        a, b = keep if keep is not None else (s, e)
        if not (0 <= s <= a <= b <= e <= L):
            raise ValueError(f"keep={keep} must lie inside window={window} within a canvas of {L} tokens.")
        fs, fe = self.forwarded(L, window, cached=cache is not None and len(cache) > 0)
        ra = self.source_start(a)
        extra = {} if block_length is None else {"block_length": block_length}
        raw = self.model(
            input_ids=input_ids[:, fs:fe],
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=cache is not None,
            cache_position=fs,
            logits_to_keep=slice(ra - fs, b - fs),
            **extra,
        ).logits  # raw positions ra .. b-1
        return self.align(raw, attention_mask, start=a)

    # ---- Dream's one-position shift: these four methods are the only code that knows it ----------
    @property
    def _shift(self) -> int:
        return 1 if self.spec.logit_shift else 0

    def source_start(self, start: int) -> int:
        """First raw position needed to predict the tokens from `start` on (start - 1 for a
        shifted model, whose raw output j predicts token j + 1)."""
        return max(start - self._shift, 0)

    def forwarded(self, length: int, window: tuple[int, int] | None = None, cached: bool = False) -> tuple[int, int]:
        """Canvas positions [start, end) that a forward computes: the whole canvas of `length`
        tokens, or with a filled cache only `window`, widened by the shift (a shifted model also
        forwards the position before the window: its output predicts the window's first token)."""
        if not cached:
            return 0, length
        s, e = window if window is not None else (0, length)
        return self.source_start(s), e

    def align(self, raw: torch.Tensor, attention_mask: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """Raw per-position outputs -> outputs where index i predicts token `start + i`.

        Args:
            raw: [B, n, ...] the raw model's outputs (logits) at positions `source_start(start)` on.
            attention_mask: [B, L] 1 real / 0 left padding, or None.
            start: canvas position of the first token to predict.

        Returns:
            raw itself for unshifted families; else [B, n or n - 1, ...]. A shifted model has no
            prediction for a row's first real token; it gets the raw output at its own position,
            as in Dream's sampler (cat([l[:, :1], l[:, :-1]])), so left-padded rows match
            unpadded ones there too.
        """
        if not self._shift:
            return raw
        out = torch.cat([raw[:, :1], raw[:, :-1]], dim=1) if start == 0 else raw[:, :-1]
        if attention_mask is not None:
            first = attention_mask.long().argmax(-1)  # first real position of each row
            rows = ((first >= max(start, 1)) & (first < start + out.shape[1])).nonzero().flatten()
            if rows.numel():
                out[rows, first[rows] - start] = raw[rows, first[rows] - self.source_start(start)]
        return out

    def source_positions(self, positions: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Raw positions whose outputs predict the tokens at `positions` (any shape), never
        before the row's first real token `first` (same shape), as in `align`."""
        return torch.maximum(positions - self._shift, first)

    # ---- the model below the LM head, for memories that train through it ----------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        *,
        start_layer: int = 0,
        end_layer: int | None = None,
        hidden: torch.Tensor | None = None,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """Outputs of decoder blocks `start_layer .. end_layer - 1` over the whole canvas.

        Args:
            input_ids: [B, L] tokens, embedded when `hidden` is None (then start_layer must be 0).
            attention_mask: [B, L] 1 real / 0 left padding, or None.
            start_layer / end_layer: the blocks to run; end_layer None = through the last block.
            hidden: [B, L, C] the output of block `start_layer - 1`, to continue from.
            checkpoint: recompute each block in the backward instead of keeping its activations.

        Returns:
            [B, L, C] before the final norm (`final_norm`, then `head` for raw logits).
        """
        model = self.base_model
        if hidden is None:
            if start_layer:
                raise ValueError(f"start_layer={start_layer} needs hidden=, the output of block {start_layer - 1}.")
            hidden = model._embed(input_ids)
        recompute = None
        if checkpoint:
            from torch.utils.checkpoint import checkpoint as run_checkpointed

            recompute = lambda block, *args: run_checkpointed(block, *args, use_reentrant=False)  # noqa: E731
        return model.run_layers(hidden, attention_mask, start_layer=start_layer, end_layer=end_layer,
                                recompute=recompute)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The norm after the last block: [..., C] -> [..., C]."""
        return self.base_model._final_norm(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw LM-head logits [..., V] of final-norm hidden states [..., C] (output j predicts
        token j + shift: pick positions with `source_positions` or realign with `align`)."""
        return self.base_model._head(hidden)

    def __call__(self, *args, **kwargs):
        return self.logits(*args, **kwargs)


def load_backbone(
    pretrained: str,
    *,
    family: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    revision: str | None = None,
    device_map=None,
    tokenizer: str | None = None,
    torch_dtype: str | torch.dtype | None = None,
    strict_weights: bool = True,
    **model_kwargs,
) -> Backbone:
    """Load a LLaDA / Dream / LLaDA-MoE / LLaDA2.x checkpoint (local dir or hub id) without remote code.

    Args:
        pretrained: checkpoint directory, hub id (e.g. GSAI-ML/LLaDA-8B-Instruct) or the name of
            a checkpoint shipped in the package (`tiny-llada`, see `lm_eval_dlmem.embedded`); or a
            loaded `Backbone` / model of our classes (see `wrap_loaded`), with `tokenizer=`.
        family: `llada`, `dream`, `llada_moe` or `llada2`; inferred from config.json when None.
        dtype: `auto` (the checkpoint's), `bfloat16`, `float16`, `float32` or a torch.dtype.
        device: where to put the model (`cpu`, `cuda`, `cuda:1`); ignored with device_map.
        load_in_4bit / load_in_8bit: bitsandbytes quantisation (NF4 with double quantisation).
        revision: hub revision.
        device_map: passed to from_pretrained (e.g. "auto" to spread over GPUs).
        tokenizer: tokenizer path or id when it is not stored with the weights.
        torch_dtype: the transformers 4 name of `dtype`, accepted as an alias.
        strict_weights: refuse a checkpoint whose weights do not match the model its config.json
            describes (missing, unexpected or misshapen tensors); False loads it anyway, with the
            missing ones randomly initialised and a warning naming them.

    Returns:
        Backbone with `.model`, `.tokenizer`, `.spec` (ids resolved against the tokenizer).
    """
    from ..embedded import resolve_embedded

    if is_loaded_model(pretrained):
        return _load_from_object(pretrained, tokenizer=tokenizer, family=family, device=device, dtype=dtype,
                                 load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, revision=revision,
                                 device_map=device_map)
    check_device(device)
    pretrained = resolve_embedded(pretrained) or os.path.expanduser(str(pretrained))
    if tokenizer is not None:  # `tokenizer=tiny-llada` names the embedded copy, as pretrained= does
        tokenizer = resolve_embedded(tokenizer) or os.path.expanduser(str(tokenizer))
    config = read_config(pretrained, revision)
    family = check_family(config, family, pretrained)
    check_weight_files(pretrained, f"pretrained={pretrained}")
    cls = model_class(family)
    if torch_dtype is not None:
        if str(dtype) != "auto" and resolve_dtype(dtype, device) != resolve_dtype(torch_dtype, device):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only dtype.")
        dtype = torch_dtype
    torch_dtype = resolve_dtype(dtype, device)
    kwargs = dict(dtype=torch_dtype, revision=revision, **model_kwargs)
    if load_in_4bit or load_in_8bit:
        kwargs["quantization_config"] = quantization_config(load_in_4bit, torch_dtype)
        device_map = device_map or {"": str(device or ("cuda" if torch.cuda.is_available() else "cpu"))}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model, loading_info = cls.from_pretrained(pretrained, output_loading_info=True, **kwargs)
    check_weights(loading_info, pretrained, strict_weights)
    if device_map is None and device is not None:
        model.to(device)
    model.eval()
    tok = load_tokenizer(tokenizer or pretrained, revision=revision)
    check_tokenizer_fits(tok, config, get_spec(family), tokenizer or pretrained, pretrained)
    spec = prepare_tokenizer(tok, get_spec(family))
    return Backbone(model=model, tokenizer=tok, spec=spec, family=family)


def is_loaded_model(pretrained) -> bool:
    """True when `pretrained=` is a model object rather than a name (a `Backbone`, or a model of
    our classes such as `LLaDAModelLM`, possibly PEFT-wrapped), as HFLM takes a loaded model."""
    return isinstance(pretrained, (Backbone, torch.nn.Module))


def loaded_label(pretrained) -> str:
    """A name for a loaded model in results and logs: its config's `_name_or_path` (the
    directory or hub id it was loaded from), else its class name."""
    model = pretrained.model if isinstance(pretrained, Backbone) else pretrained
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return str(name) or type(model).__name__


def wrap_loaded(pretrained, *, tokenizer=None, family: str | None = None) -> Backbone:
    """A `Backbone` around a model loaded in this process (a training loop's periodic eval).

    Args:
        pretrained: a `Backbone` (used as it is) or a model of our classes (`LLaDAModelLM`,
            `DreamModel`, `LLaDAMoEModelLM`, `LLaDA2MoeModelLM`, or a PEFT wrapper of one). The
            model stays on its device and dtype; it is put in eval() mode, as HFLM does (call
            `.train()` again after evaluating inside a training loop).
        tokenizer: for a bare model, its tokenizer object, or a path / hub id / embedded name;
            None loads the one saved beside the model's `config._name_or_path`.
        family: checked against the model's config, as for a checkpoint directory.

    Raises:
        ValueError: an object that is neither, a tokenizer= beside a Backbone (it has its own), a
            model whose family or tokenizer does not fit.
    """
    if isinstance(pretrained, Backbone):
        if tokenizer is not None:
            raise ValueError("tokenizer= cannot be combined with a loaded Backbone as pretrained=: it carries its "
                             "own tokenizer (build Backbone(model, tokenizer, ...) with the one you want).")
        check_family(pretrained.config.to_dict(), family, loaded_label(pretrained))
        pretrained.model.eval()
        return pretrained
    config = getattr(pretrained, "config", None)
    if not isinstance(pretrained, torch.nn.Module) or not hasattr(config, "to_dict"):
        raise ValueError(f"pretrained= got a {type(pretrained).__name__}: pass a checkpoint directory, hub id or "
                         "embedded name, a lm_eval_dlmem Backbone, or a loaded model of our classes (LLaDAModelLM, "
                         "DreamModel, LLaDAMoEModelLM, LLaDA2MoeModelLM).")
    label = loaded_label(pretrained)
    config_dict = config.to_dict()
    family = check_family(config_dict, family, label)
    tok = _loaded_tokenizer(tokenizer, config, label)
    spec = get_spec(family)
    check_tokenizer_fits(tok, config_dict, spec, getattr(tok, "name_or_path", "") or "tokenizer=", label)
    pretrained.eval()
    return Backbone(model=pretrained, tokenizer=tok, spec=prepare_tokenizer(tok, spec), family=family)


def _loaded_tokenizer(tokenizer, config, label: str):
    """The tokenizer of a loaded model: the object given, a path / id / embedded name, or the one
    saved beside the model's `_name_or_path`."""
    from ..embedded import resolve_embedded

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    name = tokenizer or getattr(config, "_name_or_path", "")
    if not name:
        raise ValueError(f"pretrained= is a loaded model ({label}) without a saved tokenizer: pass its tokenizer "
                         "as tokenizer= (the object, or a directory / hub id).")
    return load_tokenizer(resolve_embedded(str(name)) or os.path.expanduser(str(name)))


def _load_from_object(pretrained, *, tokenizer, family, device, dtype, load_in_4bit, load_in_8bit, revision,
                      device_map) -> Backbone:
    """`load_backbone` of a loaded model: options that only apply while loading from files are
    refused rather than silently dropped; `device=` moves the model (None keeps it where it is)."""
    given = {"dtype": str(dtype) != "auto", "load_in_4bit": load_in_4bit, "load_in_8bit": load_in_8bit,
             "revision": revision is not None, "parallelize": device_map is not None}
    refused = [name for name, on in given.items() if on]
    if refused:
        raise ValueError(f"{', '.join(n + '=' for n in refused)} cannot apply to a model passed loaded as "
                         "pretrained=: it is already built; drop the arg, or convert the model before passing it.")
    backbone = wrap_loaded(pretrained, tokenizer=tokenizer, family=family)
    if device is not None and backbone.device != torch.device(device):
        check_device(device)
        backbone.model.to(device)
    return backbone


def load_tokenizer(path: str, revision: str | None = None):
    """The checkpoint's tokenizer without remote code: the fast `tokenizer.json` when there is
    one, else the Qwen2 BPE files (`vocab.json` + `merges.txt`) that Dream's custom slow
    tokenizer wraps."""
    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

    errors = []
    compat = tokenizer_load_kwargs(path)  # a tokenizer saved by transformers 5, read by 4.x
    for cls in (PreTrainedTokenizerFast, Qwen2TokenizerFast):
        try:
            return cls.from_pretrained(path, revision=revision, **compat)
        except Exception as e:  # missing files raise OSError/ValueError/TypeError by version
            errors.append(f"{cls.__name__}: {e}")
    raise OSError(
        f"Could not load a tokenizer from {path!r} without remote code ({'; '.join(errors)}). "
        "Pass tokenizer=PATH pointing at a directory with tokenizer.json."
    )


def key_list(keys, limit: int = 8) -> str:
    """Sorted keys, the first `limit` of them, and how many more (a 7B model has thousands)."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_weights(loading_info: dict, pretrained: str, strict: bool = True) -> None:
    """Refuse weights that do not match the model config.json describes.

    transformers only prints a load report and initialises a missing tensor at random, so a
    dropped tensor, renamed blocks or a raised layer count evaluate a partly random model. Tied
    or buffer weights that are legitimately absent are not in `loading_info` (transformers
    fills them), so anything listed here is a real mismatch.
    """
    refuse_key_mismatch(
        f"The weights in {pretrained!r} do not match the model its config.json describes",
        (("missing (would be randomly initialised)", loading_info.get("missing_keys") or ()),
         ("unexpected (would be ignored)", loading_info.get("unexpected_keys") or ()),
         ("of the wrong shape", [k if isinstance(k, str) else k[0] for k in loading_info.get("mismatched_keys") or ()])),
        fix="Use a complete checkpoint whose config.json matches its weights (n_layers / num_hidden_layers, "
            "parameter names), or pass strict_weights=False to load it anyway.",
        strict=strict, warn=log.warning,
    )


def refuse_key_mismatch(subject: str, groups, fix: str, strict: bool, warn, error=ValueError) -> None:
    """Raise `error` naming every non-empty (description, keys) group of `groups`, or with
    strict=False only `warn` (the caller's logger, so the warning names its module) and go on.
    The one check behind a checkpoint's and an adapter's weight names."""
    problems = [f"{len(keys)} {what}: {key_list(keys)}" for what, keys in groups if keys]
    if not problems:
        return
    report = f"{subject}: {'; '.join(problems)}."
    if not strict:
        warn("%s Loading anyway (strict_weights=False).", report)
        return
    raise error(f"{report} {fix}")


def check_tokenizer_fits(tokenizer, config: dict, spec: FamilySpec, where: str, pretrained: str) -> None:
    """Refuse a tokenizer that is not the checkpoint's: more tokens than the embedding has rows,
    no mask token (or another id than config.json's `mask_token_id`), or one that turns text
    into no tokens at all (what transformers builds from a directory without tokenizer.json:
    the special tokens of tokenizer_config.json and nothing else, so every prompt would be empty)."""
    n, vocab = len(tokenizer), tokenizer.get_vocab()
    size = config.get("vocab_size")
    problem = None
    if size and n > size:
        problem = f"it has {n} tokens but the checkpoint's vocab_size is {size} (ids past {size - 1} have no embedding)"
    elif spec.mask_token not in vocab:
        problem = f"it has no mask token {spec.mask_token!r}"
    elif config.get("mask_token_id") is not None and vocab[spec.mask_token] != config["mask_token_id"]:
        problem = (f"its mask token {spec.mask_token!r} is id {vocab[spec.mask_token]}, but config.json says "
                   f"mask_token_id={config['mask_token_id']}")
    elif not tokenizer.encode("The answer is 42.", add_special_tokens=False):
        problem = f"it encodes text to no tokens (a vocabulary of {n} special tokens only)"
    if problem:
        raise ValueError(
            f"The tokenizer loaded from {where!r} does not fit the {spec.name} checkpoint {pretrained!r}: {problem}. "
            "Restore the checkpoint's tokenizer.json, or pass tokenizer=PATH pointing at the tokenizer the model "
            "was trained with."
        )


def check_device(device) -> None:
    """Refuse, before any weights load, a device string torch cannot parse or a GPU that is not there."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device torch knows ({e}); use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={device!r} asks for a GPU, but this torch sees none (torch.cuda.is_available() "
                             "is False: no GPU, or a CPU-only torch build); use device=cpu or install a CUDA torch.")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device={device!r}: only {count} GPU(s) are visible (cuda:0..cuda:{count - 1}); "
                             "pick one of those or check CUDA_VISIBLE_DEVICES.")


def resolve_dtype(dtype, device=None):
    """A dtype name or torch.dtype -> torch.dtype (or "auto"), refusing what the device cannot run."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        key = str(dtype).lower().replace("torch.", "")
        if key not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}.")
        resolved = DTYPES[key]
    dev = torch.device(device) if device is not None else None
    on_cpu = dev.type == "cpu" if dev is not None else not torch.cuda.is_available()
    if resolved == torch.float16 and on_cpu:
        raise ValueError(
            "dtype=float16 is not supported for CPU inference here (matmuls are slow or unsupported); "
            "use dtype=float32 or bfloat16 on CPU, or run on a GPU."
        )
    if resolved == torch.bfloat16 and dev is not None and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("This GPU cannot run bfloat16; use dtype=float16 or float32.")
    return resolved


def quantization_config(load_in_4bit: bool, compute_dtype):
    from transformers import BitsAndBytesConfig

    from ..extras import require

    require("bitsandbytes", "load_in_4bit / load_in_8bit")
    if not load_in_4bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if compute_dtype == "auto":
        compute_dtype = torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def prepare_tokenizer(tokenizer, spec: FamilySpec) -> FamilySpec:
    """Give the tokenizer what the family needs (chat template, template tokens, pad, left padding)
    and return the spec with ids resolved against it."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in spec.template_tokens if t in vocab and t not in tokenizer.all_special_tokens]
    if missing:
        # LLaDA Base ships the header tokens in its vocabulary but not as special tokens, so
        # they would be split by the pre-tokenizer; register them so the template encodes right.
        add_special_tokens_keeping(tokenizer, missing)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = spec.chat_template
    resolved = spec.resolve(tokenizer)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == resolved.mask_id:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(resolved.eos_id)
    tokenizer.padding_side = "left"
    return resolved
