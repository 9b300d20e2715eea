"""Gradient checkpointing of the frozen backbone's blocks in MetaState training: the same
gradients as without it, less activation memory kept for backward."""

import pytest
import torch

from lm_eval_dlmem.backbones import load_backbone
from lm_eval_dlmem.decoding.config import DecodeConfig
from lm_eval_dlmem.memory import MetaState
from lm_eval_dlmem.testing import make_tiny_checkpoint
from lm_eval_dlmem.training.checkpointing import checkpoint_blocks
from lm_eval_dlmem.training.data import collate, tokenize_pairs
from lm_eval_dlmem.training.decode_unroll import Window, decode_batch, trajectory_loss
from lm_eval_dlmem.training.metastate import UnrollConfig, unrolled_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

PAIRS = [("Repeat: apple river", "apple river"), ("Repeat: one two three", "one two three")]


def frozen(path):
    bb = load_backbone(path)
    bb.model.requires_grad_(False)
    return bb


def metastate(bb):
    torch.manual_seed(0)
    ms = MetaState.init_for(bb, slots=4, width=32, heads=4)
    with torch.no_grad():
        ms.injector.gate.fill_(1.0)
    return ms


def grads(bb, mode):
    ms = metastate(bb)
    ex = tokenize_pairs(PAIRS, bb.tokenizer, max_length=128, chat_template=False)
    if mode == "unroll":
        loss, _ = unrolled_loss(bb, ms, collate(ex, bb.spec.eos_id), UnrollConfig(3, 4), torch.Generator().manual_seed(0))
    else:
        cfg = DecodeConfig(gen_length=16, block_length=8, steps=8, stop_early=False)
        loss, _, _ = trajectory_loss(bb, ms, decode_batch(ex, 16, bb.spec.eos_id), cfg, Window(2, 4), [0, 1])
    loss.backward()
    return {n: p.grad.clone() for n, p in ms.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["unroll", "match"])
def test_checkpointing_gives_the_same_gradients(tiny_ckpts, mode):
    plain, ckpt = frozen(tiny_ckpts["llada"]), frozen(tiny_ckpts["llada"])
    assert checkpoint_blocks(ckpt) == len(ckpt.layers) and checkpoint_blocks(ckpt) == len(ckpt.layers)  # idempotent
    a, b = grads(plain, mode), grads(ckpt, mode)
    assert a.keys() == b.keys() and "mixer.k.weight" in a and "injector.gate" in a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


def saved_bytes(bb) -> int:
    """Bytes of the tensors autograd keeps for backward over one K-step unroll."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    ms = metastate(bb)
    ids = torch.randint(10, 200, (2, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "prompt_mask": torch.arange(256)[None].expand(2, -1) < 64}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = unrolled_loss(bb, ms, batch, UnrollConfig(2, 4), torch.Generator().manual_seed(0))
    loss.backward()
    return total


def test_checkpointing_keeps_less_for_backward(tmp_path):
    path = make_tiny_checkpoint("llada", tmp_path / "big", d_model=128, n_layers=8, mlp_hidden_size=512)
    plain, ckpt = frozen(path), frozen(path)
    checkpoint_blocks(ckpt)
    without, with_ = saved_bytes(plain), saved_bytes(ckpt)
    assert with_ < 0.5 * without, (with_, without)


def test_trainer_runs_checkpointed_on_a_bf16_backbone(tiny_ckpts, tmp_path):
    """--gradient-checkpointing with --dtype bfloat16 (the frozen backbone's CUDA default) trains:
    the MetaState stays float32, its loss is finite and its gate moves."""
    import math

    from test_metastate_training import copy_pairs, read_log, run_args, write_jsonl

    from lm_eval_dlmem.training.metastate import main

    data = write_jsonl(tmp_path / "copy.jsonl", copy_pairs(24))
    out = tmp_path / "run"
    assert main(run_args(tiny_ckpts["llada"], data, out, "--max-steps", "3", "--save-every", "0",
                         "--dtype", "bfloat16", "--gradient-checkpointing")) == 0
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    ms = MetaState.from_pretrained(out)
    assert ms.injector.gate.dtype == torch.float32 and ms.injector.gate.abs().sum() > 0


def test_four_bit_needs_cuda(tiny_ckpts, tmp_path):
    from test_metastate_training import copy_pairs, run_args, write_jsonl

    from lm_eval_dlmem.training.metastate import main

    data = write_jsonl(tmp_path / "copy.jsonl", copy_pairs(24))
    with pytest.raises(ValueError, match="--load-in-4bit needs a CUDA device"):
        main(run_args(tiny_ckpts["llada"], data, tmp_path / "o", "--max-steps", "1", "--load-in-4bit"))
