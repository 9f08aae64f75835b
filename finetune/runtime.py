"""Where a process runs: its device, its precision and its share of the CPU cores.

One decision per process, made once from the accelerator, the devices, the number of processes on
this machine and the local rank (`resolve`), and read by everything that runs a network or a data
loader: Lightning's Trainer (accelerator, devices, precision), every DataLoader (workers, pinned
memory), the torch thread count, and the hand-written forward loops (feature extraction, TTA,
evaluation, serving, batch prediction), which move the network to `device`, forward under
`autocast()` -- the precision that training validates in -- and put the network back where it was.

The core split. On a CPU the model and the data loader run on the same cores. torch's intra-op
threads work in lock-step: every operator waits for its slowest thread, so one thread preempted by
a loader worker (or another process) stalls them all. So the cores are *split*: decoding and
augmentation cost a small fraction of a forward/backward, so a quarter of the cores (at least one)
go to loader workers and torch gets the rest. With a GPU the model needs few cores, so the loader
gets all but one. Several processes on one machine (DDP) share its cores equally first. Loader
workers run one torch thread each (PyTorch's worker loop sets that).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from finetune.errors import UserError

log = logging.getLogger(__name__)

MAX_WORKERS = 8
GPU_ACCELERATORS = ("gpu", "cuda")
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "bf16": torch.bfloat16,
                   "16-mixed": torch.float16, "16-true": torch.float16, "16": torch.float16}


@dataclass(frozen=True)
class CoreSplit:
    workers: int  # data loader worker processes
    threads: int  # torch intra-op threads of the main process


@dataclass(frozen=True)
class Runtime:
    """The device, precision and cores of one process."""

    device: torch.device
    precision: str  # a Lightning precision string
    workers: int
    threads: int
    threads_fixed: bool = False  # the user set them (OMP_NUM_THREADS): `inference_threads` leaves them alone

    @property
    def accelerator(self) -> str:
        """What Lightning calls this device."""
        return "gpu" if self.device.type == "cuda" else "cpu"

    @property
    def lightning_devices(self) -> list[int] | int:
        """`devices` for a single-process Trainer on this process's own device."""
        return [self.device.index or 0] if self.device.type == "cuda" else 1

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast of Lightning's mixed precision (what training validates in); a no-op in fp32."""
        dtype = AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def loader_kwargs(self) -> dict[str, Any]:
        return {"num_workers": self.workers, "pin_memory": self.pin_memory}


def parse_devices(devices: str | int) -> Any:
    """`--devices` as Lightning takes it: "auto", a count, or a "0,1" list (left as a string)."""
    if isinstance(devices, int) or devices == "auto":
        return devices
    return int(devices) if str(devices).isdigit() else devices


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def split_cores(cores: int, gpu: bool, workers: int | None = None) -> CoreSplit:
    """Loader workers and torch threads for a process that owns `cores` cores; the user's `workers` win."""
    cores = max(1, cores)
    if workers is None:
        if gpu:
            workers = min(MAX_WORKERS, cores - 1)
        else:
            workers = 0 if cores == 1 else min(MAX_WORKERS, math.ceil(cores / 4))
    return CoreSplit(workers, max(1, cores - workers))


def default_precision(gpu: bool, capability: tuple[int, int] | None = None) -> str:
    """bf16 mixed precision on GPUs with native bf16 (Ampere, compute capability 8.0, and later), fp16
    mixed on older GPUs, full precision on CPU. `torch.cuda.is_bf16_supported()` also counts emulated
    bf16, which is slow, so the capability decides."""
    if not gpu:
        return "32-true"
    return "bf16-mixed" if capability is not None and capability >= (8, 0) else "16-mixed"


def local_rank() -> int:
    """This process's rank on its machine: torchrun and Lightning's launcher set LOCAL_RANK, srun SLURM_LOCALID."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def processes_per_machine(devices: Any = "auto", strategy: str = "auto", gpu: bool = False) -> int:
    """How many processes of this job share this machine's cores.

    torchrun says (LOCAL_WORLD_SIZE), so does srun (SLURM_NTASKS_PER_NODE); Lightning's own launcher
    starts one process per device of a `ddp*` strategy.
    """
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    if not str(strategy).startswith("ddp"):
        return 1
    if isinstance(devices, int) or str(devices).isdigit():
        return max(1, int(devices))
    if isinstance(devices, (list, tuple)) or "," in str(devices):
        return len(devices if isinstance(devices, (list, tuple)) else [d for d in str(devices).split(",") if d])
    if devices == "auto" and gpu:
        return max(1, torch.cuda.device_count())
    return 1


def decide(accelerator: str, cores: int, processes: int, rank: int, cuda_devices: int,
           capability: tuple[int, int] | None = None, workers: int | None = None,
           precision: str | None = None) -> Runtime:
    """The runtime of one process, from plain facts (a pure function: tested by a table).

    Args:
        accelerator: auto, cpu, gpu or cuda (Lightning's names).
        cores: cores this machine gives the job; `processes` processes share them equally.
        rank: the local rank; on a GPU it picks the device (one GPU per process).
        cuda_devices: GPUs visible (0: none).
        capability: the GPU's compute capability (decides bf16 vs fp16).
        workers / precision: given by the user, they win.
    """
    if accelerator in GPU_ACCELERATORS and cuda_devices == 0:
        raise UserError(f"--accelerator {accelerator} asks for a GPU, but PyTorch sees no CUDA device here. "
                        "Use --accelerator cpu (or auto), or check the driver and CUDA_VISIBLE_DEVICES.")
    gpu = accelerator in ("auto", *GPU_ACCELERATORS) and cuda_devices > 0
    device = torch.device("cuda", rank % cuda_devices) if gpu else torch.device("cpu")
    split = split_cores(max(1, cores // max(1, processes)), gpu, workers)
    return Runtime(device, precision or default_precision(gpu, capability), split.workers, split.threads)


def resolve(accelerator: str = "auto", devices: Any = "auto", strategy: str = "auto", precision: str | None = None,
            workers: int | None = None) -> Runtime:
    """The runtime of this process on this machine (see `decide`)."""
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu = accelerator in ("auto", *GPU_ACCELERATORS) and cuda_devices > 0
    rank = local_rank()
    capability = torch.cuda.get_device_capability(rank % cuda_devices) if gpu else None
    return decide(accelerator, available_cores(), processes_per_machine(devices, strategy, gpu), rank, cuda_devices,
                  capability, workers, precision)


def configure(accelerator: str = "auto", devices: Any = "auto", strategy: str = "auto", precision: str | None = None,
              workers: int | None = None, threads: int | None = None) -> Runtime:
    """Resolve this process's runtime and apply it: torch threads, and the current CUDA device.

    `threads` given by the caller wins, then an ``OMP_NUM_THREADS`` set in the environment (torch
    already honours it), then the split. The choice is also written to ``OMP_NUM_THREADS``, so
    Lightning's launcher (which otherwise gives every rank cores / processes threads, ignoring the
    loader workers) and the ranks it starts keep it.
    """
    rt = resolve(accelerator, devices, strategy, precision, workers)
    user_threads = os.environ.get("OMP_NUM_THREADS", "")
    fixed = bool(threads) or user_threads.isdigit()
    threads = threads or (int(user_threads) if user_threads.isdigit() else rt.threads)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
    rt = Runtime(rt.device, rt.precision, rt.workers, torch.get_num_threads(), fixed)
    log.info("Running on %s (%s) with %d data loader worker(s) and %d torch thread(s) on %d core(s)",
             rt.device, rt.precision, rt.workers, rt.threads, available_cores())
    return rt


def cpu() -> Runtime:
    """A CPU runtime with this process's threads and no loader workers (library calls and tests)."""
    return Runtime(torch.device("cpu"), "32-true", 0, torch.get_num_threads())


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for a module with neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def inference_threads(rt: Runtime) -> Iterator[None]:
    """A forward-only pass on the CPU (feature extraction, held-out crops, evaluation) gives torch the loader
    workers' cores too: decoding with the eval transform leaves them mostly idle, unlike training's
    augmentation (hymenoptera val at 160 px, mobilenetv2, 1 worker on 2 cores: 1.4x the images/s with 2 threads
    instead of 1; docs/decisions.md "Inference passes"). Threads the user fixed are left alone."""
    threads = rt.threads + rt.workers
    if rt.device.type != "cpu" or rt.threads_fixed or threads <= torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A batch of images [B, C, H, W] in the layout `evaluating_on` gives the weights."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


@contextlib.contextmanager
def evaluating_on(module: nn.Module, device: torch.device | str, channels_last: bool = True) -> Iterator[nn.Module]:
    """Run a hand-written forward loop with `module` in eval mode on `device`, its 4-d weights in channels_last
    layout unless told not to (the same numbers within float rounding; mobilenetv2 at 160 px, batch 32, 2 CPU
    threads: 1.3-1.56x the images/s, docs/decisions.md "Inference passes"); afterwards it is back on the device,
    in the layout and in the mode it was found in (callers hold on to the module, and a model left on a GPU
    would make the next CPU tensor fail)."""
    was_training, was_on = module.training, module_device(module)
    was_channels_last = any(p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last)
                            and not p.is_contiguous() for p in module.parameters())
    module.to(device).eval()
    if channels_last:
        module.to(memory_format=torch.channels_last)
    try:
        yield module
    finally:
        module.to(was_on, memory_format=torch.channels_last if was_channels_last else torch.contiguous_format)
        module.train(was_training)
