"""Harness semantics (`DlmLM`): what lm-eval's arguments mean for the answers and scores it gets
back. Tiny checkpoints, in-process."""

import logging

import pytest
import torch
from lm_eval.api.instance import Instance


def make_lm(ckpt, cls_name="MetaStateLLaDA", **args):
    from lm_eval_dlmem import harness

    return getattr(harness, cls_name)(pretrained=ckpt, device="cpu", **args)


@pytest.fixture(scope="module")
def llada(tiny_ckpts):
    return make_lm(tiny_ckpts["llada"], mc_num=4, mc_batch_size=4)


# ---- generate_until ---------------------------------------------------------------------------
def test_max_gen_toks_bounds_the_answer_when_the_canvas_is_rounded_up(tiny_ckpts, monkeypatch):
    import lm_eval_dlmem.decoding.engine as engine

    lm = make_lm(tiny_ckpts["llada"], block_length=32)
    word = lm.tok_encode("ab")[0]
    canvases = []

    def fake_generate(backbone, input_ids, attention_mask, config, *args, **kwargs):
        canvases.append(config.gen_length)
        return torch.full((input_ids.shape[0], config.gen_length), word)

    monkeypatch.setattr(engine, "generate", fake_generate)
    req = Instance("generate_until", doc={}, arguments=("x", {"until": [], "max_gen_toks": 4}), idx=0)
    (text,) = lm.generate_until([req], disable_tqdm=True)
    assert canvases == [32]  # decoded on the block-rounded canvas...
    assert text == lm.tok_decode([word] * 4)  # ...answered with at most max_gen_toks tokens
    # an explicit gen_length= is the user's own bound
    lm.args.gen_length = 40
    (text,) = lm.generate_until([req], disable_tqdm=True)
    assert canvases[-1] == 64 and text == lm.tok_decode([word] * 40)


# ---- loglikelihood: is_greedy -------------------------------------------------------------------
def ll_requests(pairs):
    return [Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


def ranked_one_token_continuations(lm, ctx: str) -> list[str]:
    """Texts of single tokens, most probable first as the continuation of `ctx`."""
    ids = lm.tok_encode(ctx)
    with torch.inference_mode():
        logits = lm.backbone.logits(torch.tensor([ids + [lm.spec.mask_id]]))[0, -1]
    texts = [lm.tok_decode([t]) for t in logits.argsort(descending=True).tolist()]
    return [t for t in texts if t and len(lm.tok_encode(ctx + t)) == len(ids) + 1
            and lm.tok_encode(ctx + t)[-1] == lm.tok_encode(t, add_special_tokens=False)[0]]


def test_is_greedy_of_one_token_continuations_is_computed_without_check_greedy(llada):
    """lambada-style `acc` and multiple-choice `exact_match` read is_greedy: a one-token
    continuation is settled by its fully masked Monte Carlo row, so it is never a silent False."""
    ctx = "The sky is"
    ranked = ranked_one_token_continuations(llada, ctx)
    assert llada.args.check_greedy is False
    got = [g for _, g in llada.loglikelihood(ll_requests([(ctx, ranked[0]), (ctx, ranked[1])]), disable_tqdm=True)]
    assert got == [True, False]


def test_uncomputed_is_greedy_is_loud(llada, caplog):
    ctx = "The sky is"
    pairs = [(ctx, " blue and round"), (ctx, ranked_one_token_continuations(llada, ctx)[0])]
    with caplog.at_level(logging.WARNING, logger="lm_eval_dlmem.harness"):
        llada.loglikelihood(ll_requests(pairs), disable_tqdm=True)
    (msg,) = [r.getMessage() for r in caplog.records if "is_greedy" in r.getMessage()]
    assert "1 of 2" in msg and "check_greedy=True" in msg and "acc" in msg and "exact_match" in msg
    caplog.clear()
    llada.args.check_greedy = True
    try:
        with caplog.at_level(logging.WARNING, logger="lm_eval_dlmem.harness"):
            llada.loglikelihood(ll_requests(pairs), disable_tqdm=True)
    finally:
        llada.args.check_greedy = False
    assert not [r for r in caplog.records if "is_greedy" in r.getMessage()]


# ---- loglikelihood_rolling ----------------------------------------------------------------------
TEXTS = ["the grass is green and the sky is blue", "a b c d e f g h i j k l", "Mary went to the kitchen."]


def rolling(lm, texts):
    reqs = [Instance("loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    return lm.loglikelihood_rolling(reqs, disable_tqdm=True)


def test_rolling_batches_requests_together_with_the_same_scores(llada, monkeypatch):
    import lm_eval_dlmem.decoding.likelihood as likelihood

    calls, real = [], likelihood.loglikelihood_rolling
    monkeypatch.setattr(likelihood, "loglikelihood_rolling", lambda bb, toks, **kw: calls.append(len(toks)) or real(bb, toks, **kw))
    together = rolling(llada, TEXTS)
    assert calls == [len(TEXTS)]  # one call: windows of all texts share forwards
    assert [rolling(llada, [t])[0] for t in TEXTS] == pytest.approx(together, abs=1e-4)


def test_rolling_honours_likelihood_cfg(tiny_ckpts):
    plain = rolling(make_lm(tiny_ckpts["llada"], mc_num=4, mc_batch_size=4), TEXTS[:1])
    guided = rolling(make_lm(tiny_ckpts["llada"], mc_num=4, mc_batch_size=4, likelihood_cfg=0.5), TEXTS[:1])
    assert guided[0] != pytest.approx(plain[0], abs=1e-3)


# ---- LLaDA2.x through the generic model ---------------------------------------------------------
@pytest.fixture(scope="module")
def llada2_ckpt(tmp_path_factory):
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    return make_tiny_checkpoint("llada2", tmp_path_factory.mktemp("tiny-llada2") / "llada2", seed=5,
                                initializer_range=0.25)


def test_dlm_decodes_llada2_with_its_family_sampler_and_batching_changes_nothing(llada2_ckpt):
    """Kills: the generic model decoding a block-causal checkpoint with the bidirectional
    default `llada` (no error, wrong attention), and a batch that changes a row's answer."""
    reqs = [Instance("generate_until", doc={}, arguments=(ctx, {"until": [], "max_gen_toks": 10}), idx=0)
            for ctx in ("one two three", "apple banana cherry table chair window")]
    answers = []
    for batch_size in (1, 2):
        lm = make_lm(llada2_ckpt, "DlmLM", block_length=4, batch_size=batch_size)
        assert (lm.args.strategy, lm.args.threshold) == ("llada2", 0.95)
        answers.append(lm.generate_until(reqs, disable_tqdm=True))
    assert answers[0] == answers[1]
    assert all(isinstance(a, str) for a in answers[0])


@pytest.mark.parametrize("cls_name, args", [("DlmLM", {"strategy": "llada"}), ("DlmLM", {"strategy": "threshold"}),
                                            ("MetaStateLLaDA", {"strategy": "llada"})])
def test_a_bidirectional_strategy_is_refused_on_llada2(llada2_ckpt, cls_name, args):
    with pytest.raises(ValueError, match=r"strategy=\w+ decodes with bidirectional attention, but this llada2 "
                                         r"checkpoint attends block-causally; use strategy= one of llada2, llada21"):
        make_lm(llada2_ckpt, cls_name, **args)


@pytest.mark.parametrize("cls_name", ["MetaStateLLaDA", "MetaStateDream", "MemDLMLLaDAMoE", "DlmLM"])
def test_every_preset_takes_a_llada2_checkpoint_with_its_family_decoding(llada2_ckpt, cls_name, caplog):
    """A preset's strategy is a default for its own family: on LLaDA2.x (which its bidirectional
    strategy does not fit) the family's sampler and block length apply, with the warning that
    says so; only a typed strategy= is refused (above)."""
    with caplog.at_level(logging.WARNING, logger="lm_eval_dlmem.harness"):
        lm = make_lm(llada2_ckpt, cls_name)
    assert (lm.args.strategy, lm.args.block_length, lm.args.threshold) == ("llada2", 32, 0.95)
    assert cls_name == "DlmLM" or any("llada2 checkpoint" in r.getMessage() for r in caplog.records)
    req = Instance("generate_until", doc={}, arguments=("one two", {"until": [], "max_gen_toks": 6}), idx=0)
    assert isinstance(lm.generate_until([req], disable_tqdm=True)[0], str)


def test_the_family_block_length_leaves_other_families_at_one_block(tiny_ckpts):
    assert make_lm(tiny_ckpts["llada_moe"], "MemDLMLLaDAMoE").args.block_length is None


def generation_config(lm, gen_kwargs):
    """The DecodeConfig the harness decodes `gen_kwargs` with (engine.generate faked)."""
    import lm_eval_dlmem.decoding.engine as engine

    seen = []

    def fake_generate(backbone, input_ids, attention_mask, config, *args, **kwargs):
        seen.append(config)
        return torch.full((input_ids.shape[0], config.gen_length), backbone.spec.eos_id)

    real, engine.generate = engine.generate, fake_generate
    try:
        lm.generate_until([Instance("generate_until", doc={}, arguments=("x", gen_kwargs), idx=0)], disable_tqdm=True)
    finally:
        engine.generate = real
    return seen[0]


def test_memdlm_llada2_decodes_as_memdlm_evaluates_llada21(llada2_ckpt):
    """memdlm/eval/llada21.py: LLaDA2Sampler, block_size 32, steps 32 per block, threshold 0.95,
    max_new_tokens 512 unless the task gives max_gen_toks; strategy=llada21 for 2.1's editing."""
    lm = make_lm(llada2_ckpt, "MemDLMLLaDA2")
    cfg = generation_config(lm, {"until": []})
    assert (cfg.strategy, cfg.block_length, cfg.steps, cfg.threshold, cfg.gen_length) == ("llada2", 32, 32, 0.95, 512)
    cfg = generation_config(lm, {"until": [], "max_gen_toks": 40})
    assert (cfg.gen_length, cfg.steps) == (40, 32)  # the task's length wins; steps stay per block
    cfg = generation_config(make_lm(llada2_ckpt, "MemDLMLLaDA2", strategy="llada21"), {"until": [], "max_gen_toks": 8})
    assert (cfg.strategy, cfg.threshold, cfg.editing_threshold, cfg.block_length) == ("llada21", 0.95, 0.9, 32)


def test_llada2_likelihood_through_the_harness_is_batch_invariant(llada2_ckpt):
    """loglikelihood / multiple choice on LLaDA2.x (no longer refused), per block of the preset's
    block_length; mc_batch_size packs rows differently and changes nothing."""
    pairs = [("one two three", " four"), ("apple banana", " cherry table chair window"), ("a", " b c")]
    scores = []
    for mc_batch in (1, 4):
        lm = make_lm(llada2_ckpt, "MemDLMLLaDA2", mc_num=4, mc_batch_size=mc_batch, block_length=4)
        scores.append([s for s, _ in lm.loglikelihood(ll_requests(pairs), disable_tqdm=True)])
    assert scores[0] == pytest.approx(scores[1], abs=1e-4)
    assert all(s < 0 for s in scores[0])
    assert rolling(lm, TEXTS[:1])[0] < 0


def test_llada2_strategies_are_refused_on_a_bidirectional_family(tiny_ckpts):
    with pytest.raises(ValueError, match="strategy=llada21 decodes with block-causal attention.*llada_moe"):
        make_lm(tiny_ckpts["llada_moe"], "DlmLM", strategy="llada21")


def test_block_diffusion_requests_keep_gen_length_and_get_a_per_block_step_budget():
    """The LLaDA2.x samplers lay blocks from each prompt's start and count steps per block (the
    official steps_per_block): the harness neither rounds the canvas nor passes total steps."""
    from lm_eval_dlmem.model_args import ModelArgs, decode_config

    for typed, per_block in (({"steps": 8}, 3), ({"steps_per_block": 4}, 4), ({}, 8)):
        args = ModelArgs.from_kwargs(pretrained="x", strategy="llada2", block_length=8, **typed)
        cfg = decode_config(args, 20, {})
        assert (cfg.gen_length, cfg.steps, cfg.block_length) == (20, per_block, 8), typed
