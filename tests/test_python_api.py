"""The Python API for lm-eval users: `lm_eval_dlmem.task_manager` (our tasks with the model's
tokenizer metadata) and `pretrained=` given a loaded Backbone or model, as HFLM takes one."""

import json
import os
import subprocess
import sys

import pytest
import torch

from _harness_runs import lm_eval_runner, task_manager as harness_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")

FAST = "gen_length=4,block_length=4,steps=1"
_RULER_SCRIPT = f"""
import json, lm_eval, lm_eval_dlmem
model_args = "pretrained=tiny-llada,{FAST}"
tm = lm_eval_dlmem.task_manager(model_args, {{"num_samples": 1}}, include_defaults=False)
out = lm_eval.simple_evaluate(model="metastate-llada", model_args=model_args, device="cpu", limit=1,
                              tasks=["dlmem_ruler_niah_single_1_1k"], task_manager=tm)
print(json.dumps(out["results"]["dlmem_ruler_niah_single_1_1k"]))
"""


def _python_c(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LM_EVAL_DLMEM")}
    env.update(LM_EVAL_DLMEM_AUTOLOAD="0", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_simple_evaluate_runs_our_ruler_task_from_python_c():
    """The README's Python recipe: `simple_evaluate` on a RULER task from `python -c`, its
    contexts sized with the evaluated model's tokenizer (which reached the task through
    `task_manager`'s metadata; without it the task stops, see below)."""
    done = _python_c(_RULER_SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sample_len"] == 1 and "score,none" in result


def test_our_task_without_the_model_args_metadata_says_what_to_do_from_python():
    """A plain `TaskManager(include_path=...)` drops the model args from the task metadata: the
    error names the Python fix as well as the CLI one."""
    from lm_eval_dlmem.tasks import ruler
    from lm_eval_dlmem.tasks.common import TaskDataError

    with pytest.raises(TaskDataError) as err:
        ruler.load(ruler_task="niah_single_1", ruler_length=1024, num_samples=1)
    assert "lm_eval_dlmem.task_manager(model_args)" in str(err.value)
    assert "--model_args" in str(err.value)


def test_task_manager_metadata_is_what_the_cli_would_give(monkeypatch):
    """Model args (string or dict) land in every task's metadata, `metadata=` wins over them
    (as --metadata does), and our tasks are indexed."""
    from lm_eval_dlmem import task_manager

    tm = task_manager("pretrained=tiny-llada,max_length=512", {"max_length": 256, "num_samples": 3},
                      include_defaults=False)
    assert tm.metadata == {"pretrained": "tiny-llada", "max_length": 256, "num_samples": 3}
    assert "dlmem_ruler_niah_single_1_1k" in tm.all_tasks
    assert task_manager({"pretrained": "tiny-llada"}, include_defaults=False).metadata == {"pretrained": "tiny-llada"}
    with pytest.raises(ValueError, match="model_args= got a int"):
        task_manager(3)


@pytest.fixture(scope="module")
def tiny_backbone():
    from lm_eval_dlmem import load_backbone

    return load_backbone("tiny-llada", dtype="float32")


def test_task_manager_names_the_tokenizer_of_a_loaded_model(tiny_backbone):
    """A loaded model cannot travel as task metadata: its tokenizer's path does, for the dict
    spelling and for a constructed DlmLM alike; a tokenizer built in memory asks for a path."""
    from lm_eval_dlmem.api import model_args_metadata
    from lm_eval_dlmem.harness import DlmLM

    path = tiny_backbone.tokenizer.name_or_path
    assert model_args_metadata({"pretrained": tiny_backbone, "steps": 2}) == {"tokenizer": path, "steps": 2}
    assert model_args_metadata({"pretrained": tiny_backbone.model}) == {"tokenizer": path}
    lm = DlmLM(pretrained=tiny_backbone, max_length=300)
    assert model_args_metadata(lm) == {"tokenizer": path, "max_length": 300}

    class Unnamed:
        name_or_path = ""

    with pytest.raises(ValueError, match="save_pretrained"):
        model_args_metadata({"pretrained": tiny_backbone.model, "tokenizer": Unnamed()})


def _answers(lm, prompts):
    from lm_eval.api.instance import Instance

    reqs = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 6}), i) for i, p in enumerate(prompts)]
    return lm.generate_until(reqs, disable_tqdm=True)


PROMPTS = ["Mary went to the kitchen. Where is Mary?", "The special magic number is 42. The number is"]


@pytest.mark.parametrize("form", ["backbone", "model+tokenizer", "model alone"])
def test_pretrained_takes_a_loaded_model(tiny_backbone, form):
    """`DlmLM(pretrained=<loaded>)` answers as `pretrained=tiny-llada` does, stays on the model's
    device, and names the model by the directory it was loaded from."""
    from lm_eval_dlmem.harness import DlmLM

    kwargs = {"backbone": dict(pretrained=tiny_backbone),
              "model+tokenizer": dict(pretrained=tiny_backbone.model, tokenizer=tiny_backbone.tokenizer),
              "model alone": dict(pretrained=tiny_backbone.model)}[form]
    lm = DlmLM(**kwargs, block_length=6, steps=3)
    by_name = DlmLM(pretrained="tiny-llada", dtype="float32", device="cpu", block_length=6, steps=3)
    assert lm.backbone.model is tiny_backbone.model and lm.device == tiny_backbone.device
    assert lm.args.pretrained.endswith("tiny-llada")
    assert _answers(lm, PROMPTS) == _answers(by_name, PROMPTS)


@pytest.fixture
def evaluate(monkeypatch):
    yield from lm_eval_runner(monkeypatch)  # one thread, no environment report


def test_simple_evaluate_takes_a_dlmlm_around_a_loaded_model(tiny_backbone, evaluate):
    """`simple_evaluate(model=DlmLM(pretrained=backbone))`: how a training loop evaluates."""
    import lm_eval

    from lm_eval_dlmem.harness import DlmLM

    lm = DlmLM(pretrained=tiny_backbone, mc_num=4, mc_batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["t_gen", "t_mc"], limit=2, task_manager=harness_tasks())
    assert out["results"]["t_gen"]["sample_len"] == 2 and "acc,none" in out["results"]["t_mc"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="bfloat16"), "dtype= cannot apply to a model passed loaded"),
    (dict(load_in_8bit=True), "load_in_8bit= cannot apply"),
    (dict(revision="main"), "revision= cannot apply"),
    (dict(tokenizer="tiny-llada"), "tokenizer= cannot be combined with a loaded Backbone"),
    (dict(family="dream"), "family=dream does not match"),
])
def test_a_loaded_model_refuses_the_loading_args(tiny_backbone, kwargs, message):
    """Args that only apply while loading from files are refused with the arg's name, not dropped."""
    from lm_eval_dlmem.harness import DlmLM

    with pytest.raises(ValueError, match=message):
        DlmLM(pretrained=tiny_backbone, **kwargs)


def test_pretrained_of_another_type_is_one_clear_error():
    from lm_eval_dlmem.harness import DlmLM

    with pytest.raises(ValueError, match="pretrained= got a list"):
        DlmLM(pretrained=["tiny-llada"])
    with pytest.raises(ValueError, match="pretrained= got a Linear"):
        DlmLM(pretrained=torch.nn.Linear(2, 2))
