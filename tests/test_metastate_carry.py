"""`metastate_carry=none|first_block`: the no-carry ablations do what they say, through the real
decoder and the model args."""

import pytest
import torch

from lm_eval_dlmem.backbones import load_backbone
from lm_eval_dlmem.decoding.config import DecodeConfig
from lm_eval_dlmem.decoding.engine import generate
from lm_eval_dlmem.memory import MetaState, NoMemory
from lm_eval_dlmem.memory.build import build_memory
from lm_eval_dlmem.memory.carry import FreezeAfterFirstBlock, ResetEachForward, with_carry
from lm_eval_dlmem.model_args import ModelArgs

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

CONFIGS = [dict(cache="none"), dict(cache="dual", strategy="threshold", threshold=0.5)]


@pytest.fixture(scope="module")
def llada(tiny_ckpts):
    return load_backbone(tiny_ckpts["llada"])


def trained(bb, seed=0):
    """A MetaState whose memory matters: open gate, a state that moves."""
    torch.manual_seed(seed)
    ms = MetaState.init_for(bb, slots=4, width=32, heads=4)
    with torch.no_grad():
        ms.injector.gate.fill_(2.0)
        for m in (ms.updater.norm_x.mod, ms.mixer.norm_s.mod):
            torch.nn.init.normal_(m.weight, std=0.5)
    return ms


def decode(bb, memory, **overrides):
    cfg = DecodeConfig(**{**dict(gen_length=16, steps=8, block_length=4, stop_early=False), **overrides})
    enc = bb.tokenizer(["The grass is green. Where is Mary?", "One two"], return_tensors="pt", padding=True)
    return generate(bb, enc["input_ids"], enc["attention_mask"], cfg, memory, seeds=[3, 4])


class States(MetaState):
    """Records the state every forward's Injector sees (before_forward) and every update."""

    def begin(self, *a, **k):
        super().begin(*a, **k)
        self.seen, self.blocks = [], []

    def before_forward(self, info):
        super().before_forward(info)
        self.seen.append(self.state.detach().clone())
        self.blocks.append(info.block)

    def end(self):
        if "seen" in self.__dict__:
            self.done = (self.seen, self.blocks)
        super().end()


def recording(bb):
    ms = trained(bb)
    rec = States(ms.config, bb.config.hidden_size, bb.config.num_hidden_layers, bb.family)
    rec.load_state_dict(ms.state_dict())
    return rec


@pytest.mark.parametrize("overrides", CONFIGS)
def test_carry_none_equals_a_memory_that_never_updates(llada, overrides):
    """Reset every forward == each forward from fresh slots: a copy whose Updater keeps the state
    (update gate z = 0, so S' = S = slot_init) decodes the same tokens; carrying differs."""
    fresh_each = trained(llada)
    with torch.no_grad():
        fresh_each.updater.gates.bias[: fresh_each.config.width].fill_(-1e4)  # z = sigmoid(-1e4) = 0
    reset = decode(llada, ResetEachForward(trained(llada)), **overrides)
    assert torch.equal(reset, decode(llada, fresh_each, **overrides))
    assert not torch.equal(reset, decode(llada, trained(llada), **overrides))  # the carry matters here
    assert not torch.equal(reset, decode(llada, NoMemory(), **overrides))  # the Injector still writes


def test_first_block_carries_then_freezes(llada):
    rec = recording(llada)
    decode(llada, FreezeAfterFirstBlock(rec))
    seen, blocks = rec.done
    assert blocks == [0, 0, 1, 1, 2, 2, 3, 3]  # 8 steps over 4 blocks
    assert not torch.equal(seen[0], seen[1])  # updated inside block 0
    frozen = seen[2]  # the state block 0 ended with
    assert not torch.equal(frozen, seen[1])
    assert all(torch.equal(s, frozen) for s in seen[2:])
    # the full carry keeps updating after block 0
    full = recording(llada)
    decode(llada, full)
    assert torch.equal(full.done[0][2], frozen) and not torch.equal(full.done[0][3], frozen)


def test_model_arg_builds_the_ablation_and_refuses_bad_values(llada, tmp_path):
    trained(llada).save_pretrained(tmp_path / "ms")
    for carry, cls in (("full", MetaState), ("none", ResetEachForward), ("first_block", FreezeAfterFirstBlock)):
        args = ModelArgs.from_kwargs(pretrained="x", metastate=str(tmp_path / "ms"), metastate_carry=carry)
        assert type(build_memory(args, llada)[1]) is cls
    with pytest.raises(ValueError, match="metastate_carry='some'; choose one of full, none, first_block"):
        ModelArgs.from_kwargs(pretrained="x", metastate=str(tmp_path / "ms"), metastate_carry="some")
    with pytest.raises(ValueError, match="metastate_carry=none ablates .* no metastate="):
        ModelArgs.from_kwargs(pretrained="x", metastate_carry="none")
    with pytest.raises(ValueError, match="metastate_carry"):
        with_carry(NoMemory(), "block")
    # the default keeps existing runs' fingerprints; an ablation gets its own
    plain = ModelArgs.from_kwargs(pretrained="x", metastate="m").fingerprint_fields()
    assert "metastate_carry" not in plain
    assert ModelArgs.from_kwargs(pretrained="x", metastate="m", metastate_carry="none").fingerprint_fields() != plain
