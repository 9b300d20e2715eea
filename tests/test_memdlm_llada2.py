"""MemDLM on LLaDA2.x (tiny official-format checkpoints, CPU): where the fast weights go, the
inner loop against an independent re-derivation, the released LLaDA2.1 adapter format through
`adapter=`, and `train memdlm` on the family (float and 4-bit base).

Against the released code itself (JarvisPei/MemDLM `memdlm/memory.py` on its LLaDA2.1 modeling
file, same masks and initial fast weights) the adapted logits agree to 3e-7 in float32; that
check needs the official code and runs outside the suite (see docs/memdlm.md). The tests below
hold the same behaviour without it.
"""

import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lm_eval_dlmem import load_backbone
from lm_eval_dlmem.memory.adapters import AdapterKeysError, apply_adapter
from lm_eval_dlmem.memory.anchor import anchor_states, prompt_anchor
from lm_eval_dlmem.memory.fast_weights import FastLoRA, FastWeightMemory, MemDLMConfig, ffn_projections
from lm_eval_dlmem.testing import make_tiny_checkpoint
from lm_eval_dlmem.training import memdlm
from lm_eval_dlmem.training.data import collate, toy_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

# The released InnerLoRAManager on LLaDA2.x (mem_inner_target_modules gate_proj,up_proj,down_proj):
# every routed expert and the MoE's `shared_experts` of a block, or a dense block's `mlp`.
RELEASED_FAST = r"model\.layers\.{layer}\.mlp\.(experts\.\d+\.|shared_experts\.|)(gate|up|down)_proj"
# PEFT's target_modules="all-linear" on the official LLaDA2 model (dllm's load_peft, r 32, alpha 64,
# dropout 0.05): the names of every nn.Linear in the blocks; the router is a bare parameter.
RELEASED_OUTER = {"query_key_value", "dense", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llada2", tmp_path_factory.mktemp("llada2") / "tiny", seed=0)


@pytest.fixture(scope="module")
def bb(ckpt):
    return load_backbone(ckpt, dtype="float32")


def _fast_names(bb, config) -> list[str]:
    mem = FastWeightMemory(bb, config)
    mem.install()
    try:
        return [n for n, m in bb.model.named_modules() if isinstance(m, FastLoRA)]
    finally:
        mem.remove()


def test_fast_weights_go_where_the_released_inner_loop_puts_them(bb):
    # tiny: layer 0 dense, layer 1 MoE with 8 experts and a shared expert; fraction 0.1 -> layer 1
    names = _fast_names(bb, MemDLMConfig())
    assert len(names) == 3 * (8 + 1) and all(re.fullmatch(RELEASED_FAST.format(layer=1), n) for n in names)
    assert sum(".shared_experts." in n for n in names) == 3
    everything = _fast_names(bb, MemDLMConfig(inner_layer_fraction=1.0))
    assert [n for n in everything if ".layers.0." in n] == [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    # inner_targets=ffn: every FFN projection, which on LLaDA2.x is the same set (the shared
    # expert's place comes from the spec)
    assert _fast_names(bb, MemDLMConfig(inner_targets="ffn")) == names
    assert len(ffn_projections(bb, 0.1)) == len(names)


def _reference_adapt(bb, ids, states, init, scaling, lr, clip):
    """The inner loop re-derived for one row with forward hooks on the whole model: targets found
    by name, full-model forward (bidirectional, as the released loop's all-zero 4-D mask), token-
    mean masked cross-entropy, per-tensor gradient clip, plain SGD. Returns the adapted logits."""
    modules = dict(bb.model.named_modules())
    fast = {n: [a.clone().requires_grad_(True), b.clone().requires_grad_(True)] for n, (a, b) in init.items()}

    def hook(name):
        def add(module, inputs, out):
            a, b = fast[name]
            return out + scaling * (inputs[0] @ a.T) @ b.T
        return add

    handles = [modules[n].register_forward_hook(hook(n)) for n in fast]
    try:
        for masked in states:
            logits = bb.model(input_ids=torch.where(masked, bb.spec.mask_id, ids)).logits
            loss = F.cross_entropy(logits[masked].float(), ids[masked])
            params = [p for pair in fast.values() for p in pair]
            grads = torch.autograd.grad(loss, params, allow_unused=True)  # an expert no token reached
            with torch.no_grad():
                for p, g in ((p, g) for p, g in zip(params, grads) if g is not None):
                    norm = g.norm()
                    p -= lr * (g * (clip / (norm + 1e-12)) if 0 < clip < norm else g)
        with torch.no_grad():
            return bb.model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("fraction, lr, clip", [(0.1, 0.5, 0.05), (1.0, 0.1, 0.0)])  # clipped / unclipped
def test_inner_loop_matches_an_independent_re_derivation(bb, fraction, lr, clip):
    """Batched, left-padded rows through FastWeightMemory == each row adapted by the reference."""
    config = MemDLMConfig(inner_layer_fraction=fraction, inner_rank=4, inner_lr=lr, inner_grad_clip=clip,
                          inner_adapter_dropout=False)
    lengths = (18, 11)
    P = max(lengths)
    g = torch.Generator().manual_seed(3)
    ids = torch.full((2, P), bb.spec.eos_id)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(10, 300, (n,), generator=g)
        attn[i, P - n:] = 1
    maskable = attn.bool()
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    states = anchor_states(maskable, prompt_anchor(maskable, 0.3, gens), 2, 1.5, gens)
    mem = FastWeightMemory(bb, config)
    mem.install()
    try:
        mem.reset(gens)
        names = [n for n, m in bb.model.named_modules() if isinstance(m, FastLoRA)]
        # a non-zero B, so both factors get a gradient from the first step on
        for layer in mem.layers:
            layer.fast_B = 0.01 * torch.randn(layer.fast_B.shape, generator=g)
        init = [{n: (layer.fast_A[i].clone(), layer.fast_B[i].clone()) for n, layer in zip(names, mem.layers)}
                for i in range(len(lengths))]
        mem.adapt(ids, attn, states, maskable)
        with torch.no_grad():
            got = bb.logits(ids, attn)
    finally:
        mem.remove()
    frozen = bb.model(input_ids=ids[1:, P - lengths[1]:]).logits[0]
    for i, n in enumerate(lengths):
        row = slice(P - n, None)
        ref = _reference_adapt(bb, ids[i:i + 1, row], [s[i:i + 1, row] for s in states], init[i],
                               config.inner_alpha / config.inner_rank, config.inner_lr, config.inner_grad_clip)
        assert (ref[0] - got[i, row]).abs().max() < 1e-5, i
    assert (got[1, P - lengths[1]:] - frozen).abs().max() > 1e-2  # the inner loop did move the logits


def _released_adapter(ckpt, out, r=4, alpha=8.0, rename=None, drop=None, seed=0):
    """An adapter in the format the released LLaDA2.1 training saves (PEFT LoRA, all-linear over
    the official parameter names, keys `base_model.model.<module>.lora_{A,B}.weight`), with random
    factors. Modules are read off the checkpoint's own weight names. `rename` (old, new) / `drop`
    (a substring) corrupt the keys. Returns {module: (A [r, in], B [out, r])}."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(seed)
    factors, tensors = {}, {}
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        for key in f.keys():
            module, _, leaf = key.rpartition(".")
            if leaf != "weight" or ".layers." not in module or module.rsplit(".", 1)[1] not in RELEASED_OUTER:
                continue
            out_f, in_f = f.get_slice(key).get_shape()
            factors[module] = (torch.randn(r, in_f, generator=g) / in_f ** 0.5, 0.1 * torch.randn(out_f, r, generator=g))
    for module, (a, b) in factors.items():
        name = module.replace(*rename) if rename else module
        if drop and drop in name:
            continue
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    config = dict(peft_type="LORA", base_model_name_or_path="inclusionAI/LLaDA2.1-mini", task_type=None, r=r,
                  lora_alpha=alpha, lora_dropout=0.05, bias="none", target_modules=sorted(RELEASED_OUTER),
                  modules_to_save=None, fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
                  use_rslora=False, use_dora=False, layers_to_transform=None, layers_pattern=None,
                  rank_pattern={}, alpha_pattern={}, revision=None)
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return factors


def test_released_llada21_adapter_format_loads_through_adapter(ckpt, bb, tmp_path):
    factors = _released_adapter(ckpt, tmp_path / "adapter")
    assert {m.rsplit(".", 1)[1] for m in factors} == RELEASED_OUTER  # fused qkv, output dense, experts, shared, dense MLP
    adapted = apply_adapter(load_backbone(ckpt, dtype="float32"), str(tmp_path / "adapter"))
    # independent: W + (alpha / r) B A merged into the plain model's weights
    merged = load_backbone(ckpt, dtype="float32")
    state = merged.model.state_dict()
    for module, (a, b) in factors.items():
        state[f"{module}.weight"] = state[f"{module}.weight"] + (8.0 / 4) * b @ a
    merged.model.load_state_dict(state)
    ids = torch.randint(10, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref, frozen = adapted.logits(ids), merged.logits(ids), bb.logits(ids)
    assert (got - ref).abs().max() < 1e-5 and (got - frozen).abs().max() > 1e-2
    # fast weights sit under the outer LoRA (on its base_layer) and leave it exactly as it was
    mem = FastWeightMemory(adapted, MemDLMConfig(inner_adapter_dropout=False))
    attn, pm = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    with torch.inference_mode():
        mem.begin(adapted, ids, attn, pm, [0, 1])
        wrapped = [n for n, m in adapted.model.named_modules() if isinstance(m, FastLoRA)]
        assert len(wrapped) == 27 and all(n.endswith(".base_layer") for n in wrapped)
        assert (adapted.logits(ids) - got).abs().max() > 1e-4
        mem.end()
        assert torch.equal(adapted.logits(ids), got)


@pytest.mark.parametrize("corrupt, named", [
    (dict(rename=("attention.query_key_value", "self_attn.query_key_value")), "query_key_value"),
    (dict(drop="layers.1.mlp.shared_experts"), "shared_experts"),
])
def test_a_mismatching_llada21_adapter_is_refused(ckpt, tmp_path, corrupt, named):
    _released_adapter(ckpt, tmp_path / "adapter", **corrupt)
    with pytest.raises(AdapterKeysError, match=named):
        apply_adapter(load_backbone(ckpt, dtype="float32"), str(tmp_path / "adapter"))


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "response": r}) for p, r in toy_pairs(24, seed=0)) + "\n")
    return str(path)


def _adapter_modules(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as f:
        return {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in f.keys()}


def test_train_memdlm_on_llada2_writes_the_released_adapter_layout(ckpt, toy_data, tmp_path):
    out = tmp_path / "memdlm"
    argv = ["--backbone", ckpt, "--data", toy_data, "--output-dir", str(out), "--batch-size", "2", "--max-length", "128",
            "--lr", "1e-3", "--max-steps", "2", "--eval-batches", "1", "--eval-every", "100", "--eval-fraction", "0.1"]
    assert memdlm.main(argv) == 0
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [row["step"] for row in log] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor([row["loss"], *row["inner"]])).all() and len(row["inner"]) == 2 for row in log[1:])
    # the same modules as the released all-linear adapter (read off the checkpoint's names)
    assert _adapter_modules(out) == set(_released_adapter(ckpt, tmp_path / "released"))
    adapted = apply_adapter(load_backbone(ckpt, dtype="float32"), str(out))
    mem = FastWeightMemory(adapted, MemDLMConfig(inner_steps=2))
    ids = torch.randint(10, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        mem.begin(adapted, ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool), [0])
        assert torch.isfinite(adapted.logits(ids)).all() and len(mem.layers) == 27
        mem.end()


def _nf4_on_cpu() -> bool:
    try:
        import bitsandbytes.functional as bnbf

        bnbf.dequantize_4bit(*bnbf.quantize_4bit(torch.randn(64, 64), quant_type="nf4"))
        return True
    except Exception:  # no bitsandbytes CPU backend in this build
        return False


@pytest.mark.skipif(not _nf4_on_cpu(), reason="bitsandbytes cannot run NF4 on this CPU")
def test_train_memdlm_on_a_4bit_llada2_base(toy_data, tmp_path):
    """The released LLaDA2.1 recipe: NF4 base, outer LoRA, one bi-level step; the adapter loads
    onto the 4-bit base. bitsandbytes' CPU kernel packs 4-bit weights in blocks of 32 output rows
    and 64 input columns, so the experts are 64 wide here (the tiny default is 32)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    ckpt = make_tiny_checkpoint("llada2", tmp_path / "nf4", seed=0, moe_intermediate_size=64)
    args = memdlm.build_parser().parse_args(["--backbone", ckpt, "--data", toy_data, "--output-dir", str(tmp_path / "out"),
                                             "--max-length", "128", "--lr", "1e-3"])
    backbone = memdlm.build_model(args, torch.device("cpu"), four_bit=True, dtype="float32")
    quantised = [n for n, m in backbone.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any("query_key_value" in n for n in quantised) and any("experts.7.down_proj" in n for n in quantised)
    assert not any(n.endswith("mlp.gate") for n in quantised)  # the router is a bare parameter
    train, _ = memdlm.load_examples(args, backbone.tokenizer)
    batch = collate(train[:2], backbone.spec.eos_id)
    memory = FastWeightMemory(backbone, memdlm.inner_config(args))
    memory.install()
    loss, inner = memdlm.train_step(backbone.model, backbone, memory, batch, args, torch.Generator().manual_seed(0))
    loss.backward()
    memory.remove()
    assert torch.isfinite(loss) and len(inner) == 2 and all(math.isfinite(v) for v in inner)
    lora = [m for m in backbone.model.modules() if isinstance(m, LoraLayer)]
    assert lora and any(m.lora_B["default"].weight.grad.abs().sum() > 0 for m in lora)
    torch.optim.AdamW([p for p in backbone.model.parameters() if p.requires_grad], lr=1e-2).step()
    memdlm.save(str(tmp_path / "out"), backbone, args=args)
    base = load_backbone(ckpt, load_in_4bit=True)
    ids = torch.randint(10, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        frozen = base.logits(ids).float()
        adapted = apply_adapter(base, str(tmp_path / "out"))  # strict: every LoRA module gets its weights
        got = adapted.logits(ids).float()
    assert torch.isfinite(got).all() and (got - frozen).abs().max() > 1e-3


@pytest.mark.parametrize("strategy", ["llada2", "llada21"])
def test_block_diffusion_decoding_with_fast_weights_batch_equals_rows_alone(bb, ckpt, tmp_path, strategy):
    """An adapter and the inner loop under LLaDA2's own samplers: a left-padded batch decodes
    each row as it decodes alone (per-row fast weights, rows leaving the batch early)."""
    from lm_eval_dlmem import DecodeConfig, generate

    _released_adapter(ckpt, tmp_path / "adapter")
    adapted = apply_adapter(load_backbone(ckpt, dtype="float32"), str(tmp_path / "adapter"))
    mem = FastWeightMemory(adapted, MemDLMConfig(inner_steps=2, inner_lr=1.0))
    config = DecodeConfig(strategy=strategy, gen_length=8, block_length=4, steps=4, threshold=0.5)
    lengths, seeds = (9, 5, 7), [3, 4, 5]
    P = max(lengths)
    g = torch.Generator().manual_seed(1)
    ids = torch.full((3, P), adapted.spec.eos_id)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(10, 300, (n,), generator=g)
        attn[i, P - n:] = 1
    with torch.inference_mode():
        batched = generate(adapted, ids, attn, config, mem, seeds=seeds)
        alone = [generate(adapted, ids[i:i + 1, P - n:], None, config, mem, seeds=[seeds[i]])[0]
                 for i, n in enumerate(lengths)]
        frozen = generate(adapted, ids, attn, config, None, seeds=seeds)
    assert torch.equal(batched, torch.stack(alone))
    assert mem.adaptations == 6 and not mem.layers  # every row adapted, fast weights removed after
    assert (batched != frozen).any()  # the fast weights changed what was decoded
