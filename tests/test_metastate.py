"""MetaState as a memory: identity at init, state carried per row, cache windows, checkpoints."""

import json
import os

import pytest
import torch

from lm_eval_dlmem.backbones import load_backbone
from lm_eval_dlmem.backbones.common import DiffusionCache
from lm_eval_dlmem.memory import MetaState, NoMemory, StepInfo
from lm_eval_dlmem.memory.metastate import MetaStateConfig, load_memory_for
from lm_eval_dlmem.testing import make_tiny_checkpoint

SMALL = dict(slots=4, width=32, heads=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def backbones(tiny_ckpts):
    return {fam: load_backbone(path) for fam, path in tiny_ckpts.items()}


def canvas(backbone, B=2, L=20, pad=(0, 3), seed=0):
    """Random tokens with left padding per row and the last 8 positions masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (B, L), generator=g)
    ids[:, -8:] = backbone.spec.mask_id
    attn = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pad[:B]):
        attn[b, :p] = 0
    prompt = torch.zeros(B, L, dtype=torch.bool)
    prompt[:, :-8] = True
    return ids, attn, prompt


def step(ms, backbone, i, ids, attn, ratio, window=None, cache=None):
    """One decoder step through the memory protocol; returns the logits."""
    L = ids.shape[1]
    info = StepInfo(i, torch.full((ids.shape[0],), ratio), window or (0, L), ids, window is None)
    ms.before_forward(info)
    out = backbone.logits(ids, attn, cache=cache, window=window)
    ms.after_forward(info)
    return out


def trained_like(backbone, seed=0, **kw):
    """A MetaState with the gate opened, so it changes the backbone (stands in for a trained one)."""
    torch.manual_seed(seed)
    ms = MetaState.init_for(backbone, **{**SMALL, **kw})
    with torch.no_grad():
        ms.injector.gate.fill_(2.0)
        ms.injector.o.weight.mul_(50)
    return ms


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_untrained_metastate_is_the_frozen_backbone(backbones, family):
    bb = backbones[family]
    ms = MetaState.init_for(bb, **SMALL)
    ids, attn, prompt = canvas(bb)
    ref = bb.logits(ids, attn)
    ms.begin(bb, ids, attn, prompt)
    states = [ms.state.clone()]
    for i, ratio in enumerate((1.0, 0.75, 0.5)):
        assert torch.equal(step(ms, bb, i, ids, attn, ratio), ref)
        states.append(ms.state.clone())
    ms.end()
    # the hooks ran: the state moved at every step, and they are gone afterwards
    assert all(not torch.equal(a, b) for a, b in zip(states, states[1:]))
    assert all(not layer._forward_hooks for layer in bb.layers)
    assert ms.state is None


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_identity_and_window_placement_with_cache(backbones, family):
    bb = backbones[family]
    ids, attn, prompt = canvas(bb)
    for ms in (MetaState.init_for(bb, **SMALL), trained_like(bb)):
        ref_cache, cache = DiffusionCache(), DiffusionCache()
        ms.begin(bb, ids, attn, prompt)
        full = step(ms, bb, 0, ids, attn, 1.0, cache=cache)
        win = step(ms, bb, 1, ids, attn, 0.5, window=(12, 16), cache=cache)  # dual-cache block
        suffix = step(ms, bb, 2, ids, attn, 0.25, window=(16, 20), cache=cache)  # prefix-cache suffix
        ms.end()
        ref_full = bb.logits(ids, attn, cache=ref_cache)
        same = torch.equal(full, ref_full) and torch.equal(win, bb.logits(ids, attn, cache=ref_cache, window=(12, 16)))
        assert same == (ms.injector.gate.abs().sum() == 0)
        assert win.shape[1] == 4 and suffix.shape[1] == 4


def test_state_carries_information_across_steps(backbones):
    bb = backbones["llada"]
    ms = trained_like(bb)
    ids, attn, prompt = canvas(bb)
    other = ids.clone()
    other[:, 2:6] = 7  # a different canvas at step 0 only
    outs = []
    for first in (ids, other):
        ms.begin(bb, ids, attn, prompt)
        step(ms, bb, 0, first, attn, 1.0)
        outs.append(step(ms, bb, 1, ids, attn, 0.5))
        ms.end()
    assert not torch.equal(outs[0], bb.logits(ids, attn))  # the memory changes the backbone
    assert not torch.allclose(outs[0], outs[1])  # what it saw at step 0 matters at step 1
    # a new request starts from the learned initial slots, whatever the last one left behind
    ms.begin(bb, ids, attn, prompt)
    assert torch.equal(ms.state, ms.slot_init.expand(2, -1, -1))
    step(ms, bb, 0, ids, attn, 1.0)
    assert torch.equal(step(ms, bb, 1, ids, attn, 0.5), outs[0])
    ms.end()


def test_rows_are_independent_and_select_follows_them(backbones):
    bb = backbones["dream"]
    ms = trained_like(bb)
    ids, attn, prompt = canvas(bb, B=3, pad=(0, 3, 5))
    ms.begin(bb, ids, attn, prompt)
    batched = [step(ms, bb, i, ids, attn, r) for i, r in enumerate((1.0, 0.5))]
    state = ms.state.clone()
    ms.select(torch.tensor([2, 0, 0]))  # repeats: likelihood expands requests this way
    assert torch.equal(ms.state, state[[2, 0, 0]])
    picked = step(ms, bb, 2, ids[[2, 0, 0]], attn[[2, 0, 0]], 0.25)
    ms.end()
    for b in range(3):
        ms.begin(bb, ids[b : b + 1], attn[b : b + 1], prompt[b : b + 1])
        alone = [step(ms, bb, i, ids[b : b + 1], attn[b : b + 1], r) for i, r in enumerate((1.0, 0.5))]
        if b == 0:
            nxt = step(ms, bb, 2, ids[:1], attn[:1], 0.25)
        ms.end()
        real = attn[b].bool()
        for x, y in zip(batched, alone):
            torch.testing.assert_close(x[b][real], y[0][real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(picked[1], nxt[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(picked[1], picked[2])


def test_guidance_batch_and_hooks_removed_on_error(backbones):
    bb = backbones["llada"]
    ms = trained_like(bb)
    ids, attn, prompt = canvas(bb)
    with pytest.raises(RuntimeError, match="boom"):
        with ms.session(bb, ids, attn, prompt):
            both = step(ms, bb, 0, torch.cat([ids, ids]), torch.cat([attn, attn]), 1.0)  # cond + uncond rows
            torch.testing.assert_close(both[:2], both[2:])
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in bb.layers)


def test_checkpoint_roundtrip_and_fit_errors(backbones, tmp_path_factory):
    bb = backbones["llada"]
    ms = trained_like(bb, read_layer=-1, write_layer=0)
    path = tmp_path_factory.mktemp("ms")
    ms.save_pretrained(path)
    meta = json.loads((path / "metastate_config.json").read_text())
    assert (meta["family"], meta["hidden_size"], meta["num_hidden_layers"]) == ("llada", 64, 2)
    assert meta["module"]["read_layer"] == 1 and meta["module"]["slots"] == 4
    loaded = load_memory_for(str(path), bb)
    assert isinstance(loaded, MetaState) and loaded.config == ms.config
    for (k, a), (k2, b) in zip(ms.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    ids, attn, prompt = canvas(bb)
    outs = []
    for m in (ms, loaded):
        m.begin(bb, ids, attn, prompt)
        outs.append([step(m, bb, i, ids, attn, 1.0) for i in range(2)])
        m.end()
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    with pytest.raises(ValueError, match="llada backbone with hidden size 64 and 2 layers.*dream with hidden size 64"):
        MetaState.from_pretrained(path, backbones["dream"])
    wide = load_backbone(make_tiny_checkpoint("llada", tmp_path_factory.mktemp("wide"), d_model=96))
    with pytest.raises(ValueError, match="hidden size 64 and 2 layers.*hidden size 96 and 2 layers"):
        load_memory_for(str(path), wide)


def test_load_memory_for_none_and_missing(backbones, tmp_path):
    assert isinstance(load_memory_for(None, backbones["llada"]), NoMemory)
    assert isinstance(load_memory_for("none", backbones["llada"]), NoMemory)
    with pytest.raises(FileNotFoundError, match="metastate_config.json"):
        load_memory_for(str(tmp_path), backbones["llada"])
    with pytest.raises(FileNotFoundError, match="neither a local directory nor reachable"):
        load_memory_for(os.path.join(str(tmp_path), "nope"), backbones["llada"])


def test_config_validation(backbones):
    with pytest.raises(ValueError, match="not divisible by heads"):
        MetaStateConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="valid ones are"):
        MetaState.init_for(backbones["llada"], slot=3)
    with pytest.raises(ValueError, match="outside the backbone's 2 layers"):
        MetaState.init_for(backbones["llada"], read_layer=5)


def test_default_sizes_land_near_the_paper_budget():
    """~0.6% of LLaDA-8B and Dream-7B, counted on the meta device from their real configs."""
    from lm_eval_dlmem.backbones.dream import DreamConfig, DreamModel
    from lm_eval_dlmem.backbones.llada import LLaDAConfig, LLaDAModelLM

    llada = LLaDAConfig(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                        vocab_size=126464, embedding_size=126464, weight_tying=False, block_type="llama",
                        layer_norm_type="rms", rope=True, activation_type="silu")
    dream = DreamConfig(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                        intermediate_size=18944, vocab_size=152064)
    for cls, cfg in ((LLaDAModelLM, llada), (DreamModel, dream)):
        with torch.device("meta"):
            total = sum(p.numel() for p in cls(cfg).parameters())
        extra = MetaState.parameter_count(cfg.hidden_size, cfg.num_hidden_layers)
        assert 0.0055 < extra / total < 0.0065, (cls.__name__, extra, total)
