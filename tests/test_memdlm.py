"""MemDLM fast weights: targets, exact restore, batched == row by row, the inner loop's effect,
mask states, and fast weights on top of an outer PEFT adapter."""

import pytest
import torch

from lm_eval_dlmem import load_backbone
from lm_eval_dlmem.memory.adapters import add_outer_lora, apply_adapter
from lm_eval_dlmem.memory.anchor import anchor_states, prompt_anchor
from lm_eval_dlmem.memory.fast_weights import FastLoRA, FastWeightMemory, MemDLMConfig, ffn_projections
from lm_eval_dlmem.testing import make_tiny_checkpoint

FAMILIES = ("llada", "dream", "llada_moe")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def backbones(tiny_ckpts):
    return {fam: load_backbone(path) for fam, path in tiny_ckpts.items()}


def prompts(backbone, lengths, gen_len=4, seed=0):
    """Left-padded prompts of the given lengths + a masked generation region."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P + gen_len), backbone.spec.eos_id)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, P - n : P] = torch.randint(10, 300, (n,), generator=g)
        attn[i, P - n :] = 1
    ids[:, P:] = backbone.spec.mask_id
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    prompt_mask[:, :P] = attn[:, :P].bool()
    return ids, attn, prompt_mask


def test_config_validation():
    with pytest.raises(ValueError, match="inner_layer_fraction"):
        MemDLMConfig(inner_layer_fraction=0.0)
    with pytest.raises(ValueError, match="pre_anchor_scale"):
        MemDLMConfig(pre_anchor_scale=0.5)
    with pytest.raises(ValueError, match="loss_weight"):
        MemDLMConfig(loss_weight="inverse")


@pytest.mark.parametrize(
    "family, sizes, expected",
    [
        ("llada", {}, ["ff_proj", "up_proj", "ff_out"]),
        ("dream", {}, ["gate_proj", "up_proj", "down_proj"]),
        ("llada_moe", {}, ["gate_proj", "up_proj", "down_proj"] * 4),
        ("llada_moe", {"shared_expert_intermediate_size": 16}, ["gate_proj", "up_proj", "down_proj"] * 5),
        ("llada", {"n_layers": 4}, ["ff_proj", "up_proj", "ff_out"]),  # int(4 * 0.9) = 3: last block only
    ],
)
def test_targets_are_ffn_projections_of_the_last_layers(tmp_path, family, sizes, expected):
    bb = load_backbone(make_tiny_checkpoint(family, tmp_path / family, **sizes))
    found = ffn_projections(bb, 0.1)
    assert [name for _, name, _ in found] == expected
    last = bb.layers[-1]
    assert all(any(parent is m for m in last.modules()) for parent, _, _ in found)
    assert [expert for *_, expert in found] == ([True] * 12 + [False] * 3 if "shared_expert_intermediate_size" in sizes
                                                 else [family == "llada_moe"] * len(expected))


@pytest.mark.parametrize("family", FAMILIES)
def test_end_restores_the_exact_model_and_zero_steps_installs_nothing(backbones, family):
    bb = backbones[family]
    ids, attn, pm = prompts(bb, [12, 9])
    originals = [getattr(p, n) for p, n, _ in ffn_projections(bb, 0.1)]
    with torch.inference_mode():
        frozen = bb.logits(ids, attn)
        off = FastWeightMemory(bb, MemDLMConfig(inner_steps=0))
        off.begin(bb, ids, attn, pm, [1, 2])
        assert not off.layers and torch.equal(bb.logits(ids, attn), frozen)
        mem = FastWeightMemory(bb, MemDLMConfig(inner_targets="ffn"))
        mem.begin(bb, ids, attn, pm, [1, 2])
        assert all(isinstance(getattr(p, n), FastLoRA) for p, n, _ in ffn_projections(bb, 0.1))
        assert not torch.allclose(bb.logits(ids, attn), frozen)
        mem.end()
        assert [getattr(p, n) for p, n, _ in ffn_projections(bb, 0.1)] == originals
        assert torch.equal(bb.logits(ids, attn), frozen)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_four_equals_rows_one_by_one(backbones, family):
    bb = backbones[family]
    lengths, seeds = [14, 9, 14, 6], [5, 6, 7, 8]
    ids, attn, pm = prompts(bb, lengths)
    mem = FastWeightMemory(bb, MemDLMConfig(inner_layer_fraction=0.5))
    with torch.inference_mode():  # as the harness calls it
        mem.begin(bb, ids, attn, pm, seeds)
        batched, batch_losses = bb.logits(ids, attn), torch.stack(mem.last_losses)
        mem.end()
        P = max(lengths)
        for i, n in enumerate(lengths):
            row = slice(P - n, None)  # the row alone, without padding
            mem.begin(bb, ids[i : i + 1, row], attn[i : i + 1, row], pm[i : i + 1, row], [seeds[i]])
            single = bb.logits(ids[i : i + 1, row], attn[i : i + 1, row])
            assert torch.allclose(torch.stack(mem.last_losses)[:, 0], batch_losses[:, i], atol=1e-5)
            mem.end()
            assert torch.allclose(single[0], batched[i, row], atol=1e-5), (family, i)


def test_select_follows_rows_with_repeats(backbones):
    bb = backbones["llada_moe"]
    ids, attn, pm = prompts(bb, [10, 10])
    mem = FastWeightMemory(bb, MemDLMConfig())
    with torch.inference_mode():
        mem.begin(bb, ids, attn, pm, [3, 4])
        both = bb.logits(ids, attn)
        index = torch.tensor([1, 1, 0])
        mem.select(index)
        picked = bb.logits(ids[index], attn[index])
        mem.end()
    assert torch.allclose(picked, both[index], atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_inner_loop_lowers_the_prompt_loss_it_optimises(backbones, family):
    bb = backbones[family]
    ids, attn, _ = prompts(bb, [32, 32, 32], gen_len=0, seed=1)
    maskable = attn.bool()
    mem = FastWeightMemory(bb, MemDLMConfig())
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    mem.install()
    mem.reset(gens)
    anchor = prompt_anchor(maskable, 0.2, gens)
    states = anchor_states(maskable, anchor, 2, 1.5, gens)
    with torch.no_grad():
        before = mem.stage_loss(ids, attn, anchor, maskable)  # fresh fast weights: B = 0
    mem.adapt(ids, attn, states, maskable)
    with torch.no_grad():
        after = mem.stage_loss(ids, attn, anchor, maskable)
    mem.remove()
    assert (after < before).all(), (before, after)


def test_a_stage_frees_the_previous_stages_gradients_before_its_forward(backbones, monkeypatch):
    """The memory model counts two fast-weight copies per inner stage (weights, gradients): the
    previous stage's gradients must be gone when the next stage's forward starts."""
    import weakref

    bb = backbones["llada"]
    ids, attn, _ = prompts(bb, [32, 32], gen_len=0, seed=1)
    maskable = attn.bool()
    mem = FastWeightMemory(bb, MemDLMConfig(inner_steps=3))
    gens = [torch.Generator().manual_seed(s) for s in range(2)]
    mem.install()
    mem.reset(gens)
    states = anchor_states(maskable, prompt_anchor(maskable, 0.2, gens), 3, 1.5, gens)
    grads, alive_at_forward = [], []
    real_grad, real_loss = torch.autograd.grad, mem.stage_loss

    def recording_grad(*args, **kwargs):
        out = real_grad(*args, **kwargs)
        grads.extend(weakref.ref(g) for g in out if g is not None)
        return out

    def checked_loss(*args, **kwargs):
        alive_at_forward.append(sum(r() is not None for r in grads))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording_grad)
    monkeypatch.setattr(mem, "stage_loss", checked_loss)
    mem.adapt(ids, attn, states, maskable)
    mem.remove()
    assert len(alive_at_forward) == 3 and grads
    assert alive_at_forward == [0, 0, 0]


@pytest.mark.parametrize(
    "family, sizes, expected",
    [
        ("llada", {}, ["up_proj"]),  # the released names on a LLaDA block (ff_proj, up_proj, ff_out)
        ("dream", {}, ["gate_proj", "up_proj", "down_proj"]),
        # the shared expert sits on the block as `shared_expert`; the released code looks for
        # `mlp.shared_experts`, so it gets no fast weights
        ("llada_moe", {"shared_expert_intermediate_size": 16}, ["gate_proj", "up_proj", "down_proj"] * 4),
    ],
)
def test_default_targets_are_the_released_codes(tmp_path, family, sizes, expected):
    bb = load_backbone(make_tiny_checkpoint(family, tmp_path / family, **sizes))
    mem = FastWeightMemory(bb, MemDLMConfig())
    mem.install()
    wrapped = [name for name, m in bb.model.named_modules() if isinstance(m, FastLoRA)]
    assert [n.rsplit(".", 1)[1] for n in wrapped] == expected
    assert not any("shared_expert" in n for n in wrapped)
    mem.remove()
    ours = FastWeightMemory(bb, MemDLMConfig(inner_targets="ffn"))
    ours.install()
    assert len(ours.layers) == len(ffn_projections(bb, 0.1)) >= len(expected)
    ours.remove()
    with pytest.raises(ValueError, match="inner_targets='all'"):
        MemDLMConfig(inner_targets="all")


def test_pre_anchor_size_is_computed_in_float32_like_the_released_code():
    # 6 of 14 masked: 14 * (1.5 * 6/14) is 9.0 in float64 but 8.99999 in float32 -> 8 masks
    maskable = torch.ones(1, 14, dtype=torch.bool)
    anchor = torch.zeros(1, 14, dtype=torch.bool)
    anchor[0, :6] = True
    pre = anchor_states(maskable, anchor, 2, 1.5, [torch.Generator().manual_seed(0)])[0]
    assert int(pre.sum()) == 8


def test_anchor_states_are_nested_and_end_at_the_anchor():
    maskable = torch.ones(3, 100, dtype=torch.bool)
    maskable[2, 60:] = False
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    anchor = prompt_anchor(maskable, 0.2, gens)
    assert not (anchor & ~maskable).any()
    for steps in (1, 2, 4):
        states = anchor_states(maskable, anchor, steps, 1.5, gens)
        assert len(states) == steps
        pre = states[0]
        n, a = maskable.sum(1), anchor.sum(1)
        start = torch.minimum((a.float() / n.float()) * 1.5, torch.ones(3))  # the released float32 ratio
        assert pre.sum(1).tolist() == [max(int(ai), int(int(ni) * float(si))) for ai, ni, si in zip(a, n, start)]
        for bigger, smaller in zip(states, states[1:]):
            assert not (smaller & ~bigger).any() and (bigger.sum(1) >= smaller.sum(1)).all()
        assert not (anchor & ~states[-1]).any()
        if steps > 1:
            assert torch.equal(states[-1], anchor)


def test_fast_weights_sit_under_an_outer_adapter(tmp_path):
    bb = load_backbone(make_tiny_checkpoint("llada_moe", tmp_path / "moe"))
    ids, attn, pm = prompts(bb, [12, 8])
    with torch.inference_mode():
        frozen = bb.logits(ids, attn)
    trained = add_outer_lora(load_backbone(str(tmp_path / "moe")))
    with torch.no_grad():
        for name, p in trained.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a non-trivial outer adapter
    trained.model.save_pretrained(tmp_path / "adapter")
    adapted = apply_adapter(bb, str(tmp_path / "adapter"))
    expert = adapted.layers[-1].mlp.experts[0]
    peft_layer, original = expert.gate_proj, expert.gate_proj.base_layer
    with torch.inference_mode():
        outer_only = adapted.logits(ids, attn)
        assert not torch.allclose(outer_only, frozen)
        keys = set(adapted.model.state_dict())
        mem = FastWeightMemory(adapted, MemDLMConfig(inner_lr=0.0))  # fast weights stay the identity
        mem.begin(adapted, ids, attn, pm, [0, 1])
        assert expert.gate_proj is peft_layer and isinstance(peft_layer.base_layer, FastLoRA)
        assert torch.allclose(adapted.logits(ids, attn), outer_only, atol=1e-6)
        assert {k for k in adapted.model.state_dict() if "lora_" in k} == {k for k in keys if "lora_" in k}
        mem.end()
        assert peft_layer.base_layer is original
        assert torch.equal(adapted.logits(ids, attn), outer_only)


@pytest.fixture(scope="module")
def adapted_moe(tmp_path_factory):
    """A tiny LLaDA-MoE with a non-trivial outer LoRA (dropout 0.05, as MemDLM trains it)."""
    tmp = tmp_path_factory.mktemp("moe_dropout")
    base = make_tiny_checkpoint("llada_moe", tmp / "moe")
    trained = add_outer_lora(load_backbone(str(base)))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trained.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trained.model.save_pretrained(tmp / "adapter")
    return apply_adapter(load_backbone(str(base)), str(tmp / "adapter"))


def test_outer_lora_dropout_is_active_during_the_inner_loop_only(adapted_moe):
    """The released evaluator adapts in train() mode, so the outer LoRA's dropout (0.05) acts on
    the inner loop; decoding after it, and `inner_adapter_dropout=False`, are dropout-free."""
    bb = adapted_moe
    ids, attn, pm = prompts(bb, [14, 9])
    dropouts = [m for m in bb.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(d.p == 0.05 for d in dropouts)

    def run(**cfg):
        mem = FastWeightMemory(bb, MemDLMConfig(inner_layer_fraction=0.5, **cfg))
        with torch.inference_mode():
            mem.begin(bb, ids, attn, pm, [3, 4])
            out = bb.logits(ids, attn), torch.stack(mem.last_losses)
            mem.end()
        return out

    logits, losses = run()
    plain_logits, plain_losses = run(inner_adapter_dropout=False)
    assert not torch.allclose(losses, plain_losses, atol=1e-6)  # the masks change the inner loss
    assert not torch.allclose(logits, plain_logits, atol=1e-6)  # and so the fitted fast weights
    again_logits, again_losses = run()
    assert torch.equal(losses, again_losses) and torch.equal(logits, again_logits)  # seeded, not global RNG
    # checkpointed blocks recompute the very same masks in the backward
    nockpt_logits, nockpt_losses = run(checkpointing=False)
    assert torch.allclose(nockpt_losses, losses, atol=1e-6) and torch.allclose(nockpt_logits, logits, atol=1e-5)
    # restored afterwards: the original modules, and decoding stays dropout-free (eval mode)
    assert [m for m in bb.model.modules() if isinstance(m, torch.nn.Dropout)] == dropouts
    with torch.inference_mode():
        assert torch.equal(bb.logits(ids, attn), bb.logits(ids, attn))


def test_seeded_dropout_rate_and_batch_invariance(adapted_moe):
    from lm_eval_dlmem.memory.adapters import DropoutRows, SeededDropout

    offsets = torch.tensor([0, 3])
    drop = SeededDropout(0.05, 0, DropoutRows([11, 12], offsets))
    x = torch.ones(2, 40, 64)
    y = drop(x)
    zeros = float((y == 0).float().mean())
    assert 0.035 < zeros < 0.065 and torch.allclose(y[y != 0], torch.tensor(1 / 0.95))
    # row 1 alone (its padding removed) draws the same mask on its real tokens
    alone = SeededDropout(0.05, 0, DropoutRows([12], torch.tensor([0])))(torch.ones(1, 37, 64))
    assert torch.equal(alone[0], y[1, 3:])
    # and the batched inner loop equals the rows one by one, dropout included
    bb = adapted_moe
    lengths, seeds = [14, 9], [5, 6]
    ids, attn, pm = prompts(bb, lengths)
    mem = FastWeightMemory(bb, MemDLMConfig(inner_layer_fraction=0.5))
    with torch.inference_mode():
        mem.begin(bb, ids, attn, pm, seeds)
        batch_losses = torch.stack(mem.last_losses)
        mem.end()
        for i, n in enumerate(lengths):
            row = slice(max(lengths) - n, None)
            mem.begin(bb, ids[i : i + 1, row], attn[i : i + 1, row], pm[i : i + 1, row], [seeds[i]])
            assert torch.allclose(torch.stack(mem.last_losses)[:, 0], batch_losses[:, i], atol=1e-5)
            mem.end()


def test_a_batch_without_prompt_tokens_keeps_the_identity(backbones):
    bb = backbones["llada"]
    ids, attn, pm = prompts(bb, [6, 6])
    with torch.inference_mode():
        frozen = bb.logits(ids, attn)
        mem = FastWeightMemory(bb, MemDLMConfig())
        mem.begin(bb, ids, attn, torch.zeros_like(pm), [0, 1])
        assert torch.equal(bb.logits(ids, attn), frozen)
        mem.end()


def test_outer_adapters_load_from_the_backbone_package_and_the_old_path():
    """Outer adapters change the backbone, so they live in `backbones.adapters`; the old import
    path keeps working (the README documents it as deprecated)."""
    from lm_eval_dlmem.backbones import adapters as new
    from lm_eval_dlmem.memory import adapters as old

    for name in ("apply_adapter", "add_outer_lora", "check_adapter_keys", "AdapterKeysError", "linear_targets"):
        assert getattr(old, name) is getattr(new, name), name


@pytest.mark.parametrize("inner_steps", [0, 2])
def test_a_session_on_another_backbone_is_refused(backbones, inner_steps):
    """The memory holds its backbone from construction (its fast weights live in that model's
    modules); a session on another model would adapt one model and decode with the other."""
    bb, other = backbones["llada"], backbones["dream"]
    ids, attn, pm = prompts(other, [6])
    mem = FastWeightMemory(bb, MemDLMConfig(inner_steps=inner_steps))
    with pytest.raises(ValueError, match="different backbone than the one it was built for"):
        with mem.session(other, ids, attn, pm, [0]):
            pass
    assert not mem.layers
