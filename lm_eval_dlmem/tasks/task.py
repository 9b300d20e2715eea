"""The lm-eval task class of our generated tasks (RULER, BABILong, LongBench, demo).

Their documents come from a loader (`custom_dataset: !function lm_eval_dlmem.tasks.<x>.load`),
called with the task's metadata (task YAML `metadata`, `--model_args`, `--metadata`) and its
`dataset_kwargs`, exactly as lm-eval's `ConfigurableTask` calls it. The one difference: lm-eval
prints a two-line "Custom kwargs can be passed to `--metadata` ..." hint for every task with a
`custom_dataset`, written for its own RULER (22 lines for `dlmem_ruler_1k`). Our loaders take
their options from the model args and the task YAML (docs/tasks.md), so the hint is noise here.
The task YAMLs name this class with `class: !function lm_eval_dlmem.tasks.task.GeneratedTask`.
"""

from __future__ import annotations

from lm_eval.api.task import ConfigurableTask


class GeneratedTask(ConfigurableTask):
    """A `ConfigurableTask` whose dataset is built by its `custom_dataset` loader, quietly."""

    def __init__(self, config: dict | None = None):
        # lm-eval hands a `class:` task its whole YAML, `class` key included; TaskConfig has no such field
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"})

    def download(self, dataset_kwargs: dict | None = None, **kwargs) -> None:
        loader = self.config.custom_dataset
        if not callable(loader):
            raise ValueError(f"{self.config.task}: class GeneratedTask needs custom_dataset: !function <loader>.")
        self.dataset = loader(**(self.config.metadata or {}), **(self.config.dataset_kwargs or {}))


__all__ = ["GeneratedTask"]
