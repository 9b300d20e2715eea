"""Writes every task and group YAML under `tasks/` from the tables in the task modules.

    python -m lm_eval_dlmem.tasks.configs            # rewrite tasks/{ruler,babilong,longbench,...}
    python -m lm_eval_dlmem.tasks.configs --check    # exit 1 when the files on disk are stale

The YAMLs are committed (they are what users and the wheel get); a test runs `--check`, so the
tables here and the files never drift apart.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from . import babilong, choices, longbench, ruler

VERSION = 1.0
PKG = "lm_eval_dlmem.tasks"
GREEDY = {"do_sample": False, "temperature": 0.0}


class Function(str):
    """A `!function module.attr` reference in the written YAML."""


class _Dumper(yaml.SafeDumper):
    def choose_scalar_style(self):
        # `!function a.b.c` unquoted, as hand-written lm-eval YAMLs have it.
        return "" if self.event.tag == "!function" else super().choose_scalar_style()


_Dumper.add_representer(Function, lambda d, v: d.represent_scalar("!function", str(v)))
# Quiet loading of the generated data (see task.py).
TASK_CLASS = Function(f"{PKG}.task.GeneratedTask")
_Dumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style='"' if "\n" in v else None)
)


def _yaml(data: dict) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


def _metric(name: str, aggregation="mean") -> dict:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": True}


def _group(name: str, tasks: list[str], aggregate: bool = True) -> dict:
    cfg = {"group": name, "task": tasks}
    if aggregate:
        cfg["aggregate_metric_list"] = [{"metric": "score", "weight_by_size": False}]
    cfg["metadata"] = {"version": VERSION}
    return cfg


# ---------------------------------------------------------------------------------------------
# RULER
# ---------------------------------------------------------------------------------------------

RULER_COMMON = {
    "class": TASK_CLASS, "dataset_path": "", "custom_dataset": Function(f"{PKG}.ruler.load"), "test_split": "test",
    "output_type": "generate_until", "doc_to_text": "input", "doc_to_target": "target",
    "gen_prefix": "gen_prefix", "num_fewshot": 0, "metadata": {"version": VERSION},
}
# `dlmem_ruler_<len>` is what runs anywhere: the 11 tasks generated locally. The two QA tasks need
# SQuAD / HotpotQA (hub or `ruler_qa_dir`), so RULER's published 13-task average is
# `dlmem_ruler_all_<len>`: a group cannot leave out a member whose data is missing, and a
# per-length group that fails offline would make the plain name unusable on air-gapped machines.
RULER_GROUPS = {
    "": [t for t in ruler.TASKS if not t.startswith("qa_")], "all": list(ruler.TASKS),
    "niah": [t for t in ruler.TASKS if t.startswith("niah_")], "agg": ["vt", "cwe", "fwe"],
    "qa": ["qa_squad", "qa_hotpot"],
}


def ruler_task_name(task: str, length: str) -> str:
    return f"dlmem_ruler_{task}_{length}"


def ruler_files() -> dict[str, dict]:
    files = {"ruler/_ruler_common_yaml": RULER_COMMON}
    for length, tokens in ruler.LENGTHS.items():
        for task in ruler.tasks_at(length):
            metric = ruler.METRIC[task]
            files[f"ruler/{length}/{ruler_task_name(task, length)}.yaml"] = {
                "include": "../_ruler_common_yaml", "task": ruler_task_name(task, length),
                "dataset_kwargs": {"ruler_task": task, "ruler_length": tokens},
                "process_results": Function(f"{PKG}.ruler.{'score_part' if metric.endswith('part') else 'score_all'}"),
                "metric_list": [_metric("score"), _metric(metric)],
                "generation_kwargs": {**GREEDY, "max_gen_toks": ruler.tokens_to_generate(task, tokens), "until": []},
            }
        for kind, tasks in RULER_GROUPS.items():
            members = [t for t in tasks if t in ruler.tasks_at(length)]
            if kind not in ("", "niah") and members != tasks:
                continue  # below 1k: only `dlmem_ruler_<len>` and `dlmem_ruler_niah_<len>`, of the needle tasks there
            name = f"dlmem_ruler_{kind + '_' if kind else ''}{length}"
            files[f"ruler/{length}/_{name}.yaml"] = _group(name, [ruler_task_name(t, length) for t in members])
    return files


# ---------------------------------------------------------------------------------------------
# BABILong
# ---------------------------------------------------------------------------------------------

BABILONG_COMMON = {
    "class": TASK_CLASS, "dataset_path": "", "custom_dataset": Function(f"{PKG}.babilong.load"), "test_split": "test",
    "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "target", "num_fewshot": 0,
    "process_results": Function(f"{PKG}.babilong.score"), "metric_list": [_metric("score")],
    "generation_kwargs": {**GREEDY, "max_gen_toks": babilong.MAX_NEW_TOKENS, "until": []},
    "metadata": {"version": VERSION},
}


def babilong_task_name(task: str, length: str) -> str:
    return f"dlmem_babilong_{task}_{length}"


def babilong_files() -> dict[str, dict]:
    files = {"babilong/_babilong_common_yaml": BABILONG_COMMON}
    for length in babilong.LENGTHS:
        for task in babilong.TASKS:
            files[f"babilong/{length}/{babilong_task_name(task, length)}.yaml"] = {
                "include": "../_babilong_common_yaml", "task": babilong_task_name(task, length),
                "dataset_kwargs": {"babilong_task": task, "babilong_length": length},
            }
        name = f"dlmem_babilong_{length}"
        files[f"babilong/{length}/_{name}.yaml"] = _group(name, [babilong_task_name(t, length) for t in babilong.TASKS])
    return files


# ---------------------------------------------------------------------------------------------
# Log-likelihood variants (tasks/choices.py): the same documents, candidate answers scored
# ---------------------------------------------------------------------------------------------

MC_COMMON = {
    "class": TASK_CLASS, "dataset_path": "", "test_split": "test", "output_type": "multiple_choice",
    "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": "", "num_fewshot": 0,
    "process_results": Function(f"{PKG}.choices.score"),
    "metric_list": [_metric("acc"), _metric("answer_ll")], "metadata": {"version": VERSION},
}


def mc_files() -> dict[str, dict]:
    """`dlmem_ruler_<needle task>_<len>_mc` and `dlmem_babilong_<task>_<len>_mc` at every length."""
    files = {
        "ruler/_ruler_mc_common_yaml": {**MC_COMMON, "custom_dataset": Function(f"{PKG}.choices.load_ruler"),
                                        "doc_to_text": "context"},
        "babilong/_babilong_mc_common_yaml": {**MC_COMMON, "custom_dataset": Function(f"{PKG}.choices.load_babilong"),
                                              "doc_to_text": "prompt"},
    }
    for length, tokens in ruler.LENGTHS.items():
        for task in (t for t in ruler.tasks_at(length) if t in choices.niah.NIAH_TASKS):
            name = ruler_task_name(task, length) + "_mc"
            files[f"ruler/{length}/{name}.yaml"] = {"include": "../_ruler_mc_common_yaml", "task": name,
                                                    "dataset_kwargs": {"ruler_task": task, "ruler_length": tokens}}
    for length in babilong.LENGTHS:
        for task in babilong.TASKS:
            name = babilong_task_name(task, length) + "_mc"
            files[f"babilong/{length}/{name}.yaml"] = {
                "include": "../_babilong_mc_common_yaml", "task": name,
                "dataset_kwargs": {"babilong_task": task, "babilong_length": length}}
    return files


# ---------------------------------------------------------------------------------------------
# LongBench
# ---------------------------------------------------------------------------------------------

LONGBENCH_COMMON = {
    "class": TASK_CLASS, "dataset_path": "", "custom_dataset": Function(f"{PKG}.longbench.load"), "test_split": "test",
    "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "target", "num_fewshot": 0,
    "process_results": Function(f"{PKG}.longbench.score"), "metadata": {"version": VERSION},
}
CATEGORIES = ("single", "multi", "summarization", "fewshot", "synthetic", "code")


def longbench_task_name(name: str) -> str:
    return f"dlmem_longbench_{name}"


def _longbench_task(name: str) -> dict:
    task = longbench.task_of(name)
    metrics = [_metric("score"), _metric(task.metric)]
    if name.endswith("_e"):
        metrics += [_metric(key, Function(f"{PKG}.longbench.mean_present")) for key, _, _ in longbench.BUCKETS]
    # No stop strings, samsum included: see `longbench.score` for how its newline stop is applied.
    until: list[str] = []
    return {"include": "_longbench_common_yaml", "task": longbench_task_name(name),
            "dataset_kwargs": {"longbench_task": name}, "metric_list": metrics,
            "generation_kwargs": {**GREEDY, "max_gen_toks": task.max_gen, "until": until}}


def _longbench_groups(folder: str, suffix: str, names: list[str]) -> dict[str, dict]:
    files, base = {}, f"dlmem_longbench{suffix}"
    for category in CATEGORIES:
        members = [longbench_task_name(n) for n in names if longbench.task_of(n).category == category]
        if members:
            files[f"{folder}/_{base}_{category}.yaml"] = _group(f"{base}_{category}", members)
    categories = [f"{base}_{c}" for c in CATEGORIES if f"{folder}/_{base}_{c}.yaml" in files]
    files[f"{folder}/_{base}.yaml"] = _group(base, categories)
    for chat in (True, False):
        members = [longbench_task_name(n) for n in names if longbench.task_of(n).chat == chat]
        kind = "chat" if chat else "nochat"
        files[f"{folder}/_{base}_{kind}.yaml"] = _group(f"{base}_{kind}", members)
    return files


def longbench_files() -> dict[str, dict]:
    files = {"longbench/_longbench_common_yaml": LONGBENCH_COMMON,
             "longbench_e/_longbench_common_yaml": LONGBENCH_COMMON}
    v1 = list(longbench.TASKS)
    e = [f"{n}_e" for n in longbench.TASKS if longbench.TASKS[n].in_e]
    for folder, names in (("longbench", v1), ("longbench_e", e)):
        for name in names:
            files[f"{folder}/{longbench_task_name(name)}.yaml"] = _longbench_task(name)
    files.update(_longbench_groups("longbench", "", v1))
    files.update(_longbench_groups("longbench_e", "_e", e))
    return files


# ---------------------------------------------------------------------------------------------
# MemDLM paper tables
# ---------------------------------------------------------------------------------------------

TABLE3 = ("triviaqa", "passage_retrieval_en", "passage_retrieval_zh", "multifieldqa_en", "multifieldqa_zh",
          "2wikimqa", "dureader", "multi_news", "trec", "samsum", "lcc", "repobench-p")


def _ruler_babilong(ruler_lengths: tuple[str, ...], babilong_lengths: tuple[str, ...]) -> list[str]:
    names = [ruler_task_name(t, n) for t in ("niah_multivalue", "vt", "cwe") for n in ruler_lengths]
    return names + [f"dlmem_babilong_{n}" for n in babilong_lengths]


def paper_files() -> dict[str, dict]:
    table3 = [longbench_task_name(n) for n in TABLE3]
    chat = [n for n, t in zip(table3, TABLE3) if longbench.TASKS[t].chat]
    groups = {
        "dlmem_memdlm_table1": _ruler_babilong(("4k", "8k"), ("2k", "4k", "8k")),
        "dlmem_memdlm_table2": _ruler_babilong(("16k", "32k"), ("16k", "32k")),
        "dlmem_memdlm_table3": table3,
        "dlmem_memdlm_table3_chat": chat,
        "dlmem_memdlm_table3_nochat": [n for n in table3 if n not in chat],
    }
    # The tables mix metrics, so the groups list their members without an aggregate.
    return {f"paper/{name}.yaml": _group(name, members, aggregate=False) for name, members in groups.items()}


def all_files() -> dict[str, str]:
    """Relative path under `tasks/` -> YAML text, for every file this module owns."""
    files = {**ruler_files(), **babilong_files(), **mc_files(), **longbench_files(), **paper_files()}
    header = "# Written by `python -m lm_eval_dlmem.tasks.configs`; edit the tables there, not this file.\n"
    return {path: header + _yaml(cfg) for path, cfg in files.items()}


OWNED = ("ruler", "babilong", "longbench", "longbench_e", "paper")


def _read(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def stale(root: str) -> list[str]:
    """Paths under `root` that differ from what `all_files` would write, or should not exist."""
    wanted = all_files()
    diff = [p for p, text in wanted.items() if _read(os.path.join(root, p)) != text]
    for folder in OWNED:
        for dirpath, _, names in os.walk(os.path.join(root, folder)):
            for n in names:
                rel = os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/")
                if rel not in wanted:
                    diff.append(rel)
    return sorted(diff)


def write(root: str) -> int:
    wanted = all_files()
    for rel in stale(root):
        path = os.path.join(root, rel)
        text = wanted.get(rel)
        if text is None:
            os.remove(path)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return len(wanted)


def main(argv: list[str] | None = None) -> int:
    from . import tasks_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=tasks_path(), help="the tasks/ directory (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        diff = stale(args.root)
        print("\n".join(diff) or "task configs are up to date")
        return 1 if diff else 0
    print(f"{write(args.root)} task config files under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
