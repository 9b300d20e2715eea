"""Find the family of a checkpoint, load it with our own classes, and wrap it as a `Backbone`.

No remote code runs: `config.json` is read as JSON, the family is decided from its keys, and the
matching class in this package loads the official safetensors through `from_pretrained` (so
`dtype`, `device_map` and bitsandbytes `quantization_config` behave as for any HF model).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .spec import FAMILIES, FamilySpec, get_spec

DTYPES = {
    "auto": "auto", "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
    "fp16": torch.float16, "half": torch.float16,
}


def model_class(family: str):
    if family == "llada":
        from .llada import LLaDAModelLM
        return LLaDAModelLM
    if family == "dream":
        from .dream import DreamModel
        return DreamModel
    if family == "llada_moe":
        from .llada_moe import LLaDAMoEModelLM
        return LLaDAMoEModelLM
    if family == "llada2":
        from .llada2 import LLaDA2MoeModelLM
        return LLaDA2MoeModelLM
    get_spec(family)  # raises with the list of families
    raise AssertionError(family)


def detect_family(config: dict) -> str:
    """Family from a config.json dict. LLaDA and LLaDA-MoE both say `model_type: llada`; LLaDA2.x
    also has MoE keys and "LLaDA" in its architecture, so the families that name themselves
    unambiguously (`FamilySpec.model_types` / `architectures`) are matched first."""
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
    raise ValueError(
        f"config.json describes model_type={config.get('model_type')!r}, architectures={config.get('architectures')}, "
        "which is none of the supported families (LLaDA-8B, Dream-v0-7B, LLaDA-MoE-7B-A1B, LLaDA2.x). "
        "Pass a checkpoint of one of those, or family=... if its config is non-standard."
    )


def read_config(pretrained: str, revision: str | None = None) -> dict:
    """config.json of a local directory or hub id, with a clear error when it cannot be found."""
    path = os.path.join(pretrained, "config.json")
    if os.path.isdir(pretrained):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{pretrained!r} is a directory without config.json; point pretrained= at a checkpoint directory.")
        with open(path) as f:
            return json.load(f)
    if os.path.sep in pretrained and (pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1):
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is not an existing directory. Check the path "
            "(or use `lm-eval-dlmem make-tiny FAMILY PATH` to create a test checkpoint)."
        )
    try:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(pretrained, "config.json", revision=revision)) as f:
            return json.load(f)
    except Exception as e:  # hub errors come in many types; the message says what to do
        raise FileNotFoundError(
            f"Could not find {pretrained!r} locally or on the Hugging Face Hub ({type(e).__name__}). "
            "Pass a local checkpoint directory, or a hub id with network access "
            "(unset HF_HUB_OFFLINE if it is set)."
        ) from e


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
        shift = 1 if self.spec.logit_shift else 0
        # Raw logit j predicts token j + shift. A shifted model has no prediction for a row's first
        # real token; it gets the raw logit at its own position, as in Dream's sampler
        # (cat([l[:, :1], l[:, :-1]])), so left-padded rows match unpadded ones there too.
        fs = max(s - shift, 0) if (cache is not None and len(cache)) else 0
        fe = e if (cache is not None and len(cache)) else L
        ra = max(a - shift, 0)
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
        if not shift:
            return raw
        out = torch.cat([raw[:, :1], raw[:, :-1]], dim=1) if a == 0 else raw[:, :-1]
        if attention_mask is not None:
            first = attention_mask.long().argmax(-1)  # first real position of each row
            rows = ((first >= max(a, 1)) & (first < b)).nonzero().flatten()
            if rows.numel():
                out[rows, first[rows] - a] = raw[rows, first[rows] - ra]
        return out

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
    **model_kwargs,
) -> Backbone:
    """Load a LLaDA / Dream / LLaDA-MoE / LLaDA2.x checkpoint (local dir or hub id) without remote code.

    Args:
        pretrained: checkpoint directory, hub id (e.g. GSAI-ML/LLaDA-8B-Instruct) or the name of
            a checkpoint shipped in the package (`tiny-llada`, see `lm_eval_dlmem.embedded`).
        family: `llada`, `dream`, `llada_moe` or `llada2`; inferred from config.json when None.
        dtype: `auto` (the checkpoint's), `bfloat16`, `float16`, `float32` or a torch.dtype.
        device: where to put the model (`cpu`, `cuda`, `cuda:1`); ignored with device_map.
        load_in_4bit / load_in_8bit: bitsandbytes quantisation (NF4 with double quantisation).
        revision: hub revision.
        device_map: passed to from_pretrained (e.g. "auto" to spread over GPUs).
        tokenizer: tokenizer path or id when it is not stored with the weights.
        torch_dtype: the transformers 4 name of `dtype`, accepted as an alias.

    Returns:
        Backbone with `.model`, `.tokenizer`, `.spec` (ids resolved against the tokenizer).
    """
    from ..embedded import resolve_embedded

    check_device(device)
    pretrained = resolve_embedded(pretrained) or os.path.expanduser(str(pretrained))
    config = read_config(pretrained, revision)
    family = family or detect_family(config)
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
    model = cls.from_pretrained(pretrained, **kwargs)
    if device_map is None and device is not None:
        model.to(device)
    model.eval()
    tok = load_tokenizer(tokenizer or pretrained, revision=revision)
    spec = prepare_tokenizer(tok, get_spec(family))
    return Backbone(model=model, tokenizer=tok, spec=spec, family=family)


def load_tokenizer(path: str, revision: str | None = None):
    """The checkpoint's tokenizer without remote code: the fast `tokenizer.json` when there is
    one, else the Qwen2 BPE files (`vocab.json` + `merges.txt`) that Dream's custom slow
    tokenizer wraps."""
    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

    errors = []
    for cls in (PreTrainedTokenizerFast, Qwen2TokenizerFast):
        try:
            return cls.from_pretrained(path, revision=revision)
        except Exception as e:  # missing files raise OSError/ValueError/TypeError by version
            errors.append(f"{cls.__name__}: {e}")
    raise OSError(
        f"Could not load a tokenizer from {path!r} without remote code ({'; '.join(errors)}). "
        "Pass tokenizer=PATH pointing at a directory with tokenizer.json."
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
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ImportError("4/8-bit loading needs bitsandbytes: pip install bitsandbytes") from e
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
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = spec.chat_template
    resolved = spec.resolve(tokenizer)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == resolved.mask_id:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(resolved.eos_id)
    tokenizer.padding_side = "left"
    return resolved
