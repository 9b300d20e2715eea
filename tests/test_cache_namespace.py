"""`--use_cache` correctness: lm-eval keys its cache by request only, so the harness gives every
model configuration a table of its own. Runs that differ only in `metastate=`, in decoding args
or in the checkpoint's contents must never share answers; a rerun of one configuration must
answer everything from its cache. Counted with a spy on the decode function (no timing)."""

import pytest
import torch
from _harness_runs import lm_eval_runner, responses


@pytest.fixture
def quick_lm_eval(monkeypatch):
    """In-process lm-eval runs on tiny checkpoints (see _harness_runs)."""
    yield from lm_eval_runner(monkeypatch)


@pytest.fixture
def decoded(monkeypatch):
    """Rows that reached the decoding engine since the fixture was made: generation rows and
    scored (context, continuation) pairs."""
    import lm_eval_dlmem.decoding.engine as gen
    import lm_eval_dlmem.decoding.likelihood as lik

    counts = {"rows": 0, "pairs": 0}
    real_generate, real_loglikelihood = gen.generate, lik.loglikelihood

    def spy_generate(backbone, input_ids, *args, **kwargs):
        counts["rows"] += int(input_ids.shape[0])
        return real_generate(backbone, input_ids, *args, **kwargs)

    def spy_loglikelihood(backbone, requests, *args, **kwargs):
        counts["pairs"] += len(requests)
        return real_loglikelihood(backbone, requests, *args, **kwargs)

    monkeypatch.setattr(gen, "generate", spy_generate)
    monkeypatch.setattr(lik, "loglikelihood", spy_loglikelihood)
    return counts


def save_metastate(backbone_path, out, gate: float):
    """A MetaState for the tiny backbone whose Injector gate is open (so it changes outputs)."""
    from lm_eval_dlmem.backbones.loading import load_backbone
    from lm_eval_dlmem.memory.metastate import MetaState

    torch.manual_seed(0)
    ms = MetaState.init_for(load_backbone(backbone_path), slots=4, width=32, heads=2, time_dim=16)
    with torch.no_grad():
        for name, p in ms.named_parameters():
            if name.endswith("gate"):
                p.fill_(gate)
    ms.save_pretrained(out)
    return str(out)


def test_configs_never_share_cached_answers_and_reruns_hit_the_cache(tiny_ckpts, quick_lm_eval, decoded, tmp_path):
    from sqlitedict import SqliteDict

    ckpt, cache = tiny_ckpts["llada"], tmp_path / "cache" / "lm"
    n = 6  # t_gen documents; t_mc: 6 documents x 3 choices
    ms = save_metastate(ckpt, tmp_path / "ms", gate=2.0)

    def run(**model_args):
        res = quick_lm_eval(ckpt=ckpt, tasks=("t_gen", "t_mc"), model_args=model_args, use_cache=str(cache),
                            log_samples=True)
        return responses(res, "t_gen")

    base = run()
    assert decoded == {"rows": n, "pairs": 3 * n}
    assert run() == base and decoded == {"rows": n, "pairs": 3 * n}  # all from the cache

    run(steps=2)  # a decoding arg
    assert decoded == {"rows": 2 * n, "pairs": 6 * n}  # its likelihoods are not shared either
    run(mc_num=8)  # a likelihood arg
    assert decoded == {"rows": 3 * n, "pairs": 9 * n}
    with_memory = run(metastate=ms)  # a memory
    assert decoded["rows"] == 4 * n
    assert with_memory != base  # the open gate changes answers: sharing would have hidden that
    assert run(metastate=ms) == with_memory and decoded["rows"] == 4 * n

    # the same metastate path with retrained weights is another configuration
    save_metastate(ckpt, tmp_path / "ms", gate=-2.0)
    run(metastate=ms)
    assert decoded["rows"] == 5 * n

    # batch size is not part of the configuration: same answers, from the cache
    before = dict(decoded)
    quick_lm_eval(ckpt=ckpt, tasks=("t_gen", "t_mc"), use_cache=str(cache), batch_size=1)
    assert decoded == before
    tables = [t for t in SqliteDict.get_tablenames(f"{cache}_rank0.db") if t.startswith("dlmem_")]
    assert len(tables) == 5
