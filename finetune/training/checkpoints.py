"""Interrupted training: checkpoints that survive signals, and `finetune train --resume RUN_ID|last`.

Lightning does the heavy lifting: `trainer.fit(ckpt_path=...)` restores weights, optimizer, scheduler, loop
counters and the state of every callback that implements `state_dict` (EMA, RNG state, ...). What this
module adds:

* `last.ckpt` after every epoch (Lightning 2.6's `save_last` rewrites it only when the monitored
  metric improved);
* every checkpoint written to a temporary file in its own folder, fsynced and renamed
  (`AtomicCheckpointIO`: Lightning's own writer goes through the system temp folder, which on another
  filesystem turns the rename into a copy that a kill or a full disk cuts short), and the resume point
  kept two deep: the previous `last.ckpt` stays as `last.prev.ckpt` until the next one is complete;
* the run id and a digest of the run's file list in every checkpoint (`RunIdentity`), checked on resume;
* the global RNG state in the checkpoint, so a resumed run draws the same batches as an uninterrupted one;
* SIGTERM and Ctrl+C stop at the end of the current batch and write `last.ckpt` before exiting;
* finding a run's output folder and checkpoint from its MLflow run id (the `finetune.output` tag);
* refusing checkpoints that hold pickled code (they are loaded with `weights_only=True`).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from finetune.config import TrainConfig
from finetune.errors import UserError
from finetune.files import atomic_write, copy_file

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"
PREVIOUS_CHECKPOINT = "last.prev.ckpt"  # the resume point before the last one
# Two SIGINTs closer than this are one Ctrl+C (a launcher forwarding it); a later one aborts.
SAME_CTRL_C_S = 1.0


class Interrupted(UserError):
    """Training stopped by a signal after saving a checkpoint; the message says how to resume."""

    exit_code = 130


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def epoch_checkpoint(output: str | Path) -> ModelCheckpoint:
    """Writes `last.ckpt` (atomically) after every epoch's validation, whatever the metrics did."""
    return ModelCheckpoint(dirpath=checkpoint_dir(output), filename=Path(LAST_CHECKPOINT).stem, monitor=None,
                           save_top_k=1, every_n_epochs=1, save_on_train_epoch_end=False,
                           enable_version_counter=False)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic in the checkpoint's own folder and two deep for `last.ckpt`.

    The checkpoint goes to a temporary file beside its target, is fsynced, and replaces the target by a rename;
    the `last.ckpt` it replaces is first hard-linked as `last.prev.ckpt`. A kill or a full disk at any moment
    leaves `last.ckpt` (and the one before it) whole; a failed write is a UserError that says so.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        try:
            with atomic_write(path, "wb") as f:
                torch.save(checkpoint, f)
                if path.name == LAST_CHECKPOINT and path.exists():
                    _keep_previous(path)
        except OSError as e:
            previous = [str(p) for p in (path, path.with_name(PREVIOUS_CHECKPOINT)) if p.is_file()]
            raise UserError(f"Cannot write checkpoint {path} ({e.strerror or e}). "
                            + (f"The earlier resume point is intact: {', '.join(previous)}. " if previous else "")
                            + "Free disk space (or fix the folder's permissions), then resume the run.") from None


def _keep_previous(path: Path) -> None:
    """`last.prev.ckpt` becomes a second name of the current `last.ckpt`, by a hard link renamed into place."""
    previous = path.with_name(PREVIOUS_CHECKPOINT)
    link = path.with_name(f".{PREVIOUS_CHECKPOINT}.link")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # no hard links on this filesystem: a copy, written atomically too
        copy_file(path, previous)
        return
    os.replace(link, previous)


def resume_candidates(output: str | Path) -> list[Path]:
    """The run's resume points, newest first: `last.ckpt`, then the one before it."""
    folder = checkpoint_dir(output)
    return [p for p in (folder / LAST_CHECKPOINT, folder / PREVIOUS_CHECKPOINT) if p.is_file()]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with tensors and plain data only; a pickle carrying code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"Refused to load checkpoint {path}: it holds pickled Python objects, not just tensors "
                        f"and plain data ({str(e).splitlines()[0][:200]}). Only resume from checkpoints "
                        "written by finetune.") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"Cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                        "It may be truncated; delete it to resume from an earlier one, or start afresh.") from None


class RunIdentity(pl.Callback):
    """Puts the run's identity (MLflow run id, digest of its file list) into every checkpoint; `--resume` checks
    it before training (`identity_of`), so nothing is restored here."""

    def __init__(self, identity: dict[str, Any]):
        self.identity = dict(identity)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.identity)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def identity_of(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The `RunIdentity` state of a checkpoint ({} for one written before checkpoints carried it)."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith(RunIdentity.__qualname__):
            return dict(state)
    return {}


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


class RngState(pl.Callback):
    """Seeds the global RNGs at the start of every training epoch from (seed, epoch), and puts their
    states into every checkpoint.

    A run resumed from an epoch checkpoint then augments (and drops out) exactly like an uninterrupted
    one: what happened between the checkpoint and the next epoch (validation creating its data
    iterator draws from the torch RNG, for one) no longer matters (docs/decisions.md). The states in the
    checkpoint cover what is not re-seeded (a checkpoint written mid-epoch).
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before the epoch's data iterator exists (Lightning creates it after this hook), so the
        # worker seeds it draws are covered too. Ranks get different streams, as with seed_everything.
        epoch_seed = (self.seed * 1_000_003 + trainer.current_epoch * 7_919 + trainer.global_rank) % 2**32
        torch.manual_seed(epoch_seed)
        random.seed(epoch_seed)
        np.random.seed(epoch_seed)

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                "python_version": random.getstate()[0], "numpy": _numpy_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate((state["python_version"], tuple(state["python"]), None))
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class SaveOnInterrupt(pl.Callback):
    """SIGTERM (and a first Ctrl+C, turned into the same thing) stops at the end of the current batch;
    the state is then written to `last.ckpt` so `--resume` continues from there.

    Under DDP a Ctrl+C reaches every rank (or some: srun, a `kill -INT`) at a different point of its step.
    Each rank only notes it; at the end of every training batch the ranks agree (a max over ranks) and,
    when any was interrupted, every rank sends itself SIGTERM at that same point, so Lightning stops
    them all after that batch (its SIGTERM handler's broadcast then pairs up across ranks) and every
    rank takes part in saving the checkpoint, which is collective under DDP.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.interrupted: str | None = None
        self._previous_sigint: Any = None
        self._ctrl_c = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _in_main_thread():
            # Lightning handles SIGTERM gracefully (stop at the batch end) but aborts on Ctrl+C wherever it
            # happens; route the first Ctrl+C through the SIGTERM path, a second one aborts.
            self._previous_sigint = signal.getsignal(signal.SIGINT)
            several = trainer.world_size > 1

            def on_sigint(signum, frame):
                first = time.monotonic()

                def on_second_sigint(signum, frame):
                    if time.monotonic() - first > SAME_CTRL_C_S:
                        raise KeyboardInterrupt
                    # the same Ctrl+C again: torchrun forwards the SIGINT it got to its workers, which the
                    # terminal has already sent them

                signal.signal(signal.SIGINT, on_second_sigint)
                if trainer.is_global_zero:
                    log.warning("Ctrl+C: stopping after this batch and saving a checkpoint (Ctrl+C again to abort).")
                self._ctrl_c = True
                if not several:
                    os.kill(os.getpid(), signal.SIGTERM)

            signal.signal(signal.SIGINT, on_sigint)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx) -> None:
        if trainer.world_size == 1:
            return
        flag = torch.tensor(1.0 if self._ctrl_c else 0.0, device=pl_module.device)
        if float(trainer.strategy.reduce(flag, reduce_op="max")) > 0:
            self._ctrl_c = True
            os.kill(os.getpid(), signal.SIGTERM)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and _in_main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        if isinstance(exception, KeyboardInterrupt) and trainer.world_size > 1:
            return  # a second Ctrl+C aborts: the ranks are not at the same point, a collective save would hang
        self.interrupted = type(exception).__name__
        trainer.save_checkpoint(self.path)  # atomic: Lightning writes a temp file and renames it
        log.warning("Interrupted in epoch %d (step %d); saved %s", trainer.current_epoch, trainer.global_step,
                    self.path)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def resume_hint(cfg: TrainConfig, run_id: str) -> str:
    return f"finetune train {cfg.data_dir} --resume {run_id}"
