"""MetaState through the real decoder: an untrained one decodes exactly like the frozen backbone
in every strategy and cache mode; a trained one changes the output and leaves no hooks behind."""

import pytest
import torch

from lm_eval_dlmem.backbones import load_backbone
from lm_eval_dlmem.decoding.config import DecodeConfig
from lm_eval_dlmem.decoding.engine import generate
from lm_eval_dlmem.memory import MetaState, NoMemory

SMALL = dict(slots=4, width=32, heads=4)
CASES = [  # (family, decode config overrides)
    ("llada", dict(strategy="llada", cache="none")),
    ("llada", dict(strategy="llada", cache="prefix", remasking="random", temperature=0.7)),
    ("llada", dict(strategy="threshold", cache="dual", threshold=0.5)),
    ("llada", dict(strategy="llada", cache="none", cfg_scale=1.0)),
    ("dream", dict(strategy="dream", cache="none", block_length=16, steps=8, alg="entropy")),
    ("dream", dict(strategy="dream", cache="dual", alg="maskgit_plus", temperature=0.5, top_p=0.9)),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def backbones(tiny_ckpts):
    return {fam: load_backbone(tiny_ckpts[fam]) for fam in ("llada", "dream")}


def prompts(backbone):
    tok = backbone.tokenizer
    enc = tok(["The grass is green. Where is Mary?", "One two"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def decode(backbone, memory, overrides):
    cfg = DecodeConfig(**{**dict(gen_length=16, steps=8, block_length=8, stop_early=False), **overrides})
    ids, attn = prompts(backbone)
    return generate(backbone, ids, attn, cfg, memory, seeds=[3, 4])


@pytest.mark.parametrize("family,overrides", CASES)
def test_untrained_metastate_decodes_like_the_frozen_backbone(backbones, family, overrides):
    bb = backbones[family]
    torch.manual_seed(0)
    ms = MetaState.init_for(bb, **SMALL)
    frozen = decode(bb, NoMemory(), overrides)
    assert torch.equal(decode(bb, ms, overrides), frozen)
    # open the gate: the same decode now differs, and the hooks are still cleaned up
    with torch.no_grad():
        ms.injector.gate.fill_(3.0)
        ms.injector.o.weight.mul_(200)
    assert not torch.equal(decode(bb, ms, overrides), frozen)
    assert all(not layer._forward_hooks for layer in bb.layers) and ms.state is None


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_each_row_keeps_its_own_state(backbones, cache):
    """A trained MetaState gives each prompt the same tokens alone as in a padded batch."""
    bb = backbones["llada"]
    torch.manual_seed(0)
    ms = MetaState.init_for(bb, **SMALL)
    with torch.no_grad():
        ms.injector.gate.fill_(3.0)
        ms.injector.o.weight.mul_(200)
    cfg = DecodeConfig(gen_length=16, steps=8, block_length=8, stop_early=False, cache=cache)
    ids, attn = prompts(bb)
    batched = generate(bb, ids, attn, cfg, ms, seeds=[3, 4])
    for b in range(2):
        real = attn[b].bool()
        alone = generate(bb, ids[b : b + 1, real], None, cfg, ms, seeds=[3 + b])
        assert torch.equal(alone[0], batched[b])


@pytest.mark.parametrize("family,cfg_scale", [("llada", 0.0), ("llada", 1.0), ("dream", 0.0)])
def test_untrained_metastate_scores_like_the_frozen_backbone(backbones, family, cfg_scale):
    from lm_eval_dlmem.decoding.likelihood import loglikelihood

    bb = backbones[family]
    tok = bb.tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    requests = [(enc("The grass is"), enc(" green.")), (enc("Where is Mary? Mary is in the"), enc(" bathroom"))]
    kw = dict(mc_num=6, batch_size=4, seeds=[5, 6], cfg_scale=cfg_scale, check_greedy=True)
    torch.manual_seed(0)
    ms = MetaState.init_for(bb, **SMALL)
    frozen = loglikelihood(bb, requests, memory=NoMemory(), **kw)
    assert loglikelihood(bb, requests, memory=ms, **kw) == frozen
    with torch.no_grad():
        ms.injector.gate.fill_(3.0)
        ms.injector.o.weight.mul_(200)
    changed = loglikelihood(bb, requests, memory=ms, **kw)
    assert [s for s, _ in changed] != [s for s, _ in frozen]
    assert all(not layer._forward_hooks for layer in bb.layers) and ms.state is None
