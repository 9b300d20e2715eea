"""MetaState on LLaDA2.x: it hooks the family's decoder layers (`backbone.layers`, sizes from
config.json's hidden_size / num_hidden_layers), is the frozen model while its gate is closed, and
runs inside the block-diffusion loop (session per batch, step per forward) and the block-wise
likelihood."""

import pytest
import torch

from lm_eval_dlmem.decoding.config import DecodeConfig
from lm_eval_dlmem.decoding.engine import generate
from lm_eval_dlmem.decoding.forward import forward_step
from lm_eval_dlmem.decoding.likelihood import loglikelihood
from lm_eval_dlmem.memory import MetaState, NoMemory

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(slots=4, width=32, heads=4)
CASES = [dict(strategy="llada2", cache="none"), dict(strategy="llada2", cache="prefix", temperature=0.7),
         dict(strategy="llada21", cache="dual", threshold=0.5)]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    from lm_eval_dlmem.backbones.loading import load_backbone
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint("llada2", tmp_path_factory.mktemp("ms-llada2") / "tiny", seed=5,
                                initializer_range=0.25)
    return load_backbone(path, device="cpu", dtype="float32")


def opened(ms, trained=False):
    """Open the gate; `trained` also gives the zero-initialised AdaLN scale/shift weights values,
    so the time code (mask ratio) matters as in a trained MetaState."""
    with torch.no_grad():
        ms.injector.gate.fill_(3.0)
        ms.injector.o.weight.mul_(200)
        if trained:
            gen = torch.Generator().manual_seed(1)
            for p in ms.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=gen))
    return ms


def prompts(bb):
    enc = bb.tokenizer(["The grass is green. Where is Mary?", "One two"], return_tensors="pt", padding=True,
                       padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def decode(bb, memory, overrides, ids=None, attn=None, seeds=(3, 4)):
    cfg = DecodeConfig(**{**dict(gen_length=12, steps=4, block_length=4, stop_early=False), **overrides})
    if ids is None:
        ids, attn = prompts(bb)
    return generate(bb, ids, attn, cfg, memory, seeds=list(seeds))


def test_metastate_sizes_and_layers_come_from_the_llada2_config(bb):
    ms = MetaState.init_for(bb, **SMALL)
    assert (ms.family, ms.hidden_size, ms.num_layers) == ("llada2", bb.config.hidden_size, bb.config.num_hidden_layers)
    assert (ms.config.read_layer, ms.config.write_layer) == (1, 0)  # ~3/4 and ~1/4 of 2 layers


def test_a_closed_gate_leaves_block_causal_logits_unchanged(bb):
    torch.manual_seed(0)
    ms = MetaState.init_for(bb, **SMALL)
    ids, attn = prompts(bb)
    ids = torch.cat([ids, torch.full((2, 4), bb.spec.mask_id)], 1)
    attn = torch.cat([attn, torch.ones(2, 4, dtype=attn.dtype)], 1)
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    ratio = torch.full((2,), 0.5)

    def logits(memory):
        with memory.session(bb, ids, attn, prompt, [0, 1]), torch.no_grad():
            return forward_step(bb, memory, ids, attn, step=0, mask_ratio=ratio, block_length=4)

    frozen = logits(NoMemory())
    assert torch.equal(logits(ms), frozen)
    assert not torch.allclose(logits(opened(ms)), frozen, atol=1e-3)  # the hooks do fire on this family


@pytest.mark.parametrize("overrides", CASES)
def test_untrained_metastate_decodes_like_the_frozen_model_in_the_block_loop(bb, overrides):
    """Kills: the block-diffusion loop forwarding outside the memory's step (an opened gate would
    then change nothing) or leaving hooks / state behind."""
    torch.manual_seed(0)
    ms = MetaState.init_for(bb, **SMALL)
    frozen = decode(bb, NoMemory(), overrides)
    assert torch.equal(decode(bb, ms, overrides), frozen)
    assert not torch.equal(decode(bb, opened(ms), overrides), frozen)
    assert all(not layer._forward_hooks for layer in bb.layers) and ms.state is None


@pytest.mark.parametrize("strategy", ["llada2", "llada21"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_each_row_keeps_its_own_state_in_the_block_loop(bb, cache, strategy):
    """An opened MetaState gives each prompt the same tokens in a left-padded batch as alone,
    although the rows' blocks sit at different columns of the shared window and a row whose block
    is done keeps being forwarded while its batch-mate finishes. Kills: the Mixer reading the
    batch-mate's extra columns, waiting rows updating their state, a windowed forward overwriting
    a row's cached finished columns, and a mask ratio over the shared canvas instead of the row's."""
    from lm_eval_dlmem.decoding.block_diffusion import BlockRows

    torch.manual_seed(0)
    ms = opened(MetaState.init_for(bb, **SMALL), trained=True)
    ids, attn = prompts(bb)
    geometry = BlockRows.build(ids, attn, 12, 4, bb.spec.mask_id)
    assert len(set(geometry.starts(0, 4))) == 2  # the rows' first blocks sit at different columns
    overrides = {"strategy": strategy, "cache": cache, "threshold": 0.99}
    batched = decode(bb, ms, overrides, ids, attn)
    for b in range(2):
        alone = decode(bb, ms, overrides, ids[b:b + 1, attn[b].bool()], None, seeds=(3 + b,))
        assert torch.equal(alone[0], batched[b]), b


def test_untrained_metastate_scores_like_the_frozen_model(bb):
    enc = lambda s: bb.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    requests = [(enc("The grass is"), enc(" green.")), (enc("Where is Mary? Mary is in the"), enc(" bathroom"))]
    kw = dict(mc_num=4, batch_size=4, seeds=[5, 6], check_greedy=True, block_length=4)
    torch.manual_seed(0)
    ms = MetaState.init_for(bb, **SMALL)
    frozen = loglikelihood(bb, requests, memory=NoMemory(), **kw)
    assert loglikelihood(bb, requests, memory=ms, **kw) == frozen
    changed = loglikelihood(bb, requests, memory=opened(ms), **kw)
    assert [s for s, _ in changed] != [s for s, _ in frozen]


def test_metastate_llada_preset_runs_a_llada2_checkpoint_with_its_metastate(bb, tmp_path):
    from lm_eval.api.instance import Instance

    from lm_eval_dlmem.harness import MetaStateLLaDA

    torch.manual_seed(0)
    opened(MetaState.init_for(bb, **SMALL)).save_pretrained(tmp_path / "ms")
    path = bb.model.config._name_or_path
    lm = MetaStateLLaDA(pretrained=path, device="cpu", metastate=str(tmp_path / "ms"), block_length=4)
    frozen = MetaStateLLaDA(pretrained=path, device="cpu", metastate="none", block_length=4)
    req = [Instance("generate_until", doc={}, arguments=("One two three", {"until": [], "max_gen_toks": 8}), idx=0)]
    assert isinstance(lm.memory, MetaState) and lm.args.strategy == "llada2"
    assert lm.generate_until(req, disable_tqdm=True) != frozen.generate_until(req, disable_tqdm=True)
