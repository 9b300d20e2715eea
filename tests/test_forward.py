"""The one guided forward step (decoding/forward.py) and the memory lifecycle it runs in
(`Memory.session` / `Memory.step`): every caller (decode loop, likelihood, MetaState training,
NLL analysis) forwards through it, so a memory sees every forward the same way."""

import pytest
import torch

from lm_eval_dlmem.decoding.forward import forward_step
from lm_eval_dlmem.memory.base import Memory, MemoryWrapper, NoMemory

V, MASK = 8, 7


class Spec:
    mask_id, eos_id, logit_shift = MASK, 6, False


class TableBackbone:
    """Logits: row r of a forward gets `tables[r % len(tables)]` [L, V]; records the inputs."""

    spec = Spec()
    device = torch.device("cpu")

    def __init__(self, *tables):
        self.tables, self.inputs = tables, []

    def logits(self, input_ids, attention_mask=None, *, cache=None, window=None, keep=None):
        self.inputs.append(input_ids.clone())
        a, b = keep if keep is not None else (0, input_ids.shape[1])
        return torch.stack([self.tables[r % len(self.tables)][a:b] for r in range(input_ids.shape[0])])


class Recorder(Memory):
    def __init__(self):
        self.events = []

    def begin(self, backbone, input_ids, attention_mask, prompt_mask, seeds=None):
        self.events.append("begin")

    def before_forward(self, info):
        self.events.append(("before", info.step, tuple(info.input_ids.shape), info.mask_ratio.tolist()))

    def after_forward(self, info):
        self.events.append(("after", info.step))

    def end(self):
        self.events.append("end")


def test_guided_step_masks_the_uncond_rows_and_combines_with_llada_formula():
    """Kills: a wrong CFG formula, halves swapped, the unconditional copy masking the wrong
    positions, or a memory that sees only the conditional rows of a guidance batch."""
    cond, uncond = torch.randn(5, V), torch.randn(5, V)
    bb, mem = TableBackbone(cond, uncond), Recorder()
    ids = torch.tensor([[1, 2, MASK, MASK, MASK]])
    prompt = torch.tensor([[True, True, False, False, False]])
    out = forward_step(bb, mem, ids, None, step=3, mask_ratio=torch.tensor([1.0]), cfg_scale=0.5,
                       uncond_mask=prompt, keep=(2, 5))
    torch.testing.assert_close(out[0], uncond[2:] + 1.5 * (cond[2:] - uncond[2:]))
    assert bb.inputs[0].tolist() == [[1, 2, MASK, MASK, MASK], [MASK] * 5]
    assert mem.events == [("before", 3, (2, 5), [1.0, 1.0]), ("after", 3)]


def test_unguided_step_keeps_the_dtype_unless_upcast():
    table = torch.randn(3, V).to(torch.bfloat16)
    ids = torch.tensor([[1, 2, 3]])
    kept = forward_step(TableBackbone(table), NoMemory(), ids, None, step=0, mask_ratio=torch.tensor([0.0]))
    up = forward_step(TableBackbone(table), NoMemory(), ids, None, step=0, mask_ratio=torch.tensor([0.0]), upcast=True)
    assert kept.dtype == torch.bfloat16 and up.dtype == torch.float32 and torch.equal(up, kept.float())


def test_session_always_ends_and_a_failed_forward_updates_nothing():
    """Kills: hooks or fast weights left on the backbone after an error, or a state update from a
    forward that raised."""
    mem = Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        with mem.session(None, torch.zeros(1, 2), None, torch.zeros(1, 2, dtype=torch.bool)):
            with mem.step(type("Info", (), {"step": 0, "input_ids": torch.zeros(1, 2),
                                            "mask_ratio": torch.ones(1)})()):
                raise RuntimeError("boom")
    assert mem.events == ["begin", ("before", 0, (1, 2), [1.0]), "end"]


def test_a_wrapper_observes_every_forward_of_its_inner_memory():
    """Kills: a wrapper whose overrides session/step bypass (attribute forwarding to the inner
    memory would call the inner's before_forward, never the wrapper's)."""

    class Count(MemoryWrapper):
        forwards = 0

        def before_forward(self, info):
            self.forwards += 1
            super().before_forward(info)

    inner = Recorder()
    mem = Count(inner)
    bb = TableBackbone(torch.randn(2, V))
    with mem.session(bb, torch.zeros(1, 2, dtype=torch.long), None, torch.zeros(1, 2, dtype=torch.bool)):
        forward_step(bb, mem, torch.zeros(1, 2, dtype=torch.long), None, step=0, mask_ratio=torch.ones(1))
    assert mem.forwards == 1 and inner.events == ["begin", ("before", 0, (1, 2), [1.0]), ("after", 0), "end"]


def test_nll_analysis_forwards_inside_the_memory_step(tiny_ckpts):
    """Kills: the NLL analysis calling the backbone outside the memory's step (a MetaState's
    hooks would then do nothing and its NLL would silently be the frozen model's)."""
    from lm_eval_dlmem import load_backbone
    from lm_eval_dlmem.training.nll import sequential_nll, static_nll

    bb = load_backbone(tiny_ckpts["llada"])
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "prompt_mask": torch.tensor([[True, True, False, False, False, False]])}
    mem = Recorder()
    static_nll(bb, batch, (0.5, 1.0), memory=mem)
    assert [e[0] for e in mem.events if isinstance(e, tuple)] == ["before", "after"] * 2
    assert mem.events[1][3] == [0.5] and mem.events[0] == "begin" and mem.events[-1] == "end"
    mem = Recorder()
    sequential_nll(bb, batch, (1.0, 0.5), memory=mem)
    assert [e[3] for e in mem.events if e[0] == "before"] == [[1.0], [0.5]]


def test_likelihood_memory_sees_the_guidance_batch_as_the_decoder_does(tiny_ckpts):
    """Kills: the likelihood giving a memory only the conditional rows under CFG while the
    decoder gives it [cond; uncond] (one convention, one forward step)."""
    from lm_eval_dlmem import load_backbone
    from lm_eval_dlmem.decoding.likelihood import loglikelihood

    bb = load_backbone(tiny_ckpts["llada"])
    mem = Recorder()
    loglikelihood(bb, [([3, 4, 5], [6])], mc_num=1, cfg_scale=0.5, memory=mem)
    (before,) = [e for e in mem.events if e[0] == "before"]
    assert before[2][0] == 2 and len(before[3]) == 2


def test_sequential_nll_commits_down_to_the_next_ratio():
    """The sequential trajectory reveals the most confident masked predictions until
    int(n * next_ratio) response tokens stay masked in each row, and touches nothing else."""
    from lm_eval_dlmem.training.nll import _commit

    mask_id = 99
    canvas = torch.tensor([[1, mask_id, mask_id, mask_id, mask_id], [1, 2, mask_id, mask_id, 5]])
    masked = canvas == mask_id
    logits = torch.zeros(2, 5, 8)
    logits[0, 1:, 3] = torch.tensor([1.0, 4.0, 3.0, 2.0])  # row 0: positions 2 > 3 > 4 > 1
    logits[1, 2:4, 4] = torch.tensor([5.0, 1.0])
    n = torch.tensor([4, 3])  # response lengths
    out = _commit(canvas, logits, masked, n, 0.34)  # keep int(4 * .34) = 1 and int(3 * .34) = 1 masked
    assert out.tolist() == [[1, mask_id, 3, 3, 3], [1, 2, 4, mask_id, 5]]
