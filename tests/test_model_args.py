import pytest

from lm_eval_dlmem.model_args import ModelArgs


def test_cli_types_are_cast():
    # lm-eval turns "-1" into -1.0, "8" into int, "true" into bool, "none" into None
    a = ModelArgs.from_kwargs(pretrained="x", steps=64.0, gen_length="128", mc_num=-1.0 + 17,
                              stop_early="false", metastate="none", cfg=0.5, batch_size=8)
    assert a.steps == 64 and isinstance(a.steps, int)
    assert a.gen_length == 128
    assert a.mc_num == 16
    assert a.stop_early is False
    assert a.metastate is None
    assert a.cfg_scale == 0.5  # LLaDA's `cfg` alias
    assert a.batch_size == "8"


def test_unknown_arg_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        ModelArgs.from_kwargs(pretrained="x", stepz=3)
    msg = str(e.value)
    assert "stepz" in msg and "Did you mean steps" in msg and "Valid model args" in msg


def test_malformed_value_is_named():
    with pytest.raises(ValueError, match=r"steps=.*malformed"):
        ModelArgs.from_kwargs(pretrained="x", steps="many")
    with pytest.raises(ValueError, match="malformed"):
        ModelArgs.from_kwargs(pretrained="x", steps=2.5)


def test_trust_remote_code_is_accepted_with_one_warning_saying_no_remote_code_runs(caplog):
    """Official LLaDA/Dream commands carry trust_remote_code=True (and lm-eval's --trust_remote_code
    adds it to the model args): accepted, with one warning; False says nothing."""
    with caplog.at_level("WARNING", logger="lm_eval_dlmem.model_args"):
        ModelArgs.from_kwargs(pretrained="x", trust_remote_code=True)
    assert [r.getMessage() for r in caplog.records] == [
        "trust_remote_code=True is ignored: lm_eval_dlmem ships its own LLaDA/Dream/LLaDA-MoE code, "
        "so no remote code is run."]
    caplog.clear()
    with caplog.at_level("WARNING", logger="lm_eval_dlmem.model_args"):
        ModelArgs.from_kwargs(pretrained="x", trust_remote_code="false")
    assert caplog.records == []
    with pytest.raises(ValueError, match="trust_remote_code='maybe' is malformed: expected bool"):
        ModelArgs.from_kwargs(pretrained="x", trust_remote_code="maybe")


def test_peft_is_hflms_name_for_adapter():
    a = ModelArgs.from_kwargs(pretrained="x", peft="org/lora")
    assert a.adapter == "org/lora"
    assert ModelArgs.from_kwargs(pretrained="x", peft="none").adapter is None
    with pytest.raises(ValueError, match="cannot be combined"):
        ModelArgs.from_kwargs(pretrained="x", peft="org/lora", metastate="ckpt")


def test_pretrained_required_and_memory_exclusive():
    with pytest.raises(ValueError, match="pretrained= is required"):
        ModelArgs.from_kwargs()
    with pytest.raises(ValueError, match="cannot be combined"):
        ModelArgs.from_kwargs(pretrained="x", metastate="ckpt", inner_steps=2)


def test_fast_dllm_cache_spelling():
    assert ModelArgs.from_kwargs(pretrained="x", use_cache=True).cache == "prefix"
    assert ModelArgs.from_kwargs(pretrained="x", use_cache=True, dual_cache=True).cache == "dual"


def test_preset_defaults_are_overridable():
    a = ModelArgs.from_kwargs({"strategy": "dream", "alg": "entropy"}, pretrained="x", alg="maskgit_plus")
    assert a.strategy == "dream" and a.alg == "maskgit_plus"


def test_fingerprint_ignores_batch_size_only():
    a = ModelArgs.from_kwargs(pretrained="x", batch_size=1).fingerprint_fields()
    b = ModelArgs.from_kwargs(pretrained="x", batch_size=8).fingerprint_fields()
    c = ModelArgs.from_kwargs(pretrained="x", steps=8).fingerprint_fields()
    assert a == b and a != c


def test_memdlm_switches_default_to_the_released_code_and_reach_the_inner_loop_config():
    from lm_eval_dlmem.memory.fast_weights import MemDLMConfig

    a = ModelArgs.from_kwargs(pretrained="x")
    assert (a.inner_targets, a.inner_adapter_dropout) == ("released", True)
    assert (MemDLMConfig().inner_targets, MemDLMConfig().inner_adapter_dropout) == ("released", True)
    a = ModelArgs.from_kwargs(pretrained="x", inner_targets="ffn", inner_adapter_dropout="false")
    assert (a.inner_targets, a.inner_adapter_dropout) == ("ffn", False)
    assert "inner_targets" in a.fingerprint_fields() and "inner_adapter_dropout" in a.fingerprint_fields()
    with pytest.raises(ValueError, match=r"inner_targets='all'; choose one of \('released', 'ffn'\)"):
        MemDLMConfig(inner_targets="all")


def test_hflm_big_model_args_map_to_parallelize_or_name_what_to_use():
    """HFLM's device_map=auto is our parallelize=True; other device maps and CPU/disk offload are
    refused naming the arg and what fits a large model instead (not 'Unknown model arg')."""
    assert ModelArgs.from_kwargs(pretrained="x", device_map="auto").parallelize is True
    with pytest.raises(ValueError, match=r"device_map='cuda:1' is not supported: only device_map=auto.*device="):
        ModelArgs.from_kwargs(pretrained="x", device_map="cuda:1")
    for key, value in [("max_memory_per_gpu", "20GB"), ("max_cpu_memory", "100GB"), ("offload_folder", "/tmp/o")]:
        with pytest.raises(ValueError, match=rf"Model arg {key}='{value}' is not supported: CPU/disk offload.*"
                                             "load_in_4bit=True"):
            ModelArgs.from_kwargs(pretrained="x", **{key: value})


def test_batch_size_auto_n_warns_that_n_is_not_honoured(caplog):
    """lm-eval's auto:N recomputes the batch size N times; ours never recomputes, so N would be
    silently dropped: one warning says so. Plain auto and integers say nothing."""
    with caplog.at_level("WARNING", logger="lm_eval_dlmem.model_args"):
        ModelArgs.from_kwargs(pretrained="x", batch_size="auto")
        ModelArgs.from_kwargs(pretrained="x", batch_size=8)
        assert caplog.records == []
        ModelArgs.from_kwargs(pretrained="x", batch_size="auto:4")
    (record,) = caplog.records
    assert record.getMessage().startswith("batch_size=auto:4: the N of auto:N is ignored.")
