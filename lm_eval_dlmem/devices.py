"""Where the harness runs: one device, or one rank of a data-parallel `accelerate launch`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """The process's share of the work.

    Args:
        device: where inputs go (and the model, unless `parallelize` spreads it with device_map).
        accelerator: the `Accelerator` of a data-parallel launch; None in a single process.
        rank / world_size: this process among the data-parallel ones (0 / 1 alone).
    """

    device: torch.device
    accelerator: object | None = None
    rank: int = 0
    world_size: int = 1

    def model_placement(self, parallelize: bool) -> dict:
        """`load_backbone`'s device / device_map: this process's device, or with `parallelize`
        the model spread over the visible devices by device_map="auto"."""
        return dict(device=None if parallelize else self.device, device_map="auto" if parallelize else None)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor of every rank, concatenated (itself in a single process)."""
        return self.accelerator.gather(tensor) if self.accelerator is not None else tensor

    def gather_object(self, obj, dst: int = 0) -> list | None:
        """Every rank's `obj` as a list on rank `dst` (None on the others); [obj] alone."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a single process)."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def place(requested: str | None, parallelize: bool) -> Placement:
    """The harness's device from `device=` and the launcher.

    lm-eval's CLI sends `cuda:0` when --device is not given: on a machine without CUDA that runs
    on CPU with a warning instead of failing. Under `accelerate launch` with several processes each
    rank takes the accelerator's device; `parallelize=True` (one model over several devices)
    cannot be combined with it.
    """
    from accelerate import Accelerator, InitProcessGroupKwargs

    if requested in ("cuda:0", "cuda") and not torch.cuda.is_available():
        default = " (lm-eval's default --device)" if requested == "cuda:0" else ""
        log.warning("device=%s%s, but torch sees no CUDA device here: running on CPU. Pass --device cpu "
                    "to ask for it.", requested, default)
        requested = "cpu"
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])
    if accelerator.num_processes == 1:
        return Placement(torch.device(requested or "cpu"))
    if parallelize:
        raise ValueError("parallelize=True (one model spread over devices) cannot be combined with "
                         "data-parallel `accelerate launch`; use one or the other.")
    return Placement(accelerator.device, accelerator, accelerator.process_index, accelerator.num_processes)
