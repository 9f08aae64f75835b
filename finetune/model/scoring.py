"""What turns a network's outputs into the scores a user reads: calibrated probabilities and an unknown score.

* **Temperature** (one scalar T, fitted after training on held-out training images, never on val): the
  probabilities are ``mean over crops of softmax(logits / T)``. T > 1 softens an over-confident model;
  it never changes which class is on top of one crop's scores.
* **Unknown score** (``ood_score``, higher = less like the training images): one minus the cosine
  similarity of the image's features (the classifier layer's input, of its centre crop) to its k-th
  nearest neighbour among the training images' features ("bank", stored with the model). An image is
  ``unknown`` when its score is above the threshold set on held-out training images so that a chosen share
  (95%) of in-distribution images are kept. Why k-th nearest neighbour and not the maximum softmax or the
  energy: `bench/trust.py`, docs/decisions.md.

Pure tensor code: the pyfunc model, batch prediction and evaluation all call it, on torch or ONNX outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BANK_FILE = "ood_bank.safetensors"
UNKNOWN_LABEL = "unknown"  # the label of an unknown image when the user asks to reject them
SIMILARITY_CHUNK = 4096  # bank rows compared at once: bounded memory for large banks


def calibrated_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logits ``[B, V, K]`` (V crops of each image) -> probabilities ``[B, K]``: mean of softmax(logits / T)."""
    return (logits.float() / float(temperature)).softmax(dim=-1).mean(dim=1)


def center_view(views: int) -> int:
    """Index of the centre crop among an image's crops: the only one (centre), or torchvision's five_crop /
    ten_crop order (four corners, then the centre)."""
    return 0 if views == 1 else 4


def pooled_features(features: torch.Tensor) -> torch.Tensor:
    """Features ``[B, V, C]`` -> one L2-normalised row per image: the centre crop's. The unknown score does not
    depend on the crop mode: the bank and the threshold are centre-crop features, whatever mode is asked for."""
    return F.normalize(features[:, center_view(features.shape[1])].float(), dim=-1)


def knn_score(features: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """``1 - cos`` to the k-th most similar bank row, for normalised rows ``[B, C]`` against ``[M, C]``."""
    if len(features) == 0:
        return torch.empty(0)
    k = max(1, min(int(k), len(bank)))
    best = None
    for part in bank.float().split(SIMILARITY_CHUNK):
        sims = features @ part.T
        best = sims if best is None else torch.cat([best, sims], dim=1)
        best = best.topk(min(k, best.shape[1]), dim=1).values
    return 1.0 - best[:, k - 1]


@dataclass
class Scoring:
    """The temperature and the unknown detector of one model (`ModelSpec.temperature`, `ModelSpec.ood`)."""

    temperature: float = 1.0
    ood: dict[str, Any] | None = None  # {"method": "knn", "k", "threshold", "kept", "bank_images", ...}
    bank: torch.Tensor | None = None  # [M, C] normalised training features
    thresholds: list[float] | None = None  # a multi-label model's per-class thresholds (`ModelSpec.thresholds`)

    @classmethod
    def load(cls, directory: str | Path, temperature: float, ood: dict[str, Any] | None,
             thresholds: list[float] | None = None) -> "Scoring":
        bank = None
        if ood:
            from safetensors.torch import load_file

            bank = load_file(str(Path(directory) / BANK_FILE))["bank"].float()
        return cls(float(temperature or 1.0), ood, bank, thresholds)

    @property
    def multi_label(self) -> bool:
        return self.thresholds is not None

    def label_sets(self, probs: torch.Tensor) -> list[list[int]]:
        """A multi-label model's answer per image: the classes whose probability reaches their threshold."""
        above = probs >= torch.tensor(self.thresholds, dtype=probs.dtype, device=probs.device)
        return [row.nonzero().flatten().tolist() for row in above]

    def save_bank(self, directory: str | Path) -> None:
        if self.bank is not None:
            from safetensors.torch import save

            from finetune.files import atomic_write

            with atomic_write(Path(directory) / BANK_FILE, "wb") as f:
                f.write(save({"bank": self.bank.to(torch.float16).contiguous()}))

    @property
    def threshold(self) -> float | None:
        return None if not self.ood else float(self.ood["threshold"])

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V, K]`` -> ``[B, K]``: the crops' mean of softmax at the temperature; a multi-label model:
        of each class's own sigmoid."""
        if self.thresholds is not None:
            return torch.sigmoid(logits.float()).mean(dim=1)
        return calibrated_probs(logits, self.temperature)

    def ood_score(self, features: torch.Tensor) -> torch.Tensor:
        """``[B]`` scores of features ``[B, V, C]``; NaN when the model has no unknown detector."""
        if self.bank is None:
            return torch.full((len(features),), float("nan"))
        return knn_score(pooled_features(features), self.bank, int(self.ood["k"]))

    def unknown(self, scores: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        limit = self.threshold if threshold is None else float(threshold)
        if limit is None:
            return torch.zeros(len(scores), dtype=torch.bool)
        return scores > limit
