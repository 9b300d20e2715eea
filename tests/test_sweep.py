"""`lm-eval-dlmem sweep`: spec parsing, runs through lm-eval on tiny checkpoints, skip/resume,
a crashing run that does not stop the sweep, and the final comparison (table and plot)."""

import json
import os
import shutil
from pathlib import Path

import pytest
from _harness_runs import lm_eval_runner

from lm_eval_dlmem.leaderboard import sweep as sweep_mod
from lm_eval_dlmem.leaderboard.spec import RunSpec, expand_env, load_sweep


@pytest.fixture
def quick_lm_eval(monkeypatch):
    """In-process lm-eval runs on tiny checkpoints (see _harness_runs)."""
    yield from lm_eval_runner(monkeypatch)


TESTS_DIR = Path(__file__).parent
EXAMPLES = TESTS_DIR.parent / "examples" / "sweeps"

LENGTH_TASK = """task: tl_ruler_gen_{n}k
dataset_path: ""
custom_dataset: !function utils.load
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {n}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def length_tasks(tmp_path_factory):
    """Two generate_until tasks whose names carry a context length, as RULER's do."""
    d = tmp_path_factory.mktemp("length_tasks")
    shutil.copy(TESTS_DIR / "tasks" / "utils.py", d / "utils.py")
    for n in (1, 2):
        (d / f"tl_ruler_gen_{n}k.yaml").write_text(LENGTH_TASK.format(n=n))
    return str(d)


def write_yaml(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data))
    return str(path)


# ---- spec parsing ---------------------------------------------------------------------------
def test_defaults_merge_and_model_args_strings(tmp_path):
    f = write_yaml(tmp_path / "s.yaml", {
        "defaults": {"model": "metastate-llada", "model_args": {"pretrained": "p", "steps": 8}, "tasks": "a,b"},
        "runs": [{"name": "x"}, {"name": "y", "model_args": {"metastate": "ckpt"}},
                 {"name": "z", "model_args": "pretrained=q,steps=4", "tasks": ["c"]}],
    })
    sweep = load_sweep(f)
    x, y, z = sweep.runs
    assert x.tasks == ["a", "b"] and x.model_args == {"pretrained": "p", "steps": 8}
    assert y.model_args == {"pretrained": "p", "steps": 8, "metastate": "ckpt"}
    assert z.model_args == {"pretrained": "q", "steps": 4} and z.tasks == ["c"]
    assert sweep.output_dir == os.path.join("runs", "s")
    assert x.fingerprint() != y.fingerprint()
    assert x.fingerprint() == RunSpec(**{**x.to_dict(), "name": "renamed"}).fingerprint()
    cmd = y.lm_eval_command("out/y")
    assert "--model_args pretrained=p,steps=8,metastate=ckpt" in cmd and "--use_cache out/y/cache/lm" in cmd


@pytest.mark.parametrize("data, message", [
    ({"runs": [{"name": "a", "model": "m", "taks": ["t"]}]}, "unknown key 'taks'. Did you mean tasks"),
    ({"runs": [{"name": "a", "model": "m"}]}, "tasks is empty"),
    ({"runs": [{"name": "a/b", "model": "m", "tasks": "t"}]}, "must be a directory name"),
    ({"runs": [{"name": "a", "tasks": "t"}]}, "model is required"),
    ({"runs": [{"name": "a", "model": "m", "tasks": "t"}] * 2}, "repeated: \\['a'\\]"),
    ({"runs": [{"name": "a", "model": "m", "tasks": "t", "seed": [1, 2]}]}, "seed must be"),
    ({"run": []}, "expected a mapping with a 'runs' list"),
    ({"runs": [{"name": "a", "model": "m", "tasks": "t", "model_args": {"x": "${NOT_SET_ANYWHERE_42}"}}]},
     "NOT_SET_ANYWHERE_42 is not set"),
])
def test_invalid_sweeps_are_rejected_with_the_reason(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(write_yaml(tmp_path / "bad.yaml", data))


def test_env_expansion(monkeypatch):
    monkeypatch.setenv("CKPT_DIR", "/ckpt")
    assert expand_env({"a": ["${CKPT_DIR}/ms", "${UNSET_X_1:-dflt}", 3]}) == {"a": ["/ckpt/ms", "dflt", 3]}


def test_shipped_sweeps_load(monkeypatch, tmp_path):
    monkeypatch.setenv("METASTATE_CKPT", "/ckpt/ms-llada")
    monkeypatch.setenv("TINY_CKPT", "/ckpt/tiny")
    table1 = load_sweep(str(EXAMPLES / "memdlm_table1.yaml"))
    assert [r.name for r in table1.runs] == ["standard", "train_only", "train_inf",
                                             "llada21_standard", "llada21_train_only", "llada21_train_inf"]
    assert table1.runs[0].model_args["pretrained"] == "inclusionAI/LLaDA-MoE-7B-A1B-Base"
    assert table1.runs[2].model_args["adapter"] == "JarvisPei/LLaDA-MoE-7B-A1B-Base-MemDLM"
    assert table1.runs[2].model_args["inner_steps"] == 2 and "inner_steps" not in table1.runs[1].model_args
    _check_llada21_rows(table1.runs[3:])
    ms = load_sweep(str(EXAMPLES / "metastate_frozen_vs_augmented.yaml"))
    frozen, aug = ms.runs
    assert {k for k in aug.model_args if aug.model_args[k] != frozen.model_args.get(k)} == {"metastate"}
    assert aug.model_args["metastate"] == "/ckpt/ms-llada"
    tiny = load_sweep(str(EXAMPLES / "tiny_demo.yaml"), output_dir=str(tmp_path))
    assert tiny.runs[0].model_args["pretrained"] == "/ckpt/tiny" and tiny.output_dir == str(tmp_path)


def _check_llada21_rows(runs):
    """MemDLM's LLaDA2.1-mini rows: one argument apart, the base/adapter the paper evaluates, and
    the decoding of memdlm/eval/llada21.py (LLaDA2.0 sampler, 32-token blocks, 32 steps per block,
    threshold 0.95) on the tasks and 4-bit base of the LLaDA-MoE rows. The memdlm-llada2 preset
    sets strategy=llada2; it is given here so the check does not load the preset."""
    from lm_eval_dlmem.model_args import ModelArgs, decode_config

    standard, train_only, train_inf = runs
    assert {r.model for r in runs} == {"memdlm-llada2"} and all(r.tasks == ["dlmem_memdlm_table1"] for r in runs)
    assert standard.model_args["pretrained"] == "inclusionAI/LLaDA2.1-mini" and "adapter" not in standard.model_args
    assert train_only.model_args == {**standard.model_args, "adapter": "JarvisPei/LLaDA2.1-mini-MemDLM"}
    assert {k: v for k, v in train_inf.model_args.items() if train_only.model_args.get(k) != v} == dict(
        inner_steps=2, inner_lr=0.1, inner_rank=32, inner_alpha=64, inner_layer_fraction=0.1)
    for run in runs:
        args = ModelArgs.from_kwargs({"strategy": "llada2"}, **run.model_args)  # every arg name is valid
        assert args.load_in_4bit and args.max_length == 8192
        config = decode_config(args, 64, {})
        assert (config.strategy, config.block_length, config.steps, config.threshold, config.temperature) == (
            "llada2", 32, 32, 0.95, 0.0)


# ---- end to end -----------------------------------------------------------------------------
def test_sweep_runs_skips_survives_a_crash_and_compares(tiny_ckpts, length_tasks, tmp_path, monkeypatch, capsys,
                                                        quick_lm_eval):
    import lm_eval

    calls = []
    real = lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: calls.append(kw["model_args"]) or real(**kw))
    out = tmp_path / "out"
    data = {
        "output_dir": str(out),
        "defaults": {"model": "metastate-llada", "model_args": {"pretrained": tiny_ckpts["llada"]},
                     "tasks": ["tl_ruler_gen_1k", "tl_ruler_gen_2k"], "include_path": [length_tasks],
                     "include_defaults": False, "device": "cpu", "batch_size": 4, "limit": 3},
        "runs": [{"name": "frozen"},
                 {"name": "broken", "model_args": {"pretrained": str(tmp_path / "no-such-ckpt")}},
                 {"name": "steps2", "model_args": {"steps": 2}}],
    }
    f = write_yaml(tmp_path / "sweep.yaml", data)
    assert sweep_mod.main([f]) == 1
    captured = capsys.readouterr()
    assert "1 run(s) failed" in captured.err and "broken" in captured.err
    assert "Traceback" in (out / "broken" / "error.txt").read_text()
    for name in ("frozen", "steps2"):
        done = json.loads((out / name / "COMPLETE.json").read_text())
        assert Path(done["results_file"]).is_file()
        assert (out / name / "command.txt").read_text().startswith("lm_eval --model metastate-llada")
    assert not (out / "broken" / "COMPLETE.json").exists()
    # the comparison covers the finished runs, baseline first, with the length plot
    table = (out / "compare.md").read_text()
    assert table.splitlines()[0] == "| Task | Metric | Filter |  | frozen | steps2 | Δ steps2 |"
    assert "| tl_ruler_gen_1k | exact_match | none |" in table and "steps=2" in table
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert len(calls) == 3

    # rerun: complete runs are skipped, the failed one is tried again (and fails again)
    assert sweep_mod.main([f]) == 1
    assert len(calls) == 4 and "complete, skipped" in capsys.readouterr().out
    # a changed spec reruns that run; its previous attempt is kept aside
    data["runs"][2]["model_args"]["steps"] = 1
    data["runs"].pop(1)
    assert sweep_mod.main([write_yaml(tmp_path / "sweep.yaml", data)]) == 0
    assert len(calls) == 5 and calls[-1]["steps"] == 1
    assert len(list((out / ".superseded").glob("steps2-*/COMPLETE.json"))) == 1


def test_tiny_demo_sweep(tiny_ckpts, tmp_path, monkeypatch, quick_lm_eval):
    monkeypatch.setenv("TINY_CKPT", tiny_ckpts["llada"])
    monkeypatch.setenv("SWEEP_OUTPUT_DIR", str(tmp_path / "demo"))
    assert sweep_mod.main([str(EXAMPLES / "tiny_demo.yaml")]) == 0
    table = (tmp_path / "demo" / "compare.md").read_text()
    header, _, *rows = table.split("\n\n")[0].splitlines()
    assert header == "| Task | Metric | Filter |  | default | threshold | Δ threshold |"
    assert {r.split("|")[1].strip() for r in rows} >= {"dlmem_demo_gen", "dlmem_demo_mc"}


def tiny_gpt2(tokenizer_dir, out):
    """A random one-layer GPT-2 with the tiny checkpoint's tokenizer: an `hf` model, offline."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_sweep_and_compare_with_an_hf_baseline(tiny_ckpts, tmp_path, quick_lm_eval):
    out = tmp_path / "out"
    data = {
        "output_dir": str(out),
        "defaults": {"tasks": ["t_gen", "t_mc"], "include_path": [str(TESTS_DIR / "tasks")],
                     "include_defaults": False, "device": "cpu", "limit": 3},
        "runs": [{"name": "gpt2", "model": "hf",
                  "model_args": {"pretrained": tiny_gpt2(tiny_ckpts["llada"], tmp_path / "g")}},
                 {"name": "llada", "model": "metastate-llada",
                  "model_args": {"pretrained": tiny_ckpts["llada"], "mc_num": 4, "mc_batch_size": 4}}],
    }
    assert sweep_mod.main([write_yaml(tmp_path / "sweep.yaml", data)]) == 0
    rows = {r.split("|")[1].strip() + "/" + r.split("|")[2].strip(): r.split("|")[5:8]
            for r in (out / "compare.md").read_text().split("\n\n")[0].splitlines()[2:]}
    assert set(rows) == {"t_gen/exact_match", "t_mc/acc"}
    base, llada, delta = (float(c.split("±")[0]) for c in rows["t_mc/acc"])
    assert delta == pytest.approx(llada - base)
    assert "- **gpt2** (baseline): hf (pretrained=" in (out / "compare.md").read_text()


# ---- stale, duplicated and concurrent runs ----------------------------------------------------
@pytest.fixture
def fake_lm_eval(monkeypatch):
    """`simple_evaluate` replaced by a stub that returns one score and one sample per run, saved by
    lm-eval's real EvaluationTracker: the sweep's bookkeeping without a model. Records the calls;
    `fail_after_save` makes a call crash once lm-eval's files are written (a kill mid-run)."""
    import lm_eval

    state = {"calls": [], "fail_after_save": False}

    def stub(**kw):
        state["calls"].append(kw["model_args"])
        kw["evaluation_tracker"].general_config_tracker.model_name_sanitized = "m"
        return {"results": {"t": {"alias": "t", "acc,none": 0.5}}, "configs": {"t": {}},
                "config": {"model": kw["model"], "model_args": kw["model_args"], "limit": None},
                "samples": {"t": [{"doc_id": 0, "doc_hash": "d", "prompt_hash": "p", "target_hash": "t",
                                   "arguments": [["q", {}]], "resps": [["a"]], "filtered_resps": ["a"],
                                   "target": "a"}]}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", stub)
    monkeypatch.setattr(sweep_mod.TaskManagers, "get", lambda self, *a, **k: None)
    real_install = sweep_mod.install_outputs

    def install(staging, path):
        if state["fail_after_save"]:
            raise KeyboardInterrupt  # killed after lm-eval wrote its files, before they were moved
        return real_install(staging, path)

    monkeypatch.setattr(sweep_mod, "install_outputs", install)
    return state


def one_run_sweep(tmp_path, ckpt):
    data = {"output_dir": str(tmp_path / "out"), "runs": [{"name": "r", "model": "metastate-llada",
                                                          "model_args": {"pretrained": str(ckpt)}, "tasks": ["t"]}]}
    return write_yaml(tmp_path / "sweep.yaml", data)


def run_files(run):
    return sorted(p.name.split("_")[0] for p in run.rglob("*_*.json*") if ".superseded" not in p.parts)


def test_a_checkpoint_retrained_in_place_is_rerun_with_a_fresh_cache(tmp_path, fake_lm_eval, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"old weights")
    f = one_run_sweep(tmp_path, ckpt)
    assert sweep_mod.main([f]) == 0
    (tmp_path / "out" / "r" / "cache").mkdir()  # lm-eval's --use_cache answers of the old weights
    assert sweep_mod.main([f]) == 0 and len(fake_lm_eval["calls"]) == 1
    assert "complete, skipped" in capsys.readouterr().out
    (ckpt / ".cache").mkdir()  # tools' hidden files do not count
    assert sweep_mod.main([f]) == 0 and len(fake_lm_eval["calls"]) == 1

    (ckpt / "model.safetensors").write_bytes(b"new weights")  # same size: the mtime tells
    os.utime(ckpt / "model.safetensors", ns=(1, 10**18))
    assert sweep_mod.main([f]) == 0 and len(fake_lm_eval["calls"]) == 2
    out = capsys.readouterr().out
    assert "r: the files of pretrained= changed on disk; the previous attempt was moved to" in out
    assert not (tmp_path / "out" / "r" / "cache").exists()
    assert len(list((tmp_path / "out" / ".superseded").glob("r-*/cache"))) == 1
    assert sweep_mod.main([f, "--dry_run"]) == 0 and "r [complete]" in capsys.readouterr().out


def test_force_and_a_kill_before_the_marker_leave_one_results_file(tmp_path, fake_lm_eval):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    f = one_run_sweep(tmp_path, ckpt)
    run = tmp_path / "out" / "r"
    assert sweep_mod.main([f]) == 0
    assert run_files(run) == ["results", "samples"]
    assert sweep_mod.main([f, "--force"]) == 0
    assert len(fake_lm_eval["calls"]) == 2 and run_files(run) == ["results", "samples"]
    done = json.loads((run / "COMPLETE.json").read_text())
    assert Path(done["results_file"]).is_file() and Path(done["results_file"]).parent.parent == run

    (run / "COMPLETE.json").unlink()  # killed between the results file and the marker
    assert sweep_mod.main([f]) == 0 and run_files(run) == ["results", "samples"]

    fake_lm_eval["fail_after_save"] = True  # killed while lm-eval's files are still staged
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.main([f, "--force"])
    assert run_files(run) == ["results", "samples"] and (run / "COMPLETE.json").is_file()
    fake_lm_eval["fail_after_save"] = False
    assert sweep_mod.main([f, "--force"]) == 0 and run_files(run) == ["results", "samples"]
    assert not list((tmp_path / "out" / ".staging").rglob("*.json*"))
    assert not list(run.glob(".*.tmp"))


HOLD_LOCK = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_a_run_locked_by_a_live_sweep_is_skipped_and_a_dead_ones_lock_is_not(tmp_path, fake_lm_eval, capsys):
    import subprocess
    import sys

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    f = one_run_sweep(tmp_path, ckpt)
    lock = tmp_path / "out" / ".locks" / "r.lock"
    lock.parent.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        assert sweep_mod.main([f]) == 0
        assert fake_lm_eval["calls"] == []
        assert f"r: being run by another sweep (pid {other.pid}), skipped" in capsys.readouterr().out
        assert sweep_mod.main([f, "--dry_run"]) == 0
        assert f"r [running (pid {other.pid})]" in capsys.readouterr().out
    finally:
        other.kill()
        other.wait()
    assert sweep_mod.main([f]) == 0 and len(fake_lm_eval["calls"]) == 1  # the kernel dropped its lock
    assert (tmp_path / "out" / "r" / "COMPLETE.json").is_file()
