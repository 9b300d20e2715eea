"""`training.common`: the resume rules and the schedule, one implementation for every script."""

import pytest
import torch

from lm_eval_dlmem.training import common, memdlm, metastate, pretrain


@pytest.mark.parametrize("script", [memdlm, metastate, pretrain], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_script_resumes_by_the_same_rules(script, tmp_path):
    """Kills: a `--resume latest` that crashes on a directory like checkpoint-final (int() of
    'final') or orders checkpoint-10 before checkpoint-2, and an explicit --resume directory
    without trainer_state.pt that is only noticed as a raw error while restoring."""
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-final"):
        (tmp_path / name).mkdir()
    assert script.find_resume("latest", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert script.find_resume("latest", str(tmp_path / "new")) is None  # a first run with --resume latest
    assert script.find_resume(None, str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="no trainer_state.pt there; pass a checkpoint-N directory"):
        script.find_resume(str(tmp_path / "checkpoint-2"), str(tmp_path))


def test_cosine_schedule_warms_up_from_one_step_and_ends_at_the_floor():
    values = [common.cosine_lr(s, warmup=4, total=12, min_ratio=0.1) for s in range(14)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and values[12] == values[13] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[3:], values[4:]))


def test_trainer_state_round_trip(tmp_path):
    """What a checkpoint saves is what a resume restores: optimizer moments, the schedule's
    position and the step (args only when given), through the weights-only loader."""
    import argparse

    from lm_eval_dlmem.training.common import cosine_schedule
    from lm_eval_dlmem.training.state import load_trainer_state, restore_trainer_state, save_trainer_state

    def fresh():
        param = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([param], lr=0.1)
        return param, opt, cosine_schedule(opt, 2, 10, 0.1)

    param, opt, sched = fresh()
    for _ in range(3):
        param.grad = torch.full_like(param, 0.5)
        opt.step()
        sched.step()
    save_trainer_state(str(tmp_path), opt, sched, 3, argparse.Namespace(lr=0.1))
    assert load_trainer_state(str(tmp_path))["args"] == {"lr": 0.1}
    _, opt2, sched2 = fresh()
    assert restore_trainer_state(str(tmp_path), opt2, sched2) == 3
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    save_trainer_state(str(tmp_path), opt, sched, 3)
    assert "args" not in load_trainer_state(str(tmp_path))


def test_fast_weight_flags_default_to_memdlm_config():
    """The trainer's and the exposure-bias analysis' --inner-* flags are the inference defaults
    (`MemDLMConfig`), declared once."""
    from lm_eval_dlmem.analysis import exposure_bias
    from lm_eval_dlmem.memory.fast_weights import MemDLMConfig

    d = MemDLMConfig()
    parsed = [memdlm.build_parser().parse_args(["--output-dir", "x", "--backbone", "b", "--data", "d"]),
              exposure_bias.build_parser().parse_args(["--output-dir", "x", "--backbone", "b", "--data", "d",
                                                       "--config", "a=none:0"])]
    for args in parsed:
        assert (args.inner_lr, args.inner_rank, args.inner_alpha, args.inner_layer_fraction) == (
            d.inner_lr, d.inner_rank, d.inner_alpha, d.inner_layer_fraction)


@pytest.mark.parametrize("script, required, expected", [
    (pretrain, ["--output-dir", "o"], dict(max_steps=600, lr=2e-3, min_lr_ratio=0.1, warmup_steps=30,
                                           weight_decay=0.1, grad_clip=1.0, batch_size=8)),
    (metastate, ["--output-dir", "o", "--backbone", "b", "--data", "d"],
     dict(max_steps=1000, lr=3e-4, min_lr_ratio=0.1, warmup_steps=50, weight_decay=0.01, grad_clip=1.0,
          batch_size=4, grad_accum=1)),
    (memdlm, ["--output-dir", "o", "--backbone", "b", "--data", "d"],
     dict(max_steps=0, lr=2e-5, weight_decay=0.0, max_grad_norm=1.0, batch_size=2, grad_accum=1)),
])
def test_shared_flags_keep_each_trainers_defaults(script, required, expected):
    """The flags written once in training.common (`add_schedule_args`, `add_batch_args`) keep
    every trainer's own defaults."""
    args = vars(script.build_parser().parse_args(required))
    assert {k: args[k] for k in expected} == expected
