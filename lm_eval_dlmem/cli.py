"""`lm-eval-dlmem`: the project's command line.

    lm-eval-dlmem demo                      frozen vs MetaState vs MemDLM on the shipped tiny default
                                            (short RULER/BABILong through lm-eval, offline, CPU)
    lm-eval-dlmem demo --random             the one-minute smoke run: a random tiny LLaDA, demo tasks
    lm-eval-dlmem eval ARGS...              `lm_eval ARGS...` with our models and tasks registered
    lm-eval-dlmem make-tiny FAMILY PATH     write a tiny official-format checkpoint
    lm-eval-dlmem tasks-path                print the directory to pass to --include_path
    lm-eval-dlmem train metastate|memdlm    train a memory (see --help of each)
    lm-eval-dlmem train pretrain            masked-diffusion pre-training / SFT of a small backbone
    lm-eval-dlmem train tiny-default        reproduce the embedded tiny models from a seed
    lm-eval-dlmem analyze exposure-bias     MemDLM's exposure-bias curve
    lm-eval-dlmem compare RESULTS...        frozen-vs-augmented table (and plot) from lm-eval outputs
    lm-eval-dlmem sweep SWEEP.yaml          run a list of evaluations, resumable
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .extras import MissingExtraError

# subcommand -> module exposing `main(argv) -> int`
DELEGATES = {
    ("train", "metastate"): "lm_eval_dlmem.training.metastate",
    ("train", "memdlm"): "lm_eval_dlmem.training.memdlm",
    ("train", "pretrain"): "lm_eval_dlmem.training.pretrain",
    ("train", "tiny-default"): "lm_eval_dlmem.training.tiny_default",
    ("analyze", "exposure-bias"): "lm_eval_dlmem.analysis.exposure_bias",
    ("compare",): "lm_eval_dlmem.leaderboard.compare",
    ("sweep",): "lm_eval_dlmem.leaderboard.sweep",
}


def _offline_defaults() -> None:
    # The demo and tests never need the network; without these lm-eval/transformers retry for minutes.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _positive_int(text: str) -> int:
    """argparse type: 0 and negative sizes are refused, not read as "use the default"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def cmd_make_tiny(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lm-eval-dlmem make-tiny", description="Write a tiny checkpoint in the official format.")
    from .backbones.spec import FAMILIES, get_spec

    p.add_argument("family", choices=list(FAMILIES), help="backbone family")
    p.add_argument("path", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    p.add_argument("--vocab-size", type=_positive_int, default=None, help="model vocabulary (tokenizer padded to match)")
    p.add_argument("--hidden", type=_positive_int, default=None,
                   help="hidden size: a multiple of 2 x the attention heads (4), e.g. 64")
    p.add_argument("--layers", type=_positive_int, default=None, help="number of layers")
    args = p.parse_args(argv)
    from .testing import check_tiny_sizes, make_tiny_checkpoint

    keys = get_spec(args.family).size_keys
    flags = {keys.hidden: args.hidden, keys.layers: args.layers}
    sizes = {key: value for key, value in flags.items() if value is not None}
    check_tiny_sizes(args.family, {**get_spec(args.family).tiny_sizes, **sizes},
                     labels={keys.hidden: "--hidden", keys.layers: "--layers"})
    print(make_tiny_checkpoint(args.family, args.path, seed=args.seed, vocab_size=args.vocab_size, **sizes))
    return 0


def cmd_tasks_path(argv: list[str]) -> int:
    from .tasks import tasks_path

    print(tasks_path())
    return 0


def cmd_eval(argv: list[str]) -> int:
    """Fallback entry: the real lm-eval CLI with our models registered and our tasks included."""
    from ._autoload import register

    register()
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        from .tasks import tasks_path

        argv = [*argv, "--include_path", tasks_path()]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def cmd_demo(argv: list[str]) -> int:
    if "--random" in argv:
        from .demo import main as demo_main

        return demo_main([a for a in argv if a != "--random"])
    from .demo_compare import main as compare_main

    return compare_main(argv)


def _run(name: str, command) -> int:
    """Run a subcommand; a bad argument, path or file (ValueError / OSError, which our checks raise
    with the problem and the fix in the message) or a missing extra prints that message instead of
    a traceback.
    LM_EVAL_DLMEM_TRACEBACK=1 shows the traceback too."""
    try:
        return command() or 0
    except (ValueError, OSError, MissingExtraError) as e:
        if os.environ.get("LM_EVAL_DLMEM_TRACEBACK") == "1":
            raise
        print(f"lm-eval-dlmem {name}: error: {e}\n(set LM_EVAL_DLMEM_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["demo"], ["make-tiny"]):
        _offline_defaults()
    commands = {"demo": cmd_demo, "eval": cmd_eval, "make-tiny": cmd_make_tiny, "tasks-path": cmd_tasks_path}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] in commands:
        return _run(argv[0], lambda: commands[argv[0]](argv[1:]))
    for key, module in DELEGATES.items():
        if tuple(argv[: len(key)]) == key:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                print(f"`lm-eval-dlmem {' '.join(key)}` is not available in this install ({e}).", file=sys.stderr)
                return 2
            return _run(" ".join(key), lambda: mod.main(argv[len(key):]))
    known = sorted(list(commands) + [" ".join(k) for k in DELEGATES])
    print(f"Unknown command {' '.join(argv[:2])!r}. Commands: {', '.join(known)}.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
