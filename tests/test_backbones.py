"""What our own backbones guarantee, on tiny official-format checkpoints (CPU, float32).

Parity with the official modeling code is measured outside the suite (that code is not ours to
ship); these tests hold the properties the decoder, the harness and training rely on.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _batches import copy_with_config, left_padded_batch as _batch, logits as _logits
from safetensors import safe_open

from lm_eval_dlmem.backbones import detect_family, load_backbone
from lm_eval_dlmem.backbones.common import DiffusionCache
from lm_eval_dlmem.backbones.loading import model_class
from lm_eval_dlmem.testing import make_tiny_checkpoint

FAMILIES = ["llada", "dream", "llada_moe"]
N_LAYERS_KEY = {"llada": "n_layers", "dream": "num_hidden_layers", "llada_moe": "num_hidden_layers"}
# PEFT target names as released adapters spell them (the official module names).
LORA_TARGETS = {
    "llada": ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"],
    "dream": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llada_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.fixture(scope="module")
def backbones(tiny_ckpts):
    return {fam: load_backbone(tiny_ckpts[fam], dtype="float32") for fam in FAMILIES}


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """Single-layer checkpoints: their keys/values depend on the token alone, so a cached window
    forward is exact even after tokens inside the window changed."""
    root = tmp_path_factory.mktemp("one_layer")
    paths = {f: make_tiny_checkpoint(f, root / f, seed=1, **{N_LAYERS_KEY[f]: 1}) for f in FAMILIES}
    return {f: load_backbone(p, dtype="float32") for f, p in paths.items()}




@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, backbones, tiny_ckpts, tmp_path):
    bb = backbones[family]
    bb.model.save_pretrained(tmp_path)
    again = model_class(family).from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = _batch(bb)
    with torch.no_grad():
        assert torch.equal(bb.model(input_ids=ids, attention_mask=mask).logits,
                           again(input_ids=ids, attention_mask=mask).logits)
    # the official parameter names survive the round trip unchanged
    names = [set(safe_open(f"{p}/model.safetensors", "pt").keys()) for p in (tiny_ckpts[family], tmp_path)]
    assert names[0] == names[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_equals_a_model_built_in_memory(family, backbones, tiny_ckpts):
    """from_pretrained builds on the meta device; anything it leaves uninitialised (a buffer
    that is not in the checkpoint, say) shows up as a difference from a model built directly."""
    from safetensors.torch import load_file

    loaded = backbones[family].model
    built = model_class(family)(loaded.config).eval()
    built.load_state_dict(load_file(f"{tiny_ckpts[family]}/model.safetensors"), strict=True)
    ids, mask = _batch(backbones[family])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           built(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_matches_unpadded_rows(family, backbones):
    bb = backbones[family]
    ids, mask = _batch(bb)
    batched = _logits(bb, ids, mask)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        alone = _logits(bb, ids[row : row + 1, -n:])
        torch.testing.assert_close(batched[row, -n:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_is_bidirectional(family, backbones):
    bb = backbones[family]
    ids, _ = _batch(bb, lengths=(16,))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 380
    first = _logits(bb, ids)[0, 0]
    assert (first - _logits(bb, changed)[0, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_shift(family, backbones):
    """logits[:, i] predicts token i: Dream's raw logits are shifted right by one, as its sampler
    does with cat([l[:, :1], l[:, :-1]]); the other families are returned as they are."""
    bb = backbones[family]
    ids, _ = _batch(bb, lengths=(12, 12))
    with torch.no_grad():
        raw = bb.model(input_ids=ids).logits
    expected = torch.cat([raw[:, :1], raw[:, :-1]], 1) if family == "dream" else raw
    assert bb.spec.logit_shift == (family == "dream")
    assert torch.equal(_logits(bb, ids), expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [(0, 5), (1, 9), (7, 24), (23, 24), (0, 24), (4, 4)])
def test_keep_equals_slicing(family, keep, backbones):
    bb = backbones[family]
    ids, mask = _batch(bb)
    full = _logits(bb, ids, mask)
    torch.testing.assert_close(_logits(bb, ids, mask, keep=keep), full[:, keep[0] : keep[1]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("window", [(16, 24), (12, 18), (0, 8), (1, 24)])
def test_cached_window_with_unchanged_canvas_is_exact(family, window, backbones):
    """Prefix (s, L) and dual (s, e) windows over a cache filled from the same canvas."""
    bb = backbones[family]
    ids, mask = _batch(bb)
    full = _logits(bb, ids, mask)
    cache = DiffusionCache()
    _logits(bb, ids, mask, cache=cache)
    s, e = window
    torch.testing.assert_close(_logits(bb, ids, mask, cache=cache, window=window), full[:, s:e], atol=1e-5, rtol=0)
    keep = (s + 1, e - 1)
    torch.testing.assert_close(
        _logits(bb, ids, mask, cache=cache, window=window, keep=keep), full[:, keep[0] : keep[1]], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_windows_track_a_decoding_canvas(family, one_layer):
    """Block-by-block decoding: a window forward after tokens changed inside the window equals a
    full forward of the new canvas. Exact for a one-layer model only: deeper layers' cached
    keys/values of other positions were computed from the old window tokens (the approximation
    Fast-dLLM's prefix and dual caches make)."""
    bb = one_layer[family]
    ids, mask = _batch(bb)
    L, mask_id = ids.shape[1], bb.spec.mask_id
    canvas = ids.clone()
    canvas[:, 8:] = mask_id
    for mode in ("prefix", "dual"):
        x, cache = canvas.clone(), DiffusionCache()
        _logits(bb, x, mask, cache=cache)
        for s in range(8, L, 4):
            window = (s, L) if mode == "prefix" else (s, s + 4)
            x[:, s : s + 2] = ids[:, s : s + 2]  # commit two tokens of the block
            got = _logits(bb, x, mask, cache=cache, window=window)
            torch.testing.assert_close(got, _logits(bb, x, mask)[:, window[0] : window[1]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_window_reads_only_the_window(family, backbones):
    """Tokens outside the forwarded positions are taken from the cache, never re-read."""
    bb = backbones[family]
    ids, mask = _batch(bb)
    s, e = 16, 20
    other = ids.clone()
    other[:, : s - 1] = bb.spec.mask_id  # s-1 stays: a shifted model forwards it too
    other[:, e:] = bb.spec.mask_id
    results = []
    for x in (ids, other):
        cache = DiffusionCache()
        _logits(bb, ids, mask, cache=cache)
        results.append(_logits(bb, x, mask, cache=cache, window=(s, e)))
    assert torch.equal(results[0], results[1])


def test_window_on_an_empty_cache_fills_it(backbones):
    bb = backbones["llada"]
    ids, _ = _batch(bb, lengths=(10,))
    cache = DiffusionCache()
    torch.testing.assert_close(_logits(bb, ids, cache=cache, window=(4, 8)), _logits(bb, ids)[:, 4:8])
    assert len(cache) == bb.config.num_hidden_layers and cache.length == 10


@pytest.mark.parametrize("family", FAMILIES)
def test_dtype_and_torch_dtype_are_both_accepted(family, tiny_ckpts):
    path = tiny_ckpts[family]
    for kwargs in ({"dtype": "bfloat16"}, {"torch_dtype": torch.bfloat16}, {"torch_dtype": "bf16"}):
        assert load_backbone(path, **kwargs).model.dtype == torch.bfloat16, kwargs
    for kwargs in ({"dtype": torch.bfloat16}, {"torch_dtype": torch.bfloat16}):
        assert model_class(family).from_pretrained(path, **kwargs).dtype == torch.bfloat16, kwargs
    with pytest.raises(ValueError, match="disagree"):
        load_backbone(path, dtype="float32", torch_dtype="bfloat16")


def test_family_detection(tiny_ckpts):
    configs = {f: json.load(open(f"{tiny_ckpts[f]}/config.json")) for f in FAMILIES}
    assert configs["llada"]["model_type"] == configs["llada_moe"]["model_type"] == "llada"
    assert {f: detect_family(c) for f, c in configs.items()} == {f: f for f in FAMILIES}
    renamed = dict(configs["llada_moe"], model_type="lladamoe")  # dllm re-registers it under this name
    assert detect_family(renamed) == "llada_moe"
    for family in FAMILIES:
        bb = load_backbone(tiny_ckpts[family])
        assert bb.family == family and isinstance(bb.model, model_class(family))


def _cpu_nf4_unsupported_reason() -> str | None:
    """Why bitsandbytes cannot quantise to NF4 on this machine's CPU, or None when it can."""
    try:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as e:  # missing package, no CPU backend in this build, ...
        return f"bitsandbytes cannot run NF4 on CPU here: {type(e).__name__}: {e}"
    return None


# bitsandbytes' CPU kernel on AVX-512-bf16 machines packs 4-bit weights in blocks of 32 output
# rows and 64 input columns, so every quantised linear of the 4-bit test checkpoints has such
# sizes (the shared tiny MoE's 4-expert router has 4 rows, its experts 32 columns): the test
# then runs the same on every CPU. Real LLaDA-MoE has 64 experts of width 1024.
NF4_SIZES = {"llada": {}, "dream": {}, "llada_moe": {"num_experts": 32, "expert_intermediate_size": 64}}


@pytest.fixture(scope="module")
def nf4_ckpts(tiny_ckpts, tmp_path_factory):
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("nf4")
    return {f: make_tiny_checkpoint(f, root / f, seed=0, **s) if s else tiny_ckpts[f] for f, s in NF4_SIZES.items()}


def test_4bit_config_matches_the_released_memdlm_loading():
    """JarvisPei/MemDLM (memdlm/models.py, via dllm) loads NF4 with double quantisation and no
    llm_int8_skip_modules: only transformers' default skips (the LM head) stay in full precision;
    the MoE router is quantised like every other linear."""
    from lm_eval_dlmem.backbones.loading import quantization_config

    cfg = quantization_config(True, torch.bfloat16)
    assert (cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant, cfg.llm_int8_skip_modules) == ("nf4", True, None)


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_loading_on_cpu(family, nf4_ckpts):
    reason = _cpu_nf4_unsupported_reason()
    if reason:
        print(reason)
        pytest.skip(reason)
    import bitsandbytes as bnb

    bb = load_backbone(nf4_ckpts[family], load_in_4bit=True)
    q_proj = bb.layers[0].q_proj if family == "llada" else bb.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    if family == "llada_moe":  # as in the released MemDLM loading (see the test above)
        assert isinstance(bb.layers[0].mlp.gate, bnb.nn.Linear4bit)
    ids, mask = _batch(bb)
    ref_bb = load_backbone(nf4_ckpts[family], dtype="float32")
    got, ref = _logits(bb, ids, mask).float(), _logits(ref_bb, ids, mask)
    assert torch.isfinite(got).all()
    # NF4 rounds every weight; the logits stay close to the float32 model's
    assert (got - ref).abs().max() < 0.3 * ref.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_released_format_lora_adapter_applies_unchanged(family, tiny_ckpts, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    trained = load_backbone(tiny_ckpts[family], dtype="float32")
    # init_lora_weights=False draws B at random, so the adapter visibly changes the logits
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[family], init_lora_weights=False)
    peft_model = get_peft_model(trained.model, config)
    peft_model.save_pretrained(tmp_path)
    with safe_open(f"{tmp_path}/adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    block = "model.transformer.blocks.0.q_proj" if family == "llada" else "model.layers.0.self_attn.q_proj"
    assert f"base_model.model.{block}.lora_A.weight" in keys
    ids, mask = _batch(trained)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits

    fresh = load_backbone(tiny_ckpts[family], dtype="float32")
    base = _logits(fresh, ids, mask)
    fresh.model = PeftModel.from_pretrained(fresh.model, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh.model(input_ids=ids, attention_mask=mask).logits, expected)
    assert (_logits(fresh, ids, mask) - base).abs().max() > 1e-3
    assert len(fresh.layers) == fresh.config.num_hidden_layers  # blocks reachable through the wrapper


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_backward(family, tiny_ckpts):
    bb = load_backbone(tiny_ckpts[family], dtype="float32")
    bb.model.train()
    ids, mask = _batch(bb)

    def grads():
        bb.model.zero_grad()
        _loss(bb, ids, mask).backward()
        return {n: p.grad.clone() for n, p in bb.model.named_parameters() if p.grad is not None}

    plain = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it; PEFT/Trainer call this name
        bb.model.gradient_checkpointing_enable()
    calls = []
    hook = bb.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    checkpointed = grads()
    hook.remove()
    assert len(calls) == 2  # the block ran again during backward
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(bb.model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def _loss(bb, ids, mask):
    logits = bb.logits(ids, mask)
    return torch.nn.functional.cross_entropy(logits[mask.bool()], ids[mask.bool()])


def test_clear_errors_for_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing directory. Check the path"):
        load_backbone(str(tmp_path / "no" / "such" / "ckpt"))
    with pytest.raises(FileNotFoundError, match="without config.json; point pretrained="):
        load_backbone(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="locally or on the Hugging Face Hub"):
        load_backbone("nobody-has/this-model")


def test_clear_error_for_an_unknown_architecture(tiny_ckpts, tmp_path):
    path = copy_with_config(tiny_ckpts["dream"], tmp_path / "llama", model_type="llama",
                         architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="none of the supported families.*family="):
        load_backbone(path)
    with pytest.raises(ValueError, match="choose one of"):
        load_backbone(tiny_ckpts["dream"], family="gpt2")


@pytest.mark.parametrize("family,key", [("llada", "activation_type"), ("dream", "hidden_act"),
                                        ("llada_moe", "hidden_act")])
def test_clear_error_for_a_non_silu_activation(family, key, tiny_ckpts, tmp_path):
    path = copy_with_config(tiny_ckpts[family], tmp_path / family, **{key: "gelu"})
    with pytest.raises(ValueError, match="gelu") as err:
        load_backbone(path)
    assert "silu" in str(err.value)


def test_clear_error_for_float16_on_cpu(tiny_ckpts):
    for dtype in ("float16", torch.float16):
        with pytest.raises(ValueError, match="use dtype=float32 or bfloat16 on CPU"):
            load_backbone(tiny_ckpts["llada"], dtype=dtype, device="cpu")


def test_clear_error_for_a_device_that_is_not_there(tiny_ckpts, monkeypatch):
    with pytest.raises(ValueError, match="is not a device torch knows"):
        load_backbone(tiny_ckpts["llada"], device="tpu9")
    # as on a CPU-only machine, whatever this one has
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="asks for a GPU, but this torch sees none"):
        load_backbone(tiny_ckpts["llada"], device="cuda:1")
    # two GPUs visible, the third asked for
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"only 2 GPU\(s\) are visible"):
        load_backbone(tiny_ckpts["llada"], device="cuda:2")


# ---- the public seam below the logits (memories and training use it, never private methods) ----

@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_in_two_spans_then_head_are_the_forward(family, backbones):
    """Blocks [0, k) then [k, n), the final norm and the head give the raw forward's logits bit for
    bit, on a left-padded batch (Dream's positions come from the mask)."""
    bb = backbones[family]
    ids, mask = _batch(bb)
    with torch.no_grad():
        raw = bb.model(input_ids=ids, attention_mask=mask).logits
        low = bb.hidden_states(ids, mask, end_layer=1)
        top = bb.hidden_states(None, mask, start_layer=1, hidden=low, checkpoint=True)
        assert torch.equal(bb.head(bb.final_norm(top)), raw)
        assert torch.equal(bb.hidden_states(ids, mask), top)
    with pytest.raises(ValueError, match="start_layer=1 needs hidden="):
        bb.hidden_states(ids, mask, start_layer=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_align_and_source_positions_agree_with_logits(family, backbones):
    """`align` (whole tensors) and `source_positions` (picked positions) realign raw outputs the
    way `logits` does, padded rows' first real token included."""
    bb = backbones[family]
    ids, mask = _batch(bb)
    with torch.no_grad():
        raw = bb.model(input_ids=ids, attention_mask=mask).logits
        logits = bb.logits(ids, mask)
    assert torch.equal(bb.align(raw, mask), logits)
    rows, cols = mask.bool().nonzero(as_tuple=True)
    src = bb.source_positions(cols, mask.argmax(1)[rows])
    assert torch.equal(raw[rows, src], logits[rows, cols])
    L = ids.shape[1]
    assert bb.forwarded(L) == bb.forwarded(L, (8, 16)) == (0, L)
    assert bb.forwarded(L, (8, 16), cached=True) == ((7, 16) if family == "dream" else (8, 16))


def test_memory_and_training_code_use_only_the_public_seam():
    """The shift and the block internals stay behind `Backbone`: no memory or MemDLM training
    code re-implements them."""
    import pathlib

    import lm_eval_dlmem

    root = pathlib.Path(lm_eval_dlmem.__file__).parent
    files = sorted((root / "memory").glob("*.py")) + [root / "training" / "memdlm.py"]
    private = ("._embed", "._blocks", "._final_norm", "._head", "logit_shift", "default_positions")
    found = [f"{p.name}: {name}" for p in files for name in private if name in p.read_text()]
    assert found == []


@pytest.mark.parametrize("family, extra", [
    ("dream", {}),
    ("llada_moe", {"bos_token_id": 7, "eos_token_id": 8, "moe_layer_freq": (1, 1)}),
    ("llada2", {}),
])
def test_family_configs_store_official_keys(family, extra):
    """The shared config __init__ (`common.init_config`): every named argument under its official
    name, 0/None key/value heads resolved to the query heads, use_cache kept as given, the base
    class's keys and unknown keys passed through, `architectures` defaulted."""
    import importlib

    from lm_eval_dlmem.backbones.spec import FAMILIES

    module, name = FAMILIES[family].model_class.split(":")
    config_class = getattr(importlib.import_module(f"lm_eval_dlmem.backbones.{module}"), name).config_class
    config = config_class(hidden_size=64, num_attention_heads=4, num_key_value_heads=0, use_cache=True,
                          pad_token_id=5, rms_norm_eps=1e-3, custom_key="kept", **extra)
    assert (config.hidden_size, config.num_key_value_heads, config.rms_norm_eps) == (64, 4, 1e-3)
    assert config.use_cache is True and config.pad_token_id == 5 and config.custom_key == "kept"
    assert config.architectures == [name]
    for key, value in extra.items():
        assert getattr(config, key) == (list(value) if isinstance(value, tuple) else value)
    assert config_class.from_dict(config.to_dict()).to_dict() == config.to_dict()
