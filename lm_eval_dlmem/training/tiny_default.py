"""The tiny default, reproduced from a seed: tokenizer, base dLLM, MetaState, MemDLM, export.

    lm-eval-dlmem train tiny-default --seed 0 --out runs/tiny          # every stage, end to end
    lm-eval-dlmem train tiny-default --out runs/tiny --stages eval     # held-out scores only

Stages (each skipped when its output exists, so an interrupted run continues where it stopped):

    tokenizer  byte-level BPE (2048 tokens, LLaDA specials) on synthetic documents  OUT/tokenizer
    base       `train pretrain --mode mixed` from scratch (masked-diffusion pre-training and
               SFT rows) on the synthetic RULER/BABILong mix, 64-256 tokens, then 256-1024  OUT/base
    data       prompt/response JSONL for the memory trainers (512-1024 tokens)       OUT/memory_*.jsonl
    metastate  `train metastate` on the frozen base (K-step unrolled)               OUT/metastate
    memdlm     `train memdlm`: bi-level outer LoRA on the base                       OUT/memdlm
    export     bf16 safetensors + configs in the embedded layout                     OUT/embedded
    eval       held-out generation accuracy per task for frozen / MetaState / MemDLM OUT/heldout.json

`--install` copies OUT/embedded into the package (`lm_eval_dlmem/embedded/`), which is how the
shipped `tiny-llada*` checkpoints were made. Every stage is the public training command with
fixed arguments (printed before it runs), so each can also be re-run by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

STAGES = ("tokenizer", "base", "data", "metastate", "memdlm", "export", "eval")
BASE_TASKS = ("niah_noise:2,niah_prose:2,niah_multikey,niah_needles,niah_multivalue,niah_multiquery,vt,"
              "babi_qa1:2,babi_qa2,babi_qa3,babi_qa4,babi_qa5")
# MemDLM's inner loop, the same in training (memdlm stage), the eval stage and `lm-eval-dlmem demo`
# (`ffn` targets: the shipped adapter was trained with fast weights on all three FFN projections)
INNER = {"inner_steps": 2, "inner_rank": 8, "inner_alpha": 16, "inner_layer_fraction": 0.25, "inner_targets": "ffn"}
MEMORY_TASKS = "niah_noise,niah_prose,niah_multikey,niah_needles,niah_multivalue,niah_multiquery,vt,babi_qa1,babi_qa2"


def base_commands(out: str, seed: int, threads: int | None) -> list[list[str]]:
    """The two `train pretrain` runs: short contexts (64-256 tokens), then the 256-1024 range.

    Both use `--mode mixed`: half the rows are pre-training rows (any token may be masked, so the
    repeated haystack text teaches copying), half SFT rows (only the answer is masked)."""
    common = ["--tasks", BASE_TASKS, "--mode", "mixed", "--seed", str(seed), "--compile",
              "--eval-size", "8"]
    if threads:
        common += ["--threads", str(threads)]
    short = ["--output-dir", os.path.join(out, "base_short"), "--tokenizer", os.path.join(out, "tokenizer"),
             "--d-model", "128", "--layers", "4", "--heads", "4", "--mlp-hidden", "256",
             "--min-tokens", "64", "--max-tokens", "256", "--batch-tokens", "2048", "--data-seed", str(seed),
             "--max-steps", "1500", "--eval-every", "250", "--save-every", "250", "--eval-tokens", "256",
             "--lr", "3e-3", "--warmup-steps", "30"]
    full = ["--output-dir", os.path.join(out, "base"), "--init-from", os.path.join(out, "base_short"),
            "--min-tokens", "256", "--max-tokens", "1024", "--batch-tokens", "4096", "--data-seed", str(seed + 1),
            "--max-steps", "300", "--eval-every", "100", "--save-every", "100", "--eval-tokens", "768",
            "--lr", "1e-3", "--warmup-steps", "10"]
    return [short + common, full + common]


def memory_data(out: str, seed: int, tokenizer, n_train: int = 2000, n_eval: int = 64) -> tuple[str, str]:
    """Prompt/response JSONL (no chat template: the prompts already end in the answer prefix)."""
    from .synthetic import SyntheticConfig, iter_examples, parse_tasks

    paths = []
    for name, n, data_seed in (("train", n_train, seed + 2), ("eval", n_eval, seed + 3)):
        path = os.path.join(out, f"memory_{name}.jsonl")
        cfg = SyntheticConfig(parse_tasks(MEMORY_TASKS), 512, 1024, data_seed)
        with open(path + ".tmp", "w") as f:
            for ex, _ in zip(iter_examples(cfg, tokenizer), range(n)):
                f.write(json.dumps({"prompt": ex["prompt"], "response": ex["answer"], "task": ex["task"]}) + "\n")
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths[0], paths[1]


def metastate_command(out: str, seed: int) -> list[str]:
    return ["--backbone", os.path.join(out, "base"), "--data", os.path.join(out, "memory_train.jsonl"),
            "--eval-data", os.path.join(out, "memory_eval.jsonl"), "--no-chat-template", "--max-length", "1100",
            "--output-dir", os.path.join(out, "metastate"), "--width", "128", "--heads", "4", "--slots", "16",
            "--unroll-steps", "4", "--denoise-steps", "16",
            "--max-steps", "200", "--batch-size", "4", "--lr", "5e-3", "--warmup-steps", "10",
            "--save-every", "50", "--eval-every", "50", "--seed", str(seed), "--cpu"]


def memdlm_command(out: str, seed: int) -> list[str]:
    return ["--backbone", os.path.join(out, "base"), "--data", os.path.join(out, "memory_train.jsonl"),
            "--eval-data", os.path.join(out, "memory_eval.jsonl"), "--no-chat-template", "--max-length", "1100",
            "--output-dir", os.path.join(out, "memdlm"), "--no-4bit", "--lora-r", "8", "--lora-alpha", "16",
            "--truncation", "filter", "--batching", "random",  # as the shipped adapter was trained
            *(x for k, v in INNER.items() for x in (f"--{k.replace('_', '-')}", str(v))),
            "--max-steps", "300", "--batch-size", "2", "--lr", "2e-3", "--eval-batches", "4",
            "--save-every", "50", "--eval-every", "50", "--seed", str(seed), "--cpu"]


def run_stage(name: str, module: str, argv: list[str]) -> None:
    import importlib

    print(f"[tiny-default] {name}: lm-eval-dlmem train {module.rsplit('.', 1)[-1]} {' '.join(argv)}", flush=True)
    code = importlib.import_module(module).main(argv)
    if code:
        raise SystemExit(f"[tiny-default] stage {name} failed with exit code {code}.")


# ---------------------------------------------------------------------------------------------
# Export into the embedded layout
# ---------------------------------------------------------------------------------------------


def _to_bf16(src: str, dst: str) -> None:
    """Copy a safetensors file with every floating tensor stored in bfloat16."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(src)
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}, dst,
              metadata={"format": "pt"})


def _relative(value, out: str):
    """A path inside the run directory as `RUN/...`; anything else unchanged."""
    root = os.path.abspath(out)
    if isinstance(value, str) and os.path.isabs(value) and os.path.commonpath([root, value]) == root:
        return os.path.join("RUN", os.path.relpath(value, root))
    return value


def export(out: str, dest: str) -> None:
    """OUT/{base,metastate,memdlm} -> DEST/tiny-llada{,-metastate,-memdlm}, weights in bfloat16.

    The base config keeps `dtype: float32`, so `dtype=auto` loads float32 weights (the bf16
    rounding is the only change); the adapter records `tiny-llada` as its base model."""
    names = {"base": "tiny-llada", "metastate": "tiny-llada-metastate", "memdlm": "tiny-llada-memdlm"}
    for stage, name in names.items():
        src, dst = os.path.join(out, stage), os.path.join(dest, name)
        if not os.path.isdir(src):
            print(f"[tiny-default] export: {src} does not exist; {name} skipped.")
            continue
        os.makedirs(dst, exist_ok=True)
        for f in sorted(os.listdir(src)):
            path = os.path.join(src, f)
            if not os.path.isfile(path) or not f.endswith((".safetensors", ".json", ".jinja")):
                continue  # trainer state, logs, pickles and model cards stay behind
            if f.endswith(".safetensors"):
                _to_bf16(path, os.path.join(dst, f))
            elif f == "config.json":
                with open(path) as fh:
                    config = json.load(fh)
                config["dtype"] = "float32"
                with open(os.path.join(dst, f), "w") as fh:
                    json.dump(config, fh, indent=2, sort_keys=True)
            elif f.endswith(".json") and not f.startswith("tokenizer"):  # tokenizer files: verbatim
                with open(path) as fh:
                    config = json.load(fh)
                if f == "adapter_config.json":
                    config["base_model_name_or_path"] = "tiny-llada"
                if isinstance(config, dict):  # run-directory paths (training records) become relative
                    config = {k: _relative(v, out) for k, v in config.items()}
                with open(os.path.join(dst, f), "w") as fh:
                    json.dump(config, fh, indent=2, sort_keys=True)
            else:
                shutil.copy(path, os.path.join(dst, f))
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dest) for f in fs)
    print(f"[tiny-default] exported {dest} ({total / 2**20:.1f} MiB)")


# ---------------------------------------------------------------------------------------------
# Held-out generation accuracy
# ---------------------------------------------------------------------------------------------


def score(example: dict, output: str) -> float:
    """RULER's string_match_all for the retrieval tasks, BABILong's compare_answers for bAbI (0-100)."""
    from ..tasks.metrics import TASK_LABELS, compare_answers, string_match_all

    task = example["task"]
    if task.startswith("babi_"):
        label = example["answer"].rstrip(".").split()[-1]
        question = example["prompt"].rsplit("Question: ", 1)[-1]
        return 100.0 * compare_answers(label, output, question, TASK_LABELS[task[5:]])
    refs = example["answer"].strip(" .").replace(",", " ").split()
    return string_match_all(output.strip(), refs)


def heldout_accuracy(backbone, memory, examples: list[dict], gen_length: int = 32, batch_size: int = 8) -> dict:
    """Decode every example's answer (greedy, one token per step) and score it.

    Returns:
        {task: (mean score, standard error, n)} and "all".
    """
    from ..decoding.config import DecodeConfig

    cfg = DecodeConfig(gen_length=gen_length, steps=gen_length, block_length=gen_length)
    scores: dict[str, list[float]] = {}
    for e, _, text in decoded_answers(backbone, memory, examples, cfg, batch_size):
        scores.setdefault(e["task"], []).append(score(e, text))
    scores["all"] = [s for v in list(scores.values()) for s in v]
    return {k: _mean_se(v) for k, v in scores.items()}


def decoded_answers(backbone, memory, examples: list[dict], config, batch_size: int = 8):
    """Decode each example's prompt with `config` in left-padded batches of `batch_size`.

    Yields:
        (example, the decoded row [gen_length] token ids, its text up to the first stop token).
    """
    from ..decoding.engine import generate, left_pad

    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        ids, mask = left_pad([e["input_ids"][: e["prompt_len"]] for e in chunk], backbone.spec.eos_id)
        out = generate(backbone, ids, mask, config, memory)
        for e, row in zip(chunk, out.tolist()):
            stop = next((k for k, t in enumerate(row) if t in backbone.spec.stop_ids), len(row))
            yield e, row, backbone.tokenizer.decode(row[:stop], skip_special_tokens=True)


def _mean_se(values: list[float]) -> tuple[float, float, int]:
    """(mean, lm-eval's standard error of the mean, n); the error of a single value is 0."""
    from lm_eval.api.metrics import mean, mean_stderr

    return round(mean(values), 2), round(mean_stderr(values), 2) if len(values) > 1 else 0.0, len(values)


def heldout_examples(tokenizer, seed: int, per_task: int, tokens: int) -> list[dict]:
    """Examples from data seed + 1000: never seen in training (which uses seed, seed + 1, ...)."""
    from .synthetic import EVAL_TASKS, build_example

    return [build_example(t, i, tokens, tokenizer, seed + 1000) for t in sorted(EVAL_TASKS) for i in range(per_task)]


def evaluate_all(out: str, seed: int, per_task: int, tokens: int) -> dict:
    """Held-out generation accuracy of the frozen base, base + MetaState, base + MemDLM."""
    from ..backbones.loading import load_backbone
    from ..memory.adapters import apply_adapter
    from ..memory.fast_weights import FastWeightMemory, MemDLMConfig
    from ..memory.metastate import MetaState

    base = load_backbone(os.path.join(out, "base"), dtype="float32")
    examples = heldout_examples(base.tokenizer, seed, per_task, tokens)
    report = {"frozen": heldout_accuracy(base, None, examples)}
    if os.path.isdir(os.path.join(out, "metastate")):
        report["metastate"] = heldout_accuracy(base, MetaState.from_pretrained(os.path.join(out, "metastate"), base), examples)
    if os.path.isdir(os.path.join(out, "memdlm")):
        adapted = apply_adapter(load_backbone(os.path.join(out, "base"), dtype="float32"), os.path.join(out, "memdlm"))
        memory = FastWeightMemory(adapted, MemDLMConfig(**INNER, seed=seed))
        report["memdlm"] = heldout_accuracy(adapted, memory, examples)
    with open(os.path.join(out, "heldout.json"), "w") as f:
        json.dump({"per_task": per_task, "tokens": tokens, "scores": report}, f, indent=2)
    for variant, scores in report.items():
        print(f"[tiny-default] {variant:9s} " + ", ".join(f"{k} {m:.1f}±{se:.1f}" for k, (m, se, _) in scores.items()))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lm-eval-dlmem train tiny-default", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the tokenizer corpus, data, weights and masks")
    p.add_argument("--out", required=True, help="run directory (stages skip what already exists there)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--eval-per-task", type=int, default=16, help="held-out examples per task in the eval stage")
    p.add_argument("--eval-tokens", type=int, default=768, help="length of the held-out examples")
    p.add_argument("--install", action="store_true", help="copy the exported checkpoints into lm_eval_dlmem/embedded/")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"Unknown stage(s) {unknown}; choose from {', '.join(STAGES)}.")
    os.makedirs(args.out, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    done = lambda sub, f: os.path.isfile(os.path.join(args.out, sub, f))  # noqa: E731
    if "tokenizer" in stages and not done("tokenizer", "tokenizer.json"):
        from .synthetic import corpus_texts
        from .tokenizer import train_tokenizer

        train_tokenizer(corpus_texts(3000, seed=args.seed), vocab_size=2048).save_pretrained(
            os.path.join(args.out, "tokenizer"))
    if "base" in stages:
        for argv_ in base_commands(args.out, args.seed, args.threads):
            sub = argv_[argv_.index("--output-dir") + 1]
            if not os.path.isfile(os.path.join(sub, "model.safetensors")):
                run_stage("base", "lm_eval_dlmem.training.pretrain", argv_ + _resume(sub))
    if "data" in stages and not os.path.isfile(os.path.join(args.out, "memory_eval.jsonl")):
        from ..backbones.loading import load_tokenizer

        memory_data(args.out, args.seed, load_tokenizer(os.path.join(args.out, "tokenizer")))
    if "metastate" in stages and not done("metastate", "metastate.safetensors"):
        run_stage("metastate", "lm_eval_dlmem.training.metastate",
                  metastate_command(args.out, args.seed) + _resume(os.path.join(args.out, "metastate")))
    if "memdlm" in stages and not done("memdlm", "adapter_model.safetensors"):
        run_stage("memdlm", "lm_eval_dlmem.training.memdlm",
                  memdlm_command(args.out, args.seed) + _resume(os.path.join(args.out, "memdlm")))
    if "export" in stages:
        export(args.out, os.path.join(args.out, "embedded"))
    if "eval" in stages:
        evaluate_all(args.out, args.seed, args.eval_per_task, args.eval_tokens)
    if args.install:
        from ..embedded import EMBEDDED_DIR, NAMES

        for name in NAMES:
            src = os.path.join(args.out, "embedded", name)
            if os.path.isdir(src):
                shutil.rmtree(os.path.join(EMBEDDED_DIR, name), ignore_errors=True)
                shutil.copytree(src, os.path.join(EMBEDDED_DIR, name))
                print(f"[tiny-default] installed {name} into {EMBEDDED_DIR}")
    return 0


def _resume(output_dir: str) -> list[str]:
    """`--resume latest` when an interrupted run left checkpoints in `output_dir`."""
    found = os.path.isdir(output_dir) and any(d.startswith("checkpoint-") for d in os.listdir(output_dir))
    return ["--resume", "latest"] if found else []


if __name__ == "__main__":
    sys.exit(main())
