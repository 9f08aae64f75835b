"""What every plan's executor shares: the run it belongs to (`RunContext`) and what it returns (`FitResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from finetune.data.folders import Sample
from finetune.model.outputs import Outputs


CV_FOLDS = 5  # folds of the cross-validation that chooses a linear head's weight decay and epochs


@dataclass
class HeldOut:
    """Training images a model never fitted on, and that model (built on demand): what choices made after
    training (the test-time crops, the temperature, the unknown threshold) are scored on. The user's val
    and test are never held-out data."""

    samples: list[Sample]
    net: Callable[[], nn.Module] | None = None  # a network plan: its network, which scores the images
    # A feature plan's fold: () -> (per-crop logits [N, 10, K], per-crop features [N, 10, C], labels [N]) of (a
    # stratified subset of) these images, from its out-of-fold head on cached 10-crop features: no network
    # pass once they are cached.
    per_view: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
    # What an image's unknown score is measured against (model.scoring.knn_score): () -> normalised features
    # [M, C] of the images this model fitted on (feature plans: cached); None (network plans): the held-out
    # images themselves, from the same pass (evaluation.trust), so that no pass over the fitted images is needed.
    bank: Callable[[], torch.Tensor] | None = None


@dataclass
class FitResult:
    """What a plan's execution hands to evaluation and tracking (on global rank 0).

    Every choice in it (epochs, weights, weight decay) was made on data inside the training split: the
    metrics are select_* (the selection split or cross-validation, `selection` says which images).
    """

    net: nn.Module  # the network to save: trained head, or fine-tuned (or warmed-up) network
    metrics: dict[str, Any]  # select_acc, select_loss, best_epoch / epochs, and what was compared
    selection: dict[str, Any]  # how the choices were made and on which images
    report: dict[str, Any] = field(default_factory=dict)  # plan-specific: head search, warm-up
    center_outputs: dict[str, Outputs] | None = None  # val/test centre-crop outputs from the cache (pretrained backbone)
    heldout: list[HeldOut] = field(default_factory=list)
    bank: Callable[[], torch.Tensor] | None = None  # the saved model's unknown-score bank (see HeldOut.bank)
    ddp: dict[str, Any] | None = None  # world size and whether the ranks ended in sync


@dataclass
class RunContext:
    """Where the run lives and how the executor talks back to it (tracking is a later stage)."""

    run_id: str
    output: Path
    logger: Any  # the Lightning logger (MLflow on rank 0)
    resume_checkpoint: Path | None = None
    identity: dict[str, Any] | None = None  # written into every checkpoint (`checkpoints.RunIdentity`)
    progress: bool = True  # Lightning's progress bar (on stdout); the pilot's candidates run without it
    # A list whose cached features hold every image of the run's splits (the pilot: the training split that the
    # measurement extracted, of which its splits are parts): those are read from its entry, not extracted again.
    # None: the run's own training split.
    features_within: list[Sample] | None = None
