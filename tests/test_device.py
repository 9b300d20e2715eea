"""The public API on an accelerator: backbone forwards, decoding in each cache mode, likelihood,
MetaState and MemDLM, on the device named by `DLMEM_TEST_DEVICE` (default `cpu`).

The rest of the suite runs on CPU only. These tests are the small subset that a GPU run
(`DLMEM_TEST_DEVICE=cuda pytest tests/test_device.py`, or `benchmarks/gpu_check.sh`) repeats on
the device, against float32 results on CPU where the comparison is robust. What they catch:
tensors left on the CPU (generators, masks, cache buffers, memory state), dtype mix-ups in
bfloat16, and kernels whose numbers drift from the CPU ones. Without the device they are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

from lm_eval_dlmem import DecodeConfig, generate, load_backbone
from lm_eval_dlmem.backbones.common import DiffusionCache
from lm_eval_dlmem.decoding.likelihood import loglikelihood
from lm_eval_dlmem.memory import FastWeightMemory, MemDLMConfig, MetaState
from lm_eval_dlmem.testing import make_tiny_checkpoint

FAMILIES = ("llada", "dream", "llada_moe")
DEVICE = os.environ.get("DLMEM_TEST_DEVICE", "cpu")
# Random weights with std 0.3 give peaked logits, so greedy choices are not near-ties and the
# device's tokens can be compared with the CPU's (std 0.02 would make every choice a coin flip).
PEAKED = {"llada": {"init_std": 0.3}, "dream": {"initializer_range": 0.3}, "llada_moe": {"initializer_range": 0.3}}


def _unavailable(device: str) -> str | None:
    """Why `device` cannot run here, or None."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        return f"DLMEM_TEST_DEVICE={device!r} is not a torch device: {e}"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"DLMEM_TEST_DEVICE={device!r} but torch sees no CUDA GPU"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"DLMEM_TEST_DEVICE={device!r} but only {torch.cuda.device_count()} GPU(s) are visible"
    return None


pytestmark = pytest.mark.skipif(_unavailable(DEVICE) is not None, reason=str(_unavailable(DEVICE)))


class Lazy(dict):
    """family -> value, made on first use (so `-k llada` builds one family, not three)."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, family):
        self[family] = self.make(family)
        return self[family]


@pytest.fixture(scope="module")
def peaked_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("peaked")
    return Lazy(lambda f: make_tiny_checkpoint(f, root / f, seed=1, **PEAKED[f]))


@pytest.fixture(scope="module")
def on_cpu(peaked_ckpts):
    return Lazy(lambda f: load_backbone(peaked_ckpts[f], dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def on_device(peaked_ckpts):
    return Lazy(lambda f: load_backbone(peaked_ckpts[f], dtype="float32", device=DEVICE))


def _batch(lengths=(14, 9), seed=0, pad_id=0):
    """Left-padded prompts: ids [B, P], attention mask [B, P] (CPU tensors)."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), pad_id)
    attn = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(10, 300, (n,), generator=g)
        attn[i, P - n:] = 1
    return ids, attn


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float().cpu() - ref.float()).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.15)])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_forward_matches_cpu_float32(family, dtype, tol, peaked_ckpts, on_cpu):
    ids, attn = _batch(pad_id=on_cpu[family].tokenizer.pad_token_id)
    ref = on_cpu[family].logits(ids, attn)
    bb = load_backbone(peaked_ckpts[family], dtype=dtype, device=DEVICE)
    got = bb.logits(ids.to(DEVICE), attn.to(DEVICE))
    assert got.device.type == torch.device(DEVICE).type and got.dtype == getattr(torch, dtype)
    real = attn.bool()  # padded positions are never read
    assert _relative_error(got[real], ref[real]) < tol


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_cached_window_equals_the_full_forward(family, on_device):
    bb = on_device[family]
    ids, attn = (t.to(DEVICE) for t in _batch(pad_id=bb.tokenizer.pad_token_id))
    full = bb.logits(ids, attn)
    cache = DiffusionCache()
    bb.logits(ids, attn, cache=cache)  # fills the cache
    window = bb.logits(ids, attn, cache=cache, window=(8, 12))
    assert torch.allclose(window, full[:, 8:12], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_matches_cpu_in_each_cache_mode(family, cache, on_cpu, on_device):
    ids, attn = _batch(pad_id=on_cpu[family].tokenizer.pad_token_id)
    for strategy in ("llada", "threshold"):
        config = DecodeConfig(gen_length=16, block_length=8, steps=16, strategy=strategy, cache=cache,
                              stop_early=False)
        ref = generate(on_cpu[family], ids, attn, config)
        got = generate(on_device[family], ids, attn, config)
        assert got.device.type == torch.device(DEVICE).type and got.shape == ref.shape
        # float sums differ by kernel: allow a rare flipped near-tie, not a different decode
        assert (got.cpu() == ref).float().mean() >= 0.9, (strategy, got, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_on_the_device_is_seeded_per_row(family, on_device):
    bb = on_device[family]
    ids, attn = _batch(pad_id=bb.tokenizer.pad_token_id)
    config = DecodeConfig(gen_length=16, block_length=8, steps=16, temperature=1.0, cache="dual", stop_early=False)
    first = generate(bb, ids, attn, config, seeds=[3, 4])
    assert torch.equal(first, generate(bb, ids, attn, config, seeds=[3, 4]))
    # alone, row 1 meets other matmul shapes: allow a rare flip at a sampling boundary
    assert (first[1:] == generate(bb, ids[1:], attn[1:], config, seeds=[4])).float().mean() >= 0.9
    assert not bool((first == bb.spec.mask_id).any())


@pytest.mark.parametrize("family", FAMILIES)
def test_loglikelihood_matches_cpu(family, on_cpu, on_device):
    g = torch.Generator().manual_seed(0)
    requests = [(torch.randint(10, 300, (n,), generator=g).tolist(), torch.randint(10, 300, (t,), generator=g).tolist())
                for n, t in ((12, 3), (7, 5), (20, 4))]
    ref = loglikelihood(on_cpu[family], requests, mc_num=16, batch_size=8)
    got = loglikelihood(on_device[family], requests, mc_num=16, batch_size=8)
    for (a, _), (b, _) in zip(got, ref):
        assert abs(a - b) <= 1e-3 * abs(b) + 1e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_metastate_runs_on_the_device(family, dtype, peaked_ckpts):
    """Fresh MetaState (gate at zero) = the frozen model token for token; opened, it decodes."""
    bb = load_backbone(peaked_ckpts[family], dtype=dtype, device=DEVICE)
    ids, attn = _batch(pad_id=bb.tokenizer.pad_token_id)
    config = DecodeConfig(gen_length=16, block_length=8, steps=16, cache="dual", stop_early=False)
    frozen = generate(bb, ids, attn, config)
    torch.manual_seed(0)
    ms = MetaState.init_for(bb, slots=4, width=32, heads=4)
    assert ms.slot_init.device.type == torch.device(DEVICE).type
    assert torch.equal(generate(bb, ids, attn, config, ms), frozen)
    with torch.no_grad():
        ms.injector.gate.fill_(2.0)
    out = generate(bb, ids, attn, config, ms)
    assert not bool((out == bb.spec.mask_id).any()) and not ms._hooks


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_memdlm_inner_loop_runs_on_the_device_and_restores_the_model(family, dtype, peaked_ckpts):
    bb = load_backbone(peaked_ckpts[family], dtype=dtype, device=DEVICE)
    ids, attn = _batch(pad_id=bb.tokenizer.pad_token_id)
    with torch.no_grad():
        before = bb.logits(ids.to(DEVICE), attn.to(DEVICE))
    memory = FastWeightMemory(bb, MemDLMConfig(inner_layer_fraction=0.5))
    config = DecodeConfig(gen_length=16, block_length=8, steps=16, cache="dual", stop_early=False)
    out = generate(bb, ids, attn, config, memory)
    assert not bool((out == bb.spec.mask_id).any())
    losses = torch.cat([stage.float().cpu().flatten() for stage in memory.last_losses])  # [stages * B]
    assert torch.isfinite(losses).all() and losses.numel() > 0
    with torch.no_grad():
        assert torch.equal(bb.logits(ids.to(DEVICE), attn.to(DEVICE)), before)


def test_placement_puts_the_model_on_its_device_or_spreads_it():
    """`parallelize=True` hands load_backbone device_map="auto" and no device; otherwise the
    process's device and no device_map."""
    from lm_eval_dlmem.devices import Placement

    placement = Placement(torch.device("cpu"))
    assert placement.model_placement(False) == dict(device=torch.device("cpu"), device_map=None)
    assert placement.model_placement(True) == dict(device=None, device_map="auto")
