"""The split of cores between torch threads and data loader workers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from finetune import runtime
from finetune.data import default_num_workers


@pytest.mark.parametrize("cores, gpu, workers, expected", [
    (1, False, None, runtime.CoreSplit(0, 1)),  # one core: load in the main process
    (2, False, None, runtime.CoreSplit(1, 1)),  # never more busy threads than cores
    (4, False, None, runtime.CoreSplit(1, 3)),
    (8, False, None, runtime.CoreSplit(2, 6)),
    (64, False, None, runtime.CoreSplit(8, 56)),  # workers capped
    (2, False, 0, runtime.CoreSplit(0, 2)),  # the user's worker count wins, torch gets the rest
    (4, False, 3, runtime.CoreSplit(3, 1)),
    (2, False, 5, runtime.CoreSplit(5, 1)),  # oversubscribed by the user: torch still gets one
    (2, True, None, runtime.CoreSplit(1, None)),  # a GPU runs the model: loader takes all but one core
    (16, True, None, runtime.CoreSplit(8, None)),
    (16, True, 2, runtime.CoreSplit(2, None)),
    (1, True, None, runtime.CoreSplit(0, None)),
])
def test_split_cores(cores, gpu, workers, expected):
    assert runtime.split_cores(cores, gpu, workers) == expected


def test_default_num_workers_follows_the_split(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    monkeypatch.setattr(runtime, "uses_gpu", lambda accelerator="auto": False)
    assert default_num_workers() == 2


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configure_sets_torch_threads_to_the_cores_left(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 4)
    split = runtime.configure("cpu", workers=None)
    assert split == runtime.CoreSplit(1, 3) and torch.get_num_threads() == 3
    assert runtime.configure("cpu", workers=2).threads == 2 == torch.get_num_threads()


def test_configure_explicit_threads_and_omp_env_win(monkeypatch, restore_threads):
    monkeypatch.setattr(runtime, "available_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.configure("cpu", workers=1, threads=2).threads == 2
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's environment: leave torch as it is
    assert runtime.configure("cpu", workers=1).threads == 1 == torch.get_num_threads()


class _Threads(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.get_num_threads()


def test_loader_workers_run_one_torch_thread(restore_threads):
    """The split counts each worker as one core: PyTorch's worker loop must keep them at one thread."""
    torch.set_num_threads(2)
    seen = [int(t) for batch in DataLoader(_Threads(), batch_size=1, num_workers=1) for t in batch]
    assert seen == [1, 1]
