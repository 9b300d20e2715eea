"""Same seed, same outputs: across runs (fresh model objects, disturbed global RNG), and, on a
trained model, across batch sizes (1 vs 4: other padding, other batch-mates) and request order,
greedy and sampled. The harness derives each request's seed from its content and `seed=`, so
only `seed=` changes sampled outputs."""

import random

import pytest
import torch
from _harness_runs import lm_eval_runner
from lm_eval.api.instance import Instance


@pytest.fixture
def quick_lm_eval(monkeypatch):
    """In-process lm-eval runs on tiny checkpoints (see _harness_runs)."""
    yield from lm_eval_runner(monkeypatch)


PROMPTS = [
    "Mary went to the kitchen.\nQuestion: Where is Mary?\nAnswer:",
    "The key is 4821.",
    "Daniel moved to the hallway. Then he went back to the office and picked up the red ball.\nWhere?",
    "Größe, café, 東京, 🙂: non-ASCII text",
    "a",
    "Bill has the milk. Fred has the apple. Who has the milk?",
]
GREEDY = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
SAMPLED = {"until": ["\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0}


def generate(lm, prompts, gen_kwargs, batch_size: int) -> dict[str, str]:
    lm.args.batch_size = str(batch_size)
    torch.manual_seed(random.randrange(1 << 30))  # the global RNG must not matter
    reqs = [Instance("generate_until", doc={}, arguments=(p, dict(gen_kwargs)), idx=i) for i, p in enumerate(prompts)]
    return dict(zip(prompts, lm.generate_until(reqs, disable_tqdm=True)))


def make_lm(ckpt, family, **args):
    from lm_eval_dlmem.harness import MetaStateDream, MetaStateLLaDA

    cls = MetaStateDream if family == "dream" else MetaStateLLaDA
    return cls(pretrained=ckpt, device="cpu", **args)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_generation_is_deterministic_across_runs(tiny_ckpts, quick_lm_eval, family):
    """Same requests, same batch size: bit-identical answers from fresh model objects whatever the
    global RNG; `seed=` reaches the sampler and only it."""
    lm = make_lm(tiny_ckpts[family], family)
    for gen_kwargs in (GREEDY, SAMPLED):
        one = generate(lm, PROMPTS, gen_kwargs, batch_size=3)
        assert generate(make_lm(tiny_ckpts[family], family), PROMPTS, gen_kwargs, batch_size=3) == one
    other = make_lm(tiny_ckpts[family], family, seed=7)
    assert generate(other, PROMPTS, SAMPLED, batch_size=4) != generate(lm, PROMPTS, SAMPLED, batch_size=4)
    assert generate(other, PROMPTS, GREEDY, batch_size=4) == generate(lm, PROMPTS, GREEDY, batch_size=4)


@pytest.mark.parametrize("args", [{}, {"strategy": "dream", "alg": "entropy"}], ids=["llada", "dream_sampler"])
def test_generation_is_batch_invariant_on_a_trained_model(quick_lm_eval, args):
    """Batch 1 vs 4 and reversed order change the padding and the batch-mates, which moves the
    logits by float noise (~1e-7); the answers stay the same when no two candidates tie within
    that noise, as on a trained model (the embedded tiny-llada). Random tiny checkpoints have
    exact ties and are not used for this."""
    lm = make_lm("tiny-llada", "llada", **args)
    for gen_kwargs in (GREEDY, SAMPLED):
        one = generate(lm, PROMPTS, gen_kwargs, batch_size=1)
        assert generate(lm, PROMPTS, gen_kwargs, batch_size=4) == one
        assert generate(lm, PROMPTS[::-1], gen_kwargs, batch_size=4) == one


def test_threshold_decoding_and_cache_modes_are_batch_invariant(quick_lm_eval):
    lm = make_lm("tiny-llada", "llada", strategy="threshold", threshold=0.3, cache="dual", block_length=4)
    for gen_kwargs in (GREEDY, SAMPLED):
        assert generate(lm, PROMPTS, gen_kwargs, batch_size=1) == generate(lm, PROMPTS, gen_kwargs, batch_size=4)


def test_loglikelihood_does_not_depend_on_batch_mates_order_or_runs(tiny_ckpts, quick_lm_eval):
    # mc_num 4 in strata of 4 with mc_batch_size 8: two requests share each forward
    lm = make_lm(tiny_ckpts["llada"], "llada", mc_num=4, mc_batch_size=8)
    pairs = [("", " kitchen"), ("Mary went to the kitchen. Where is Mary?", " kitchen"),
             ("Mary went to the kitchen. Where is Mary?", " garden"), ("东京 🙂", " Größe"), ("a b c", " d e f g")]

    def score(model, items):
        torch.manual_seed(random.randrange(1 << 30))
        reqs = [Instance("loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(items)]
        return [r[0] for r in model.loglikelihood(reqs, disable_tqdm=True)]

    together = score(lm, pairs)
    assert all(v < 0 for v in together)
    assert [score(lm, [p])[0] for p in pairs] == pytest.approx(together, abs=1e-4)
    assert score(lm, pairs[::-1])[::-1] == pytest.approx(together, abs=1e-4)
    assert score(make_lm(tiny_ckpts["llada"], "llada", mc_num=4, mc_batch_size=8), pairs) == pytest.approx(
        together, abs=1e-4)
    other = score(make_lm(tiny_ckpts["llada"], "llada", mc_num=4, mc_batch_size=8, seed=7), pairs)
    assert other != pytest.approx(together, abs=1e-4)  # the seed drives the Monte Carlo masks
