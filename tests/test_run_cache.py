"""`run_cache`: one signature of a local checkpoint, shared by the harness fingerprint (the
`--use_cache` table) and the sweep (whether a finished run still counts)."""

import shutil

from lm_eval_dlmem.leaderboard.spec import RunSpec
from lm_eval_dlmem.leaderboard.sweep import run_inputs


def harness_fingerprint(ckpt) -> str:
    from lm_eval_dlmem.harness import DlmLM

    return DlmLM(pretrained=str(ckpt), device="cpu").fingerprint()


def sweep_signature(ckpt) -> str:
    spec = RunSpec(name="r", model="dlm", model_args={"pretrained": str(ckpt)}, tasks=["t"])
    return run_inputs(spec)["checkpoints"]["pretrained"]


def test_harness_and_sweep_see_the_same_checkpoint_changes(tiny_ckpts, tmp_path):
    """Kills: a harness signature that lists only the top-level files (a retrained file in a
    sub-folder then reuses the old configuration's cached answers) or that counts hidden tool
    files (.cache/ written by a download), which the sweep's signature ignores."""
    ckpt = shutil.copytree(tiny_ckpts["llada"], tmp_path / "ckpt")
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "weights.bin").write_bytes(b"a")
    before = harness_fingerprint(ckpt), sweep_signature(ckpt)

    (ckpt / ".cache").mkdir()
    (ckpt / ".cache" / "lock").write_bytes(b"x")
    (ckpt / ".gitattributes").write_text("*.bin lfs\n")
    assert (harness_fingerprint(ckpt), sweep_signature(ckpt)) == before  # hidden entries: same run

    (ckpt / "sub" / "weights.bin").write_bytes(b"bb")  # retrained in place
    after = harness_fingerprint(ckpt), sweep_signature(ckpt)
    assert after[0] != before[0] and after[1] != before[1]
