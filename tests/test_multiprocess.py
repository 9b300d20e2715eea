"""Scale-out: data-parallel `accelerate launch --num_processes 2 --cpu -m lm_eval` gives the same
per-document answers and metrics as one process; `parallelize=True` places the model with a
`device_map` that splits only between decoder blocks, and the forward runs under accelerate's
placement hooks. (Without GPUs the hooks are exercised with CPU and disk offload.)"""

import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from _harness_runs import TEST_TASKS, lm_eval_runner


@pytest.fixture
def quick_lm_eval(monkeypatch):
    """In-process lm-eval runs on tiny checkpoints (see _harness_runs)."""
    yield from lm_eval_runner(monkeypatch)


TASKS = ("t_gen", "t_mc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def per_doc(samples: list[dict]) -> dict:
    """doc_id -> (raw responses, metrics) of one task's logged samples."""
    out = {}
    for s in samples:
        # loglikelihood answers come back as (logprob, is_greedy); the samples file stores them as strings
        resps = [[(float(r[0]), str(r[1]) == "True") if isinstance(r, (list, tuple)) else r for r in rs]
                 for rs in s["resps"]]
        out[s["doc_id"]] = (resps, s.get("exact_match", s.get("acc")))
    return out


def assert_same_answers(a: dict, b: dict):
    assert a.keys() == b.keys()
    for doc, (ra, ma) in a.items():
        rb, mb = b[doc]
        assert ma == mb, doc
        for x, y in zip(ra, rb):
            if x and isinstance(x[0], tuple):  # loglikelihood: (logprob, is_greedy)
                assert [v[1] for v in x] == [v[1] for v in y]
                assert [v[0] for v in x] == pytest.approx([v[0] for v in y], abs=1e-4)
            else:
                assert x == y


@pytest.mark.slow
def test_two_processes_match_one(tiny_ckpts, quick_lm_eval, tmp_path):
    ckpt = tiny_ckpts["llada"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # `python -m accelerate.commands.launch` is `accelerate launch` without relying on PATH
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--cpu", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "lm_eval",
           "--model", "metastate-llada", "--model_args", f"pretrained={ckpt},mc_num=8,mc_batch_size=8",
           "--include_path", TEST_TASKS, "--tasks", ",".join(TASKS), "--device", "cpu", "--batch_size", "2",
           "--log_samples", "--output_path", str(tmp_path / "dp2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = glob.glob(str(tmp_path / "dp2" / "*" / "results_*.json"))
    with open(results_file) as f:
        two = json.load(f)

    one = quick_lm_eval(ckpt=ckpt, tasks=TASKS, model_args={"mc_num": 8, "mc_batch_size": 8}, batch_size=2,
                        log_samples=True)
    for task in TASKS:
        assert two["n-samples"][task]["effective"] == 6
        for key, value in one["results"][task].items():
            if key.split(",")[0] in ("exact_match", "acc", "exact_match_stderr", "acc_stderr"):
                assert two["results"][task][key] == pytest.approx(value), (task, key)
        (sample_file,) = glob.glob(str(tmp_path / "dp2" / "*" / f"samples_{task}_*.jsonl"))
        with open(sample_file) as f:
            logged = [json.loads(line) for line in f]
        assert_same_answers(per_doc(logged), per_doc(one["samples"][task]))


def test_parallelize_places_the_model_with_device_map(tiny_ckpts, quick_lm_eval, monkeypatch):
    from lm_eval.api.instance import Instance
    from transformers import PreTrainedModel

    from lm_eval_dlmem.harness import MetaStateLLaDA

    seen = []
    real = PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    reqs = [Instance("generate_until", doc={}, arguments=(p, {"until": ["\n"], "max_gen_toks": 8}), idx=i)
            for i, p in enumerate(["Where is Mary?", "The key is"])]
    spread = MetaStateLLaDA(pretrained=tiny_ckpts["llada"], parallelize=True)
    plain = MetaStateLLaDA(pretrained=tiny_ckpts["llada"], device="cpu")
    assert seen == ["auto", None]
    assert spread.generate_until(reqs, disable_tqdm=True) == plain.generate_until(reqs, disable_tqdm=True)
    assert spread.get_model_info()["args_fingerprint"] == plain.get_model_info()["args_fingerprint"]


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_device_map_splits_between_blocks_and_forward_runs_under_hooks(family, tmp_path, quick_lm_eval):
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    from lm_eval_dlmem.backbones.loading import load_backbone
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    layers = {"n_layers": 4} if family == "llada" else {"num_hidden_layers": 4}
    backbone = load_backbone(make_tiny_checkpoint(family, tmp_path / family, **layers))
    model = backbone.model
    ids = torch.randint(0, 400, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1
    with torch.no_grad():
        expected = backbone.logits(ids, mask)

    # three "GPUs" of a third of the model each: blocks stay whole, each on one device
    size = compute_module_sizes(model)[""]
    plan = infer_auto_device_map(model, max_memory={0: size // 3, 1: size // 3, 2: size},
                                 no_split_module_classes=model._no_split_modules)
    assert len(set(plan.values())) == 3
    assert type(backbone.layers[0]).__name__ in model._no_split_modules
    blocks = {n for n, m in model.named_modules() if type(m).__name__ in model._no_split_modules}
    assert len(blocks) == 4
    assert not any(name.startswith(b + ".") for name in plan for b in blocks), plan  # never inside a block

    # the same placement with CPU and disk: the forward runs through accelerate's hooks
    offload = {name: ("cpu" if dev == 0 else "disk") for name, dev in plan.items()}
    dispatched = dispatch_model(model, device_map=offload, offload_dir=str(tmp_path / "offload"))
    assert any(hasattr(m, "_hf_hook") for m in model.modules())
    with torch.no_grad():
        got = backbone.logits(ids, mask) if dispatched is model else None
    assert got is not None and torch.allclose(got, expected, atol=1e-5)
