"""How a process shares the machine's cores between the model and the data loader workers.

On a CPU the model and the data loader run on the same cores. torch's intra-op threads work in
lock-step: every operator waits for its slowest thread, so one thread preempted by a loader worker
(or by another process) stalls them all; measured here, a step went from 2.9 s with one thread to
32 s with two while other processes competed. So on a CPU the cores are *split*: decoding and
augmentation cost a small fraction of a forward/backward (about 5 ms per 224px image against 30 ms+
of model time), so a quarter of the cores (at least one) go to loader workers, and torch gets the
rest, never more threads than cores left to it. Loader workers run one torch thread each (PyTorch's
worker loop sets that). With a GPU the model does not need the CPU cores, so the loader gets them
all but one.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MAX_WORKERS = 8


@dataclass(frozen=True)
class CoreSplit:
    workers: int  # data loader worker processes
    threads: int | None  # torch intra-op threads of the main process; None: torch's default


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def split_cores(cores: int, gpu: bool, workers: int | None = None) -> CoreSplit:
    """Decide loader workers and torch threads for `cores` cores; `workers` given by the user wins."""
    cores = max(1, cores)
    if gpu:
        return CoreSplit(min(MAX_WORKERS, cores - 1) if workers is None else workers, None)
    if workers is None:
        workers = 0 if cores == 1 else min(MAX_WORKERS, math.ceil(cores / 4))
    return CoreSplit(workers, max(1, cores - workers))


def uses_gpu(accelerator: str = "auto") -> bool:
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def configure(accelerator: str = "auto", workers: int | None = None, threads: int | None = None) -> CoreSplit:
    """Apply the split to this process (torch threads) and return it.

    `threads` given by the caller wins, then an ``OMP_NUM_THREADS`` set in the environment (torch
    already honours it), then the split.
    """
    split = split_cores(available_cores(), uses_gpu(accelerator), workers)
    if not threads and not os.environ.get("OMP_NUM_THREADS"):
        threads = split.threads
    if threads and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    split = CoreSplit(split.workers, torch.get_num_threads())
    log.info("Using %d data loader worker(s) and %d torch thread(s) on %d core(s)", split.workers, split.threads,
             available_cores())
    return split
