"""Shared plumbing for the task loaders: the sizing tokenizer, seeds, options and hub access.

lm-eval calls a task's `custom_dataset(**metadata, **dataset_kwargs)` once per task, where the
metadata is the task YAML's `metadata` merged with the run's `--model_args` and `--metadata`. Our
loaders take their fixed per-task values (task name, context length) from `dataset_kwargs` and
every optional knob from the metadata, and accept `**kwargs` because model args such as
`batch_size` or `metastate` arrive there too.

Lengths are measured in the evaluated model's tokens (RULER's convention): the tokenizer is
the first of the metadata keys `tokenizer`, `pretrained`, `model`, loaded without remote code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
from functools import lru_cache
from typing import Callable

log = logging.getLogger(__name__)

TOKENIZER_KEYS = ("tokenizer", "pretrained", "model")
DEFAULT_SEED = 42  # RULER's and BABILong's `random_seed`
_OFF = {"1", "true", "yes", "on"}
_hub_unreachable: set[str] = set()


class TaskDataError(RuntimeError):
    """A task's data cannot be produced or loaded; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------
# Sizing tokenizer
# ---------------------------------------------------------------------------------------------


def key_request_cache_by_metadata() -> None:
    """Make lm-eval's `--cache_requests` key of our tasks (`dlmem_*`) include their metadata.

    lm-eval 0.4.13 keys cached requests by task name, shots, rank, chat template, system prompt
    and tokenizer name only (`ConfigurableTask.build_all_requests`), but our documents are made
    from the metadata (`--metadata` data_seed / num_samples / lengths, and the model args whose
    tokenizer sizes the contexts): a rerun with other metadata would get the old prompts back.
    The metadata's hash is appended to the `tokenizer_name` argument, which lm-eval uses only
    for that key. Installed once per process by our dataset loaders, so before any of our tasks
    builds its requests; other tasks are untouched.
    """
    from lm_eval.api.task import ConfigurableTask

    original = ConfigurableTask.build_all_requests
    if getattr(original, "keyed_by_metadata", False):
        return

    @functools.wraps(original)
    def build_all_requests(self, *args, tokenizer_name: str = "", **kwargs):
        if str(getattr(self.config, "task", "")).startswith("dlmem_"):
            tokenizer_name = f"{tokenizer_name}-metadata{metadata_hash(self.config.metadata)}"
        return original(self, *args, tokenizer_name=tokenizer_name, **kwargs)

    build_all_requests.keyed_by_metadata = True
    ConfigurableTask.build_all_requests = build_all_requests


def metadata_hash(metadata) -> str:
    """Short stable hash of a task's metadata dict."""
    blob = json.dumps(metadata or {}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenizer_name(meta: dict) -> str | None:
    """The tokenizer path or id named in the metadata (`tokenizer` > `pretrained` > `model`)."""
    for key in TOKENIZER_KEYS:
        value = meta.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


@lru_cache(maxsize=8)
def load_sizing_tokenizer(name: str):
    """Load (once per process) the tokenizer used to size prompts, without remote code."""
    from lm_eval_dlmem.backbones.loading import load_tokenizer
    from lm_eval_dlmem.embedded import resolve_embedded

    try:
        return load_tokenizer(resolve_embedded(name) or name)
    except OSError as e:
        raise TaskDataError(
            f"Could not load the tokenizer {name!r} to size the task prompts ({e}). Pass a local "
            "checkpoint as pretrained= in --model_args, or --metadata tokenizer=PATH (from Python: "
            "lm_eval_dlmem.task_manager(model_args, metadata={'tokenizer': PATH}))."
        ) from e


class TokenCounter:
    """Counts tokens of the evaluated model, without special tokens (as RULER measures them)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> int:
        return len(self.encode(text))

    def many(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]

    def encode(self, text: str) -> list[int]:
        # verbose=False: drafts longer than the tokenizer's model_max_length are expected while
        # sizing, so transformers' "sequence length is longer than..." warning is noise here
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def metadata_hint(key: str, value: str) -> str:
    """How to set a task metadata knob, worded for CLI and Python users alike."""
    return (f"--metadata {key}={value} on the lm_eval command line (from Python: "
            f"task_manager=lm_eval_dlmem.task_manager(model_args, metadata={{{key!r}: {value!r}}}))")


def require_tokenizer_name(meta: dict, benchmark: str) -> str:
    """The tokenizer named in the metadata, or a clear error when there is none."""
    name = tokenizer_name(meta)
    if name is None:
        raise TaskDataError(
            f"{benchmark} sizes its prompts with the evaluated model's tokenizer, but none was given. "
            "From the lm_eval CLI: pass pretrained=PATH in --model_args (our models do), or --metadata "
            "tokenizer=PATH. From Python: pass task_manager=lm_eval_dlmem.task_manager(model_args) to "
            "simple_evaluate (or TaskManager(metadata={'tokenizer': PATH}))."
        )
    return name


def sizing_counter(meta: dict, benchmark: str) -> TokenCounter:
    """The evaluated model's token counter, or a clear error when no tokenizer was named."""
    return TokenCounter(load_sizing_tokenizer(require_tokenizer_name(meta, benchmark)))


# ---------------------------------------------------------------------------------------------
# Options, seeds, small helpers
# ---------------------------------------------------------------------------------------------


def option(meta: dict, key: str, env: str | None = None, default=None):
    """A knob from the metadata (`--metadata key=...`), else an environment variable, else default."""
    value = meta.get(key)
    if value is None and env:
        value = os.environ.get(env) or None
    return default if value is None else value


def int_option(meta: dict, key: str, default: int, minimum: int = 0) -> int:
    value = meta.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--metadata {key}={value!r} must be an integer.") from None
    if number < minimum or number != float(value):
        raise ValueError(f"--metadata {key}={value!r} must be an integer >= {minimum}.")
    return number


def data_seed(meta: dict) -> int:
    """The data seed (`--metadata data_seed=N`; not the model's `seed`, which drives decoding)."""
    return int_option(meta, "data_seed", DEFAULT_SEED)


def sample_bar(what: str, total: int):
    """A progress bar over the samples being generated (one task at 32k tokens takes minutes of
    tokenizing before lm-eval shows anything)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"Generating {what}", unit="sample")


def sample_rng(*parts) -> random.Random:
    """An RNG for one sample. A str seed is hashed with SHA-512, so it is the same in every process."""
    return random.Random("/".join(str(p) for p in parts))


def largest_fitting(measure: Callable[[int], int], budget: int, lo: int, hi: int) -> int | None:
    """Largest n in [lo, hi] with measure(n) <= budget, assuming measure grows with n.

    Returns:
        That n, or None when even `lo` does not fit.
    """
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if measure(mid) <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def to_dataset(rows) -> "datasets.Dataset":  # noqa: F821
    """Rows as a `datasets.Dataset`. Loaders cache the Dataset itself (Arrow memory, shared by
    every task that asks for the same data) and return `{"test": dataset}` to lm-eval."""
    import datasets

    rows = list(rows)
    if not rows:
        raise TaskDataError("The task produced no samples.")
    return datasets.Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub access
# ---------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """True when the user switched the hub off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(k, "").strip().lower() in _OFF for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_known_unreachable(repo: str) -> bool:
    return hub_offline() or repo in _hub_unreachable


def from_hub(repo: str, fetch: Callable[[], object], hint: str):
    """Run `fetch()` (a `datasets`/`huggingface_hub` call for `repo`), turning failures into one
    clear `TaskDataError`. A failure is remembered, so the other tasks of the run do not wait
    for the same network timeouts again."""
    if hub_offline():
        raise TaskDataError(f"{repo} is on the Hugging Face Hub and the hub is switched off (HF_*_OFFLINE). {hint}")
    if repo in _hub_unreachable:
        raise TaskDataError(f"{repo} could not be loaded from the Hugging Face Hub earlier in this run. {hint}")
    try:
        return fetch()
    except Exception as e:  # datasets/hub raise many types (ConnectionError, OSError, HfHubHTTPError...)
        _hub_unreachable.add(repo)
        raise TaskDataError(f"Could not load {repo} from the Hugging Face Hub ({type(e).__name__}: {e}). {hint}") from e


# ---------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------


def clean_prediction(text: str) -> str:
    """RULER's post-processing: strip, control characters to newlines, strip again."""
    text = text.strip()
    return "".join("\n" if ord(ch) < 0x20 else ch for ch in text).strip()
