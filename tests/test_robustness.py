"""What users get wrong, and edge inputs: each case gives a clear message or a correct result,
and no case loses finished results. In-process through the LM or `simple_evaluate`; one real
`lm_eval` subprocess checks what the command line shows."""

import logging
import os
import subprocess
import sys

import pytest
from _harness_runs import TEST_TASKS, lm_eval_runner, responses
from lm_eval.api.instance import Instance


@pytest.fixture
def quick_lm_eval(monkeypatch):
    """In-process lm-eval runs on tiny checkpoints (see _harness_runs)."""
    yield from lm_eval_runner(monkeypatch)


GEN = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}


def make_lm(ckpt, cls_name="MetaStateLLaDA", **args):
    from lm_eval_dlmem import harness

    return getattr(harness, cls_name)(**({"pretrained": ckpt} if ckpt else {}), device="cpu", **args)


def gen_requests(prompts, gen_kwargs=GEN):
    return [Instance("generate_until", doc={}, arguments=(p, dict(gen_kwargs)), idx=i) for i, p in enumerate(prompts)]


@pytest.fixture
def spy_generate(monkeypatch):
    """Record the prompt batches reaching the decoding engine; optionally fail on call N."""
    import lm_eval_dlmem.decoding.engine as gen

    calls, real = {"shapes": [], "fail_on": None}, gen.generate

    def spy(backbone, input_ids, *args, **kwargs):
        calls["shapes"].append(tuple(input_ids.shape))
        if calls["fail_on"] == len(calls["shapes"]):
            raise RuntimeError("simulated crash (e.g. the job was killed)")
        return real(backbone, input_ids, *args, **kwargs)

    monkeypatch.setattr(gen, "generate", spy)
    return calls


# ---- loading ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, error, message", [
    ({}, ValueError, "pretrained= is required"),
    ({"pretrained": "/no/such/checkpoint"}, FileNotFoundError, "is not an existing directory"),
    ({"pretrained": TEST_TASKS}, FileNotFoundError, "without config.json"),
    ({"pretrained": "no-such-org/no-such-model"}, FileNotFoundError, "Could not find 'no-such-org/no-such-model'"),
])
def test_wrong_or_missing_pretrained(args, error, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(error, match=message):
        make_lm(None, **args)


@pytest.mark.parametrize("args, message", [
    ({"stepz": 8}, "Unknown model arg 'stepz'. Did you mean steps\\?"),
    ({"steps": "many"}, "steps='many' is malformed: expected int"),
    ({"stop_early": "maybe"}, "stop_early='maybe' is malformed: expected bool"),
    ({"truncation_side": "top"}, "truncation_side='top'; choose middle, left or right"),
    ({"backend": "causal"}, "neither causal nor seq2seq"),
    ({"metastate": "x", "inner_steps": 2}, "cannot be combined"),
    ({"batch_size": "0"}, "batch_size=0 must be a positive integer or 'auto'"),
])
def test_unknown_and_malformed_model_args(tiny_ckpts, args, message):
    with pytest.raises(ValueError, match=message):
        lm = make_lm(tiny_ckpts["llada"], **args)
        lm.generate_until(gen_requests(["x"]), disable_tqdm=True)  # batch size is checked when used


def test_memory_checkpoints_for_another_backbone(tiny_ckpts, tmp_path):
    from lm_eval_dlmem.backbones.loading import load_backbone
    from lm_eval_dlmem.memory.adapters import add_outer_lora
    from lm_eval_dlmem.memory.metastate import MetaState

    MetaState.init_for(load_backbone(tiny_ckpts["dream"]), slots=2, width=16, heads=2, time_dim=8).save_pretrained(
        tmp_path / "ms_dream")
    with pytest.raises(ValueError, match="made for a dream backbone .* but the backbone is llada"):
        make_lm(tiny_ckpts["llada"], metastate=str(tmp_path / "ms_dream"))
    with pytest.raises(FileNotFoundError, match="has no metastate_config.json"):
        make_lm(tiny_ckpts["llada"], metastate=tiny_ckpts["llada"])
    add_outer_lora(load_backbone(tiny_ckpts["llada_moe"]), r=2, alpha=4).model.save_pretrained(tmp_path / "ad_moe")
    with pytest.raises(ValueError, match="adapter=.* does not fit pretrained=.*made for another backbone"):
        make_lm(tiny_ckpts["llada"], "MemDLMLLaDAMoE", adapter=str(tmp_path / "ad_moe"))


# ---- inputs -----------------------------------------------------------------------------------
def test_batch_size_auto_runs_and_matches_a_fixed_batch_size(tiny_ckpts, quick_lm_eval):
    auto = quick_lm_eval(ckpt=tiny_ckpts["llada"], batch_size="auto", log_samples=True)
    fixed = quick_lm_eval(ckpt=tiny_ckpts["llada"], batch_size=2, log_samples=True)
    assert responses(auto, "t_gen") == responses(fixed, "t_gen")
    assert auto["results"]["t_gen"]["exact_match,none"] == fixed["results"]["t_gen"]["exact_match,none"]


def test_edge_prompts_and_generation_budgets(tiny_ckpts, spy_generate, caplog, quick_lm_eval):
    lm = make_lm(tiny_ckpts["llada"], max_length=48, batch_size=4)
    long_prompt = " ".join(f"word{i}" for i in range(200))
    prompts = ["", "東京の天気は? Größe 🙂 — ünïcödé", long_prompt, "plain"]
    with caplog.at_level(logging.WARNING):
        out = lm.generate_until(gen_requests(prompts), disable_tqdm=True)
    assert len(out) == 4 and all(isinstance(s, str) and "\n" not in s for s in out)
    budget = 48 - 32  # max_length - gen_length (max_gen_toks 8 rounded up to the preset's block of 32)
    assert all(width <= budget for _, width in spy_generate["shapes"])  # long prompts were cut
    too_long = sum(len(lm.tok_encode(p)) > budget for p in prompts)
    assert too_long >= 1
    assert f"{too_long} prompt(s) were longer than max_length - gen_length and were middle-truncated" in caplog.text

    calls = len(spy_generate["shapes"])
    assert lm.generate_until(gen_requests(prompts, {**GEN, "max_gen_toks": 0}), disable_tqdm=True) == [""] * 4
    assert len(spy_generate["shapes"]) == calls  # nothing decoded for a zero budget
    with pytest.raises(ValueError, match="leaves no room for the prompt within max_length=48"):
        lm.generate_until(gen_requests(["x"], {**GEN, "max_gen_toks": 100}), disable_tqdm=True)


def test_likelihood_edge_inputs(tiny_ckpts, quick_lm_eval):
    lm = make_lm(tiny_ckpts["llada"], max_length=48, mc_num=4, mc_batch_size=4)
    long_context = " ".join(f"word{i}" for i in range(200))

    def ll(pairs):
        return lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)],
                                disable_tqdm=True)

    out = ll([("", " kitchen"), (long_context, " kitchen"), ("東京 🙂", " Größe")])
    assert all(isinstance(v, float) and -1e4 < v < 0 and isinstance(g, bool) for v, g in out)
    with pytest.raises(ValueError, match="does not fit max_length=48; raise max_length="):
        ll([("ctx", " " + long_context)])
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", doc={}, arguments=(long_context,),
                                                    idx=0)], disable_tqdm=True)
    assert isinstance(rolling, float) and rolling < 0  # windows of max_length over a longer text


CHAT_TASK = """task: t_gen_prefix
include: {tests}/t_gen.yaml
gen_prefix: "The answer is"
"""


def test_chat_template_with_and_without_gen_prefix(tiny_ckpts, quick_lm_eval, tmp_path):
    (tmp_path / "t_gen_prefix.yaml").write_text(CHAT_TASK.format(tests=TEST_TASKS))
    res = quick_lm_eval(ckpt=tiny_ckpts["llada"], tasks=("t_gen", "t_gen_prefix"), apply_chat_template=True,
                        include_paths=(TEST_TASKS, str(tmp_path)), log_samples=True, limit=2)
    lm_eval_prompt = res["samples"]["t_gen"][0]["arguments"][0][0]
    prefixed = res["samples"]["t_gen_prefix"][0]["arguments"][0][0]
    assert "<|start_header_id|>user<|end_header_id|>" in lm_eval_prompt
    assert lm_eval_prompt.rstrip().endswith("<|start_header_id|>assistant<|end_header_id|>")
    # with gen_prefix the assistant turn is continued, not closed
    assert prefixed.endswith("The answer is") and "<|start_header_id|>assistant<|end_header_id|>" in prefixed
    assert all(isinstance(r[0][0], str) for r in responses(res, "t_gen_prefix"))


# ---- interrupted runs -------------------------------------------------------------------------
def test_interrupted_run_resumes_from_use_cache(tiny_ckpts, quick_lm_eval, spy_generate, tmp_path):
    cache = str(tmp_path / "cache" / "lm")
    reference = responses(quick_lm_eval(ckpt=tiny_ckpts["llada"], batch_size=2, log_samples=True), "t_gen")
    spy_generate["shapes"].clear()
    spy_generate["fail_on"] = 3  # 6 documents in batches of 2: the third batch dies
    with pytest.raises(RuntimeError, match="simulated crash"):
        quick_lm_eval(ckpt=tiny_ckpts["llada"], batch_size=2, use_cache=cache)
    spy_generate["fail_on"] = None
    resumed = quick_lm_eval(ckpt=tiny_ckpts["llada"], batch_size=2, use_cache=cache, log_samples=True)
    assert [s[0] for s in spy_generate["shapes"][3:]] == [2]  # only the unfinished batch ran again
    assert responses(resumed, "t_gen") == reference


# ---- the command line -------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_shows_the_reason_not_a_deep_traceback(tiny_ckpts, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "metastate-llada", "--model_args",
           f"pretrained={tiny_ckpts['llada']},stepz=8", "--tasks", "t_gen", "--include_path", TEST_TASKS,
           "--device", "cpu", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: Unknown model arg 'stepz'. Did you mean steps?"), proc.stderr[-2000:]
    assert "torch/" not in proc.stderr.split("Traceback")[-1]
    assert not (tmp_path / "out").exists()


def test_our_cli_prints_the_message_without_a_traceback(tmp_path, capsys, monkeypatch):
    from lm_eval_dlmem import cli

    argv = ["train", "metastate", "--backbone", str(tmp_path / "no-such-ckpt"), "--data", str(tmp_path / "d.jsonl"),
            "--output-dir", str(tmp_path / "out"), "--cpu"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm-eval-dlmem train metastate: error: pretrained=") and "no-such-ckpt" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    monkeypatch.setenv("LM_EVAL_DLMEM_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(argv)


# ---- noise and feedback -----------------------------------------------------------------------
@pytest.fixture
def transformers_log():
    """What transformers logs meanwhile (its loggers do not propagate; `warning_once` forgets what
    it already said, so an earlier test cannot hide a warning)."""
    import io

    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_our_forward_uses_no_deprecated_transformers_argument(tiny_ckpts, transformers_log, family):
    import torch

    from lm_eval_dlmem.backbones.loading import load_backbone
    from lm_eval_dlmem.backbones.common import DiffusionCache

    backbone = load_backbone(tiny_ckpts[family], device="cpu")
    ids = torch.randint(0, 40, (1, 8))
    cache = DiffusionCache()
    backbone.logits(ids)
    backbone.logits(ids, cache=cache)  # fills the cache
    backbone.logits(ids, cache=cache, window=(4, 8))
    assert "deprecated" not in transformers_log.getvalue()


TASK_CLASS_LINE = "class: !function lm_eval_dlmem.tasks.task.GeneratedTask"


def test_our_tasks_load_without_lm_evals_custom_kwargs_hint(tiny_ckpts, caplog):
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    from lm_eval_dlmem.tasks import tasks_path

    # every YAML that builds its data with a loader uses the quiet task class (includes carry it)
    loaders = [p for p in Path(tasks_path()).rglob("*") if p.is_file() and "custom_dataset:" in p.read_text()]
    assert len(loaders) >= 5 and all(TASK_CLASS_LINE in p.read_text() for p in loaders)
    manager = TaskManager(include_path=[tasks_path()], include_defaults=False,
                          metadata={"pretrained": tiny_ckpts["llada"]})
    with caplog.at_level(logging.INFO):
        tasks = manager.load(["dlmem_demo_gen", "dlmem_ruler_vt_1k"])
    built = tasks["tasks"]
    assert len(built["dlmem_demo_gen"].dataset["test"]) > 0 and len(built["dlmem_ruler_vt_1k"].dataset["test"]) > 0
    assert built["dlmem_ruler_vt_1k"].config.metadata["pretrained"] == tiny_ckpts["llada"]  # loaders get metadata
    assert "Custom kwargs" not in caplog.text


def test_loading_an_adapter_raises_no_warning_under_W_error(tiny_ckpts, tmp_path):
    import warnings

    from lm_eval_dlmem.backbones.loading import load_backbone
    from lm_eval_dlmem.memory.adapters import add_outer_lora

    backbone = load_backbone(tiny_ckpts["llada_moe"], device="cpu")
    add_outer_lora(backbone, r=2, alpha=4).model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # `python -W error -m lm_eval ... adapter=`
        lm = make_lm(tiny_ckpts["llada_moe"], "MemDLMLLaDAMoE", adapter=str(tmp_path / "adapter"))
    assert type(lm.backbone.model).__name__ == "PeftModel"
    # PEFT asks this to decide on its checkpointing hooks: the answer must stay right
    fresh = load_backbone(tiny_ckpts["llada_moe"], device="cpu").model
    assert fresh.is_gradient_checkpointing is False
    fresh.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert fresh.is_gradient_checkpointing is True


@pytest.mark.parametrize("device, default", [("cuda", False), ("cuda:0", True)])
def test_cuda_on_a_machine_without_one_says_it_runs_on_cpu(tiny_ckpts, monkeypatch, caplog, device, default):
    import torch

    from lm_eval_dlmem import harness

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="lm_eval_dlmem"):
        lm = harness.MetaStateLLaDA(pretrained=tiny_ckpts["llada"], device=device)
    assert lm.device == torch.device("cpu")
    said = [r.getMessage() for r in caplog.records if "no CUDA device" in r.getMessage()]
    assert said == [f"device={device}{' (lm-eval' + chr(39) + 's default --device)' if default else ''}, but torch "
                    "sees no CUDA device here: running on CPU. Pass --device cpu to ask for it."]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lm_eval_dlmem"):
        harness.MetaStateLLaDA(pretrained=tiny_ckpts["llada"], device="cpu")
    assert "CUDA" not in caplog.text


def test_the_loglikelihood_bar_moves_per_batch_not_per_chunk(tiny_ckpts, monkeypatch):
    from lm_eval_dlmem import harness

    steps = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total = total

        def update(self, n):
            steps.append(n)

        def close(self):
            pass

    monkeypatch.setattr(harness, "tqdm", Bar)
    lm = make_lm(tiny_ckpts["llada"], mc_num=4, mc_batch_size=4)
    pairs = [("The cat sat on", f" the mat number {i}") for i in range(10)]  # one 64-request chunk
    lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)])
    assert sum(steps) == 10 and len(steps) >= 5  # a forward of 4 rows finishes at most one request here


def test_ruler_and_babilong_data_generation_show_a_progress_bar(tiny_ckpts, monkeypatch):
    import tqdm

    from lm_eval_dlmem.tasks import babilong, ruler

    bars = []

    class Bar:
        def __init__(self, total=None, desc="", **kwargs):
            self.total, self.desc, self.n = total, desc, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    ruler.load("vt", "1k", pretrained=tiny_ckpts["llada"], num_samples=3, seed=11)
    babilong.load("qa1", "0k", pretrained=tiny_ckpts["llada"], num_samples=2, babilong_source="generate", seed=11)
    assert [(b.desc, b.total, b.n) for b in bars] == [
        ("Generating RULER vt at 1024 tokens", 3, 3), ("Generating BABILong qa1 at 0 tokens", 2, 2)]


def test_official_commands_trust_remote_code_builds_the_model_with_one_warning(tiny_ckpts, caplog):
    """`--model_args ...,trust_remote_code=True` (or lm-eval's --trust_remote_code, which adds it)
    builds the model; one warning says no remote code is run."""
    with caplog.at_level(logging.WARNING):
        lm = make_lm(tiny_ckpts["llada"], trust_remote_code=True)
    assert lm.args.pretrained == tiny_ckpts["llada"]
    assert [r.getMessage() for r in caplog.records if "remote code" in r.getMessage()] == [
        "trust_remote_code=True is ignored: lm_eval_dlmem ships its own LLaDA/Dream/LLaDA-MoE code, "
        "so no remote code is run."]


def test_gen_kwargs_decoding_does_not_use_are_named_in_one_warning(tiny_ckpts, caplog):
    """--gen_kwargs repetition_penalty=1.2 (or a task's num_beams) must not vanish silently: one
    warning names each ignored key once per model, however many batches carry it."""
    lm = make_lm(tiny_ckpts["llada"], batch_size=1)
    gk = {**GEN, "repetition_penalty": 1.2, "num_beams": 2, "temperature": 0.0}
    with caplog.at_level(logging.WARNING):
        lm.generate_until(gen_requests(["a", "b"], gk), disable_tqdm=True)
        lm.generate_until(gen_requests(["c"], {**gk, "length_penalty": 1.0}), disable_tqdm=True)
    ignored = [r.getMessage() for r in caplog.records if "are ignored" in r.getMessage()]
    assert len(ignored) == 2, ignored
    assert ignored[0].startswith("gen_kwargs num_beams, repetition_penalty are ignored")
    assert ignored[1].startswith("gen_kwargs length_penalty are ignored")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        lm.generate_until(gen_requests(["d"], {**GEN, "temperature": 0.5, "top_p": 0.9, "top_k": 5}), disable_tqdm=True)
    assert not [r for r in caplog.records if "are ignored" in r.getMessage()]


def test_add_bos_token_default_is_the_familys_as_the_readme_says(tiny_ckpts):
    """README: add_bos_token defaults to True for Dream and False for the others (it used to say
    'tokenizer default', which the code never did); True prepends BOS for LLaDA too."""
    lm = make_lm(tiny_ckpts["llada"])
    bos = lm.spec.bos_id
    assert bos is not None and lm.tok_encode("The grass is green.")[0] != bos
    assert make_lm(tiny_ckpts["llada"], add_bos_token=True).tok_encode("The grass is green.")[0] == bos
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    assert "| `add_bos_token` | Dream: True, others: False |" in readme
