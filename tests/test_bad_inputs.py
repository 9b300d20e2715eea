"""Bad numbers, the wrong family, broken files, bad sweep and compare inputs: each is refused
before any work with one message that names what the user typed (the arg, flag or file) and
what to do, never a traceback from deep inside, a silent default or a full-size model build."""

import json
import math
import os
import shutil

import pytest
import yaml

from lm_eval_dlmem import cli
from lm_eval_dlmem.backbones import loading
from lm_eval_dlmem.decoding.config import DecodeConfig
from lm_eval_dlmem.leaderboard import compare
from lm_eval_dlmem.leaderboard.spec import load_sweep
from lm_eval_dlmem.model_args import ModelArgs


# ---- numeric model args -----------------------------------------------------------------------
@pytest.mark.parametrize("typed, message", [
    ({"temperature": "nan"}, "temperature=nan is not a finite number: it must be >= 0"),
    ({"temperature": "inf"}, "temperature=inf is not a finite number"),
    ({"inner_lr": "nan"}, "inner_lr=nan is not a finite number"),
    ({"cfg_scale": "nan"}, "cfg_scale=nan is not a finite number"),
    ({"cfg": "nan"}, "cfg=nan is not a finite number"),  # the alias, as typed
    ({"alg_temp": "nan"}, "alg_temp=nan is not a finite number"),
    ({"inner_alpha": "-inf"}, "inner_alpha=-inf is not a finite number"),
    ({"likelihood_cfg": -1.0}, "likelihood_cfg=-1.0 is out of range: it must be >= 0"),
    ({"max_batch_size": -1.0}, "max_batch_size=-1 is out of range: it must be > 0"),
    ({"top_p": 0}, "top_p=0.0 is out of range: it must be in \\(0, 1\\]"),
    ({"threshold": 2}, "threshold=2.0 is out of range: it must be in \\[0, 1\\]"),
    ({"eps": 0}, "eps=0.0 is out of range: it must be in \\(0, 1\\)"),
    ({"top_k": 0}, "top_k=0 is out of range"),
    ({"inner_rank": 0}, "inner_rank=0 is out of range"),
    ({"inner_layer_fraction": 1.5}, "inner_layer_fraction=1.5 is out of range"),
    ({"inner_mask_ratio": 0}, "inner_mask_ratio=0.0 is out of range"),
    ({"batch_size": "x"}, "batch_size=x must be a positive integer or 'auto'"),
    ({"steps": "inf"}, "steps='inf' is malformed: expected int"),
    # zero is not "use the default", and each error names the arg the user typed
    ({"gen_length": 0}, "gen_length=0 is out of range: it must be > 0 \\(leave it unset"),
    ({"gen_length": -5.0}, "^gen_length=-5 is out of range"),
    ({"max_new_tokens": 0}, "^max_new_tokens=0 is out of range"),
    ({"steps": 0}, "^steps=0 is out of range"),
    ({"diffusion_steps": 0}, "^diffusion_steps=0 is out of range"),
    ({"steps_per_block": 0}, "^steps_per_block=0 is out of range"),
    ({"block_length": 0}, "^block_length=0 is out of range"),
    ({"block_size": -32.0}, "^block_size=-32 is out of range"),
])
def test_numeric_model_args_are_refused_at_construction(typed, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_kwargs(pretrained="x", **typed)


def test_valid_numbers_and_unset_values_still_pass():
    a = ModelArgs.from_kwargs(pretrained="x", temperature=0.0, top_p=1.0, threshold=0, batch_size="auto:4",
                              max_new_tokens=64, block_size=32, steps=None)
    assert (a.gen_length, a.block_length, a.batch_size) == (64, 32, "auto:4")
    assert a.fingerprint_fields() == ModelArgs.from_kwargs(
        pretrained="x", temperature=0.0, top_p=1.0, threshold=0, gen_length=64, block_length=32).fingerprint_fields()


@pytest.mark.parametrize("field", ["temperature", "cfg_scale", "alg_temp", "top_p", "threshold", "eps"])
def test_decode_config_refuses_nan(field):
    with pytest.raises(ValueError, match=f"{field}=nan is not a finite number"):
        DecodeConfig(**{field: math.nan})


# ---- lm-eval's own --batch_size / --device next to --model_args -----------------------------------
def test_model_args_batch_size_and_device_merge_with_lm_eval_flags(tiny_ckpts):
    from lm_eval.api.registry import get_model

    from lm_eval_dlmem._autoload import register

    register()
    cls = get_model("metastate-llada")
    flags = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}  # what lm_eval sends by default
    lm = cls.create_from_arg_string(f"pretrained={tiny_ckpts['llada']},device=cpu,batch_size=2", flags)
    assert (lm.args.batch_size, lm.args.device) == ("2", "cpu")
    lm = cls.create_from_arg_obj({"pretrained": tiny_ckpts["llada"], "device": "cpu"}, {**flags, "batch_size": 3})
    assert lm.args.batch_size == "3"
    with pytest.raises(ValueError, match="--model_args batch_size=2 and --batch_size 4 disagree"):
        cls.create_from_arg_string(f"pretrained={tiny_ckpts['llada']},batch_size=2", {**flags, "batch_size": 4})
    with pytest.raises(ValueError, match="--model_args device=cpu and --device cuda:1 disagree"):
        cls.create_from_arg_obj({"pretrained": tiny_ckpts["llada"], "device": "cpu"}, {**flags, "device": "cuda:1"})


# ---- family= against config.json ----------------------------------------------------------------
@pytest.fixture
def no_model_build(monkeypatch):
    """Fail the test if a model class is even looked up: the check must come first."""
    def refuse(family):
        raise AssertionError(f"a {family} model was about to be built")

    monkeypatch.setattr(loading, "model_class", refuse)


@pytest.mark.parametrize("ckpt, family, message", [
    ("llada", "dream", "family=dream does not match .*describes a llada checkpoint"),
    ("dream", "llada", "family=llada does not match .*describes a dream checkpoint"),
    ("llada_moe", "llada", "family=llada does not match .*describes a llada_moe checkpoint"),
    ("llada", "llada_moe", "family=llada_moe does not match .*describes a llada checkpoint"),
    ("llada", "gpt", "family='gpt' is not a supported family; choose one of llada, dream, llada_moe"),
])
def test_family_that_contradicts_config_json_is_refused_before_building(tiny_ckpts, no_model_build, ckpt, family,
                                                                        message):
    with pytest.raises(ValueError, match=message):
        loading.load_backbone(tiny_ckpts[ckpt], family=family)


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = {**json.loads((dst / "config.json").read_text()), **changes}
    (dst / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return str(dst)


def test_unknown_model_type_recommends_family_only_when_it_can_work(tiny_ckpts, tmp_path, no_model_build):
    olmo = _with_config(tiny_ckpts["llada"], tmp_path / "olmo", model_type="olmo", architectures=["X"])
    with pytest.raises(ValueError, match="none of the supported families.*pass family=llada"):
        loading.load_backbone(olmo)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match="none of the supported families") as e:
        loading.load_backbone(str(gpt2))
    assert "family=" not in str(e.value)
    with pytest.raises(ValueError, match="family=dream, but the config.json of .* lacks hidden_size"):
        loading.load_backbone(str(gpt2), family="dream")


def test_the_recommended_family_loads_a_config_with_an_unknown_model_type(tiny_ckpts, tmp_path):
    olmo = _with_config(tiny_ckpts["llada"], tmp_path / "olmo", model_type="olmo", architectures=["X"])
    assert loading.load_backbone(olmo, family="llada").family == "llada"


# ---- broken checkpoint and adapter files ---------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, error, message", [
    (lambda d: (d / "config.json").write_text('{"model_type": "llada",'), OSError, "config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), OSError, "config.json holds a JSON list, not an object"),
    (lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00garbage"), OSError, "config.json is not valid JSON"),
    (lambda d: os.truncate(d / "model.safetensors", 5000), OSError,
     "model.safetensors is not a readable safetensors file .*truncated or corrupt"),
    (lambda d: (d / "model.safetensors").write_bytes(os.urandom(4000)), OSError,
     "model.safetensors is not a readable safetensors file"),
    (lambda d: (d / "model.safetensors").unlink(), FileNotFoundError, "holds no weights \\(model.safetensors or"),
])
def test_broken_checkpoint_files_are_named(tiny_ckpts, tmp_path, no_model_build, damage, error, message):
    ckpt = _copy(tiny_ckpts["llada"], tmp_path / "ckpt")
    damage(ckpt)
    with pytest.raises(error, match=message) as e:
        loading.load_backbone(str(ckpt))
    assert str(ckpt) in str(e.value)


def test_adapter_dir_without_or_with_broken_weights_is_named(tiny_ckpts, tmp_path):
    from lm_eval_dlmem.memory.adapters import add_outer_lora, apply_adapter

    add_outer_lora(loading.load_backbone(tiny_ckpts["llada"]), r=2, alpha=4).model.save_pretrained(tmp_path / "ad")
    backbone = loading.load_backbone(tiny_ckpts["llada"])
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(OSError, match="ad/adapter_model.safetensors is not a readable safetensors file"):
        apply_adapter(backbone, str(tmp_path / "ad"))
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights \\(adapter_model.safetensors or") as e:
        apply_adapter(backbone, str(tmp_path / "ad"))
    assert "repo" not in str(e.value).lower()  # a local directory: no Hub repo-id advice


# ---- make-tiny ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["llada", "--hidden", "0"], "argument --hidden: 0 is not a positive integer"),
    (["dream", "--layers", "-1"], "argument --layers: -1 is not a positive integer"),
    (["llada", "--vocab-size", "0"], "argument --vocab-size: 0 is not a positive integer"),
])
def test_make_tiny_refuses_zero_and_negative_sizes(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["make-tiny", argv[0], str(tmp_path / "t"), *argv[1:]])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("family, hidden", [("llada", 3), ("dream", 3), ("llada_moe", 12)])
def test_make_tiny_refuses_sizes_attention_cannot_split(tmp_path, capsys, family, hidden):
    assert cli.main(["make-tiny", family, str(tmp_path / "t"), "--hidden", str(hidden)]) == 2
    err = capsys.readouterr().err
    assert f"--hidden={hidden} does not split into" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()


def test_make_tiny_checkpoint_names_config_keys(tmp_path):
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    with pytest.raises(ValueError, match="d_model=6 does not split into n_heads=4"):
        make_tiny_checkpoint("llada", tmp_path / "a", d_model=6)
    with pytest.raises(ValueError, match="num_attention_heads=4 attention heads do not split into "
                                         "num_key_value_heads=3"):
        make_tiny_checkpoint("dream", tmp_path / "b", num_key_value_heads=3)
    with pytest.raises(ValueError, match="vocab_size=0 must be a positive integer"):
        make_tiny_checkpoint("llada", tmp_path / "c", vocab_size=0)


# ---- sweep files ----------------------------------------------------------------------------------
def _sweep(tmp_path, **run):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"runs": [{"name": "a", "model": "dlm", "tasks": ["t"], **run}]}))
    return str(path)


@pytest.mark.parametrize("run, message", [
    ({"tasks": 5}, "run 'a': tasks=5 must be a list \\(or a comma-separated string\\)"),
    ({"tasks": ["t", 5]}, "run 'a': tasks must list names as strings; \\[5\\] are not"),
    ({"limit": "lots"}, "run 'a': limit='lots' is not a number"),
    ({"limit": 0}, "run 'a': limit=0 must be a number of documents"),
    ({"limit": 2.5}, "run 'a': limit=2.5 must be a number of documents"),
    ({"batch_size": [1]}, "run 'a': batch_size=\\[1\\] must be a positive integer or 'auto'"),
    ({"batch_size": 0}, "run 'a': batch_size=0 must be a positive integer or 'auto'"),
    ({"max_batch_size": "big"}, "run 'a': max_batch_size='big' is not a number"),
    ({"num_fewshot": -1}, "run 'a': num_fewshot=-1 must be an integer >= 0"),
    ({"log_samples": "yes"}, "run 'a': log_samples='yes' must be a bool"),
])
def test_sweep_field_types_fail_at_load(tmp_path, run, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(_sweep(tmp_path, **run))


def test_sweep_numbers_from_env_strings_are_cast(tmp_path, monkeypatch):
    monkeypatch.setenv("N_DOCS", "4")
    spec = load_sweep(_sweep(tmp_path, limit="${N_DOCS}", num_fewshot="${SHOTS:-2}", batch_size="auto")).runs[0]
    assert (spec.limit, spec.num_fewshot, spec.batch_size) == (4, 2, "auto")
    with pytest.raises(ValueError, match="--limit=0.0 must be a number of documents"):
        load_sweep(_sweep(tmp_path), limit=0.0)


def test_bad_sweep_files_give_one_message_even_with_dry_run(tmp_path, capsys):
    bad = _sweep(tmp_path, tasks=5)
    assert cli.main(["sweep", bad, "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert "run 'a': tasks=5 must be a list" in err and "Traceback" not in err
    binary = tmp_path / "sweep.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert cli.main(["sweep", str(binary), "--dry_run"]) == 2
    assert f"{binary}: not a text file" in capsys.readouterr().err
    regex = tmp_path / "r.yaml"
    regex.write_text(yaml.safe_dump({"runs": [{"name": "a", "model": "dlm", "tasks": "t"}],
                                     "compare": {"tasks": "([unclosed"}}))
    with pytest.raises(ValueError, match="compare: tasks '\\(\\[unclosed' is not a valid regular expression"):
        load_sweep(str(regex))


# ---- compare regexes ------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--tasks", "--plot_tasks"])
def test_compare_bad_regex_is_one_message(tmp_path, capsys, flag):
    from test_compare import write_results

    write_results(tmp_path / "run" / "results_2026-01-01T00-00-00.json", {"pretrained": "p"},
                  {"dlmem_ruler_vt_4k": {"score,none": 1.0}})
    argv = [str(tmp_path / "run"), flag, "([unclosed", "--plot", str(tmp_path / "p.png")]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flag} '([unclosed' is not a valid regular expression" in err
    assert not (tmp_path / "p.png").exists()
