"""How processes that run at once on one machine share it (trials of a study, clients of a
federation simulated on one machine)."""

from __future__ import annotations

import os


def share_of_machine(jobs: int, slot: int) -> dict[str, str]:
    """The environment of the process in ``slot`` (0..jobs-1) when ``jobs`` run at once: its
    share of the CPU cores (torch reads these variables at start) and, where there are GPUs,
    one of them (round robin over the visible ones).

    Without it each process takes every core, and their OpenMP threads, outnumbering the
    cores, spin-wait on each other: three clients training at once on 2 cores ran several
    times slower than the same work one at a time."""
    if jobs <= 1:
        return {}
    share = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share}
    import torch

    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else \
            [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
    return env
