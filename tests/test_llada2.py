"""The LLaDA2.x backbone on tiny official-format checkpoints (CPU, float32).

Parity with the official modeling code (dllm's llada2/llada21, MemDLM's llada21) is measured
outside the suite; these tests hold what the decoder relies on: the official format round trip,
family detection, the router's official semantics, the block-causal pattern, an exact KV cache
for it, and left-padded rows equal to the same rows run alone.
"""

from __future__ import annotations

import json

import pytest
import torch
from _batches import copy_with_config, left_padded_batch as _batch, logits as _logits
from safetensors import safe_open

from lm_eval_dlmem.backbones import detect_family, load_backbone
from lm_eval_dlmem.backbones.common import DiffusionCache
from lm_eval_dlmem.backbones.llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM, block_causal_mask
from lm_eval_dlmem.backbones.loading import model_class
from lm_eval_dlmem.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llada2", tmp_path_factory.mktemp("llada2") / "tiny", seed=0)


@pytest.fixture(scope="module")
def bb(ckpt):
    return load_backbone(ckpt, dtype="float32")




# --- official format -----------------------------------------------------------------------


def test_tiny_checkpoint_is_in_the_official_format(ckpt, bb):
    with open(f"{ckpt}/config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["LLaDA2MoeModelLM"] and config["model_type"] == "llada2_moe"
    for key in ("n_group", "topk_group", "routed_scaling_factor", "num_shared_experts", "moe_intermediate_size",
                "first_k_dense_replace", "partial_rotary_factor", "use_qk_norm", "use_qkv_bias", "use_bias",
                "score_function", "moe_router_enable_expert_bias"):
        assert key in config, key
    assert "mask_token_id" not in config  # the mask comes from the tokenizer, as on the hub
    with safe_open(f"{ckpt}/model.safetensors", "pt") as f:
        names = set(f.keys())
    for name in ("model.word_embeddings.weight", "model.layers.0.attention.query_key_value.weight",
                 "model.layers.0.attention.query_layernorm.weight", "model.layers.0.attention.dense.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.mlp.gate.expert_bias", "model.layers.1.mlp.experts.7.down_proj.weight",
                 "model.layers.1.mlp.shared_experts.up_proj.weight", "lm_head.weight"):
        assert name in names, name
    vocab = bb.tokenizer.get_vocab()
    assert {"<|mask|>", "<|endoftext|>", "<|role_end|>"} <= set(vocab)
    spec = bb.spec
    assert (spec.mask_id, spec.eos_id, spec.eot_id) == (vocab["<|mask|>"], vocab["<|endoftext|>"], vocab["<|role_end|>"])
    assert bb.tokenizer.pad_token_id == spec.eos_id and bb.tokenizer.padding_side == "left"
    prompt = bb.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert prompt == "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>"


def test_save_load_round_trip(bb, ckpt, tmp_path):
    bb.model.save_pretrained(tmp_path)
    again = LLaDA2MoeModelLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = _batch(bb)
    with torch.no_grad():
        for block_length in (None, 4):
            kw = {} if block_length is None else {"block_length": block_length}
            assert torch.equal(bb.model(input_ids=ids, attention_mask=mask, **kw).logits,
                               again(input_ids=ids, attention_mask=mask, **kw).logits)
    names = [set(safe_open(f"{p}/model.safetensors", "pt").keys()) for p in (ckpt, tmp_path)]
    assert names[0] == names[1]


def test_from_pretrained_loads_the_expert_bias(bb, ckpt):
    """The router's `expert_bias` is a buffer stored in the checkpoint; from_pretrained must load
    it rather than leave it at its initial zeros."""
    from safetensors.torch import load_file

    stored = load_file(f"{ckpt}/model.safetensors")["model.layers.1.mlp.gate.expert_bias"]
    assert stored.abs().max() > 0
    assert torch.equal(bb.model.model.layers[1].mlp.gate.expert_bias, stored)
    built = LLaDA2MoeModelLM(bb.model.config).eval()
    built.load_state_dict(load_file(f"{ckpt}/model.safetensors"), strict=True)
    ids, mask = _batch(bb)
    with torch.no_grad():
        assert torch.equal(bb.model(input_ids=ids, attention_mask=mask).logits,
                           built(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("model_type", ["llada2_moe", "llada21_moe", "llada2_moe_21"])
def test_detection_of_every_released_model_type(model_type, ckpt, tmp_path):
    """LLaDA2 configs have MoE keys and "LLaDA" in their architecture, which the LLaDA-MoE rule
    also matches: LLaDA2 must win for each model_type in the wild."""
    path = copy_with_config(ckpt, tmp_path / model_type, model_type=model_type)
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    assert detect_family(config) == "llada2"
    assert detect_family(dict(config, model_type="something_else")) == "llada2"  # by architecture
    loaded = load_backbone(path, dtype="float32")
    assert loaded.family == "llada2" and isinstance(loaded.model, model_class("llada2"))


def test_official_config_defaults_and_traps():
    config = LLaDA2MoeConfig(num_attention_heads=8, hidden_size=64, num_key_value_heads=0)
    assert config.num_key_value_heads == 8  # the 2.0 class's 0 means "as many as query heads"
    assert (config.use_bias, config.partial_rotary_factor, config.head_dim) == (True, 0.5, 8)
    assert config.rotary_dim == 4


@pytest.mark.parametrize("changes,match", [
    ({"score_function": "softmax"}, "score_function='softmax'"),
    ({"norm_topk_prob": False}, "norm_topk_prob=false"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"n_group": 3}, "n_group=3"),
    ({"topk_group": 5}, "topk_group=5"),
])
def test_clear_errors_for_unsupported_configs(changes, match, ckpt, tmp_path):
    path = copy_with_config(ckpt, tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=match):
        load_backbone(path)


# --- router ---------------------------------------------------------------------------------


def test_router_is_sigmoid_group_limited_with_bias_and_scaling(bb):
    """Gate weights 0 -> every score sigmoid(0) = 0.5; the bias alone picks. Groups of 2 experts:
    {0,1} {2,3} {4,5} {6,7}, scored by the sum of their two best biased scores; the best 2 groups
    are searched. Expert 0 has the single highest bias, but its group (0.9) loses to {2,3} (1.0)
    and {4,5} (0.92), so experts 2 and 4 are picked. Weights are the *unbiased* scores
    renormalised (0.5 / 1.0) times routed_scaling_factor (2.5)."""
    gate = bb.model.model.layers[1].mlp.gate
    saved = gate.weight.detach().clone(), gate.expert_bias.clone()
    try:
        with torch.no_grad():
            gate.weight.zero_()
            gate.expert_bias.copy_(torch.tensor([0.9, 0.0, 0.55, 0.45, 0.5, 0.42, 0.1, 0.1]) - 0.5)
            weights, experts = gate(torch.randn(3, gate.weight.shape[1]))
    finally:
        with torch.no_grad():
            gate.weight.copy_(saved[0])
            gate.expert_bias.copy_(saved[1])
    assert experts.tolist() == [[2, 4]] * 3
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.full((3, 2), 1.25))


# --- attention pattern, cache, padding --------------------------------------------------------


def test_block_causal_mask_aligns_blocks_to_each_rows_first_token():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    m = block_causal_mask(mask, 0, 7, 7, 2, "cpu")[:, 0]  # [B, q, k]
    # row 0: real tokens from 2, blocks {2,3} {4,5} {6}; row 1: {0,1} {2,3} {4,5} {6}
    assert m[0, 4].tolist() == [False, False, True, True, True, True, False]
    assert m[0, 2].tolist() == [False, False, True, True, False, False, False]
    assert m[1, 2].tolist() == [True, True, True, True, False, False, False]
    assert m[1, 6].tolist() == [True] * 7
    assert m[0, 0].tolist() == m[0, 2].tolist()  # a pad query sees block 0 (never an empty row)
    window = block_causal_mask(mask, 4, 2, 7, 2, "cpu")  # queries 4, 5 over all 7 keys
    assert torch.equal(window, block_causal_mask(mask, 0, 7, 7, 2, "cpu")[:, :, 4:6])


@pytest.mark.parametrize("block_length", [4, 5, 32])
def test_attention_is_block_causal(block_length, bb):
    """Changing a token changes no logit of an earlier block, and does change the logits of its
    own block (bidirectional inside a block) and of later blocks."""
    ids, _ = _batch(bb, lengths=(24,))
    n = block_length
    base = _logits(bb, ids, block_length=n)
    L = ids.shape[1]
    for pos in sorted({min(n - 1, L - 1), min(2 * n, L - 1)}):
        changed = ids.clone()
        changed[0, pos] = (ids[0, pos] + 1) % 380
        diff = (_logits(bb, changed, block_length=n) - base).abs().amax(-1)[0]  # [L]
        start = pos // n * n  # first position of the changed token's block
        assert torch.all(diff[:start] == 0)
        assert torch.all(diff[start:] > 1e-6)


def test_without_block_length_attention_is_bidirectional(bb):
    ids, _ = _batch(bb, lengths=(16,))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 380
    assert (_logits(bb, ids)[0, 0] - _logits(bb, changed)[0, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("block_length", [None, 4, 7, 32])
def test_left_padded_rows_equal_each_row_alone(block_length, bb):
    ids, mask = _batch(bb)
    batched = _logits(bb, ids, mask, block_length=block_length)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        alone = _logits(bb, ids[row : row + 1, -n:], block_length=block_length)
        torch.testing.assert_close(batched[row, -n:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_kv_cache_is_exact_for_block_causal_decoding(mode, bb):
    """Block-by-block decoding of a left-padded batch (each row's blocks start at its first real
    token): the cache is filled once per block, then tokens of the active block change and only
    the window (the union of the rows' active blocks, and for `prefix` everything after it) is
    forwarded. With block-causal attention that equals a full forward of the new canvas at every
    depth (the two-layer model here), unlike the bidirectional families' approximate caches."""
    n = 4
    ids, mask = _batch(bb, lengths=(24, 21, 14))
    B, L = ids.shape
    first = (mask == 0).sum(-1)  # first real position per row
    canvas = ids.clone()
    prompt = 6  # real prompt tokens per row; the rest is the masked generation region
    for r in range(B):
        canvas[r, first[r] + prompt :] = bb.spec.mask_id
    for k in range(prompt // n, (L - int(first.min())) // n):
        starts = [int(first[r]) + k * n for r in range(B)]
        s, e = min(starts), min(max(starts) + n, L)
        if s >= L:
            break
        cache = DiffusionCache()
        _logits(bb, canvas, mask, cache=cache, block_length=n)
        for r in range(B):  # commit two tokens of each row's active block
            lo = max(starts[r], int(first[r]) + prompt)
            canvas[r, lo : lo + 2] = ids[r, lo : lo + 2]
        window = (s, L) if mode == "prefix" else (s, e)
        got = _logits(bb, canvas, mask, cache=cache, window=window, block_length=n)
        full = _logits(bb, canvas, mask, block_length=n)[:, window[0] : window[1]]
        if mode == "prefix":
            torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
        for r in range(B):  # a row's active block is exact in both modes (in `dual`, a row's
            a, b = starts[r] - s, min(starts[r] + n, L) - s  # next block may read stale keys)
            torch.testing.assert_close(got[r, a:b], full[r, a:b], atol=1e-5, rtol=0)


def test_bidirectional_families_refuse_a_block_length(tmp_path):
    path = make_tiny_checkpoint("llada_moe", tmp_path / "moe", seed=0)
    other = load_backbone(path, dtype="float32")
    with pytest.raises(ValueError, match="block_length=4.*attends bidirectionally"):
        _logits(other, torch.zeros(1, 8, dtype=torch.long), block_length=4)


# --- samplers: strategy=llada2 / llada21 -----------------------------------------------------
# Token identity with the official samplers is measured outside the suite (README, Numbers);
# these tests hold the rules and the batching contract.

from lm_eval_dlmem.decoding import DecodeConfig, generate  # noqa: E402
from lm_eval_dlmem.decoding.engine import left_pad  # noqa: E402

V, MASK, EOS = 32, 31, 30


class CountingMock:
    """A block-causal stand-in: every position of the active block predicts token
    10 + (masks left in the canvas) with probability ~0.998, slightly less for later positions (so
    one-at-a-time commits go left to right); a token placed early is 'wrong' once later masks
    are filled, and an editing sampler rewrites it."""

    class spec:  # noqa: N801
        mask_id, eos_id, eot_id, logit_shift, block_causal = MASK, EOS, None, False, True
        stop_ids = (EOS,)

    family = "mock"
    tokenizer = None
    device = torch.device("cpu")

    def logits(self, x, attn=None, *, cache=None, window=None, keep=None, block_length=None):
        assert block_length is not None
        a, b = keep
        left = (x == MASK).sum(-1)  # [B]
        table = torch.zeros(x.shape[0], b - a, V)
        table[torch.arange(x.shape[0]), :, (10 + left).clamp_max(29)] = 10.0 - 0.1 * torch.arange(b - a).float()
        return table


def _mock_generate(strategy, **kw):
    cfg = DecodeConfig(**{"strategy": strategy, "gen_length": 4, "block_length": 4, "steps": 4,
                          "threshold": 0.999, "stop_early": False, **kw})
    return generate(CountingMock(), torch.tensor([[1, 2, 3, 4]]), None, cfg)[0].tolist()


def test_llada2_commits_one_per_step_below_threshold_and_never_edits():
    # one token per step (schedule 1,1,1,1; p < 0.999), each predicted with the masks left then
    assert _mock_generate("llada2") == [14, 13, 12, 11]
    assert _mock_generate("llada2", threshold=0.9) == [14] * 4  # all four clear 0.9 in the first step


def test_llada21_edits_placed_tokens_after_the_masks_are_gone():
    # the same commits, then post steps rewrite every token to the final prediction (no mask left: 10)
    assert _mock_generate("llada21", editing_threshold=0.9) == [10] * 4
    # no post step: the block ends as soon as its last mask is filled; edits during the fill only
    assert _mock_generate("llada21", editing_threshold=0.9, max_post_steps=0) == [11] * 4
    assert _mock_generate("llada21", editing_threshold=0.999) == [14, 13, 12, 11]  # nothing clears it


def test_block_strategy_configs():
    assert DecodeConfig(strategy="llada2").threshold == 0.95  # the official default
    assert DecodeConfig(strategy="llada21").threshold == 0.95
    assert DecodeConfig(strategy="threshold").threshold == 0.9
    DecodeConfig(strategy="llada2", gen_length=21, block_length=8, steps=5)  # no multiple needed
    with pytest.raises(ValueError, match="strategy=llada21 has no cfg_scale=1.0"):
        DecodeConfig(strategy="llada21", cfg_scale=1.0)
    with pytest.raises(ValueError, match="editing_threshold=1.5"):
        DecodeConfig(strategy="llada21", editing_threshold=1.5)
    with pytest.raises(ValueError, match="max_post_steps=-1"):
        DecodeConfig(strategy="llada21", max_post_steps=-1)


def test_block_strategies_refuse_a_bidirectional_backbone(tmp_path):
    other = load_backbone(make_tiny_checkpoint("llada_moe", tmp_path / "moe", seed=0), dtype="float32")
    with pytest.raises(ValueError, match="strategy=llada2 decodes with block-causal attention.*llada_moe.*"
                                         "strategy= one of llada, dream, threshold"):
        generate(other, torch.tensor([[1, 2, 3]]), None, DecodeConfig(strategy="llada2", gen_length=4, block_length=4))


@pytest.mark.parametrize("strategy", ["llada", "threshold", "dream"])
def test_bidirectional_strategies_refuse_a_block_causal_backbone(strategy, bb):
    """llada/threshold/dream forward without block_length, i.e. with bidirectional attention,
    which LLaDA2.x does not decode with: refused, naming the strategies that fit."""
    with pytest.raises(ValueError, match=f"strategy={strategy} decodes with bidirectional attention.*llada2.*"
                                         "strategy= one of llada2, llada21"):
        generate(bb, torch.tensor([[1, 2, 3]]), None, DecodeConfig(strategy=strategy, gen_length=4, block_length=4, steps=4))


def test_threshold_default_depends_on_the_strategy():
    """threshold=None resolves once, in DecodeConfig: the official 0.95 for the LLaDA2.x
    samplers, 0.9 (Fast-dLLM's) otherwise; an explicit value is kept."""
    assert DecodeConfig(strategy="llada2").threshold == 0.95
    assert DecodeConfig(strategy="llada21").threshold == 0.95
    assert DecodeConfig(strategy="threshold").threshold == 0.9
    assert DecodeConfig(strategy="llada21", threshold=0.5).threshold == 0.5


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """Larger initial weights, so probabilities clear thresholds and the editing phase acts."""
    path = make_tiny_checkpoint("llada2", tmp_path_factory.mktemp("peaked") / "tiny", seed=5, initializer_range=0.25)
    return load_backbone(path, dtype="float32")


PROMPT_LENGTHS = (5, 9, 12, 16, 3)
BLOCK_CASES = [
    dict(strategy="llada2", gen_length=21, block_length=8, steps=4, threshold=0.6),
    dict(strategy="llada2", gen_length=16, block_length=4, steps=2, threshold=0.95),
    dict(strategy="llada21", gen_length=21, block_length=8, threshold=0.6, editing_threshold=0.5, max_post_steps=2),
    dict(strategy="llada21", gen_length=16, block_length=4, threshold=0.3, editing_threshold=0.3),
]


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 380, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("case", BLOCK_CASES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_batch_equals_its_rows_one_by_one(case, temperature, peaked):
    """Left-padded rows have their own block geometry (blocks from their own first token) and
    their own generator: batched output equals each row decoded alone. (Cached windows forward
    other shapes alone than batched, and on random weights two masked positions of a block can
    be a 1e-8 near-tie that float order flips; cache modes are compared on one batch below.)"""
    prompts = _prompts()
    cfg = DecodeConfig(**case, temperature=temperature, stop_early=False)
    ids, mask = left_pad(prompts, peaked.spec.eos_id)
    seeds = [7 + i for i in range(len(prompts))]
    batched = generate(peaked, ids, mask, cfg, seeds=seeds)
    for r, p in enumerate(prompts):
        alone = generate(peaked, torch.tensor([p]), None, cfg, seeds=[seeds[r]])
        assert batched[r].tolist() == alone[0].tolist(), r


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_cache_modes_are_exact(case, peaked):
    """Finished blocks never change under block-causal attention: the cached window forwards
    give the tokens of full forwards, not an approximation."""
    ids, mask = left_pad(_prompts(1), peaked.spec.eos_id)
    outs = [generate(peaked, ids, mask, DecodeConfig(**case, cache=c, stop_early=False)).tolist()
            for c in ("none", "prefix", "dual")]
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_early_exit_keeps_the_text_up_to_the_stop(case, peaked):
    """Rows leave the batch once a finished block holds EOS/EoT; later blocks cannot change
    earlier ones, so the text through the stop token is that of the full decode."""
    ids, mask = left_pad(_prompts(2), peaked.spec.eos_id)
    full = generate(peaked, ids, mask, DecodeConfig(**case, stop_early=False))
    early = generate(peaked, ids, mask, DecodeConfig(**case, stop_early=True))
    stops = set(peaked.spec.stop_ids)
    for a, b in zip(full.tolist(), early.tolist()):
        cut = next((i + 1 for i, t in enumerate(a) if t in stops), len(a))
        assert a[:cut] == b[:cut]
