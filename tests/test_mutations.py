"""Checks with known answers, each written against a plausible bug that the rest of the suite let
through (the bug is named in the test's docstring): mock backbones with known logits for CFG,
Dream's confidences and the rolling likelihood; the harness's request-to-config plumbing
(top_p/top_k, which end of a long context is kept); MetaState's time input and padding."""

from dataclasses import dataclass

import pytest
import torch
from lm_eval.api.instance import Instance

from lm_eval_dlmem.backbones.loading import Backbone
from lm_eval_dlmem.decoding.forward import BlockForward
from lm_eval_dlmem.decoding.config import DecodeConfig
from lm_eval_dlmem.decoding.engine import generate, left_pad
from lm_eval_dlmem.decoding.likelihood import loglikelihood, loglikelihood_rolling
from lm_eval_dlmem.decoding.strategies import RowRandom, dream_commit
from lm_eval_dlmem.memory import NoMemory, StepInfo

V, MASK, EOS, EOT, BOS = 16, 15, 14, 13, 12


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@dataclass(frozen=True)
class MockSpec:
    mask_id: int = MASK
    eos_id: int = EOS
    eot_id: int = EOT
    bos_id: int = BOS
    logit_shift: bool = False
    block_causal: bool = False  # bidirectional, as the strategies under test expect

    @property
    def stop_ids(self):
        return (EOS, EOT)


class GuidanceMock:
    """Known logits that depend only on the position and on whether the prompt is visible:
    `cond` [L, V] for rows whose first token is real, `uncond` [L, V] for rows whose first token
    is the mask (the unconditional copy of CFG masks the prompt). A table of one row [1, V]
    serves every position. Records every forward's input ids."""

    spec = MockSpec()
    # the decoder asks the backbone which positions a cached forward computes: the real methods,
    # so a mock spec's `logit_shift` is honoured exactly as a real backbone's
    _shift, source_start, forwarded = Backbone._shift, Backbone.source_start, Backbone.forwarded
    device = torch.device("cpu")

    def __init__(self, cond, uncond=None):
        self.cond, self.uncond = cond, cond if uncond is None else uncond
        self.inputs = []

    def logits(self, input_ids, attention_mask=None, *, cache=None, window=None, keep=None):
        B, L = input_ids.shape
        self.inputs.append(input_ids.clone())
        a, b = keep if keep is not None else (0, L)
        rows = []
        for row in input_ids:
            table = self.uncond if row[0] == MASK else self.cond
            rows.append(table.expand(L, -1)[a:b] if table.shape[0] == 1 else table[a:b])
        return torch.stack(rows).clone()


def random_table(L, seed):
    table = torch.randn(L, V, generator=torch.Generator().manual_seed(seed)) * 2
    table[:, MASK] = -10.0  # never the model's choice: the expected tokens stay well defined
    return table


# ---- classifier-free guidance ---------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_cfg_decoding_logits_are_uncond_plus_scale_plus_one_times_the_difference(scale):
    """Kills: a wrong CFG formula in the decode loop (e.g. `u + s (c - u)`, the halves swapped)
    or an unconditional copy that masks more or less than the prompt."""
    P, G = 3, 4
    cond, uncond = random_table(P + G, 0), random_table(P + G, 1)
    bb = GuidanceMock(cond, uncond)
    x = torch.tensor([[1, 2, 3] + [MASK] * G])
    forward = BlockForward(bb, DecodeConfig(gen_length=G, steps=G, block_length=G, cfg_scale=scale), NoMemory(), P)
    logits = forward(x, None, (P, P + G), refresh=True)
    expected = uncond[P:] + (scale + 1) * (cond[P:] - uncond[P:])  # LLaDA's generate()
    torch.testing.assert_close(logits[0], expected, rtol=1e-6, atol=1e-6)
    (batch,) = bb.inputs
    assert batch[0].tolist() == x[0].tolist() and batch[1].tolist() == [MASK] * (P + G)
    # through the whole loop: greedy decoding picks the guided argmax at every position
    out = generate(GuidanceMock(cond, uncond), x[:, :P], None,
                   DecodeConfig(gen_length=G, steps=G, block_length=G, cfg_scale=scale, stop_early=False))
    assert out[0].tolist() == expected.argmax(-1).tolist()


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_cfg_likelihood_is_exact_on_a_position_independent_model(scale):
    """Kills: a wrong CFG formula in the likelihood scorer. Every continuation token is the same
    and the logits do not depend on the position, so every masked token has the same loss and
    each Monte Carlo sample is exactly T * CE: the estimate equals T * log p_guided(token)."""
    cond, uncond = random_table(1, 2), random_table(1, 3)
    token, T = 4, 5
    ((score, _),) = loglikelihood(GuidanceMock(cond, uncond), [([1, 2, 3], [token] * T)], mc_num=8,
                                  cfg_scale=scale)
    guided = uncond[0] + (scale + 1) * (cond[0] - uncond[0])
    assert score == pytest.approx(T * torch.log_softmax(guided, -1)[token].item(), rel=1e-5)


# ---- Dream's confidence algorithms -----------------------------------------------------------
def three_positions():
    """Block logits [1, 3, V] whose three confidences rank the positions differently:
    pos 0: p = 0.5 on one token, the rest spread (top 0.50, margin 0.47, entropy 2.05)
    pos 1: p = 0.45 on two tokens (top 0.45, margin 0.00, entropy 1.21: the surest by entropy)
    pos 2: p = 0.3 on one token, the rest spread (top 0.30, margin 0.25, entropy 2.51)"""
    probs = torch.zeros(3, V)
    probs[0] = 0.5 / (V - 1)
    probs[0, 4] = 0.5
    probs[1] = 0.1 / (V - 2)
    probs[1, 5] = probs[1, 6] = 0.45
    probs[2] = 0.7 / (V - 1)
    probs[2, 7] = 0.3
    return probs.log()[None]


@pytest.mark.parametrize("alg, ranking", [
    ("maskgit_plus", [0, 1, 2]),  # probability of the chosen token
    ("topk_margin", [0, 2, 1]),   # top-1 minus top-2 probability
    ("entropy", [1, 0, 2]),       # negative entropy: the peakiest distribution first
])
def test_dream_algorithms_commit_positions_in_their_confidence_order(alg, ranking):
    """Kills: Dream's entropy confidence with its sign flipped (it would commit position 2, the
    most uncertain, first), and any algorithm scored by another's confidence."""
    logits, masked = three_positions(), torch.ones(1, 3, dtype=torch.bool)
    config = DecodeConfig(strategy="dream", alg=alg, temperature=0.0)
    for k in (1, 2):
        tokens, commit = dream_commit(logits.clone(), masked, k, None, config, MockSpec(),
                                      RowRandom.from_seeds([0], "cpu"))
        assert sorted(commit[0].nonzero().flatten().tolist()) == sorted(ranking[:k])
        assert tokens[0, 0] == 4 and tokens[0, 2] == 7
    # positions already committed are never chosen again, whatever their confidence
    masked[0, ranking[0]] = False
    _, commit = dream_commit(logits.clone(), masked, 1, None, config, MockSpec(), RowRandom.from_seeds([0], "cpu"))
    assert commit[0].nonzero().flatten().tolist() == [ranking[1]]


def test_dream_entropy_decodes_the_peakiest_position_first_in_the_loop():
    """The same ranking through `generate` (the schedule commits 0, then 1, then 2 positions)."""
    P = 3
    table = torch.zeros(P + 3, V)
    table[P:] = three_positions()[0]
    bb = GuidanceMock(table)
    generate(bb, torch.tensor([[1, 2, 3]]), None,
             DecodeConfig(gen_length=3, steps=3, block_length=3, strategy="dream", alg="entropy", stop_early=False))
    filled = [(ids[0, P:] != MASK).nonzero().flatten().tolist() for ids in bb.inputs]
    assert filled == [[], [], [1]]


# ---- rolling likelihood ----------------------------------------------------------------------
def test_rolling_score_is_the_sum_of_its_windows():
    """Kills: scoring only the last (or first) rolling window, or dropping/duplicating one.
    Logits that ignore the position give each token the loss -log p(token); with windows that
    each repeat one token (windows of 8 predicted tokens), every Monte Carlo sample is exact,
    so the text's score is the sum of log p over all its tokens."""
    z = random_table(1, 4)
    tokens = [5] * 8 + [6] * 8 + [7] * 3
    (score,) = loglikelihood_rolling(GuidanceMock(z), [tokens], max_length=8, mc_num=4)
    logp = torch.log_softmax(z[0], -1)
    assert score == pytest.approx(sum(logp[t].item() for t in tokens), rel=1e-5)
    # and texts scored together are scored as if alone
    both = loglikelihood_rolling(GuidanceMock(z), [tokens, tokens[:8]], max_length=8, mc_num=4)
    assert both == pytest.approx([score, 8 * logp[5].item()], rel=1e-5)


# ---- the harness: what reaches the decoder ---------------------------------------------------
def set_arg(monkeypatch, lm, name, value):
    """Patch one model arg where it lives (its group in `ModelArgs`): monkeypatch must see a
    plain attribute to restore it (pytest >= 9.2 deletes attributes it found only through
    `__getattr__`)."""
    from lm_eval_dlmem.model_args import GROUP_OF

    monkeypatch.setattr(getattr(lm.args, GROUP_OF[name]), name, value)


@pytest.fixture(scope="module")
def tiny_lm():
    from lm_eval_dlmem.harness import MetaStateLLaDA

    return MetaStateLLaDA(pretrained="tiny-llada", device="cpu", max_length=16, mc_num=2, mc_batch_size=2)


def test_likelihood_truncation_keeps_the_end_of_the_context(tiny_lm, monkeypatch):
    """Kills: cutting a too-long likelihood context on the wrong side (keeping its start). The
    tokens right before the continuation are the ones that condition it; lm-eval's HF models
    keep the last max_length tokens too."""
    import lm_eval_dlmem.decoding.likelihood as likelihood

    seen = []
    monkeypatch.setattr(likelihood, "loglikelihood",
                        lambda backbone, pairs, **kw: seen.extend(pairs) or [(-1.0, False)] * len(pairs))
    context = " ".join(f"word{i}" for i in range(40))
    tiny_lm.loglikelihood([Instance("loglikelihood", doc={}, arguments=(context, " kitchen"), idx=0)],
                          disable_tqdm=True)
    ctx_ids, cont_ids = tiny_lm._encode_pair(context, " kitchen")
    assert len(ctx_ids) + len(cont_ids) > 16
    ((prefix, cont),) = seen
    assert cont == cont_ids and len(prefix) + len(cont) == 16
    assert prefix == ctx_ids[-len(prefix):]


@pytest.mark.parametrize("side", ["left", "middle", "right"])
def test_generation_prompts_are_cut_on_the_side_asked_for(tiny_lm, monkeypatch, side):
    """Kills: `truncation_side` ignored (or a fixed side) when a prompt exceeds
    max_length - gen_length: `left` keeps the end, `right` the start, `middle` both ends."""
    import lm_eval_dlmem.decoding.engine as engine

    seen = []

    def fake_generate(backbone, input_ids, attention_mask, config, memory=None, **kw):
        seen.append((input_ids[0].tolist(), config.gen_length))
        return torch.full((input_ids.shape[0], config.gen_length), backbone.spec.eos_id)

    monkeypatch.setattr(engine, "generate", fake_generate)
    set_arg(monkeypatch, tiny_lm, "block_length", 4)
    set_arg(monkeypatch, tiny_lm, "truncation_side", side)
    prompt = " ".join(f"word{i}" for i in range(40))
    gen = {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}
    tiny_lm.generate_until([Instance("generate_until", doc={}, arguments=(prompt, gen), idx=0)], disable_tqdm=True)
    ((ids, gen_length),) = seen
    full, budget = tiny_lm.tok_encode(prompt), 16 - gen_length
    half = budget // 2
    expected = {"left": full[-budget:], "right": full[:budget], "middle": full[:half] + full[-(budget - half):]}
    assert len(full) > budget and ids == expected[side]


def test_a_tasks_top_p_and_top_k_reach_the_sampler(tiny_lm, monkeypatch):
    """Kills: `decode_config` ignoring the task's `top_p` (or `top_k`): the values in a task's
    generation_kwargs must be the ones Dream's sampler filters with; a model arg overrides them."""
    import lm_eval_dlmem.decoding.strategies as strategies

    seen = {"top_p": set(), "top_k": set()}
    real_p, real_k = strategies.filter_top_p, strategies.filter_top_k
    monkeypatch.setattr(strategies, "filter_top_p", lambda l, p: seen["top_p"].add(p) or real_p(l, p))
    monkeypatch.setattr(strategies, "filter_top_k", lambda l, k: seen["top_k"].add(k) or real_k(l, k))
    set_arg(monkeypatch, tiny_lm, "strategy", "dream")
    set_arg(monkeypatch, tiny_lm, "block_length", 4)  # the preset's 32 would not fit max_length=16
    gen = {"until": ["\n"], "max_gen_toks": 4, "do_sample": True, "temperature": 1.0, "top_p": 0.5, "top_k": 3}
    request = [Instance("generate_until", doc={}, arguments=("The grass is", gen), idx=0)]
    tiny_lm.generate_until(request, disable_tqdm=True)
    assert seen == {"top_p": {0.5}, "top_k": {3}}
    set_arg(monkeypatch, tiny_lm, "top_p", 0.9)  # README: model-arg values override the task's
    seen["top_p"].clear()
    tiny_lm.generate_until(request, disable_tqdm=True)
    assert seen["top_p"] == {0.9}


# ---- MetaState ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_with_metastate():
    from lm_eval_dlmem import load_backbone
    from lm_eval_dlmem.memory.metastate import load_memory_for

    bb = load_backbone("tiny-llada")
    return bb, load_memory_for("tiny-llada-metastate", bb)


def test_metastate_time_input_is_the_masked_fraction_of_the_generation(tiny_with_metastate, monkeypatch):
    """Kills: MetaState's time conditioner fed `1 - t` (or anything but the mask ratio): t is 1
    when the generation region is all masks and falls as tokens are committed, per row."""
    bb, ms = tiny_with_metastate
    seen, canvases = [], []
    hook = ms.time.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    real_before = ms.before_forward
    monkeypatch.setattr(ms, "before_forward", lambda info: canvases.append(info.input_ids.clone()) or real_before(info))
    try:
        ids, attn = left_pad([bb.tokenizer.encode("The grass is green. The sky is"), [5, 6]], bb.spec.eos_id)
        P = ids.shape[1]
        generate(bb, ids, attn, DecodeConfig(gen_length=8, steps=8, block_length=4, stop_early=False), ms)
    finally:
        hook.remove()
    assert len(seen) == len(canvases) == 8
    for t, canvas in zip(seen, canvases):
        torch.testing.assert_close(t, (canvas[:, P:] == bb.spec.mask_id).float().mean(-1))
    assert seen[0].tolist() == [1.0, 1.0] and seen[-1].tolist() == [0.125, 0.125]


def test_metastate_mixer_never_reads_padding(tiny_with_metastate):
    """Kills: the Mixer attending to left padding. A padded row of a batch must carry the same
    state, and give the same logits, as the same row alone without padding."""
    bb, ms = tiny_with_metastate
    tok = bb.tokenizer
    prompts = [tok.encode("The sky is blue."), tok.encode("Mary moved to the bathroom. John went to the hallway.")]
    G = 6

    def run(rows):
        ids, attn = left_pad([r + [bb.spec.mask_id] * G for r in rows], bb.spec.eos_id)
        attn = torch.ones_like(ids) if attn is None else attn
        prompt = attn.bool().clone()
        prompt[:, -G:] = False
        ms.begin(bb, ids, attn, prompt)
        try:
            for i, ratio in enumerate((1.0, 0.5)):
                info = StepInfo(i, torch.full((len(rows),), ratio), (0, ids.shape[1]), ids, True)
                ms.before_forward(info)
                logits = bb.logits(ids, attn)
                ms.after_forward(info)
            return ms.state.clone(), logits
        finally:
            ms.end()

    padded_state, padded_logits = run(prompts)
    alone_state, alone_logits = run(prompts[:1])
    n = len(prompts[0]) + G
    torch.testing.assert_close(padded_state[0], alone_state[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded_logits[0, -n:], alone_logits[0], rtol=1e-4, atol=1e-4)
