"""Multi-process training (DDP): one MLflow run, one evaluation, one set of files.

Lightning's `ddp` strategy re-launches the whole command once per extra device, and torchrun / SLURM
start every rank themselves. Every rank trains; only global rank 0 talks to MLflow, evaluates and
writes files. Rank 0 shares the run id and output folder with the ranks Lightning launches through
environment variables set before launching (children inherit them).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)

RUN_ID_ENV = "FINETUNE_RUN_ID"
OUTPUT_ENV = "FINETUNE_OUTPUT"


def is_global_zero() -> bool:
    """Whether this process is global rank 0, before any process group exists.

    torchrun sets RANK; ranks that Lightning launches get LOCAL_RANK and NODE_RANK (they inherit
    SLURM_PROCID from their parent, so it is looked at last); srun sets SLURM_PROCID.
    """
    if os.environ.get("RANK"):
        return int(os.environ["RANK"]) == 0
    if os.environ.get("LOCAL_RANK") or os.environ.get("NODE_RANK"):
        return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    return int(os.environ.get("SLURM_PROCID", 0)) == 0


def share_run(run_id: str, output: Path) -> None:
    """Make the run id and output folder known to the ranks Lightning is about to launch."""
    os.environ[RUN_ID_ENV] = run_id
    os.environ[OUTPUT_ENV] = str(Path(output).resolve())


def shared_run() -> tuple[str | None, Path | None]:
    """The run id and output folder rank 0 shared, on the other ranks; (None, None) otherwise."""
    if is_global_zero():
        return None, None
    output = os.environ.get(OUTPUT_ENV)
    return os.environ.get(RUN_ID_ENV), Path(output) if output else None


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
