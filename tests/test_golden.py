"""Golden values of the embedded, trained `tiny-llada` (and its MetaState), as lm-eval pins its
own models' numbers (tests/models/test_huggingface.py): a change of any of these numbers is a
decision to make visibly, not a side effect.

Tolerances are for float32 on any CPU: token ids exact (greedy decoding of the trained model has
no near-ties on these prompts: the smallest top-1/top-2 logit gap of a committed token is 1.2e-3
and the smallest gap between the k-th and (k+1)-th confidence 2.0e-3, against float32 noise of
~1e-6; a float64 run gives the same ids), log-likelihoods to 1e-4 relative (float64 agrees with
float32 to 1e-7, 1 and 2 threads exactly). (The MetaState's greedy decode is not pinned: its
confidences tie to within 4e-7.)

To regenerate after a deliberate change of numbers, run

    PYTHONPATH=. python tests/test_golden.py

paste its output over the constants below, and say in the commit message why they changed.
"""

import pytest
import torch

PROMPTS = [
    "Mary moved to the bathroom. John went to the hallway. Daniel travelled to the office.\n"
    "Question: Where is Mary?\nAnswer:",
    "One of the special magic numbers for apple is: 4821. What is the special magic number for apple?",
]
CONTINUATIONS = [" bathroom", " 4821."]
DECODE = dict(gen_length=16, steps=16, block_length=8, stop_early=False)  # greedy, two blocks
MC = dict(mc_num=8, seeds=[0, 1])

# ---- golden values (regenerate: see the module docstring) -------------------------------------
GREEDY_IDS = [
    [272, 31, 264, 379, 226, 204, 19, 204, 272, 272, 272, 272, 272, 272, 1, 1],
    [332, 475, 331, 475, 264, 379, 332, 475, 36, 36, 272, 332, 272, 36, 305, 332],
]
LOGLIKELIHOOD = [-8.681774139404297, -36.87290072441101]
LOGLIKELIHOOD_METASTATE = [-7.143586158752441, -30.556002378463745]
HARNESS_LOGLIKELIHOOD = [-8.681774139404297, -33.40609383583069]
# -----------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def tiny():
    from lm_eval_dlmem import load_backbone

    return load_backbone("tiny-llada")


def encode(backbone, text):
    return backbone.tokenizer.encode(text, add_special_tokens=False)


def greedy_ids(backbone):
    from lm_eval_dlmem.decoding.config import DecodeConfig
    from lm_eval_dlmem.decoding.engine import generate, left_pad

    ids, attn = left_pad([encode(backbone, p) for p in PROMPTS], backbone.spec.eos_id)
    return generate(backbone, ids, attn, DecodeConfig(**DECODE)).tolist()


def loglikelihoods(backbone, memory=None):
    from lm_eval_dlmem.decoding.likelihood import loglikelihood

    pairs = [(encode(backbone, p), encode(backbone, c)) for p, c in zip(PROMPTS, CONTINUATIONS)]
    return [score for score, _ in loglikelihood(backbone, pairs, memory=memory, **MC)]


def harness_loglikelihoods():
    """Through `DlmLM.loglikelihood`: lm-eval's context/continuation split and the per-request
    seed derived from the request's text."""
    from lm_eval.api.instance import Instance

    from lm_eval_dlmem.harness import MetaStateLLaDA

    lm = MetaStateLLaDA(pretrained="tiny-llada", device="cpu", mc_num=8, mc_batch_size=8)
    requests = [Instance("loglikelihood", doc={}, arguments=pc, idx=i) for i, pc in enumerate(zip(PROMPTS, CONTINUATIONS))]
    return [score for score, _ in lm.loglikelihood(requests, disable_tqdm=True)]


def test_greedy_generation_is_pinned(tiny):
    assert greedy_ids(tiny) == GREEDY_IDS


def test_loglikelihood_is_pinned(tiny):
    assert loglikelihoods(tiny) == pytest.approx(LOGLIKELIHOOD, rel=1e-4)


def test_metastate_loglikelihood_is_pinned(tiny):
    """The trained MetaState's numbers: any change in how it is fed (time input, read/write
    layers, which positions it reads) moves them."""
    from lm_eval_dlmem.memory.metastate import load_memory_for

    assert loglikelihoods(tiny, load_memory_for("tiny-llada-metastate", tiny)) == pytest.approx(
        LOGLIKELIHOOD_METASTATE, rel=1e-4)


def test_harness_loglikelihood_is_pinned():
    assert harness_loglikelihoods() == pytest.approx(HARNESS_LOGLIKELIHOOD, rel=1e-4)


if __name__ == "__main__":
    from lm_eval_dlmem import load_backbone
    from lm_eval_dlmem.memory.metastate import load_memory_for

    torch.set_num_threads(1)
    backbone = load_backbone("tiny-llada")
    print("GREEDY_IDS = [")
    for row in greedy_ids(backbone):
        print(f"    {row},")
    print("]")
    print(f"LOGLIKELIHOOD = {loglikelihoods(backbone)}")
    print(f"LOGLIKELIHOOD_METASTATE = {loglikelihoods(backbone, load_memory_for('tiny-llada-metastate', backbone))}")
    print(f"HARNESS_LOGLIKELIHOOD = {harness_loglikelihoods()}")
