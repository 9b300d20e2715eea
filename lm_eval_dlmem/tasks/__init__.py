"""The Python behind our lm-eval task YAMLs (`dlmem_ruler_*`, `dlmem_babilong_*`, `dlmem_longbench_*`).

The YAML configs live in the repository's top-level `tasks/` folder, which the wheel installs as
`lm_eval_dlmem/task_configs/`; `tasks_path()` finds either, so `--include_path $(lm-eval-dlmem
tasks-path)` works from a source checkout and from an installed wheel alike. YAMLs call into this
package with absolute imports (`!function lm_eval_dlmem.tasks.ruler.load`), so they resolve from any
include path and any working directory.

Modules: `common` (sizing tokenizer, seeds, hub access), `text` (word lists, haystacks, filler
prose), `ruler`, `ruler_niah`, `ruler_synthetic`, `ruler_qa` (RULER), `babi` and `babilong`
(BABILong), `longbench`, `metrics` and `rouge` (upstream scoring), `configs` (writes the YAMLs).
"""

from __future__ import annotations

import os

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tasks_path() -> str:
    """The directory to pass to lm-eval's `--include_path`.

    Returns:
        The installed `lm_eval_dlmem/task_configs` directory when the package was installed from a
        wheel, else the `tasks/` directory of the source checkout this module was imported from.

    Raises:
        FileNotFoundError: when neither exists (a broken install).
    """
    installed = os.path.join(_PACKAGE_DIR, "task_configs")
    if os.path.isdir(installed):
        return installed
    checkout = os.path.join(os.path.dirname(_PACKAGE_DIR), "tasks")
    if os.path.isdir(checkout):
        return checkout
    raise FileNotFoundError(
        f"No task configs found: neither {installed} (installed wheel) nor {checkout} (source checkout) "
        "exists. Reinstall lm-eval-dlmem (`pip install --force-reinstall lm-eval-dlmem`)."
    )


__all__ = ["tasks_path"]
