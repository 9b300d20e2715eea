"""Inputs that used to be accepted silently and give wrong numbers: sampled repeats that collapse
to one sample, a tokenizer or weights that do not fit the checkpoint, an adapter whose keys do
not match, and a resume state that runs code. Each case now differs, or stops with one message
naming what is wrong and the fix."""

import json
import os
import shutil

import pytest
import torch
from _harness_runs import TESTS_DIR, lm_eval_runner, responses
from safetensors.torch import load_file, save_file


@pytest.fixture
def quick_lm_eval(monkeypatch):
    yield from lm_eval_runner(monkeypatch)


def make_lm(ckpt, cls_name="MetaStateLLaDA", **args):
    from lm_eval_dlmem import harness

    return getattr(harness, cls_name)(pretrained=ckpt, device="cpu", **args)


def repeats_task(tmp_path, do_sample: bool):
    """A copy of the t_gen test task with `repeats: 4`, sampled or greedy."""
    root = tmp_path / ("sampled" if do_sample else "greedy")
    root.mkdir()
    shutil.copy(TESTS_DIR / "tasks" / "utils.py", root / "utils.py")
    sampling = "do_sample: true\n  temperature: 1.0" if do_sample else "do_sample: false"
    (root / "t_rep.yaml").write_text(
        "task: t_rep\ndataset_path: ''\ncustom_dataset: !function utils.load\ntest_split: test\n"
        "output_type: generate_until\nrepeats: 4\n"
        "doc_to_text: \"{{context}}\\nQuestion: {{question}}\\nAnswer:\"\ndoc_to_target: \"{{answer}}\"\n"
        f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  {sampling}\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return str(root)


# ---- 1. repeats with sampling ---------------------------------------------------------------
def test_sampled_repeats_differ_and_are_reproducible(tiny_ckpts, quick_lm_eval, tmp_path):
    """lm-eval passes a `repeats: 4` request four times; each copy must get its own seed
    (pass@k and majority vote need four samples, not one sample four times)."""
    tasks = repeats_task(tmp_path, do_sample=True)
    run = lambda bs: responses(quick_lm_eval(ckpt=tiny_ckpts["llada"], tasks=["t_rep"], include_paths=(tasks,),
                                             batch_size=bs, log_samples=True), "t_rep")
    first = run(4)
    assert all(len(doc) == 1 and len(doc[0]) == 4 for doc in first)  # one request, four answers
    distinct = [len(set(doc[0])) for doc in first]
    assert min(distinct) > 1, f"repeats collapsed to identical samples: {first}"
    assert run(3) == first  # same seeds again, whatever the batch size


def test_greedy_repeats_keep_the_single_request_answer(tiny_ckpts, quick_lm_eval, tmp_path):
    """Greedy decoding: every repeat is the answer the task gives without repeats."""
    tasks = repeats_task(tmp_path, do_sample=False)
    rep = responses(quick_lm_eval(ckpt=tiny_ckpts["llada"], tasks=["t_rep"], include_paths=(tasks,),
                                  log_samples=True), "t_rep")
    single = responses(quick_lm_eval(ckpt=tiny_ckpts["llada"], log_samples=True), "t_gen")
    assert [doc[0] for doc in rep] == [s[0] * 4 for s in single]


def test_repeat_zero_keeps_the_content_seed(tiny_ckpts):
    """Seeds of requests that are not repeated are what they were (cached and published runs
    stay comparable); only copies 1..K-1 get new ones."""
    from lm_eval.api.instance import Instance

    from lm_eval_dlmem.harness import repeat_indices

    lm = make_lm(tiny_ckpts["llada"])
    gk = {"until": ["\n"], "max_gen_toks": 8}
    assert lm.request_seed("ctx", gk, repeat=0) == lm.request_seed("ctx", gk)
    assert len({lm.request_seed("ctx", gk, repeat=k) for k in range(4)}) == 4
    a = Instance("generate_until", doc={}, arguments=("p", gk), idx=0, metadata=("t", 0, 3))
    b = Instance("generate_until", doc={}, arguments=("p", gk), idx=0, metadata=("t", 1, 3))  # same prompt, other doc
    assert repeat_indices([a, a, a, b, b, b]) == [0, 1, 2, 0, 1, 2]


# ---- checkpoint variants -----------------------------------------------------------------------
def variant(src, dst, weights=None, config=None, drop=()):
    """A copy of checkpoint `src` with its safetensors state dict / config.json edited."""
    shutil.copytree(src, dst)
    for name in drop:
        os.remove(os.path.join(dst, name))
    if weights:
        path = os.path.join(dst, "model.safetensors")
        save_file(weights(load_file(path)), path, metadata={"format": "pt"})
    if config:
        path = os.path.join(dst, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        config(cfg)
        with open(path, "w") as f:
            json.dump(cfg, f)
    return str(dst)


def edit_adapter(src, dst, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "adapter_model.safetensors")
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})
    return str(dst)


# ---- 2. a tokenizer that does not fit ---------------------------------------------------------
def test_a_checkpoint_without_tokenizer_json_is_refused(tiny_ckpts, tmp_path):
    """transformers builds a special-tokens-only tokenizer from tokenizer_config.json alone:
    every prompt would encode to [] and every answer be ''."""
    for fam in ("llada", "llada_moe"):  # LLaDA's config.json has mask_token_id, LLaDA-MoE's not
        ckpt = variant(tiny_ckpts[fam], tmp_path / fam, drop=["tokenizer.json"])
        with pytest.raises(ValueError, match=f"tokenizer loaded from '{ckpt}' does not fit .*tokenizer=PATH"):
            make_lm(ckpt)


def test_a_tokenizer_of_another_checkpoint_is_refused(tiny_ckpts, tmp_path):
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    big = str(make_tiny_checkpoint("llada", tmp_path / "big", vocab_size=640))
    with pytest.raises(ValueError, match="it has 640 tokens but the checkpoint's vocab_size is 448"):
        make_lm(tiny_ckpts["llada"], tokenizer=big)
    with pytest.raises(ValueError, match="no mask token '<\\|mdm_mask\\|>'"):
        make_lm(tiny_ckpts["llada"], tokenizer=tiny_ckpts["dream"])
    shifted = variant(tiny_ckpts["llada"], tmp_path / "shifted", config=lambda c: c.update(mask_token_id=5))
    with pytest.raises(ValueError, match="is id 386, but config.json says mask_token_id=5"):
        make_lm(shifted)


# ---- 3. backbone weights that do not match config.json ---------------------------------------
BLOCK0 = "model.transformer.blocks.0.attn_norm.weight"


@pytest.mark.parametrize("case, weights, config, message", [
    ("dropped", lambda sd: {k: v for k, v in sd.items() if k != BLOCK0}, None,
     f"1 missing \\(would be randomly initialised\\): {BLOCK0}\\."),
    ("renamed", lambda sd: {k.replace(".blocks.", ".layers."): v for k, v in sd.items()}, None,
     "18 missing .*blocks.0.* and 10 more; 18 unexpected \\(would be ignored\\): .*layers.0.*"),
    ("more_layers", None, lambda c: c.update(n_layers=3),
     "9 missing .*blocks.2.attn_norm.weight.* and 1 more\\."),
])
def test_missing_or_unexpected_backbone_weights_are_an_error(tiny_ckpts, tmp_path, case, weights, config, message):
    ckpt = variant(tiny_ckpts["llada"], tmp_path / case, weights=weights, config=config)
    with pytest.raises(ValueError, match=f"weights in '{ckpt}' do not match .*{message}.*strict_weights=False"):
        make_lm(ckpt)


def test_strict_weights_false_loads_anyway_and_says_so(tiny_ckpts, tmp_path, caplog):
    ckpt = variant(tiny_ckpts["llada"], tmp_path / "dropped", weights=lambda sd: {k: v for k, v in sd.items() if k != BLOCK0})
    lm = make_lm(ckpt, strict_weights="false")
    assert lm.args.strict_weights is False
    assert BLOCK0 in caplog.text and "Loading anyway (strict_weights=False)" in caplog.text


def test_complete_checkpoints_still_load(tiny_ckpts, tmp_path):
    """No false alarms: every family's tiny checkpoint, the embedded one, and a LLaDA checkpoint
    with a tied LM head (no ff_out tensor: legitimately absent)."""
    from lm_eval_dlmem.backbones.loading import load_backbone

    tied = variant(tiny_ckpts["llada"], tmp_path / "tied", weights=lambda sd: {
        k: v for k, v in sd.items() if k != "model.transformer.ff_out.weight"}, config=lambda c: c.update(weight_tying=True))
    for ckpt in (*tiny_ckpts.values(), "tiny-llada", tied):
        load_backbone(ckpt)


# ---- 4. adapters whose keys do not match ------------------------------------------------------
@pytest.fixture(scope="module")
def llada_adapter(tiny_ckpts, tmp_path_factory):
    from lm_eval_dlmem.backbones.loading import load_backbone
    from lm_eval_dlmem.memory.adapters import add_outer_lora

    path = tmp_path_factory.mktemp("adapter") / "ok"
    torch.manual_seed(0)
    bb = add_outer_lora(load_backbone(tiny_ckpts["llada"]), r=2, alpha=4)
    for name, p in bb.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter: not the identity
    bb.model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("case, edit, message", [
    ("renamed", lambda sd: {k.replace(".blocks.", ".layers."): v for k, v in sd.items()},
     "28 LoRA weights missing .*blocks.0.attn_out.lora_A.default.weight.*28 adapter weights that match no module"),
    ("block0_only", lambda sd: {k: v for k, v in sd.items() if ".blocks.0." in k},
     "14 LoRA weights missing \\(those modules would stay unadapted\\): [^;]*blocks.1.attn_out"),
])
def test_adapter_keys_that_do_not_match_are_an_error(tiny_ckpts, llada_adapter, tmp_path, case, edit, message):
    adapter = edit_adapter(llada_adapter, tmp_path / case, edit)
    with pytest.raises(ValueError, match=f"adapter='{adapter}' does not match the modules it adapts: {message}"):
        make_lm(tiny_ckpts["llada"], "MemDLMLLaDAMoE", adapter=adapter)


def test_matching_adapters_load_and_change_the_answers(tiny_ckpts, llada_adapter):
    from lm_eval_dlmem.backbones.loading import load_backbone
    from lm_eval_dlmem.embedded import resolve_embedded
    from lm_eval_dlmem.memory.adapters import apply_adapter

    apply_adapter(load_backbone("tiny-llada"), resolve_embedded("tiny-llada-memdlm"))
    ids = torch.tensor([[5, 6, 7, 8]])
    frozen = load_backbone(tiny_ckpts["llada"])
    base = frozen.logits(ids)
    adapted = apply_adapter(frozen, llada_adapter).logits(ids)
    assert not torch.allclose(base, adapted)


# ---- 5. resume never unpickles code -------------------------------------------------------------
class RunsCode:
    """What a crafted trainer_state.pt holds: unpickling it calls os.makedirs(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def crafted_checkpoint(src, dst, marker):
    """A copy of checkpoint directory `src` (or an empty one) with a code-running trainer_state.pt."""
    if src:
        shutil.copytree(src, dst)
    else:
        os.makedirs(dst)
    torch.save({"optimizer": RunsCode(marker), "scheduler": {}, "step": 2}, os.path.join(dst, "trainer_state.pt"))
    return str(dst)


def test_a_code_running_trainer_state_is_refused(tmp_path):
    from lm_eval_dlmem.training.state import load_trainer_state

    ckpt = crafted_checkpoint(None, tmp_path / "ckpt", tmp_path / "pwned")
    with pytest.raises(ValueError, match="trainer_state.pt holds more than tensors.*not loaded.*could run code"):
        load_trainer_state(ckpt)
    assert not os.path.exists(tmp_path / "pwned")


def test_every_resume_path_reads_the_state_weights_only(tiny_ckpts, llada_adapter, tmp_path):
    """pretrain, metastate and memdlm resume through the refusing loader: the crafted state stops
    each one before anything in it runs."""
    from lm_eval_dlmem.backbones.loading import load_backbone
    from lm_eval_dlmem.memory.adapters import add_outer_lora
    from lm_eval_dlmem.memory.metastate import MetaState
    from lm_eval_dlmem.training import memdlm, metastate, pretrain

    marker = tmp_path / "pwned"
    refused = pytest.raises(ValueError, match="trainer_state.pt holds more than tensors")
    ckpt = crafted_checkpoint(tiny_ckpts["llada"], tmp_path / "pretrain", marker)
    with refused:
        pretrain.setup(pretrain.build_parser().parse_args(["--output-dir", str(tmp_path / "out"), "--resume", ckpt]))

    ms = tmp_path / "ms"
    MetaState.init_for(load_backbone(tiny_ckpts["llada"]), slots=2, width=16, heads=2).save_pretrained(ms)
    ckpt = crafted_checkpoint(ms, tmp_path / "metastate", marker)
    with refused:
        metastate.main(["--backbone", tiny_ckpts["llada"], "--data", "unused.jsonl", "--output-dir", str(tmp_path / "out"),
                        "--slots", "2", "--width", "16", "--heads", "2", "--cpu", "--resume", ckpt])

    ckpt = crafted_checkpoint(llada_adapter, tmp_path / "memdlm", marker)
    with refused:
        memdlm.restore(ckpt, add_outer_lora(load_backbone(tiny_ckpts["llada"]), r=2, alpha=4), None, None)
    assert not marker.exists()
