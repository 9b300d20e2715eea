"""A sweep file parsed into typed run specs, validated at one boundary.

Every field of a run has the meaning of the `lm_eval` flag of the same name; `defaults` are
merged under each run (model_args key by key); unknown keys are rejected with the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..checks import check_batch_size

DEFAULT_SEEDS = (0, 1234, 1234, 1234)  # lm-eval's --seed default: random, numpy, torch, fewshot
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# The types a sweep file may give each field (after `tasks`/`include_path` strings become lists);
# numbers are checked by `_count` / `_limit`, which also accept the strings `${VAR}` expands to.
FIELD_TYPES = {
    "model": (str,), "model_args": (dict,), "tasks": (list,), "device": (str, type(None)),
    "gen_kwargs": (dict, str, type(None)), "apply_chat_template": (bool, str),
    "fewshot_as_multiturn": (bool, type(None)), "system_instruction": (str, type(None)),
    "include_path": (list,), "include_defaults": (bool,), "use_cache": (bool,), "log_samples": (bool,),
    "confirm_run_unsafe_code": (bool,), "metadata": (dict,),
}


@dataclass
class RunSpec:
    """One evaluation: the arguments of one `lm_eval` command.

    Args:
        name: directory name of the run under the sweep's output_dir (letters, digits, . _ + -).
        model: registered lm-eval model name (`metastate-llada`, `memdlm-llada-moe`, `hf`, ...).
        model_args: dict, or lm-eval's `k=v,k2=v2` string.
        tasks: task names (list or comma-separated string).
        include_path: extra task directories; default: this package's tasks (`tasks_path()`).
        include_defaults: also index lm-eval's built-in tasks (False saves seconds per sweep
            when every task comes from include_path; no lm_eval flag does this).
        use_cache: keep lm-eval's `--use_cache` db in the run dir, so an interrupted run resumes.
        seed: one int (all four lm-eval seeds) or four (random, numpy, torch, fewshot).
        Others (batch_size, max_batch_size, device, limit, num_fewshot, gen_kwargs,
        apply_chat_template, fewshot_as_multiturn, system_instruction, log_samples,
        confirm_run_unsafe_code, metadata):
        as the lm_eval flags.
    """

    name: str
    model: str = ""
    model_args: dict = field(default_factory=dict)
    tasks: list = field(default_factory=list)
    batch_size: int | str = 1
    max_batch_size: int | None = None
    device: str | None = None
    limit: int | float | None = None
    num_fewshot: int | None = None
    gen_kwargs: dict | str | None = None
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool | None = None
    system_instruction: str | None = None
    include_path: list = field(default_factory=list)
    include_defaults: bool = True
    use_cache: bool = True
    log_samples: bool = True
    confirm_run_unsafe_code: bool = False
    seed: int | list | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not _SAFE_NAME.match(self.name):
            raise ValueError(f"run name {self.name!r} must be a directory name: letters, digits, '.', '_', '+', '-'.")
        if not self.model:
            raise ValueError(f"run {self.name!r}: model is required (e.g. metastate-llada, memdlm-llada-moe, hf).")
        if isinstance(self.model_args, str):
            from lm_eval.utils import simple_parse_args_string

            self.model_args = simple_parse_args_string(self.model_args)
        if not isinstance(self.model_args, dict):
            raise ValueError(f"run {self.name!r}: model_args must be a mapping or a 'k=v,k2=v2' string.")
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if isinstance(self.include_path, str):
            self.include_path = [self.include_path]
        self._check_types()
        if not self.tasks:
            raise ValueError(f"run {self.name!r}: tasks is empty; list at least one task.")
        where = f"run {self.name!r}"
        check_batch_size(f"{where}: batch_size", self.batch_size)
        self.max_batch_size = _count(f"{where}: max_batch_size", self.max_batch_size, minimum=1)
        self.num_fewshot = _count(f"{where}: num_fewshot", self.num_fewshot, minimum=0)
        self.limit = _limit(f"{where}: limit", self.limit)
        if self.fewshot_as_multiturn is None:  # the lm_eval CLI's rule
            self.fewshot_as_multiturn = bool(self.apply_chat_template)
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError(f"run {self.name!r}: fewshot_as_multiturn needs apply_chat_template.")
        self.seed_kwargs()  # validates

    def _check_types(self) -> None:
        """Every field has a type lm-eval accepts, so a bad sweep fails at load, not in a run."""
        for key, types in FIELD_TYPES.items():
            value = getattr(self, key)
            if not isinstance(value, types):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise ValueError(f"run {self.name!r}: {key}={value!r} must be a {names}"
                                 + (" (or a comma-separated string)" if key in ("tasks", "include_path") else "") + ".")
        for key in ("tasks", "include_path"):
            bad = [v for v in getattr(self, key) if not isinstance(v, str) or not v.strip()]
            if bad:
                raise ValueError(f"run {self.name!r}: {key} must list names as strings; {bad!r} are not.")

    def seed_kwargs(self) -> dict:
        """`simple_evaluate`'s four seed arguments."""
        if self.seed is None:
            seeds = DEFAULT_SEEDS
        elif isinstance(self.seed, int) and not isinstance(self.seed, bool):
            seeds = (self.seed,) * 4
        elif isinstance(self.seed, (list, tuple)) and len(self.seed) == 4:
            seeds = tuple(self.seed)
        else:
            raise ValueError(f"run {self.name!r}: seed must be an int or a list of 4 ints, got {self.seed!r}.")
        names = ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")
        return dict(zip(names, seeds))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes the run's results (not its name)."""
        blob = {k: v for k, v in self.to_dict().items() if k != "name"}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def lm_eval_command(self, output_path: str) -> str:
        """The `lm_eval` command line that does the same evaluation."""
        args = ["lm_eval", "--model", self.model]
        if self.model_args:
            args += ["--model_args", ",".join(f"{k}={v}" for k, v in self.model_args.items())]
        args += ["--tasks", ",".join(self.tasks), "--batch_size", str(self.batch_size)]
        for flag, value in (("--max_batch_size", self.max_batch_size), ("--device", self.device),
                            ("--limit", self.limit), ("--num_fewshot", self.num_fewshot),
                            ("--system_instruction", self.system_instruction)):
            if value is not None:
                args += [flag, str(value)]
        if self.gen_kwargs:
            gk = self.gen_kwargs if isinstance(self.gen_kwargs, str) else ",".join(
                f"{k}={v}" for k, v in self.gen_kwargs.items())
            args += ["--gen_kwargs", gk]
        if self.apply_chat_template:
            args += ["--apply_chat_template"] + ([] if self.apply_chat_template is True else [str(self.apply_chat_template)])
            args += [] if self.fewshot_as_multiturn else ["--fewshot_as_multiturn", "false"]
        for path in self.include_path:
            args += ["--include_path", path]
        if self.metadata:
            args += ["--metadata", json.dumps(self.metadata)]
        if self.use_cache:
            args += ["--use_cache", os.path.join(output_path, "cache", "lm")]
        if self.log_samples:
            args += ["--log_samples"]
        if self.confirm_run_unsafe_code:
            args += ["--confirm_run_unsafe_code"]
        args += ["--seed", ",".join(str(v) for v in self.seed_kwargs().values()), "--output_path", output_path]
        return " ".join(shlex.quote(a) for a in args)


@dataclass
class Sweep:
    """A list of runs and where they go. compare: {tasks: regex, plot_tasks: regex}."""

    runs: list[RunSpec]
    output_dir: str
    compare: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.runs:
            raise ValueError("the sweep lists no runs.")
        names = [r.name for r in self.runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"run names must be unique; repeated: {dup}.")
        unknown = set(self.compare) - {"tasks", "plot_tasks"}
        if unknown:
            raise ValueError(f"compare: unknown key(s) {sorted(unknown)}; valid: tasks, plot_tasks.")
        for key, pattern in self.compare.items():
            if pattern is not None:
                check_regex(f"compare: {key}", pattern)


def _number(where: str, value):
    """A YAML number, or a string that is one (`${VAR}` expands to strings); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") or value.strip().lower() in ("nan", "inf") \
                else int(value)
        except ValueError:
            raise ValueError(f"{where}={value!r} is not a number.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}={value!r} is not a finite number.")
    return value


def _count(where: str, value, minimum: int) -> int | None:
    value = _number(where, value)
    if value is not None and (value != int(value) or value < minimum):
        raise ValueError(f"{where}={value!r} must be an integer >= {minimum}.")
    return None if value is None else int(value)


def _limit(where: str, value) -> int | float | None:
    """lm-eval's --limit: a count of documents (an integer >= 1) or a fraction in (0, 1)."""
    value = _number(where, value)
    if value is None:
        return None
    if value <= 0 or (value >= 1 and value != int(value)):
        raise ValueError(f"{where}={value!r} must be a number of documents (an integer >= 1) or a fraction in (0, 1).")
    return int(value) if value >= 1 else value


def expand_env(value):
    """`${VAR}` and `${VAR:-default}` in every string of a YAML tree, from the environment.

    Raises:
        ValueError: a `${VAR}` without default names an unset variable.
    """
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ValueError(f"${{{name}}} is used in the sweep but the environment variable {name} is not set.")

    return _VAR.sub(sub, value)


def _run_spec(raw: dict, defaults: dict, where: str) -> RunSpec:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: each run must be a mapping with at least a name, got {raw!r}.")
    valid = {f.name for f in dataclasses.fields(RunSpec)}
    for key in set(raw) | set(defaults):
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=2)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}.{hint} Valid keys: {', '.join(sorted(valid))}.")
    merged = {**copy_tree(defaults), **copy_tree(raw)}
    base_args, run_args = defaults.get("model_args") or {}, raw.get("model_args")
    if isinstance(base_args, dict) and isinstance(run_args, dict):
        merged["model_args"] = {**base_args, **run_args}
    if "include_path" not in merged:
        merged["include_path"] = _default_include_path()
    try:
        return RunSpec(**merged)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def copy_tree(value):
    return json.loads(json.dumps(value, default=str))


def _default_include_path() -> list[str]:
    try:
        from ..tasks import tasks_path
    except ImportError:
        return []
    try:
        return [tasks_path()]
    except FileNotFoundError:
        return []


def load_sweep(path: str, *, output_dir: str | None = None, limit: float | None = None) -> Sweep:
    """Read and validate a sweep YAML.

    Args:
        path: the YAML file.
        output_dir: overrides the file's output_dir (default there: runs/<file stem>).
        limit: overrides every run's limit.

    Raises:
        OSError: the file cannot be read. ValueError: the file is not a valid sweep (the message
        names the run and the key).
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e}).") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a text file ({e}); pass a sweep YAML (see examples/sweeps/).") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path}: expected a mapping with a 'runs' list (see examples/sweeps/).")
    unknown = set(data) - {"runs", "defaults", "output_dir", "compare"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(unknown)}; valid: runs, defaults, output_dir, compare.")
    data = expand_env(data)
    defaults = data.get("defaults") or {}
    runs = [_run_spec(raw, defaults, f"{path}: runs[{i}]") for i, raw in enumerate(data["runs"])]
    if limit is not None:
        limit = _limit("--limit", limit)
        runs = [dataclasses.replace(r, limit=limit) for r in runs]
    out = output_dir or data.get("output_dir") or os.path.join("runs", Path(path).stem)
    return Sweep(runs=runs, output_dir=str(out), compare=data.get("compare") or {})


def check_regex(label: str, pattern) -> str:
    """`pattern` when it is a valid regular expression; else one ValueError naming `label`."""
    if not isinstance(pattern, str):
        raise ValueError(f"{label}={pattern!r} must be a regular expression string.")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{label} {pattern!r} is not a valid regular expression ({e}).") from None
    return pattern


__all__ = ["RunSpec", "Sweep", "check_regex", "expand_env", "load_sweep"]
