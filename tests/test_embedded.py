"""The checkpoints shipped in the package: names resolve offline, load, stay small, and the
MetaState / MemDLM ones fit the base."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lm_eval_dlmem.embedded import EMBEDDED_DIR, NAMES, resolve_embedded


def test_names_resolve_to_package_directories():
    for name in NAMES:
        path = resolve_embedded(name)
        assert path == os.path.join(EMBEDDED_DIR, name) and os.path.isdir(path)
    assert resolve_embedded("GSAI-ML/LLaDA-8B-Instruct") is None
    assert resolve_embedded(None) is None
    assert resolve_embedded("tiny-llada-nope") is None


def test_shipped_files_are_small_safetensors_and_json():
    total = 0
    for name in NAMES:
        for f in os.listdir(os.path.join(EMBEDDED_DIR, name)):
            assert f.endswith((".safetensors", ".json", ".jinja")), f"{name}/{f} is not safetensors/JSON"
            total += os.path.getsize(os.path.join(EMBEDDED_DIR, name, f))
    assert total < 8 * 2**20, f"embedded checkpoints take {total / 2**20:.1f} MiB"


def test_base_loads_offline_in_float32(monkeypatch):
    from lm_eval_dlmem.backbones.loading import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = load_backbone("tiny-llada")
    assert backbone.family == "llada" and next(backbone.model.parameters()).dtype == torch.float32
    assert backbone.tokenizer.convert_ids_to_tokens(backbone.spec.mask_id) == "<|mdm_mask|>"
    ids = backbone.tokenizer("The grass is green.", return_tensors="pt")["input_ids"]
    assert backbone.logits(ids).shape == (1, ids.shape[1], backbone.config.vocab_size)


def test_tokenizer_arg_resolves_embedded_names_like_pretrained(monkeypatch, tmp_path):
    """`tokenizer=tiny-llada` is the shipped tokenizer, not a hub id to look up (which failed
    offline with a misleading 'could not load a tokenizer' error)."""
    import shutil

    from lm_eval_dlmem.backbones.loading import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "weights"  # the checkpoint without its tokenizer files
    shutil.copytree(resolve_embedded("tiny-llada"), weights,
                    ignore=lambda _d, names: [n for n in names if n.startswith(("tokenizer", "special_tokens"))])
    backbone = load_backbone(str(weights), tokenizer="tiny-llada")
    assert backbone.tokenizer.convert_ids_to_tokens(backbone.spec.mask_id) == "<|mdm_mask|>"


def test_memories_load_onto_the_base(monkeypatch):
    from lm_eval_dlmem.backbones.loading import load_backbone
    from lm_eval_dlmem.memory.adapters import apply_adapter
    from lm_eval_dlmem.memory.metastate import load_memory_for

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = load_backbone("tiny-llada")
    memory = load_memory_for("tiny-llada-metastate", backbone)
    assert type(memory).__name__ == "MetaState" and memory.hidden_size == backbone.config.hidden_size
    adapted = apply_adapter(backbone, "tiny-llada-memdlm")
    with open(os.path.join(EMBEDDED_DIR, "tiny-llada-memdlm", "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == "tiny-llada"
    assert any("lora_A" in n for n, _ in adapted.model.named_parameters())


@pytest.mark.parametrize("name", NAMES)
def test_a_local_directory_wins_over_the_embedded_name(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    os.makedirs(name)
    assert resolve_embedded(name) is None


def test_demo_prints_frozen_metastate_memdlm_table(tmp_path, capsys):
    """The README's main job, cut to one short task and two documents."""
    from lm_eval_dlmem.demo_compare import main

    out = tmp_path / "runs"
    assert main(["--tasks", "dlmem_babilong_qa1_0k", "--limit", "2", "--batch-size", "2",
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for variant in ("frozen", "metastate", "memdlm"):
        assert variant in printed and (out / variant / "results.json").is_file()
    assert "dlmem_babilong_qa1_0k" in printed


def test_demo_names_a_missing_checkpoint(tmp_path, monkeypatch, capsys):
    import lm_eval_dlmem.embedded as embedded
    from lm_eval_dlmem.demo_compare import main

    monkeypatch.setattr(embedded, "EMBEDDED_DIR", str(tmp_path))
    assert main(["--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "tiny-llada" in err and "train tiny-default" in err
    assert not (tmp_path / "runs").exists()


def test_export_writes_bf16_safetensors_json_and_relative_paths(tmp_path):
    """`train tiny-default`'s export stage: weights in bfloat16, configs that load as float32,
    no trainer state or model card, run-directory paths made relative."""
    from safetensors.torch import load_file

    from lm_eval_dlmem.testing import make_tiny_checkpoint
    from lm_eval_dlmem.training.tiny_default import export

    run = tmp_path / "run"
    make_tiny_checkpoint("llada", run / "base")
    memdlm = run / "memdlm"
    memdlm.mkdir()
    (memdlm / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(run / "base")}))
    (memdlm / "memdlm_training.json").write_text(json.dumps({"backbone": str(run / "base"), "lr": 2e-3,
                                                             "elsewhere": "/data/x.jsonl"}))
    (memdlm / "adapter_model.safetensors").write_bytes((run / "base" / "model.safetensors").read_bytes())
    (memdlm / "README.md").write_text("card")
    (memdlm / "trainer_state.pt").write_bytes(b"x")
    export(str(run), str(tmp_path / "out"))

    base = tmp_path / "out" / "tiny-llada"
    assert all(t.dtype == torch.bfloat16 for t in load_file(base / "model.safetensors").values())
    assert json.loads((base / "config.json").read_text())["dtype"] == "float32"
    mem = tmp_path / "out" / "tiny-llada-memdlm"
    assert sorted(p.name for p in mem.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "memdlm_training.json"]
    assert json.loads((mem / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llada"
    record = json.loads((mem / "memdlm_training.json").read_text())
    assert record == {"backbone": os.path.join("RUN", "base"), "lr": 2e-3, "elsewhere": "/data/x.jsonl"}
    assert not (tmp_path / "out" / "tiny-llada-metastate").exists()


def test_tiny_default_stage_commands_parse_with_the_trainers(tmp_path):
    """Every stage's fixed arguments are accepted by its trainer, with the intended values (a
    repeated flag would silently take the last one)."""
    from lm_eval_dlmem.training import memdlm, metastate, pretrain
    from lm_eval_dlmem.training.tiny_default import INNER, base_commands, memdlm_command, metastate_command

    short, full = (pretrain.build_parser().parse_args(a) for a in base_commands(str(tmp_path), 0, 2))
    assert (short.max_steps, short.lr, short.min_tokens, short.max_tokens, short.init_from) == (1500, 3e-3, 64, 256, None)
    assert (full.max_steps, full.lr, full.min_tokens, full.max_tokens) == (300, 1e-3, 256, 1024)
    assert full.init_from == os.path.join(str(tmp_path), "base_short") and short.mode == full.mode == "mixed"
    ms = metastate.build_parser().parse_args(metastate_command(str(tmp_path), 0))
    assert (ms.width, ms.max_steps, ms.lr, ms.unroll_steps) == (128, 200, 5e-3, 4)
    md = memdlm.build_parser().parse_args(memdlm_command(str(tmp_path), 0))
    assert {k: getattr(md, k) for k in INNER} == INNER and (md.max_steps, md.lr) == (300, 2e-3)


def test_tiny_default_resumes_interrupted_stages_and_rejects_unknown_ones(tmp_path):
    from lm_eval_dlmem.training.tiny_default import _resume, main

    assert _resume(str(tmp_path / "missing")) == [] and _resume(str(tmp_path)) == []
    (tmp_path / "checkpoint-50").mkdir()
    assert _resume(str(tmp_path)) == ["--resume", "latest"]
    with pytest.raises(SystemExit, match="Unknown stage"):
        main(["--out", str(tmp_path / "run"), "--stages", "base,bogus"])
