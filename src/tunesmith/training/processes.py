"""The processes of one run launched by ``torchrun`` or ``accelerate launch``, on one or more nodes.

Every process runs the same flow and takes part in every collective; only the main process of
the main node (Accelerate's ``is_main_process``: global rank 0, not each node's local main)
writes the run directory. A decision that rests on what a process finds on disk is taken by the
main process and followed by the others, or checked to be the same everywhere: a process that
went its own way would wait forever in a collective the others never join.

On a machine without a GPU, Accelerate must be told so (``cpu=True``) to join the process group
with gloo: otherwise every process of a CPU run takes itself for the only one and trains the
whole batch alone, each writing the same run directory.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object

from tunesmith.errors import TrainingError, TunesmithError

__all__ = ["accelerator", "main_decides", "processes", "same_everywhere", "wait_for_main"]

T = TypeVar("T")


def _cpu_only() -> bool:
    found = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return not (found.is_available() if found is not None else torch.cuda.is_available())


def processes() -> PartialState:
    """This process's place in the run (joining the process group torchrun set up, if any)."""
    return PartialState(cpu=_cpu_only())


def accelerator() -> Accelerator:
    """The run's Accelerator, in the same process group as ``processes()``."""
    return Accelerator(cpu=_cpu_only())


def main_decides(group: Any, decide: Callable[[], T]) -> T:
    """``decide()`` on the main process; its result, or its error, on every process.

    ``group`` is a ``PartialState`` or an ``Accelerator``. The others raise the main process's
    ``TunesmithError`` message too, so every process stops instead of one waiting for the rest.
    """
    result: Any = None
    error: TunesmithError | None = None
    if group.is_main_process:
        try:
            result = decide()
        except TunesmithError as err:
            error = err
    if group.num_processes > 1:
        box = [result, None if error is None else str(error)]
        broadcast_object_list(box, from_process=0)
        result, failed = box
        if failed is not None and error is None:
            raise TunesmithError(failed)
    if error is not None:
        raise error
    return result


def wait_for_main(group: Any) -> Callable[[], None]:
    """A barrier for the end of a run, where the main process has done alone what the others
    skip (evaluation, report); made now, by every process at the same point.

    The others must not exit first: torchrun's agent of a node whose processes are done waits
    only 300 s for the rest, and when that agent hosts the rendezvous store, the main node's
    agent fails with it and stops the main process. The barrier is gloo's, with a timeout
    no evaluation reaches (a collective's default is 10 to 30 minutes).
    """
    if group.num_processes == 1:
        return lambda: None
    waiting = torch.distributed.new_group(backend="gloo", timeout=timedelta(days=7))
    return lambda: torch.distributed.barrier(group=waiting)


def same_everywhere(group: Any, value: T, *, what: str, fix: str) -> T:
    """``value`` when every process holds the same one; else a ``TrainingError`` everywhere
    naming ``what`` differs, with ``fix``."""
    if group.num_processes == 1:
        return value
    seen = gather_object([value])
    if any(v != seen[0] for v in seen):
        raise TrainingError(f"the processes disagree on {what} ({', '.join(map(str, seen))}, "
                            f"by rank); {fix}")
    return value
