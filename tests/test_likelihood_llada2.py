"""Log-likelihood on a block-causal family (LLaDA2.x): the chain rule over blocks, each block
scored under the attention the samplers decode it with (decoding/likelihood.py docstring)."""

import pytest
import torch

from lm_eval_dlmem.decoding.likelihood import greedy_check, loglikelihood, loglikelihood_rolling, segments

pytestmark = pytest.mark.usefixtures("one_thread")

N = 4  # block length of these tests
REQS = [([5, 6, 7], [8, 9, 10, 11, 12]), ([5, 6, 7, 8, 9, 10, 11], [12]), ([4], [9, 9, 9, 9, 9, 9, 9, 9, 9])]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    from lm_eval_dlmem.backbones.loading import load_backbone
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint("llada2", tmp_path_factory.mktemp("ll-llada2") / "tiny", seed=5,
                                initializer_range=0.25)
    return load_backbone(path, device="cpu", dtype="float32")


def exact_logp(bb, prefix, target, n=N):
    """log p(target | prefix) by the chain rule, one token at a time, each scored alone with its
    position masked, the tokens before it clean and block-causal attention from the prefix start."""
    total = 0.0
    for t, tok in enumerate(target):
        ids = torch.tensor([prefix + target[:t] + [bb.spec.mask_id]])
        with torch.no_grad():
            logits = bb.logits(ids, None, block_length=n)[0, -1].float()
        total += torch.log_softmax(logits, -1)[tok].item()
    return total


def test_segments_cut_the_continuation_at_block_boundaries_counted_from_the_prefix_start():
    assert segments(3, 5, 4) == [(0, 1), (1, 5)]  # positions 3 | 4..7
    assert segments(4, 6, 4) == [(0, 4), (4, 6)]  # prefix fills block 0 exactly
    assert segments(7, 1, 4) == [(0, 1)]
    assert segments(3, 5, None) == [(0, 5)]  # bidirectional families: one segment


def test_one_token_per_block_is_the_exact_chain_rule(bb):
    """Each continuation token alone in its block: every sample masks that single token, so the
    estimate is exactly sum_j log p(c_j | prefix, c_<j) with block-causal attention. Kills
    bidirectional scoring (a later token visible), masking several blocks in one row (a later
    block seeing masked earlier ones), and blocks not aligned to the prefix start."""
    prefix, target = [5, 6, 7], [8, 9, 10, 11, 12]
    (score, _), = loglikelihood(bb, [(prefix, target)], mc_num=8, batch_size=8, block_length=1, seeds=[0])
    assert score == pytest.approx(exact_logp(bb, prefix, target, n=1), abs=1e-4)
    # blocks of 4 from the prefix start: position 3 closes block 0, positions 4..7 form block 1
    (score, _), = loglikelihood(bb, [(prefix, [8])], mc_num=8, batch_size=8, block_length=N, seeds=[0])
    assert score == pytest.approx(exact_logp(bb, prefix, [8]), abs=1e-5)
    (two, _), = loglikelihood(bb, [(prefix, [8, 9])], mc_num=8, batch_size=8, block_length=N, seeds=[0])
    assert two == pytest.approx(exact_logp(bb, prefix, [8, 9]), abs=1e-4)  # 8 | 9: two one-token blocks


def test_a_later_block_never_changes_an_earlier_blocks_score(bb):
    """Under block-causal attention the tokens after a block are invisible to it: replacing the
    continuation's last block changes the total by exactly that block's term."""
    prefix = [5, 6, 7]
    (a, _), (b, _) = loglikelihood(bb, [(prefix, [8, 9]), (prefix, [8, 20])], mc_num=8, batch_size=8,
                                   block_length=N, seeds=[0, 0])
    first = exact_logp(bb, prefix, [8])
    assert a - first == pytest.approx(exact_logp(bb, prefix + [8], [9]), abs=1e-4)
    assert b - first == pytest.approx(exact_logp(bb, prefix + [8], [20]), abs=1e-4)


def test_scores_do_not_depend_on_batch_size_request_order_or_left_padding(bb):
    seeds = [1, 2, 3]
    together = [s for s, _ in loglikelihood(bb, REQS, mc_num=8, batch_size=4, block_length=N, seeds=seeds)]
    one_row = [s for s, _ in loglikelihood(bb, REQS, mc_num=8, batch_size=1, block_length=N, seeds=seeds)]
    alone = [loglikelihood(bb, [r], mc_num=8, batch_size=8, block_length=N, seeds=[s])[0][0]
             for r, s in zip(REQS, seeds)]  # unpadded, each row by itself
    reversed_ = [s for s, _ in loglikelihood(bb, REQS[::-1], mc_num=8, batch_size=4, block_length=N,
                                             seeds=seeds[::-1])][::-1]
    assert one_row == pytest.approx(together, abs=1e-4)
    assert alone == pytest.approx(together, abs=1e-4)
    assert reversed_ == pytest.approx(together, abs=1e-4)


def test_deterministic_with_its_seed_and_the_seed_matters(bb):
    run = lambda seed: loglikelihood(bb, REQS[:1], mc_num=4, batch_size=4, block_length=N, seeds=[seed])[0][0]  # noqa: E731
    assert run(7) == run(7)
    assert run(7) != run(8)  # masks are drawn: a 5-token continuation's estimate varies


def test_block_causal_families_need_a_block_length(bb):
    with pytest.raises(ValueError, match=r"block_length=None: llada2 checkpoints attend block-causally"):
        loglikelihood(bb, REQS, mc_num=4)
    with pytest.raises(ValueError, match=r"block_length=None"):
        loglikelihood_rolling(bb, [[5, 6, 7, 8]], max_length=16, mc_num=4)
    with pytest.raises(ValueError, match=r"block_length=None"):
        greedy_check(bb, REQS)


def test_rolling_sums_its_windows_with_the_block_estimator(bb):
    """One window with context token 0 (EOS as prefix): one-token blocks make it exact."""
    text = [5, 6, 7, 8]
    (score,) = loglikelihood_rolling(bb, [text], max_length=16, mc_num=4, batch_size=4, block_length=1)
    assert score == pytest.approx(exact_logp(bb, [bb.spec.eos_id], text, n=1), abs=1e-4)


def greedy_continuation(bb, prefix, length, n=N):
    """Block-causal greedy decoding of one token per block (n=1 here: every token its own block)."""
    out = []
    for _ in range(length):
        ids = torch.tensor([prefix + out + [bb.spec.mask_id]])
        with torch.no_grad():
            out.append(int(bb.logits(ids, None, block_length=n)[0, -1].argmax()))
    return out


def surest_first_continuation(bb, prefix, length, n=1):
    """LLaDA's bidirectional-style greedy: commit the surest masked position anywhere first."""
    x = prefix + [bb.spec.mask_id] * length
    for _ in range(length):
        with torch.no_grad():
            logits = bb.logits(torch.tensor([x]), None, block_length=n)[0].float()
        masked = [i for i, t in enumerate(x) if t == bb.spec.mask_id]
        probs = logits.softmax(-1)
        best = max(masked, key=lambda i: probs[i].max().item())
        x[best] = int(probs[best].argmax())
    return x[len(prefix):]


def test_greedy_check_decodes_block_by_block(bb):
    """With one-token blocks the greedy decode is left to right: the check must agree with it,
    on a prompt where committing the surest position anywhere first (LLaDA's order) differs."""
    prefix = next(p for p in ([5, 6, 7], [9, 4], [11, 12, 13, 14], [3], [20, 21], [30, 8, 8], [40])
                  if greedy_continuation(bb, p, 4, n=1) != surest_first_continuation(bb, p, 4))
    greedy, surest = greedy_continuation(bb, prefix, 4, n=1), surest_first_continuation(bb, prefix, 4)
    assert greedy_check(bb, [(prefix, greedy), (prefix, surest)], block_length=1) == [True, False]
    got = loglikelihood(bb, [(prefix, greedy)], mc_num=4, batch_size=4, block_length=1, check_greedy=True)
    assert got[0][1] is True


def test_a_trained_in_continuation_scores_higher(tmp_path):
    """A few steps of block-diffusion training (clean earlier blocks, masked positions in one
    block, block-causal attention) on one prefix+continuation: its score must rise well above a
    distractor's, which it did not see."""
    from lm_eval_dlmem.backbones.loading import load_backbone
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    bb = load_backbone(make_tiny_checkpoint("llada2", tmp_path / "tiny", seed=3), device="cpu", dtype="float32")
    prefix, target, other = [5, 6, 7], [30, 31, 32, 33, 34], [30, 41, 42, 43, 44]
    score = lambda cont: loglikelihood(bb, [(prefix, cont)], mc_num=8, batch_size=8, block_length=N,  # noqa: E731
                                       seeds=[0])[0][0]
    before = score(target) - score(other)
    seq = torch.tensor([prefix + target])
    opt = torch.optim.Adam(bb.model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    bb.model.train()
    for _ in range(40):
        s, e = segments(len(prefix), len(target), N)[int(torch.randint(2, (), generator=gen))]
        cols = torch.arange(len(prefix) + s, len(prefix) + e)
        masked = cols[torch.rand(len(cols), generator=gen) < 0.7]
        if not len(masked):
            masked = cols[:1]
        noisy = seq.clone()
        noisy[0, masked] = bb.spec.mask_id
        logits = bb.model(input_ids=noisy, block_length=N).logits[0, masked]
        loss = torch.nn.functional.cross_entropy(logits.float(), seq[0, masked])
        opt.zero_grad()
        loss.backward()
        opt.step()
    bb.model.eval()
    after = score(target) - score(other)
    assert after > before + 5 and after > 5
