"""Monte Carlo likelihood: LLaDA's estimator, batched across requests, per-request seeds."""

import pytest
import torch
import torch.nn.functional as F

from lm_eval_dlmem import load_backbone
from lm_eval_dlmem.decoding.likelihood import draw_samples, loglikelihood, loglikelihood_rolling, stratified_masks
from lm_eval_dlmem.memory.base import Memory


@pytest.fixture(scope="module")
def bb(tiny_ckpts):
    return load_backbone(tiny_ckpts["llada"])


def reqs(tok):
    return [(tok.encode("Mary went to the kitchen. Where is Mary?"), tok.encode(" kitchen")),
            (tok.encode("The ball is"), tok.encode(" blue and round")),
            (tok.encode("Hi"), tok.encode(" the grass is green"))]


def test_stratified_counts_cover_one_to_T():
    masks, ratio = stratified_masks(10, 5, torch.Generator().manual_seed(0))
    counts = masks.sum(-1)
    assert torch.equal(counts.float() / 10, ratio)
    assert counts.min() >= 1 and counts.max() <= 10
    # stratified: the 5 counts are spread over the range, about T/b apart (mod T)
    assert len(set(counts.tolist())) == 5


@torch.inference_mode()
def test_equals_direct_estimator(bb):
    p, t = reqs(bb.tokenizer)[0]
    (ours, greedy), = loglikelihood(bb, [(p, t)], mc_num=8, batch_size=8, seeds=[7])
    seq = torch.tensor(p + t)[None].repeat(8, 1)
    masks, ratio = stratified_masks(len(t), 8, torch.Generator().manual_seed(7))
    noisy = seq.clone()
    noisy[:, len(p):] = noisy[:, len(p):].masked_fill(masks, bb.spec.mask_id)
    m = noisy == bb.spec.mask_id
    logits = bb.logits(noisy).float()
    loss = F.cross_entropy(logits[m], seq[m], reduction="none") / ratio[:, None].expand_as(seq)[m]
    assert ours == pytest.approx(-(loss.sum() / 8).item(), rel=1e-6)
    assert greedy is None  # two tokens, check_greedy=False: not computed


@torch.inference_mode()
def test_independent_of_batch_size_and_order(bb):
    r = reqs(bb.tokenizer)
    together = loglikelihood(bb, r, mc_num=6, batch_size=16, stratum=3, seeds=[1, 2, 3])
    for bs in (1, 5, 64):  # rows per forward: a request's samples may straddle forwards
        other = loglikelihood(bb, r, mc_num=6, batch_size=bs, stratum=3, seeds=[1, 2, 3])
        assert [a[0] for a in other] == pytest.approx([a[0] for a in together], rel=1e-5)
    alone = [loglikelihood(bb, [x], mc_num=6, batch_size=16, stratum=3, seeds=[s])[0] for x, s in zip(r, [1, 2, 3])]
    reversed_ = loglikelihood(bb, r[::-1], mc_num=6, batch_size=16, stratum=3, seeds=[3, 2, 1])[::-1]
    for a, b, c in zip(together, alone, reversed_):
        assert a[0] == pytest.approx(b[0], rel=1e-5) and a[0] == pytest.approx(c[0], rel=1e-5)
    assert loglikelihood(bb, r, mc_num=6, stratum=3, seeds=[9, 2, 3])[0][0] != together[0][0]  # seeds matter


def test_strata_cover_mc_num_even_when_they_do_not_divide_it():
    masks, ratios = draw_samples(7, 10, 4, torch.Generator().manual_seed(0))
    assert masks.shape == (10, 7) and torch.equal(masks.sum(-1).float() / 7, ratios)


@torch.inference_mode()
def test_progress_memory_sees_no_continuation_and_edge_cases(bb):
    r = reqs(bb.tokenizer)
    done, seen = [], []

    class Spy(Memory):
        def begin(self, backbone, ids, attn, prompt_mask, seeds=None):
            seen.append(ids.clone())

    loglikelihood(bb, r, mc_num=4, batch_size=3, memory=Spy(), progress=done.append)
    assert sum(done) == len(r)
    cont = {t for _, c in r for t in c}
    for ids in seen:  # continuation positions reach the memory as mask tokens only
        assert not (set(ids[:, -1].tolist()) & cont)
    assert loglikelihood(bb, [(r[0][0], [])], mc_num=4, check_greedy=True) == [(0.0, True)]
    with pytest.raises(ValueError, match="seeds"):
        loglikelihood(bb, r, seeds=[1])
    with pytest.raises(ValueError, match="mc_num"):
        loglikelihood(bb, r, mc_num=0)


@torch.inference_mode()
def test_memory_hooks_and_rolling(bb):
    calls = []

    class Spy(Memory):
        def begin(self, backbone, ids, attn, prompt_mask, seeds=None):
            calls.append(("begin", ids.shape[0], int(prompt_mask.sum())))

        def select(self, rows):
            calls.append(("select", len(rows)))

        def end(self):
            calls.append(("end",))

    r = reqs(bb.tokenizer)[:2]
    loglikelihood(bb, r, mc_num=2, batch_size=4, memory=Spy())
    assert calls[0][0] == "begin" and calls[1] == ("select", 4) and calls[-1] == ("end",)
    tokens = bb.tokenizer.encode("the grass is green and the sky is blue")
    (whole,) = loglikelihood_rolling(bb, [tokens], max_length=8, mc_num=2)
    assert whole < 0


@torch.inference_mode()
def test_greedy_check_detects_the_models_own_continuation(bb):
    prefix = bb.tokenizer.encode("The sky is")
    x = torch.tensor(prefix + [bb.spec.mask_id])[None]
    best = int(bb.logits(x)[0, -1].argmax())
    (_, is_greedy), = loglikelihood(bb, [(prefix, [best])], mc_num=1, check_greedy=True)
    assert is_greedy is True
    # batched with longer, padded requests: the same verdicts as one by one
    mixed = reqs(bb.tokenizer) + [(prefix, [best]), (prefix, [best, best])]
    together = [g for _, g in loglikelihood(bb, mixed, mc_num=1, check_greedy=True, batch_size=8)]
    alone = [loglikelihood(bb, [m], mc_num=1, check_greedy=True)[0][1] for m in mixed]
    assert together == alone and together[3] is True


@torch.inference_mode()
def test_repeated_masks_are_forwarded_once(bb):
    rows = []

    class Count(Memory):
        def before_forward(self, info):
            rows.append(info.input_ids.shape[0])

    prefix = bb.tokenizer.encode("The sky is")
    (ll, _), = loglikelihood(bb, [(prefix, [5])], mc_num=64, memory=Count())
    assert rows == [1]  # a one-token continuation has a single possible mask
    x = torch.tensor(prefix + [bb.spec.mask_id])[None]
    assert ll == pytest.approx(bb.logits(x)[0, -1].float().log_softmax(-1)[5].item(), rel=1e-5)


def test_public_entry_points_run_without_autograd(bb):
    """generate / loglikelihood / greedy_check / loglikelihood_rolling called directly (not through
    the harness's inference_mode) must not record a graph: with a trainable memory that would keep
    every step's activations alive (a decode of 32 steps grew by 1.2 GB before this held)."""
    from lm_eval_dlmem import DecodeConfig, generate
    from lm_eval_dlmem.decoding.likelihood import greedy_check

    seen = []

    class GradSpy(Memory):
        def after_forward(self, info):
            seen.append(torch.is_grad_enabled())

    assert torch.is_grad_enabled()
    ids = torch.tensor([bb.tokenizer.encode("the grass is green")])
    generate(bb, ids, None, DecodeConfig(gen_length=4, steps=4, block_length=4), GradSpy())
    r = reqs(bb.tokenizer)[:1]
    loglikelihood(bb, r, mc_num=2, memory=GradSpy())
    greedy_check(bb, r, memory=GradSpy())
    loglikelihood_rolling(bb, [ids[0].tolist()], max_length=8, mc_num=2, memory=GradSpy())
    assert seen and not any(seen)


@torch.inference_mode()
def test_memdlm_adapts_each_request_once_across_its_forwards(bb, monkeypatch):
    """mc_num 8 in forwards of 3 rows: every request's samples span several forwards (and two
    requests share the boundary ones); the inner loop runs once per request, as in the released
    evaluator, and the scores equal those of one forward holding every sample."""
    from lm_eval_dlmem.memory.fast_weights import FastWeightMemory, MemDLMConfig

    rows_adapted = []
    real = FastWeightMemory.adapt
    monkeypatch.setattr(FastWeightMemory, "adapt", lambda self, x0, *a: rows_adapted.append(x0.shape[0]) or real(self, x0, *a))
    mem = FastWeightMemory(bb, MemDLMConfig(inner_layer_fraction=0.5))
    r = reqs(bb.tokenizer)
    split = loglikelihood(bb, r, mc_num=8, batch_size=3, seeds=[1, 2, 3], memory=mem)
    assert sum(rows_adapted) == len(r)
    whole = loglikelihood(bb, r, mc_num=8, batch_size=64, seeds=[1, 2, 3], memory=mem)
    assert [s for s, _ in split] == pytest.approx([s for s, _ in whole], abs=1e-4)
    frozen = loglikelihood(bb, r, mc_num=8, batch_size=64, seeds=[1, 2, 3])
    assert [s for s, _ in whole] != pytest.approx([s for s, _ in frozen], abs=1e-4)  # it did adapt
    # rolling windows are requests of their own: each adapts once as well
    rows_adapted.clear()
    tokens = [bb.tokenizer.encode(t) for t in ("the grass is green and the sky is blue", "a b c d e f g h")]
    loglikelihood_rolling(bb, tokens, max_length=8, mc_num=8, batch_size=3, memory=mem)
    windows = sum(-(-len(t) // 8) for t in tokens)
    assert sum(rows_adapted) == windows
