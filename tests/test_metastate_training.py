"""K-step unrolled MetaState training: the unroll itself, BPTT through the state, a short run
that lowers the held-out loss, and resume."""

import json
import random
import shutil

import pytest
import torch

from lm_eval_dlmem.backbones import load_backbone
from lm_eval_dlmem.memory import Memory, MetaState
from lm_eval_dlmem.training.data import collate, tokenize_pairs
from lm_eval_dlmem.decoding.strategies import rank_mask
from lm_eval_dlmem.training.metastate import UnrollConfig, main, masked_count, unrolled_loss

WORDS = "apple banana cherry table chair window river mountain forest ocean".split()


def copy_pairs(n, seed=0, words=3):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        seq = " ".join(rng.choice(WORDS) for _ in range(words))
        pairs.append({"prompt": f"Repeat: {seq}", "response": seq})
    return pairs


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def llada(tiny_ckpts):
    backbone = load_backbone(tiny_ckpts["llada"])
    backbone.model.requires_grad_(False)  # as the trainer does
    return backbone


@pytest.fixture(scope="module")
def batch(llada):
    pairs = [(p["prompt"], p["response"]) for p in copy_pairs(3)]
    return collate(tokenize_pairs(pairs, llada.tokenizer, max_length=64), llada.spec.eos_id)


class Recorder(Memory):
    """Records every canvas and mask ratio the unroll forwards."""

    def begin(self, backbone, input_ids, attention_mask, prompt_mask, seeds=None):
        self.seen, self.ratios = [], []

    def before_forward(self, info):
        self.seen.append(info.input_ids.clone())
        self.ratios.append(info.mask_ratio.clone())


def test_schedule_helpers():
    R = torch.tensor([10, 7, 0])
    assert masked_count(R, 0, 4).tolist() == [10, 7, 0]
    assert masked_count(R, 1, 4).tolist() == [8, 6, 0]  # ceil(R * 3/4)
    assert masked_count(R, 4, 4).tolist() == [0, 0, 0]
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    allowed = torch.tensor([[True, False, True, True]])
    assert rank_mask(scores, torch.tensor([2]), allowed=allowed, stable=False).tolist() == [[False, False, True, True]]


def test_unroll_follows_the_schedule_and_never_masks_the_prompt(llada, batch):
    cfg = UnrollConfig(unroll_steps=3, denoise_steps=3)  # T == K: starts fully masked
    rec = Recorder()
    loss, per_step = unrolled_loss(llada, rec, batch, cfg, torch.Generator().manual_seed(0))
    prompt, mask_id = batch["prompt_mask"], llada.spec.mask_id
    resp_len = (~prompt).sum(1)
    assert len(rec.seen) == 3 and per_step.shape == (3,) and torch.isclose(loss, per_step.sum())
    for k, (x, ratio) in enumerate(zip(rec.seen, rec.ratios)):
        assert torch.equal(x[prompt], batch["input_ids"][prompt])
        masked = (x == mask_id).sum(1)
        assert torch.equal(masked, masked_count(resp_len, k, 3))
        torch.testing.assert_close(ratio, masked / resp_len)
    # committed tokens are the model's own predictions, so they need not equal the data
    assert rec.seen[0][~prompt].eq(mask_id).all()


def test_gradient_flows_back_through_the_state(llada, batch):
    torch.manual_seed(0)
    ms = MetaState.init_for(llada, slots=4, width=32, heads=4)
    with torch.no_grad():
        ms.injector.gate.fill_(1.0)
    for K, reaches_mixer in ((1, False), (2, True)):
        ms.zero_grad(set_to_none=True)
        loss, _ = unrolled_loss(llada, ms, batch, UnrollConfig(K, 4), torch.Generator().manual_seed(0))
        loss.backward()
        grad = ms.mixer.k.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches_mixer
        assert ms.injector.gate.grad.abs().sum() > 0


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_args(ckpt, data, out, *extra):
    return ["--backbone", ckpt, "--data", data, "--output-dir", str(out), "--slots", "4", "--width", "32",
            "--heads", "4", "--unroll-steps", "2", "--denoise-steps", "4", "--batch-size", "4",
            "--eval-size", "8", "--warmup-steps", "2", "--lr", "3e-2", "--eval-every", "0", "--cpu", *extra]


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_short_run_lowers_the_held_out_loss(tiny_ckpts, tmp_path, llada):
    data = write_jsonl(tmp_path / "copy.jsonl", copy_pairs(72))
    out = tmp_path / "run"
    assert main(run_args(tiny_ckpts["llada"], data, out, "--max-steps", "24", "--save-every", "0")) == 0
    log = read_log(out)
    start, end = log[0], log[-1]
    assert start["eval_metastate"] == start["eval_frozen"]  # gate at zero: the frozen model
    assert end["eval_metastate"] < start["eval_frozen"] - 0.1, (start, end)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 24 and sum(losses[-6:]) < sum(losses[:6])
    trained = MetaState.from_pretrained(out, llada)
    assert trained.injector.gate.abs().sum() > 0


def test_resume_continues_exactly(tiny_ckpts, tmp_path):
    data = write_jsonl(tmp_path / "copy.jsonl", copy_pairs(40))
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(run_args(tiny_ckpts["llada"], data, a, "--max-steps", "4", "--save-every", "2")) == 0
    shutil.copytree(a / "checkpoint-2", b / "checkpoint-2")
    assert main(run_args(tiny_ckpts["llada"], data, b, "--max-steps", "4", "--resume", "latest")) == 0
    wa, wb = MetaState.from_pretrained(a).state_dict(), MetaState.from_pretrained(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in read_log(b) if "loss" in r] == [r["loss"] for r in read_log(a) if "loss" in r][2:]
