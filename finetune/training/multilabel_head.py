"""The head warm-up of a network plan with several labels per image: a one-vs-rest logistic regression on the
cached, frozen features (scikit-learn), folded into the network's linear classifier.

The single-label warm-up (`linear_probe`) fits a softmax head; with several labels per image each class is a
yes/no question of its own, which is what scikit-learn's one-vs-rest logistic regression answers, to
convergence (L-BFGS), in seconds on cached features. Its regularisation C is chosen by macro mAP on a fifth of
the fit images held out (seeded), then the head is refitted on them all. The standardisation is folded into
the weights, so the head reads the raw pooled features as the network's classifier does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from finetune.data.multilabel import macro_map

C_GRID = (0.01, 0.1, 1.0, 10.0)


@dataclass
class MultiLabelHead:
    weight: torch.Tensor  # [K, C], on raw features
    bias: torch.Tensor  # [K]
    c: float
    held_out_map: float  # macro mAP of the chosen C on the held-out fifth
    scores: dict[float, float]  # C -> that mAP


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Per class (weight [C], bias) on raw features; a class with only positives or only negatives gets a zero
    weight and the bias of its frequency (logistic regression needs both)."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    weight, bias = np.zeros((y.shape[1], x.shape[1])), np.zeros(y.shape[1])
    for k in range(y.shape[1]):
        share = y[:, k].mean()
        if share in (0.0, 1.0):
            bias[k] = 8.0 if share == 1.0 else -8.0
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a ConvergenceWarning at max_iter: the fit so far is kept
            model = LogisticRegression(C=c, max_iter=1000).fit(z, y[:, k])
        weight[k] = model.coef_[0] / scale
        bias[k] = model.intercept_[0] - float(model.coef_[0] @ (mean / scale))
    return weight, bias


def fit_multilabel_head(x: np.ndarray, y: np.ndarray, seed: int, c_grid: tuple[float, ...] = C_GRID
                        ) -> MultiLabelHead:
    """`x` [N, C] features, `y` [N, K] 0/1 targets."""
    rng = np.random.default_rng(seed)
    held = np.sort(rng.permutation(len(x))[: max(1, len(x) // 5)])
    fit_rows = np.setdiff1d(np.arange(len(x)), held)
    scores: dict[float, float] = {}
    for c in c_grid:
        w, b = _fit(x[fit_rows], y[fit_rows], c)
        scores[c] = macro_map(1 / (1 + np.exp(-(x[held] @ w.T + b))), y[held])
    finite = {c: s for c, s in scores.items() if np.isfinite(s)}
    best = max(finite, key=lambda c: (finite[c], -c)) if finite else 1.0
    w, b = _fit(x, y, best)
    return MultiLabelHead(torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), best,
                          scores.get(best, float("nan")), scores)

