"""`--cache_requests` and our tasks: lm-eval keys cached requests without the task metadata, but
our documents are made from it; the key of `dlmem_*` tasks includes it."""

import pytest


@pytest.mark.parametrize("metadata", [{"data_seed": 1}, {"num_samples": 3}])
def test_cached_requests_follow_the_task_metadata(monkeypatch, tmp_path, metadata):
    import lm_eval.caching.cache as cache
    from lm_eval.tasks import TaskManager, get_task_dict

    from lm_eval_dlmem.tasks import tasks_path

    monkeypatch.setattr(cache, "PATH", str(tmp_path))
    name = "dlmem_ruler_niah_single_1_1k"

    def prompts(meta, cache_requests):
        tm = TaskManager(include_path=tasks_path(), include_defaults=False,
                         metadata={"pretrained": "tiny-llada", "num_samples": 2, **meta})
        task = get_task_dict([name], tm)[name]
        task.build_all_requests(rank=0, world_size=1, cache_requests=cache_requests)
        return [inst.args[0] for inst in task.instances]

    first = prompts({}, True)
    fresh = prompts(metadata, False)
    assert fresh != first
    assert prompts(metadata, True) == fresh  # not the first run's cached prompts
    assert prompts({}, True) == first  # and the first configuration still answers from its cache
