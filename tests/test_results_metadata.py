"""The results file's `config`: lm-eval's `model_args` as the user passed them, ours beside
them (`dlmem_model_args`, resolved), and HFLM's model fields (sha, dtype, parameters)."""

import glob
import json
import os

import pytest

from lm_eval_dlmem.embedded import resolve_embedded
from lm_eval_dlmem.model_info import checkpoint_sha, directory_sha, hub_commit

from test_cli import run_lm_eval

USER_ARGS = "pretrained=tiny-llada,dtype=bfloat16,metastate=tiny-llada-metastate,gen_length=4,block_length=4,steps=1"


@pytest.mark.slow
def test_cli_results_keep_the_user_model_args_and_add_ours(tmp_path):
    run_lm_eval("metastate-llada", USER_ARGS, tmp_path, 2, tasks="t_gen", extra=("--limit", "2"))
    (path,) = glob.glob(os.path.join(str(tmp_path), "**", "results_*.json"), recursive=True)
    with open(path) as f:
        config = json.load(f)["config"]
    user = dict(pair.split("=", 1) for pair in USER_ARGS.split(","))
    given = config["model_args"]
    given = dict(p.split("=", 1) for p in given.split(",")) if isinstance(given, str) else given
    assert {k: str(v) for k, v in given.items()} == user  # not overwritten by the resolved args
    ours = config["dlmem_model_args"]
    assert ours["strategy"] == "llada" and ours["dtype"] == "bfloat16" and ours["steps"] == 1 and ours["mc_num"] == 128
    assert config["model_sha"] == directory_sha(resolve_embedded("tiny-llada"))
    assert config["model_sha"].startswith("sha256:")
    assert config["metastate_sha"] == directory_sha(resolve_embedded("tiny-llada-metastate"))
    assert config["model_dtype"] == "torch.bfloat16"
    assert 1_000_000 < config["model_num_parameters"] < 2_000_000
    assert config["model_revision"] == "main"


def test_directory_sha_follows_file_contents_and_names(tmp_path):
    """A different weight byte or file name is a different sha; hidden entries are not part of it."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    first = directory_sha(str(tmp_path))
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "lock").write_text("x")
    assert directory_sha(str(tmp_path)) == first
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 99 + b"\x01")
    assert directory_sha(str(tmp_path)) != first
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    assert directory_sha(str(tmp_path)) == first
    os.rename(tmp_path / "model.safetensors", tmp_path / "model-00001.safetensors")
    assert directory_sha(str(tmp_path)) != first


def test_hub_id_sha_is_the_cached_snapshot_commit(tmp_path, monkeypatch):
    """A hub id names the commit its files were loaded from (offline, from the hub cache)."""
    import huggingface_hub.constants as constants

    repo = tmp_path / "models--org--tiny"
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub_commit("org/tiny") == "0123abcd"
    assert checkpoint_sha("org/tiny") == "0123abcd"
    assert checkpoint_sha("org/not-cached") == ""
