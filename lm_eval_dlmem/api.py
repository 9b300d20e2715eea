"""Python-side entry points for lm-eval users: a `TaskManager` that knows our tasks.

From the CLI, `--include_path $(lm-eval-dlmem tasks-path)` finds our task YAMLs, and lm-eval
merges `--model_args` into every task's metadata, which is where RULER, BABILong and LongBench
read the tokenizer that sizes their contexts. From Python, `simple_evaluate` does the same merge
only when it builds the TaskManager itself, and that one lacks our include path; passing your own
`TaskManager(include_path=...)` drops the model args from the metadata. `task_manager()` builds
the one that does both.
"""

from __future__ import annotations

from .tasks import tasks_path


class UnnamedTokenizerError(ValueError):
    """The evaluated model's tokenizer was built in memory, so the tasks cannot load it by name."""


def task_manager(model_args=None, metadata: dict | None = None, *, include_defaults: bool = True):
    """lm-eval's `TaskManager` with our tasks on the include path and the metadata the CLI would give.

    Args:
        model_args: what you pass to `simple_evaluate(model_args=...)`: a `"k=v,k2=v2"` string or a
            dict (its `pretrained` may be a loaded model), or the `DlmLM` you pass as `model=`.
        metadata: extra task metadata (the CLI's `--metadata`), e.g. `{"ruler_qa_dir": DIR}`; wins
            over model args of the same name, as on the CLI.
        include_defaults: keep lm-eval's own tasks (False indexes only ours, faster).

    Returns:
        `lm_eval.tasks.TaskManager`; pass it as `simple_evaluate(..., task_manager=tm)`.

    Raises:
        ValueError: `model_args` is of another type.
    """
    from lm_eval.tasks import TaskManager

    extra = dict(metadata or {})
    try:
        meta = model_args_metadata(model_args)
    except UnnamedTokenizerError:
        if "tokenizer" not in extra:
            raise
        meta = {}
    meta = meta | extra
    return TaskManager(include_path=tasks_path(), include_defaults=include_defaults, metadata=meta)


def model_args_metadata(model_args) -> dict:
    """The task metadata lm-eval's CLI derives from `--model_args`, for the three spellings of
    model args a Python caller has. A loaded model is named by its tokenizer's path (the tasks
    load the sizing tokenizer by name)."""
    from lm_eval.utils import simple_parse_args_string

    if model_args is None:
        return {}
    if isinstance(model_args, str):
        return simple_parse_args_string(model_args)
    if isinstance(model_args, dict):
        return _named(dict(model_args))
    args = getattr(model_args, "args", None)
    if args is not None and hasattr(args, "objects"):  # a DlmLM: what its user typed, by name
        return _lm_metadata(model_args)
    raise ValueError(f"model_args= got a {type(model_args).__name__}: pass the model args string "
                     "('pretrained=...,k=v'), a dict, or the DlmLM you evaluate.")


def _named(meta: dict) -> dict:
    """Replace a loaded model / tokenizer object by the name its tokenizer was loaded from."""
    from .backbones.loading import is_loaded_model

    model = meta.get("pretrained")
    tok = meta.get("tokenizer")
    if tok is not None and not isinstance(tok, str):
        meta["tokenizer"] = _tokenizer_name(tok)
    if model is not None and is_loaded_model(model):
        meta.pop("pretrained")
        if "tokenizer" not in meta:
            meta["tokenizer"] = _tokenizer_name(getattr(model, "tokenizer", None), model)
    return meta


def _lm_metadata(lm) -> dict:
    """Metadata for a constructed DlmLM: its tokenizer's name, and max_length when it was given."""
    meta = {"tokenizer": _tokenizer_name(lm.tokenizer)}
    if lm.args.max_length is not None:
        meta["max_length"] = lm.args.max_length
    return meta


def _tokenizer_name(tokenizer, model=None) -> str:
    """The path or hub id a tokenizer was loaded from (or, with no tokenizer, the model's)."""
    name = getattr(tokenizer, "name_or_path", "") if tokenizer is not None else ""
    if not name and model is not None:
        name = getattr(getattr(model, "config", None), "_name_or_path", "")
    if not name:
        raise UnnamedTokenizerError("The tokenizer that sizes RULER/BABILong/LongBench contexts has no name to load it by "
                         "(built in memory): save it (tokenizer.save_pretrained(DIR)) and pass "
                         "metadata={'tokenizer': DIR}.")
    return str(name)
