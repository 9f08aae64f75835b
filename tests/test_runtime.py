"""One decision per process: device, precision and the split of cores between torch threads and loader workers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from finetune import runtime
from finetune.errors import UserError


@pytest.mark.parametrize("cores, gpu, workers, expected", [
    (1, False, None, runtime.CoreSplit(0, 1)),  # one core: load in the main process
    (2, False, None, runtime.CoreSplit(1, 1)),  # never more busy threads than cores
    (4, False, None, runtime.CoreSplit(1, 3)),
    (8, False, None, runtime.CoreSplit(2, 6)),
    (64, False, None, runtime.CoreSplit(8, 56)),  # workers capped
    (2, False, 0, runtime.CoreSplit(0, 2)),  # the user's worker count wins, torch gets the rest
    (4, False, 3, runtime.CoreSplit(3, 1)),
    (2, False, 5, runtime.CoreSplit(5, 1)),  # oversubscribed by the user: torch still gets one
    (2, True, None, runtime.CoreSplit(1, 1)),  # a GPU runs the model: loader takes all but one core
    (16, True, None, runtime.CoreSplit(8, 8)),
    (16, True, 2, runtime.CoreSplit(2, 14)),
    (1, True, None, runtime.CoreSplit(0, 1)),
])
def test_split_cores(cores, gpu, workers, expected):
    assert runtime.split_cores(cores, gpu, workers) == expected


CPU, CUDA0, CUDA1, CUDA3 = (torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1),
                            torch.device("cuda", 3))


@pytest.mark.parametrize("accelerator, cores, processes, rank, gpus, capability, workers, expected", [
    # one process: the whole machine
    ("auto", 2, 1, 0, 0, None, None, (CPU, "32-true", 1, 1)),
    ("cpu", 16, 1, 0, 4, (9, 0), None, (CPU, "32-true", 4, 12)),  # cpu asked for: GPUs ignored
    ("auto", 16, 1, 0, 1, (9, 0), None, (CUDA0, "bf16-mixed", 8, 8)),
    ("gpu", 16, 1, 0, 1, (7, 5), None, (CUDA0, "16-mixed", 8, 8)),  # pre-Ampere: fp16, not emulated bf16
    ("cuda", 16, 1, 0, 1, (8, 0), 3, (CUDA0, "bf16-mixed", 3, 13)),
    # DDP: the processes on a machine share its cores, each rank drives its own GPU
    ("cpu", 2, 2, 1, 0, None, None, (CPU, "32-true", 0, 1)),
    ("cpu", 16, 2, 0, 0, None, None, (CPU, "32-true", 2, 6)),
    ("cpu", 16, 4, 3, 0, None, None, (CPU, "32-true", 1, 3)),
    ("auto", 16, 4, 1, 4, (9, 0), None, (CUDA1, "bf16-mixed", 3, 1)),
    ("gpu", 64, 4, 3, 4, (9, 0), None, (CUDA3, "bf16-mixed", 8, 8)),
    ("gpu", 64, 8, 3, 8, (9, 0), 2, (CUDA3, "bf16-mixed", 2, 6)),
    ("auto", 3, 8, 0, 8, (9, 0), None, (CUDA0, "bf16-mixed", 0, 1)),  # fewer cores than ranks: one each
])
def test_decide_table(accelerator, cores, processes, rank, gpus, capability, workers, expected):
    rt = runtime.decide(accelerator, cores, processes, rank, gpus, capability, workers)
    assert (rt.device, rt.precision, rt.workers, rt.threads) == expected
    # the loader and the threads come from the same split: together they never oversubscribe this
    # process's share of the cores (unless the user asked for more workers)
    if workers is None:
        assert rt.workers + rt.threads <= max(1, cores // processes) or rt.workers == 0
    assert rt.pin_memory == (rt.device.type == "cuda")
    assert rt.accelerator == ("gpu" if rt.device.type == "cuda" else "cpu")


def test_user_precision_wins_and_autocast_follows_it():
    rt = runtime.decide("cpu", 2, 1, 0, 0, precision="bf16-mixed")
    assert rt.precision == "bf16-mixed"
    with rt.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16  # the hand-written loops forward in the precision training validates in
    with runtime.decide("cpu", 2, 1, 0, 0).autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_gpu_asked_for_without_cuda_is_an_error():
    with pytest.raises(UserError, match="no CUDA device"):
        runtime.decide("gpu", 2, 1, 0, 0)


@pytest.mark.parametrize("env, devices, strategy, expected", [
    ({}, "auto", "auto", 1),
    ({}, 2, "ddp", 2),
    ({}, "2", "ddp_spawn", 2),
    ({}, "0,1,2", "ddp", 3),
    ({}, 4, "auto", 1),  # no DDP strategy: one process
    ({"LOCAL_WORLD_SIZE": "4"}, "auto", "auto", 4),  # torchrun says
    ({"SLURM_NTASKS_PER_NODE": "8"}, 1, "ddp", 8),  # srun says
])
def test_processes_per_machine(monkeypatch, env, devices, strategy, expected):
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert runtime.processes_per_machine(devices, strategy) == expected


@pytest.mark.parametrize("env, expected", [({}, 0), ({"LOCAL_RANK": "3"}, 3), ({"SLURM_LOCALID": "2"}, 2),
                                           ({"LOCAL_RANK": "1", "SLURM_LOCALID": "5"}, 1)])
def test_local_rank(monkeypatch, env, expected):
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert runtime.local_rank() == expected


@pytest.fixture
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    yield
    torch.set_num_threads(before)


def test_configure_sets_torch_threads_and_tells_lightning(monkeypatch, restore_threads):
    monkeypatch.setattr(runtime, "available_cores", lambda: 4)
    rt = runtime.configure("cpu")
    assert (rt.workers, rt.threads) == (1, 3) and torch.get_num_threads() == 3
    # Lightning's DDP launcher sets cores / processes threads unless OMP_NUM_THREADS is set: it is now
    import os

    assert os.environ["OMP_NUM_THREADS"] == "3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert runtime.configure("cpu", workers=2).threads == 2 == torch.get_num_threads()


def test_configure_under_ddp_splits_this_process_share(monkeypatch, restore_threads):
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    rt = runtime.configure("cpu", devices=2, strategy="ddp")
    assert (rt.workers, rt.threads) == (1, 3)


def test_configure_explicit_threads_and_omp_env_win(monkeypatch, restore_threads):
    monkeypatch.setattr(runtime, "available_cores", lambda: 4)
    assert runtime.configure("cpu", workers=1, threads=2).threads == 2
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's environment: leave torch as it is
    assert runtime.configure("cpu", workers=1).threads == 1 == torch.get_num_threads()


def test_evaluating_on_restores_device_and_mode():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5)).train()
    with runtime.evaluating_on(net, "cpu"):
        assert not net.training
    assert net.training and runtime.module_device(net) == CPU


def test_evaluating_on_gives_channels_last_weights_and_puts_the_layout_back():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = net(x)
        with runtime.evaluating_on(net, "cpu"):
            assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
            assert torch.allclose(net(runtime.channels_last(x)), ref, atol=1e-5)
        assert net[0].weight.is_contiguous()
        with runtime.evaluating_on(net, "cpu", channels_last=False):
            assert net[0].weight.is_contiguous()


def test_inference_threads_take_the_workers_cores_and_give_them_back(monkeypatch, restore_threads):
    monkeypatch.setattr(runtime, "available_cores", lambda: 4)
    rt = runtime.configure("cpu")
    assert (rt.workers, rt.threads) == (1, 3)
    with runtime.inference_threads(rt):
        assert torch.get_num_threads() == 4
    assert torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice is left alone
    fixed = runtime.configure("cpu")
    with runtime.inference_threads(fixed):
        assert torch.get_num_threads() == 3


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
