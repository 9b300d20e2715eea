"""MemDLM training CLI (bi-level and --baseline, checkpoint and resume), the adapter it writes in
the three inference modes, and the exposure-bias analysis."""

import csv
import json
import os

import pytest
import torch

from lm_eval_dlmem import load_backbone
from lm_eval_dlmem.analysis import exposure_bias
from lm_eval_dlmem.memory.fast_weights import FastWeightMemory, MemDLMConfig, apply_adapter
from lm_eval_dlmem.training import memdlm
from lm_eval_dlmem.training.data import toy_pairs


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in toy_pairs(24, seed=0)) + "\n")
    return str(path)


def train(backbone, data, out, *extra):
    argv = ["--backbone", backbone, "--data", data, "--output-dir", str(out), "--batch-size", "2",
            "--max-length", "128", "--lr", "1e-3", "--eval-batches", "1", "--eval-every", "100", "--eval-fraction", "0.1", *extra]
    assert memdlm.main(argv) == 0
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


@pytest.fixture(scope="module")
def memdlm_adapter(tiny_ckpts, toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("memdlm")
    log = train(tiny_ckpts["llada_moe"], toy_data, out, "--max-steps", "3", "--save-every", "2", "--inner-layer-fraction", "0.5")
    return out, log


def test_bilevel_training_logs_inner_and_outer_losses_and_saves_a_peft_adapter(memdlm_adapter):
    out, log = memdlm_adapter
    assert [row["step"] for row in log] == [0, 1, 2, 3]
    # step 0: the frozen baseline (the LoRA starts at B = 0), before any update
    assert log[0]["eval_frozen_nll"] > 0 and "eval_frozen_nll_adapted" in log[0] and "loss" not in log[0]
    assert all(len(row["inner"]) == 2 and row["loss"] > 0 for row in log[1:])
    assert "eval_nll_adapted" in log[-1] and log[-1]["eval_nll"] > 0
    assert os.path.isfile(out / "adapter_model.safetensors") and os.path.isdir(out / "checkpoint-2")
    settings = json.load(open(out / "memdlm_training.json"))
    assert settings["lora_r"] == 32 and settings["inner_steps"] == 2 and not settings["baseline"]


def test_resume_continues_from_the_checkpoint(memdlm_adapter, tiny_ckpts, toy_data, tmp_path):
    out, log = memdlm_adapter
    resumed = tmp_path / "resumed"
    os.makedirs(resumed)
    os.symlink(out / "checkpoint-2", resumed / "checkpoint-2")
    rows = train(tiny_ckpts["llada_moe"], toy_data, resumed, "--max-steps", "3", "--resume", "latest",
                 "--inner-layer-fraction", "0.5")
    assert [row["step"] for row in rows] == [3]
    assert rows[0]["loss"] == pytest.approx(log[3]["loss"], rel=1e-4)  # same batch, masks and weights


def test_baseline_trains_plain_mdlm(tiny_ckpts, toy_data, tmp_path):
    rows = train(tiny_ckpts["llada"], toy_data, tmp_path / "std", "--max-steps", "1", "--baseline")
    assert rows[0]["step"] == 0 and "eval_frozen_nll_adapted" not in rows[0]
    assert rows[1]["inner"] == [] and "eval_nll_adapted" not in rows[1]


def test_three_modes_one_argument_apart(memdlm_adapter, tiny_ckpts):
    from lm_eval_dlmem import DecodeConfig, generate

    out, _ = memdlm_adapter
    base = load_backbone(tiny_ckpts["llada_moe"])
    ids = torch.randint(10, 300, (3, 12))
    attn = torch.ones_like(ids)
    attn[1, :4] = 0
    cfg = DecodeConfig(gen_length=8, steps=8, block_length=8)
    with torch.inference_mode():
        frozen = generate(base, ids, attn, cfg, seeds=[0, 1, 2])
        frozen_logits = base.logits(ids, attn)
    adapted = apply_adapter(base, str(out))
    memories = {"train-only": FastWeightMemory(adapted, MemDLMConfig(inner_steps=0)),
                "train+inference": FastWeightMemory(adapted, MemDLMConfig(inner_steps=2))}
    with torch.inference_mode():
        outs = {mode: generate(adapted, ids, attn, cfg, mem, seeds=[0, 1, 2]) for mode, mem in memories.items()}
        assert not torch.allclose(adapted.logits(ids, attn), frozen_logits)
    assert all(o.shape == frozen.shape for o in outs.values())


def test_exposure_bias_writes_csv_and_png(memdlm_adapter, tiny_ckpts, toy_data, tmp_path):
    out, _ = memdlm_adapter
    argv = ["--backbone", tiny_ckpts["llada_moe"], "--data", toy_data, "--num-samples", "3", "--num-steps", "3",
            "--min-response", "4", "--batch-size", "3", "--output-dir", str(tmp_path), "--device", "cpu",
            "--config", "base=none:0", "--config", f"T={out}:0", "--config", f"T+I={out}:2"]
    assert exposure_bias.main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "exposure_bias.csv")))
    assert [r["config"] for r in rows] == ["base"] * 3 + ["T"] * 3 + ["T+I"] * 3
    assert [float(r["mask_ratio"]) for r in rows[:3]] == pytest.approx([1.0, 2 / 3, 1 / 3], abs=1e-5)
    first = rows[0]
    assert float(first["static_nll"]) == pytest.approx(float(first["sequential_nll"]))  # r = 1: same input
    by = {(r["config"], r["mask_ratio"]): float(r["static_nll"]) for r in rows}
    assert by[("T", rows[1]["mask_ratio"])] != by[("base", rows[1]["mask_ratio"])]
    assert os.path.getsize(tmp_path / "exposure_bias.png") > 1000
    with pytest.raises(ValueError, match="LABEL=ADAPTER:INNER_STEPS"):
        exposure_bias.parse_config("T+I=ckpt")


@pytest.mark.slow
def test_three_modes_through_the_lm_eval_cli(memdlm_adapter, tiny_ckpts, tmp_path):
    """The issue's end-to-end check: `lm_eval --model memdlm-llada-moe` on a tiny LLaDA-MoE with the
    adapter `train memdlm` wrote, baseline / train-only / train+inference, batched (batch 4)."""
    from test_cli import load_samples, run_lm_eval

    out, _ = memdlm_adapter
    base = f"pretrained={tiny_ckpts['llada_moe']},mc_num=4,mc_batch_size=8,block_length=8,inner_layer_fraction=0.5"
    modes = {"baseline": base, "train-only": f"{base},adapter={out}",
             "train+inference": f"{base},adapter={out},inner_steps=2"}
    scores = {}
    for mode, args in modes.items():
        proc = run_lm_eval("memdlm-llada-moe", args, tmp_path / mode, 4)
        assert "t_gen" in proc.stdout and "t_mc" in proc.stdout, mode  # lm-eval's results table
        scores[mode] = load_samples(tmp_path / mode, "t_mc")
        assert len(scores[mode]) == 6 and len(load_samples(tmp_path / mode, "t_gen")) == 6
    # the adapter changes the model, and the inner loop changes it again, per request
    assert scores["train-only"] != scores["baseline"]
    assert scores["train+inference"] != scores["train-only"]


def test_released_data_defaults_and_length_grouped_batches():
    """Defaults follow the released training (dllm right truncation, Trainer group_by_length);
    `--truncation filter --batching random` is the paper's text / a plain shuffle."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from lm_eval_dlmem.training.memdlm import build_parser, epoch_batches

    args = build_parser().parse_args(["--backbone", "b", "--data", "d.jsonl", "--output-dir", "o"])
    assert (args.truncation, args.batching) == ("right", "length")
    examples = [{"input_ids": [1] * n, "prompt_len": 1} for n in (5, 40, 3, 17, 9, 30, 2, 25, 11, 8, 6, 33)]
    batches = epoch_batches(examples, 2, seed=7, epoch=1, rank=0, world=1, batching="length", group=4)
    order = get_length_grouped_indices([len(e["input_ids"]) for e in examples], 4, generator=torch.Generator().manual_seed(8))
    assert [id(e) for b in batches for e in b] == [id(examples[i]) for i in order]
    assert max(len(e["input_ids"]) for e in batches[0]) == 40  # the longest batch first, as the Trainer does
    shuffled = epoch_batches(examples, 2, seed=7, epoch=1, rank=0, world=1)
    assert sorted(id(e) for b in shuffled for e in b) == sorted(map(id, examples))
    two = [epoch_batches(examples, 2, seed=7, epoch=1, rank=r, world=2, batching="length", group=4) for r in (0, 1)]
    assert [b for pair in zip(*two) for b in pair] == batches  # round-robin shards of the same order
