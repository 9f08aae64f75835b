"""Multi-process training (DDP): one MLflow run, one output folder, one evaluation.

Whoever starts the ranks (Lightning's own `ddp` launcher, torchrun, srun), `start` makes them all exist
and join the process group before any work: Lightning's launcher is asked to start its ranks there and
then instead of inside `trainer.fit`, torchrun / srun ranks join right away, and Lightning reuses the
group in `fit` (`_init_dist_connection` returns early when it exists). The one-time work (the data
scan, feature extraction, similarity probe and decision, the MLflow run and the output folder) then
runs on global rank 0 only, and `on_rank_zero` sends its result (or its error) to the other ranks,
which never touch the MLflow store nor create folders. Every rank trains; DDP broadcasts rank 0's
parameters when it wraps the model, so what rank 0 alone fitted (a warmed-up head) reaches every rank.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
from typing import Any, Callable, TypeVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers.logger import Logger

from finetune.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Rank 0's one-time work (feature extraction over a large folder on a CPU) can take hours; the other
# ranks wait for it in a CPU (gloo) group of their own with this limit, instead of the training group's
# 30 minutes. A rank that dies closes its connections, so the others stop at once, not at this limit.
ONE_TIME_WORK_TIMEOUT = datetime.timedelta(hours=24)
_one_time_group: Any = None


class RankZeroFailed(UserError):
    """Raised on the other ranks when global rank 0 failed during its one-time work."""

    exit_code = 1


def is_global_zero() -> bool:
    """Whether this process is global rank 0: the process group's answer once it exists, before that the
    launcher's environment.

    torchrun sets RANK; ranks that Lightning launches get LOCAL_RANK and NODE_RANK (they inherit
    SLURM_PROCID from their parent, so it is looked at last); srun sets SLURM_PROCID.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    if os.environ.get("RANK"):
        return int(os.environ["RANK"]) == 0
    if os.environ.get("LOCAL_RANK") or os.environ.get("NODE_RANK"):
        return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    return int(os.environ.get("SLURM_PROCID", 0)) == 0


def start(accelerator: str, devices: Any, strategy: str, num_nodes: int, precision: str) -> int:
    """Start (or join) every rank of a multi-process run and initialise the process group now.

    Lightning decides from the options and the environment what the run is (its cluster environments
    detect torchrun and srun). With its own launcher, rank 0 starts the other ranks here: they re-run
    the same command, reach this point and join. Returns the world size (1: nothing to do).
    """
    from pytorch_lightning.strategies import ParallelStrategy
    from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

    global _one_time_group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes,
                         precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    strat = trainer.strategy
    launched_outside = _launched_outside()
    if not isinstance(strat, ParallelStrategy) or strat.num_nodes * strat.num_processes == 1:
        if launched_outside:
            raise UserError(f"This is one of {os.environ.get('WORLD_SIZE') or os.environ.get('SLURM_NTASKS')} "
                            f"processes started by torchrun/srun, but --strategy {strategy} --devices {devices} "
                            "trains in one process. Pass --strategy ddp, --devices <processes per node> and "
                            "--num-nodes <nodes>.")
        return 1
    env = strat.cluster_environment
    if env.creates_processes_externally:
        try:  # Lightning checks this only in its own launcher
            env.validate_settings(num_devices=strat.num_processes, num_nodes=strat.num_nodes)
        except ValueError as e:
            raise UserError(f"The launcher's processes do not match the options: {e}") from None
    if isinstance(strat.launcher, _SubprocessScriptLauncher) or strat.launcher is None:
        # Lightning's own launcher starts the other ranks (then sets up this one); torchrun/srun have.
        if strat.launcher is not None:
            strat.launcher.launch(strat.setup_environment)
        else:
            strat.setup_environment()
    else:  # ddp_spawn and the like: only `trainer.fit` runs in the spawned workers; this process does the rest
        return 1
    _one_time_group = torch.distributed.new_group(backend="gloo", timeout=ONE_TIME_WORK_TIMEOUT)
    log.info("Rank %d of %d joined the process group", torch.distributed.get_rank(), torch.distributed.get_world_size())
    return torch.distributed.get_world_size()


def _launched_outside() -> bool:
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return int(os.environ.get("WORLD_SIZE", 1)) > 1
    return int(os.environ.get("SLURM_NTASKS", 1)) > 1 and SLURMEnvironment.detect()


def is_multi_process() -> bool:
    """Whether this run has joined other ranks (`start` made the one-time group)."""
    return _one_time_group is not None


def on_rank_zero(fn: Callable[[], T]) -> T:
    """Run `fn` on global rank 0 only; every other rank waits and gets its result, or raises its error.

    In a single process (or before `start`), `fn` just runs. The result is pickled: keep it to data
    (no models). An error on rank 0 stops the other ranks too, with the same message for a UserError.
    """
    if _one_time_group is None:
        return fn()
    if torch.distributed.get_rank() == 0:
        try:
            result = fn()
        except BaseException as e:
            _broadcast((False, _shareable(e)))
            raise
        _broadcast((True, result))
        return result
    ok, value = _broadcast(None)
    if not ok:
        raise value
    return value


def _broadcast(obj: Any) -> Any:
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, group=_one_time_group)
    return box[0]


def _shareable(error: BaseException) -> UserError:
    if isinstance(error, UserError):
        try:
            return pickle.loads(pickle.dumps(error))
        except Exception:
            return UserError(error.message)
    return RankZeroFailed(f"Global rank 0 failed ({type(error).__name__}: {str(error)[:300]}); see its output. "
                          "This rank stops too.")


class QuietLogger(Logger):
    """The logger of ranks other than 0: logs nothing and opens no MLflow client (creating one creates
    the store's tables; rank 0 alone writes to MLflow). LearningRateMonitor needs some logger."""

    def __init__(self, run_id: str):
        super().__init__()
        self._run_id = run_id

    @property
    def name(self) -> str:
        return "finetune"

    @property
    def version(self) -> str:
        return self._run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def param_fingerprint(module: torch.nn.Module) -> float:
    """A number that changes with any parameter (sum of |p| weighted by position), cheap to gather."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(module.parameters()):
        total += (i + 1) * p.detach().double().abs().sum().cpu()
    return float(total)


class RankSyncCheck(pl.Callback):
    """At the end of training, gather a parameter fingerprint from every rank: they must be equal
    (DDP keeps them so unless a rank changed `requires_grad` or parameters on its own)."""

    def __init__(self) -> None:
        self.fingerprints: list[float] = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mine = torch.tensor([param_fingerprint(pl_module)], dtype=torch.float64)
        gathered = trainer.strategy.all_gather(mine)
        self.fingerprints = [float(v) for v in gathered.reshape(-1)]
        if not self.in_sync:
            log.error("DDP ranks ended training with different parameters: %s", self.fingerprints)

    @property
    def in_sync(self) -> bool:
        return all(v == self.fingerprints[0] for v in self.fingerprints)

    def report(self, world_size: int) -> dict[str, Any]:
        return {"world_size": world_size, "param_fingerprints": self.fingerprints, "ranks_in_sync": self.in_sync}
