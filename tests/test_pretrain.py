"""Masked-diffusion pre-training / SFT (`training.pretrain`): the loss, the masks, learning, resume."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from lm_eval_dlmem.training import pretrain as P
from lm_eval_dlmem.training.synthetic import corpus_texts
from lm_eval_dlmem.training.tokenizer import train_tokenizer

TINY = ["--d-model", "32", "--layers", "2", "--heads", "2", "--mlp-hidden", "64", "--tasks", "niah_noise",
        "--min-tokens", "64", "--max-tokens", "96", "--batch-tokens", "512", "--gen-pad", "4",
        "--eval-size", "4", "--eval-tokens", "80", "--warmup-steps", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    train_tokenizer(corpus_texts(40), vocab_size=512).save_pretrained(path)
    return path


class Recorder(torch.nn.Module):
    """Wraps a model and keeps the input ids of its last call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, None

    def forward(self, input_ids, **kwargs):
        self.seen = input_ids.clone()
        return self.model(input_ids=input_ids, **kwargs)

    def _head(self, x):
        return self.model._head(x)


def _setup(tokenizer_dir, tmp_path, *extra):
    args = P.build_parser().parse_args(["--output-dir", str(tmp_path), "--tokenizer", tokenizer_dir, *TINY, *extra])
    return args, P.setup(args)


def test_sample_t_is_stratified():
    t = P.sample_t(8, 1e-3, torch.Generator().manual_seed(0))
    assert t.shape == (8,) and bool((t > 1e-3).all()) and bool((t <= 1).all())
    # one draw per eighth of (eps, 1): sorted gaps are exactly 1/8 of the range
    gaps = t.sort().values.diff()
    assert torch.allclose(gaps, torch.full_like(gaps, (1 - 1e-3) / 8), atol=1e-5)


@pytest.mark.parametrize("mode", ["sft", "pretrain"])
def test_sft_never_masks_the_prompt(tokenizer_dir, tmp_path, mode):
    args, run = _setup(tokenizer_dir, tmp_path)
    model, tok = run.model, run.tokenizer
    spec_mask = tok.mask_token_id
    batches, _ = P.make_data(args, tok, tok.eos_token_id)
    batch = batches[0]
    rec = Recorder(model)
    loss, n = P.mdlm_loss(rec, batch, P.MaskConfig(mode), spec_mask, torch.Generator().manual_seed(0))
    masked = rec.seen == spec_mask
    assert n == int(masked.sum()) > 0 and torch.isfinite(loss)
    if mode == "sft":
        assert not bool((masked & batch["prompt_mask"]).any())
    else:
        assert bool((masked & batch["prompt_mask"]).any())


def test_loss_falls_over_a_short_run(tokenizer_dir, tmp_path):
    args, run = _setup(tokenizer_dir, tmp_path, "--lr", "1e-2", "--max-steps", "25")
    model, tok, optimizer, scheduler = run.model, run.tokenizer, run.optimizer, run.scheduler
    batches, evals = P.make_data(args, tok, tok.eos_token_id)
    cfg = P.MaskConfig("sft")
    model.eval()
    before = P.heldout_metrics(model, evals, tok.mask_token_id)["nll"]
    model.train()
    losses = [P.train_step(model, optimizer, scheduler, batches[i], cfg, tok.mask_token_id, i, args) for i in range(25)]
    model.eval()
    after = P.heldout_metrics(model, evals, tok.mask_token_id)["nll"]
    assert after < 0.8 * before, (before, after)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_main_resume_reproduces_the_uninterrupted_run(tokenizer_dir, tmp_path):
    common = ["--tokenizer", tokenizer_dir, *TINY, "--max-steps", "4", "--eval-every", "0"]
    P.main(["--output-dir", str(tmp_path / "full"), *common, "--save-every", "0"])
    P.main(["--output-dir", str(tmp_path / "cut"), *common, "--save-every", "2"])
    assert os.path.isfile(tmp_path / "cut" / "checkpoint-2" / "trainer_state.pt")
    # a run resumed from step 2 must land on the same weights as the uninterrupted one
    P.main(["--output-dir", str(tmp_path / "cut"), *common, "--save-every", "0", "--resume", "latest"])
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    log = [json.loads(line) for line in open(tmp_path / "full" / "train_log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert "per_task" in log[-1] and "niah_noise" in log[-1]["per_task"]


def test_new_model_has_official_llada_config(tokenizer_dir, tmp_path):
    args, run = _setup(tokenizer_dir, tmp_path)
    model, tok = run.model, run.tokenizer
    cfg = model.config
    assert cfg.architectures == ["LLaDAModelLM"] and cfg.d_model == 32 and cfg.n_layers == 2
    assert cfg.mask_token_id == tok.mask_token_id and cfg.vocab_size % 64 == 0 and cfg.vocab_size >= len(tok)


@pytest.mark.parametrize("device, message", [
    ("cuda", "no CUDA GPU visible to torch; use --device cpu"),
    ("gpu0", "is not a device name: use cpu or cuda[:N]"),
    ("meta", "only cpu and cuda[:N] are supported"),
])
def test_device_flag_refuses_what_it_cannot_train_on(device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: --device cuda is valid here")
    with pytest.raises(ValueError, match=re.escape(message)):
        P.training_device(device)


def test_device_flag_trains_where_it_says(tokenizer_dir, tmp_path):
    """`--device cpu` given explicitly is the default run: same weights, batches moved to the model."""
    common = ["--tokenizer", tokenizer_dir, *TINY, "--max-steps", "2", "--eval-every", "0", "--save-every", "0"]
    P.main(["--output-dir", str(tmp_path / "default"), *common])
    P.main(["--output-dir", str(tmp_path / "cpu"), *common, "--device", "cpu"])
    a, b = load_file(tmp_path / "default" / "model.safetensors"), load_file(tmp_path / "cpu" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    batch = {"input_ids": torch.ones(1, 2, dtype=torch.long), "tasks": ["vt"]}
    moved = P.on_device(batch, torch.device("meta"))
    assert moved["input_ids"].device.type == "meta" and moved["tasks"] == ["vt"]
