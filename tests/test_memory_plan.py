"""The memory model: each term against what it counts, the harness's batch_size=auto plan, and
the prediction against measured peaks (benchmarks/memory_check.py --quick)."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

from lm_eval_dlmem import load_backbone
from lm_eval_dlmem import memory_plan as mp
from lm_eval_dlmem.backbones.spec import get_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLADA_8B = dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288)
MOE_7B = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=16,
              expert_intermediate_size=1024, dense_intermediate_size=8192, num_experts=64, num_experts_per_tok=8)


def released(family, sizes, vocab):
    return mp.Shape.from_config(get_spec(family).official_config_dict(vocab, sizes), family)


@pytest.fixture(scope="module")
def shape_8b():
    return released("llada", LLADA_8B, 126464)


def test_released_shapes_count_their_published_parameters(shape_8b):
    # LLaDA-8B: 8.02B (gpu_check measured 14.93 GiB of bf16 weights); LLaDA-MoE-7B-A1B: 7.36B
    assert shape_8b.params == 8_015_581_184
    assert mp.weight_bytes(shape_8b, "bfloat16") / mp.GIB == pytest.approx(14.93, abs=0.01)
    moe = released("llada_moe", MOE_7B, 157184)
    assert moe.params == 7_356_880_896 and moe.ffn == 8 * 1024
    assert moe.ffn_live == 8 * 1024 // 64  # experts run one at a time on k / E of the tokens
    assert mp.layer_bytes(moe, 10, "bfloat16", backward=True) > mp.layer_bytes(moe, 10, "bfloat16")
    assert mp.Shape.released("LLaDA-MoE-7B-A1B") == moe


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe", "llada2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_bytes_equal_the_loaded_model(tiny_ckpts, tmp_path_factory, family, dtype):
    from lm_eval_dlmem import make_tiny_checkpoint

    path = tiny_ckpts.get(family) or make_tiny_checkpoint(family, tmp_path_factory.mktemp(family) / "tiny")
    bb = load_backbone(path, dtype=dtype)
    loaded = sum(p.numel() * p.element_size() for p in bb.model.parameters())
    shape = mp.Shape.from_config(bb.config.to_dict(), family)
    assert mp.weight_bytes(shape, dtype) == loaded


def test_quantized_weights_per_parameter(shape_8b):
    assert mp.NF4_BYTES == pytest.approx(0.516, abs=1e-3)  # double quantisation (load_in_4bit)
    assert mp.NF4_BYTES_SINGLE == pytest.approx(0.5625)  # the ~0.56 without it
    rest = shape_8b.params - shape_8b.quantizable  # embedding + LM head stay bf16
    assert rest == 2 * 126464 * 4096 + 65 * 4096
    assert mp.weight_bytes(shape_8b, "nf4") == int(shape_8b.quantizable * mp.NF4_BYTES + rest * 2)
    assert mp.weight_bytes(shape_8b, "int8") < mp.weight_bytes(shape_8b, "bfloat16") * 0.6


def batch_term(shape, run, batch):
    return mp.decode_peak(shape, run, batch) - mp.resident_bytes(shape, run) - mp.WORKSPACE


def test_batch_term_is_linear_and_guidance_doubles_it(shape_8b):
    run = mp.RunPlan(prompt=512, gen_length=256, cache="dual")
    assert batch_term(shape_8b, run, 2) == 2 * batch_term(shape_8b, run, 1)
    assert batch_term(shape_8b, dataclasses.replace(run, cfg=True), 3) == 2 * batch_term(shape_8b, run, 3)


def test_cache_term_counts_keys_and_values_over_the_canvas(shape_8b):
    none = mp.RunPlan(prompt=512, gen_length=256, cache="none")
    for mode in ("prefix", "dual"):
        extra = batch_term(shape_8b, dataclasses.replace(none, cache=mode), 1) - batch_term(shape_8b, none, 1)
        # K and V, 32 layers, 768 positions, 4096 wide, bf16; the refreshing forward's own k and v
        # (otherwise among its attention's tensors) are the ones the cache keeps; a block's first
        # step runs in a fresh decode_block call, so no previous logits [32, V] are alive then
        assert extra == 2 * 32 * 768 * 4096 * 2 - 2 * 768 * 4096 * 2 - 32 * 126464 * 2
    dream = released("dream", dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                   num_hidden_layers=28, intermediate_size=18944), 152064)
    assert mp.cache_bytes(dream, 768, "bfloat16") == 2 * 28 * 768 * 4 * 128 * 2  # GQA: 4 kv heads
    # GQA: q [l, 28*128], k and v [l, 4*128]; SDPA's inputs (q and k rotated, k and v repeated
    # to 28 heads) and output outweigh the rotation of q
    q, kv = 3584, 512
    assert mp.attention_bytes(dream, 10, "bfloat16") == 10 * 2 * (3 * 3584 + (q + 2 * kv) + (q + kv) + 2 * q + q)
    assert mp.attention_bytes(dream, 10, "bfloat16", cached=True) == 10 * 2 * (3 * 3584 + q + (q + kv) + 2 * q + q)
    # a dual-cache step's SDPA repeats the whole cached canvas's keys and values to 28 heads
    dual = mp.RunPlan(prompt=512, gen_length=256, cache="dual")
    assert mp.window_forward_row_bytes(dream, dual) == (mp.layer_bytes(dream, 32, "bfloat16") + mp.cache_bytes(
        dream, 768, "bfloat16") + 2 * 768 * q * 2 + mp.previous_logits_bytes(dream, dual))
    assert mp.repeat_bytes(shape_8b, 768, "bfloat16") == 0  # no GQA, no copies


def test_guidance_keeps_one_row_of_previous_logits(shape_8b):
    """The decode loop holds the previous step's logits through the next full forward: after
    guidance they are [B, n, V], not [2B, n, V] (measured: llada-m batch 2 under CFG, 73 MiB,
    against batch 4 without, 81 MiB)."""
    run = mp.RunPlan(prompt=512, gen_length=256, cache="none")
    guided = dataclasses.replace(run, cfg=True)
    previous = 32 * 126464 * 2
    assert mp.previous_logits_bytes(shape_8b, run) == previous
    assert batch_term(shape_8b, run, 1) == mp.layer_bytes(shape_8b, 768, "bfloat16") + previous
    assert batch_term(shape_8b, guided, 1) == 2 * mp.layer_bytes(shape_8b, 768, "bfloat16") + previous


def test_activation_terms_scale_with_their_sizes(shape_8b):
    C, F = 4096, 12288
    # feed-forward: embedding output, block input, residual, normed input; gate's activation, up, product
    assert mp.ffn_bytes(shape_8b, 100, "bfloat16") == 2 * 100 * (4 * C + 3 * F)
    assert mp.ffn_bytes(shape_8b, 100, "float32") == 2 * mp.ffn_bytes(shape_8b, 100, "bfloat16")
    # LLaDA rotates float32 copies of q and k: below float32 they are extra tensors, and the
    # rotation's three temporaries are float32 (rotating k, with the rotated q kept, is the peak)
    assert shape_8b.rope_fp32
    assert mp.attention_bytes(shape_8b, 100, "bfloat16") == 100 * (2 * 3 * C + 2 * 3 * C + 4 * 2 * C + 2 * C + 12 * C)
    assert mp.attention_bytes(shape_8b, 100, "float32") == 100 * (4 * 3 * C + 4 * 3 * C + 4 * C + 12 * C)
    # bf16 peaks in the attention (measured on CPU: llada-m, 50 MiB there against 41 in the
    # feed-forward), float32 in the feed-forward (81 against 68)
    assert mp.layer_bytes(shape_8b, 100, "bfloat16") == mp.attention_bytes(shape_8b, 100, "bfloat16")
    assert mp.layer_bytes(shape_8b, 100, "float32") == mp.ffn_bytes(shape_8b, 100, "float32")
    assert mp.layer_bytes(shape_8b, 200, "bfloat16") == 2 * mp.layer_bytes(shape_8b, 100, "bfloat16")
    # a decode step's peak is the larger of a block's tensors and the head's, never their sum
    run = mp.RunPlan(prompt=500, gen_length=28, block_length=32)
    assert mp.decode_row_bytes(shape_8b, run) == max(mp.layer_bytes(shape_8b, 528, "bfloat16") + 28 * 126464 * 2,
                                                     mp.decode_head_bytes(shape_8b, run))
    assert mp.decode_head_bytes(shape_8b, run) == 28 * 126464 * (2 + mp.HEAD_EXTRA_BYTES)


def test_likelihood_scores_the_masked_positions_in_float32():
    """A stratum of b rows masks at most (b + 1) / 2b of the continuation; the cross-entropy
    gathers those logits and their log-softmax in float32 on top of the logits (measured: llada-m,
    16 rows, 135 MiB, where every position counted gave 161)."""
    assert mp.likelihood_masked_fraction(mp.RunPlan(mc_batch_size=16)) == 17 / 32
    assert mp.likelihood_masked_fraction(mp.RunPlan(mc_batch_size=1)) == 1.0
    shape = released("llada", dict(d_model=512, n_heads=8, n_kv_heads=8, n_layers=6, mlp_hidden_size=1536), 32768)
    run = mp.RunPlan(precision="float32", prompt=256, gen_length=32, mc_batch_size=16)
    assert mp.likelihood_row_bytes(shape, run) == int(32 * 32768 * (4 + 8 * 17 / 32))
    # bfloat16: the logits are upcast (the bf16 ones freed), the cross-entropy is the same
    bf16 = dataclasses.replace(run, precision="bfloat16", mc_batch_size=32)
    assert mp.likelihood_row_bytes(shape, bf16) == int(32 * 32768 * (4 + 8 * 33 / 64))
    # guidance: both rows' float32 logits and the two temporaries of the guided difference
    assert mp.likelihood_row_bytes(shape, dataclasses.replace(run, cfg=True)) == 32 * 32768 * (2 * 4 + 8)


def test_llada2_counts_its_dense_first_layer():
    cfg = dict(num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512, num_shared_experts=1,
               intermediate_size=5120, first_k_dense_replace=1)
    assert mp.ffn_width(cfg) == 5120  # LLaDA2.1-mini: the dense first layer is wider than 8 + 1 experts
    assert mp.ffn_width({**cfg, "intermediate_size": 1024}) == 9 * 512
    assert mp.ffn_width({**cfg, "first_k_dense_replace": 0}) == 9 * 512  # no dense layer


def test_memory_methods_cost(tiny_ckpts):
    from lm_eval_dlmem.memory import FastWeightMemory, MemDLMConfig, MetaState

    bb = load_backbone(tiny_ckpts["llada"])
    ms = MetaState.init_for(bb)
    cost = mp.MemoryCost.of(ms)
    assert cost.resident == sum(p.numel() * 4 for p in ms.parameters()) and cost.fast_layers == 0
    fused = ms.fused()  # the weights a session fuses: held from its first forward to its end
    assert cost.session == ms.fused_bytes() == sum(t.numel() * t.element_size() for t in vars(fused).values())
    run = mp.RunPlan(prompt=64, gen_length=32)
    shape = mp.Shape.from_config(bb.config.to_dict(), "llada")
    with_ms = dataclasses.replace(run, memory=cost)
    assert mp.decode_peak(shape, with_ms, 1) - mp.decode_peak(shape, run, 1) == cost.resident + cost.session + cost.per_row
    fw = FastWeightMemory(bb, MemDLMConfig(inner_targets="ffn", inner_layer_fraction=1.0))
    cost = mp.MemoryCost.of(fw)  # before any session: the targets are not wrapped yet
    fw.install()
    r = MemDLMConfig.inner_rank
    fast = 4 * r * sum(m.in_features + m.out_features for m in fw.layers)
    fw.remove()
    assert fast > 0 and cost.fast_layers == len(bb.layers) and cost.per_row == fast
    assert cost.mask_fraction == pytest.approx(0.3) and cost.anchor_fraction == pytest.approx(0.2)
    assert mp.MemoryCost.of(FastWeightMemory(bb, MemDLMConfig(inner_steps=0))) == mp.MemoryCost()
    shape = mp.Shape.from_config(bb.config.to_dict(), "llada")
    run = mp.RunPlan(prompt=64, gen_length=32, memory=cost)
    assert mp.decode_row_bytes(shape, run) > mp.decode_row_bytes(shape, mp.RunPlan(prompt=64, gen_length=32))


def test_inner_loop_counts_fast_weight_copies_per_stage():
    """MemDLM's inner loop: each stage holds the fast weights and their gradients (the previous
    stage's are freed first: tests/test_memdlm.py); the cross-entropy backward over the masked
    tokens, three float32 [N, V] (measured: moe-m, 4 rows, 119 MiB, predicted 68 with the fast
    weights left out). The larger first (pre-anchor) mask makes the first stage the peak."""
    shape = released("llada_moe", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                                       num_hidden_layers=4, expert_intermediate_size=256,
                                       dense_intermediate_size=1024, num_experts=16, num_experts_per_tok=4), 16384)
    fast = 6 * 2 ** 20
    cost = mp.MemoryCost(per_row=fast, fast_layers=2, mask_fraction=0.3, anchor_fraction=0.2)
    run = mp.RunPlan(precision="float32", prompt=256, gen_length=64, memory=cost)
    kept = 2 * 256 * 256 * 4
    block = 2 * mp.layer_bytes(shape, 256, "float32", backward=True)
    first = kept + max(block, 3 * 4 * 77 * 16384) + 2 * fast
    later = kept + max(block, 3 * 4 * 52 * 16384) + 2 * fast
    assert first > later
    assert mp.decode_row_bytes(shape, run) == first  # the held copy is one of the two
    one_stage = dataclasses.replace(run, memory=dataclasses.replace(cost, anchor_fraction=0.0))
    assert mp.decode_row_bytes(shape, one_stage) == first
    bigger_anchor = dataclasses.replace(run, memory=dataclasses.replace(cost, anchor_fraction=0.5))
    assert mp.decode_row_bytes(shape, bigger_anchor) == kept + max(block, 3 * 4 * 128 * 16384) + 2 * fast


def test_largest_batch_fits_the_free_memory(shape_8b):
    run = mp.RunPlan(prompt=512, gen_length=256, cache="dual")
    row = mp.decode_row_bytes(shape_8b, run)
    free = 10 * row + mp.WORKSPACE
    assert mp.largest_batch(shape_8b, run, free, headroom=1.0) == 10
    assert mp.largest_batch(shape_8b, run, free - 1, headroom=1.0) == 9
    assert mp.largest_batch(shape_8b, run, free, headroom=1.0, cap=4) == 4
    assert mp.largest_batch(shape_8b, run, 0) == 1  # the out-of-memory backoff has the last word


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache="full"), "cache='full' is not one of"),
    (dict(precision="int4"), "dtype='int4' is not one of"),
    (dict(prompt=0), "prompt=0 must be a positive integer"),
    (dict(gen_length=-1), "gen_length=-1 must be a non-negative integer"),
])
def test_bad_plans_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        mp.RunPlan(**kwargs)


# ---- the harness ---------------------------------------------------------------------------------

def harness(ckpt, **kwargs):
    from lm_eval_dlmem.harness import DlmLM

    return DlmLM(pretrained=ckpt, device="cpu", gen_length=8, **kwargs)


def test_auto_batch_starts_at_the_planned_batch(tiny_ckpts, monkeypatch, capsys):
    monkeypatch.setattr(mp, "free_bytes", lambda device: 64 * 2**20)
    lm = harness(tiny_ckpts["llada"], batch_size="auto")
    shape = mp.Shape.from_config(lm.backbone.config.to_dict(), "llada")
    run = mp.RunPlan(precision="float32", prompt=lm.max_length - 8, gen_length=8, block_length=8)
    expected = mp.largest_batch(shape, run, 64 * 2**20)
    assert 1 < expected < 64  # neither the old fixed start nor the floor
    assert lm.batch_sizer.n() == expected
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("memory plan: ") and f"batch_size {expected}" in line and "float32" in line
    weights = mp.weight_bytes(shape, "float32")
    assert f"weights {weights / 2**20:.1f} MiB" in line and "free 64.0 MiB" in line  # tiny sizes not shown as 0.00 GiB
    lm.args.max_batch_size = 2  # what the out-of-memory backoff sets
    assert lm.batch_sizer.n() == 2


def test_human_bytes_switches_to_gib_at_one_gib():
    assert mp.human_bytes(mp.GIB - 2**20) == "1023.0 MiB" and mp.human_bytes(3 * mp.GIB // 2) == "1.50 GiB"


def test_fixed_batch_is_kept_and_reported(tiny_ckpts, capsys):
    lm = harness(tiny_ckpts["llada"], batch_size=3, max_batch_size=2)
    assert lm.batch_sizer.n() == 3
    assert "-> batch_size 3" in capsys.readouterr().err


def test_out_of_memory_backoff_still_halves_from_the_plan(tiny_ckpts, monkeypatch):
    monkeypatch.setattr(mp, "free_bytes", lambda device: 64 * 2**20)
    lm = harness(tiny_ckpts["llada"], batch_size="auto")
    n = lm.batch_sizer.n()
    sizes = []

    def fn(part):
        sizes.append(len(part))
        if len(part) > 2:
            raise torch.OutOfMemoryError("fake")
        return part

    assert lm.batch_sizer.run(fn, list(range(n))) == list(range(n))
    assert sizes[0] == n and max(sizes[1:]) <= 2 and lm.batch_sizer.n() <= 2


# ---- against measured peaks ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak resident set reset is Linux-only")
def test_bytes_per_request_match_measured_peaks():
    """benchmarks/memory_check.py --quick: batches of 1 and 4 on a 256-wide random LLaDA
    (float32, canvas 288, no cache); what a request adds, (peak(4) - peak(1)) / 3, against
    `decode_row_bytes`. Tolerance 20%: at this size one request is ~6 MiB and the allocator's
    slack moves a peak by ~1 MiB between runs (benchmarks/README.md has the larger sizes)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # spawned workers inherit sys.path
    try:
        import memory_check

        one, four = memory_check.measure(memory_check.QUICK_CASES)
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))
    per_request = (four["measured"] - one["measured"]) / 3
    predicted = (four["predicted"] - one["predicted"]) / 3
    assert per_request == pytest.approx(predicted, rel=0.2), (one, four)


def test_prediction_matches_the_h200_peaks():
    """benchmarks/results/gpu_check_h200.md: torch.cuda.max_memory_allocated of LLaDA-8B-shaped
    bf16 decoding (prompt 512, gen 256, block 32) and likelihood (prefix 256, mc_batch_size 32)."""
    import re

    with open(os.path.join(REPO, "benchmarks", "results", "gpu_check_h200.md")) as f:
        text = f.read()

    def measured(check):
        return float(re.search(rf"\| {re.escape(check)} \| [^|]+ \| ([\d.]+) GiB", text).group(1)) * mp.GIB

    shape = mp.Shape.released("LLaDA-8B-Instruct")
    for batch, cache, check in [(1, "none", "batch 1: cache=none, 1 token/step"),
                                (1, "dual", "batch 1: cache=dual, threshold=0.9"),
                                (16, "none", "batch 16: cache=none, 1 token/step"),
                                (16, "dual", "batch 16: cache=dual, threshold=0.9")]:
        peak = mp.decode_peak(shape, mp.RunPlan(prompt=512, gen_length=256, cache=cache), batch)
        assert peak == pytest.approx(measured(check), rel=0.02), check
    peak = mp.likelihood_peak(shape, mp.RunPlan(prompt=256, gen_length=6, mc_batch_size=32))
    assert peak == pytest.approx(measured("mc_batch_size 32"), rel=0.02)
