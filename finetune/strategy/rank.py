"""Which backbone? Cheap transferability scores of frozen features, and the ranking `finetune rank` prints.

Pure (numpy; no torch). Two scores of a candidate's pooled final features on the training images:

* `knn_accuracy`: leave-one-out k-nearest-neighbour accuracy (cosine), balanced over classes. In a study of
  42,000 fine-tuning runs a plain k-NN on frozen features ranked backbones better than most dedicated
  transferability metrics (Sorkhei et al. 2025); it is the ranking key.
* `logme`: LogME (You et al., ICML 2021), the log marginal evidence of a Bayesian linear model from the features
  to the one-hot labels, per image; implemented after the authors' reference code (thuml/LogME), which is not
  packaged. Reported beside k-NN: no metric wins everywhere (Agostinelli et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

KNN_K = 10
CHUNK = 1024  # rows of the similarity matrix computed at once (memory: CHUNK x n floats)


def knn_accuracy(x: np.ndarray, y: np.ndarray, k: int = KNN_K) -> float:
    """Leave-one-out k-NN accuracy of features `x` [n, d] for labels `y` [n], balanced (the mean of per-class
    recalls): each image is classified by the majority of its k most similar other images (cosine), ties
    broken by the summed similarity."""
    x = np.asarray(x, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = np.asarray(y)
    classes = np.unique(y)
    k = max(1, min(k, len(y) - 1))
    predicted = np.empty_like(y)
    for start in range(0, len(y), CHUNK):
        sims = x[start:start + CHUNK] @ x.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # not its own neighbour
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        near_sims = np.take_along_axis(sims, nearest, axis=1)
        votes = np.stack([(y[nearest] == c).sum(1) + 1e-3 * np.where(y[nearest] == c, near_sims, 0).sum(1)
                          for c in classes], axis=1)
        predicted[start:start + CHUNK] = classes[votes.argmax(1)]
    return float(np.mean([(predicted[y == c] == c).mean() for c in classes]))


def logme(x: np.ndarray, y: np.ndarray, iterations: int = 11) -> float:
    """LogME of features `x` [n, d] for labels `y` [n]: the mean over classes of the per-image log evidence of a
    Bayesian linear regression onto that class's indicator, with its prior and noise precisions (alpha, beta)
    found by the fixed-point iteration of the reference code. Higher: the features fit the labels better."""
    f = np.asarray(x, dtype=np.float64)
    n, d = f.shape
    if n < d:  # fewer images than channels: the thin SVD of f (the reference code's branch); F^T F's other d - n
        _, sigma, vh = np.linalg.svd(f, full_matrices=False)  # eigenvalues are 0
        s = sigma ** 2
    else:
        _, s, vh = np.linalg.svd(f.T @ f, full_matrices=True)
    v, null = vh.T, d - len(s)
    evidences = []
    for c in np.unique(y):
        target = (np.asarray(y) == c).astype(np.float64)
        alpha, beta, projected = 1.0, 1.0, vh @ (f.T @ target)
        for _ in range(iterations):
            gamma = (beta * s / (alpha + beta * s)).sum()
            m = v @ (projected * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            beta_de = ((target - f @ m) ** 2).sum()
            new_alpha, new_beta = gamma / (alpha_de + 1e-5), (n - gamma) / (beta_de + 1e-5)
            converged = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < 0.01
            alpha, beta = new_alpha, new_beta
            if converged:
                break
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta)
                    - 0.5 * (np.log(alpha + beta * s).sum() + null * np.log(alpha))
                    - beta / 2 * beta_de - alpha / 2 * alpha_de - n / 2 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


@dataclass
class Candidate:
    """One backbone as `finetune rank` measured it."""

    name: str  # timm name
    weights: str  # hub, or a weights file
    image_size: int
    params: int
    knn: float
    logme: float
    latency_ms: dict[str, float]  # "batch1": ms per image at batch 1; "batch32": ms per image at batch 32
    seconds: float  # what measuring it cost (features, scores, latency)
    excluded: str | None = None  # why it is out of the ranking (a latency budget), else None
    pareto: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def rank(candidates: Sequence[Candidate], max_latency_ms: float | None = None) -> list[Candidate]:
    """The candidates best first (k-NN accuracy, then LogME), those over the latency budget last and marked;
    `pareto` marks the ones no other beats on both k-NN accuracy and batch-1 latency."""
    for c in candidates:
        if max_latency_ms is not None and c.latency_ms["batch1"] > max_latency_ms:
            c.excluded = f"batch-1 latency {c.latency_ms['batch1']:.1f} ms > --max-latency-ms {max_latency_ms:g}"
    for c in candidates:
        c.pareto = c.excluded is None and not any(
            o is not c and o.excluded is None and o.knn >= c.knn and o.latency_ms["batch1"] <= c.latency_ms["batch1"]
            and (o.knn > c.knn or o.latency_ms["batch1"] < c.latency_ms["batch1"]) for o in candidates)
    ordered = sorted(candidates, key=lambda c: (c.excluded is not None, -c.knn, -c.logme))
    best = next((c for c in ordered if c.excluded is None), None)
    for c in ordered:
        if c.excluded:
            c.reasons = [f"excluded: {c.excluded}"]
        elif c is best:
            c.reasons = [f"best k-NN accuracy of the frozen features ({c.knn:.3f})"]
        else:
            c.reasons = [f"k-NN {c.knn:.3f}, {100 * (best.knn - c.knn):.1f} points below {best.name}"]
        if c.pareto and c is not best:
            c.reasons.append("on the accuracy-latency front: nothing is both better and faster")
    return ordered
