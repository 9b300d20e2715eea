"""`train metastate --match-decode`: the training trajectory is the decode: same canvases, same
positions read by the Mixer and written by the Injector, forward by forward, in every cache
mode; gradients reach the state through the cache; truncation cuts them."""

import pytest
import torch

from lm_eval_dlmem.backbones import load_backbone
from lm_eval_dlmem.decoding.config import DecodeConfig
from lm_eval_dlmem.decoding.engine import generate
from lm_eval_dlmem.memory import MetaState
from lm_eval_dlmem.training.data import collate, tokenize_pairs
from lm_eval_dlmem.training.decode_unroll import Window, decode_batch, trajectory_forwards, trajectory_loss
from lm_eval_dlmem.training.metastate import UnrollConfig, unrolled_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

PAIRS = [("Repeat: apple river", "apple river"), ("Repeat: one", "one"), ("Where is the forest now?", "here")]
CONFIGS = [
    dict(cache="none"),
    dict(cache="prefix", logits_eos_inf=True),
    dict(cache="dual"),
    dict(cache="dual", strategy="threshold", threshold=0.5),
    dict(cache="none", remasking="random", temperature=0.7, cfg_scale=1.0),
]


class Recording(MetaState):
    """MetaState that logs, per forward, the canvas it sees and the canvas spans its Mixer reads
    and its Injector writes."""

    def begin(self, *args, **kwargs):
        super().begin(*args, **kwargs)
        self.log = []

    def before_forward(self, info):
        super().before_forward(info)
        self.log.append({"canvas": info.input_ids.clone()})

    def _read_hook(self, module, args, output):
        if self._info is not None:
            self.log[-1]["read"] = self._span(output.shape[1])
        return super()._read_hook(module, args, output)

    def _write_hook(self, module, args, output):
        if self._info is not None:
            self.log[-1]["write"] = (self._span(output.shape[1]), output.shape[0])
        return super()._write_hook(module, args, output)

    def end(self):
        self.done = getattr(self, "log", None)
        super().end()


@pytest.fixture(scope="module")
def llada(tiny_ckpts):
    bb = load_backbone(tiny_ckpts["llada"])
    bb.model.requires_grad_(False)
    return bb


def memory(bb, cls=Recording):
    torch.manual_seed(0)
    ms = cls(MetaState.init_for(bb, slots=4, width=32, heads=4).config, bb.config.hidden_size,
             bb.config.num_hidden_layers, bb.family)
    with torch.no_grad():
        ms.injector.gate.fill_(2.0)  # the memory changes the logits, so a divergence shows
    return ms


def examples(bb):
    return tokenize_pairs(PAIRS, bb.tokenizer, max_length=64, chat_template=False)


def config(**overrides):
    return DecodeConfig(**{**dict(gen_length=8, block_length=4, steps=8, stop_early=False), **overrides})


@pytest.fixture(scope="module")
def dream(tiny_ckpts):
    bb = load_backbone(tiny_ckpts["dream"])
    bb.model.requires_grad_(False)
    return bb


@pytest.mark.parametrize("family,overrides", [("llada", c) for c in CONFIGS] + [
    ("dream", dict(cache="dual", strategy="dream", alg="entropy")),  # the shift forwards one extra position
])
def test_training_forward_reads_writes_and_commits_like_the_decode(request, family, overrides):
    bb = request.getfixturevalue(family)
    cfg, seeds = config(**overrides), [5, 6, 7]
    batch = decode_batch(examples(bb), cfg.gen_length, bb.spec.eos_id)
    decoded, trained = memory(bb), memory(bb)
    out = generate(bb, batch["input_ids"], batch["attention_mask"], cfg, decoded, seeds=seeds)
    loss, per_forward, _ = trajectory_loss(bb, trained, batch, cfg, Window(0, trajectory_forwards(cfg)), seeds)
    dec, tr = decoded.done, trained.done
    assert len(tr) == len(dec) and len(dec) >= cfg.num_blocks
    for i, (a, b) in enumerate(zip(dec, tr)):
        assert a["read"] == b["read"] and a["write"] == b["write"], i
        assert torch.equal(a["canvas"], b["canvas"]), i
    if overrides["cache"] == "dual":  # the window steps read and write the active block only
        P, shift = batch["input_ids"].shape[1], int(family == "dream")
        assert dec[1]["read"] == (P - shift, P + cfg.block_length) and dec[0]["read"] == (0, P + cfg.gen_length)
    loss.backward()  # gradients flow through the whole trajectory, the cache included
    assert trained.mixer.k.weight.grad.abs().sum() > 0 and trained.injector.gate.grad.abs().sum() > 0
    assert out.shape == (3, cfg.gen_length)


def test_the_default_unroll_reads_other_positions_than_a_dual_cache_decode(llada):
    """The comparison above can fail: the full-sequence unroll reads the whole canvas every step."""
    cfg = config(cache="dual")
    batch = collate(examples(llada), llada.spec.eos_id)
    ms = memory(llada)
    unrolled_loss(llada, ms, batch, UnrollConfig(4, 4), torch.Generator().manual_seed(0))
    assert all(r["read"] == (0, batch["input_ids"].shape[1]) for r in ms.done)
    dbatch = decode_batch(examples(llada), cfg.gen_length, llada.spec.eos_id)
    dual = memory(llada)
    trajectory_loss(llada, dual, dbatch, cfg, Window(0, 4), [0, 1, 2])
    assert [r["read"] for r in dual.done] != [r["read"] for r in ms.done]


def test_window_burns_in_without_gradients_and_truncation_cuts_the_state(llada):
    cfg = config(cache="dual")
    batch = decode_batch(examples(llada), cfg.gen_length, llada.spec.eos_id)
    grads = {}
    for every in (0, 1):
        ms = memory(llada)
        loss, per_forward, tokens = trajectory_loss(llada, ms, batch, cfg, Window(3, 3, truncate_every=every), [0, 1, 2])
        assert len(ms.done) == 6 and per_forward.shape == (3,)  # 3 burn-in forwards, 3 trained, then stop
        loss.backward()
        grads[every] = ms.mixer.k.weight.grad
    assert grads[0].abs().sum() > 0
    # detached every forward: the loss sees only the state the previous forward built, cut from it
    assert grads[1] is None or grads[1].abs().sum() == 0


def test_responses_longer_than_the_generation_region_are_refused(llada):
    with pytest.raises(ValueError, match="gen-length"):
        decode_batch(examples(llada), 1, llada.spec.eos_id)


def test_match_decode_run_lowers_the_held_out_trajectory_loss(tiny_ckpts, tmp_path, llada):
    from test_metastate_training import copy_pairs, read_log, run_args, write_jsonl

    from lm_eval_dlmem.training.metastate import main

    data = write_jsonl(tmp_path / "copy.jsonl", copy_pairs(72))
    out = tmp_path / "run"
    decode = "gen_length=16,block_length=8,steps=8,cache=dual"
    assert main(run_args(tiny_ckpts["llada"], data, out, "--max-steps", "24", "--save-every", "0",
                         "--match-decode", decode, "--truncate-every", "2")) == 0
    log = read_log(out)
    start, end = log[0], log[-1]
    assert start["eval_metastate"] == start["eval_frozen"]
    assert end["eval_metastate"] < start["eval_frozen"] - 0.05, (start, end)


@pytest.mark.parametrize("argv,message", [
    (["--match-decode", "gen_length=8,block_size=4"], "block_size"),
    (["--match-decode", "gen_length=8,block_length=3"], "multiple of block_length"),
    (["--match-decode", "gen_length=8,block_length=4,steps=8", "--unroll-steps", "9"], "--unroll-steps 9"),
    (["--truncate-every", "2"], "--truncate-every needs --match-decode"),
    (["--match-decode", "strategy=llada2,gen_length=8,block_length=4"], "own block-diffusion loop"),
    (["--match-decode", "gen_length=8,block_length=4,steps=8,cache=dual", "--gradient-checkpointing"], "cache=dual"),
])
def test_bad_match_decode_options_name_the_problem(tiny_ckpts, tmp_path, argv, message):
    from test_metastate_training import copy_pairs, run_args, write_jsonl

    from lm_eval_dlmem.training.metastate import main

    data = write_jsonl(tmp_path / "copy.jsonl", copy_pairs(20))
    with pytest.raises(ValueError, match=message):
        main(run_args(tiny_ckpts["llada"], data, tmp_path / "o", "--max-steps", "1", *argv))
