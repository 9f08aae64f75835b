"""Evaluation report: top-1/top-5, per-class precision/recall/F1, confusion matrix, top losses.

Runs after training on the val (and test) split, read once each after every choice was made (the
crop mode, temperature and unknown threshold too: `trust.choose_after_training`), and on its own as
`finetune evaluate MODEL_URI DATA_DIR` for any logged or registered model. Everything goes to
`OUTPUT/evaluation/<split>/` and to the MLflow run under `evaluation/<split>/`.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import torch
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn

from finetune import runtime, timing
from finetune.files import atomic_write, write_json
from finetune.model.artifact import ModelSpec
from finetune.data.folders import FolderSplits, Sample
from finetune.data.images import ImageError, display_path, load_rgb
from finetune.data.crops import TTA_VIEWS, is_multi_crop
from finetune.evaluation.trust import ECE_BINS, ece
from finetune.evaluation.tta import source_outputs
from finetune.model.outputs import Outputs
from finetune.model.scoring import Scoring, calibrated_probs

log = logging.getLogger(__name__)


def accuracy_interval(right: int, images: int, confidence: float = 0.95) -> list[float]:
    """The Wilson interval of an accuracy of `right` out of `images` (what another sample of as many images
    could read); [nan, nan] without images."""
    if images == 0:
        return [float("nan"), float("nan")]
    ci = binomtest(right, images).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


def report(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Metrics of probabilities ``[N, K]`` against integer labels; rows with NaN (failed images) excluded.
    `top1_ci95` is top-1's 95% Wilson interval over these images."""
    ok = ~np.isnan(probs).any(axis=1)
    probs, labels = probs[ok], labels[ok]
    k = len(class_names)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    right = pred == labels
    top5 = np.argsort(-probs, axis=1)[:, :min(5, k)] if len(probs) else np.zeros((0, 1), dtype=int)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=list(range(k)), zero_division=0)
    return {
        "images": int(len(labels)),
        "failed_images": int((~ok).sum()),
        "top1": float(right.mean()) if len(labels) else float("nan"),
        "top1_ci95": accuracy_interval(int(right.sum()), len(labels)),
        "top5": float((top5 == labels[:, None]).any(axis=1).mean()) if len(labels) else float("nan"),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
        "macro_f1": float(f1.mean()) if k else float("nan"),
        "confusion_matrix": confusion_matrix(labels, pred, labels=list(range(k))).tolist(),
    }


def top_losses(probs: np.ndarray, labels: np.ndarray, n: int = 16) -> list[int]:
    """Indices of the most confidently wrong predictions, highest loss (-log p(true)) first."""
    ok = ~np.isnan(probs).any(axis=1)
    wrong = np.flatnonzero(ok & (np.nan_to_num(probs).argmax(axis=1) != labels))
    loss = -np.log(np.clip(probs[wrong, labels[wrong]], 1e-12, 1.0))
    return wrong[np.argsort(-loss, kind="stable")][:n].tolist()


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only): the report's plots and the audit's contact sheets."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: list[list[int]], class_names: Sequence[str], path: Path) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = pyplot()
    size = max(4.0, 0.5 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.array(cm), display_labels=list(class_names)).plot(
        ax=ax, xticks_rotation="vertical", colorbar=False, values_format="d")
    ax.set_title("Confusion matrix (rows: true, columns: predicted)")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return path


def top_loss_heatmaps(net: nn.Module | None, data_config: dict[str, Any] | None, paths: Sequence[str],
                      probs: np.ndarray, indices: Sequence[int]) -> dict[int, Any]:
    """Grad-CAM overlays (for the predicted class) of the images `indices`; {} with a warning when
    there is no network or Grad-CAM fails for it: the sheet is then drawn without heatmaps."""
    if net is None or data_config is None:
        log.warning("Top-losses sheet without Grad-CAM heatmaps: no network to explain (predictions given).")
        return {}
    from finetune.evaluation.explain import explain_image

    out = {}
    try:
        for i in indices:
            try:
                img = load_rgb(paths[i])
            except (ImageError, OSError):
                continue
            out[i] = explain_image(net, img, data_config, int(np.argmax(probs[i])))[0]
    except Exception as e:  # an architecture Grad-CAM cannot handle must not cost the report
        log.warning("Top-losses sheet without Grad-CAM heatmaps: Grad-CAM failed for %s (%s: %s).",
                    type(net).__name__, type(e).__name__, e)
        return {}
    return out


def plot_top_losses(paths: Sequence[str], probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                    path: Path, n: int = 16, net: nn.Module | None = None,
                    data_config: dict[str, Any] | None = None) -> Path:
    """The most confidently wrong images, each beside its Grad-CAM overlay when `net` can be explained."""
    plt = pyplot()
    worst = top_losses(probs, labels, n)
    cams = top_loss_heatmaps(net, data_config, paths, probs, worst) if worst else {}
    per = 2 if cams else 1  # panels per image: image | heatmap
    cols = max(1, min(4, len(worst)))
    rows = max(1, math.ceil(len(worst) / cols))
    fig, axes = plt.subplots(rows, cols * per, figsize=(3 * cols * per, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not worst:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    for k, i in enumerate(worst):
        ax = axes.flat[k * per]
        try:
            img = load_rgb(paths[i], draft_size=(160, 160))
            img.thumbnail((160, 160))
            ax.imshow(img)
        except (ImageError, OSError):
            pass
        if i in cams:
            axes.flat[k * per + 1].imshow(cams[i])
            axes.flat[k * per + 1].set_title("Grad-CAM (pred)", fontsize=8)
        pred = int(np.argmax(probs[i]))
        ax.set_title(f"pred {class_names[pred]} {probs[i, pred]:.2f}\ntrue {class_names[labels[i]]} "
                     f"{probs[i, labels[i]]:.2f}", fontsize=8)
    fig.suptitle("Most confidently wrong (top losses)" + (", each beside its Grad-CAM heatmap" if cams else ""))
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return path


def without_leaked(probs: np.ndarray, labels: np.ndarray, paths: Sequence[str],
                   leaked: Collection[str]) -> dict[str, Any]:
    """Top-1 over the images that are not in `leaked` (display paths of images duplicated in train)."""
    leaked = set(leaked)
    keep = np.array([display_path(p) not in leaked for p in paths], dtype=bool)
    ok = keep & ~np.isnan(probs).any(axis=1)
    top1 = float((probs[ok].argmax(axis=1) == labels[ok]).mean()) if ok.any() else float("nan")
    return {"leaked_images": int((~keep).sum()), "images": int(ok.sum()), "top1": top1}


def evaluate_samples(net: nn.Module, spec: ModelSpec, samples: Sequence[Sample], mode: str, out_dir: Path,
                     batch_size: int = 32, max_pixels: int | None = None, rt: runtime.Runtime | None = None,
                     label_map: Sequence[int] | None = None, outputs: Outputs | None = None,
                     leaked: Collection[str] | None = None, scoring: Scoring | None = None) -> dict[str, Any]:
    """Predict one split with TTA and write report.json, predictions.csv, confusion_matrix.png, reliability.png
    and top_losses.png.

    `outputs`: logits and features already computed with exactly this preprocessing (a frozen-backbone
    plan's head on its cached centre-crop features), used instead of running the network again. `scoring`
    (the model's temperature and unknown detector; none: uncalibrated, no unknown score): the report gives
    the expected calibration error before and after the temperature, and the share of images the model
    calls unknown. `leaked` (display paths of images with a duplicate in train, from the audit): the same
    predictions are scored without them too, under `no_leakage`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [s.path for s in samples]
    labels = np.array([label_map[s.label] if label_map else s.label for s in samples], dtype=int)
    if outputs is None:
        images_per_batch = max(1, batch_size // TTA_VIEWS[mode])  # keep a forward pass near batch_size crops
        outputs = source_outputs(net, paths, spec.data_config, mode, images_per_batch, max_pixels, rt, pool=True)
    scoring = scoring or Scoring()
    probs_np = scoring.probs(outputs.logits).double().numpy()
    result = {"tta": mode, **report(probs_np, labels, spec.class_names)}
    result["calibration"] = calibration_report(outputs.logits, probs_np, labels, scoring.temperature,
                                               out_dir / "reliability.png")
    if scoring.ood:
        flagged = scoring.unknown(scoring.ood_score(outputs.features)).numpy()
        ok = ~np.isnan(probs_np).any(axis=1)
        result["unknown"] = {"threshold": scoring.threshold, "share": float(flagged[ok].mean()) if ok.any() else 0.0}
    if leaked is not None:
        result["no_leakage"] = without_leaked(probs_np, labels, paths, leaked)
    write_json(out_dir / "report.json", result)
    write_predictions(out_dir / "predictions.csv", paths, probs_np, labels, spec.class_names)
    plot_confusion(result["confusion_matrix"], spec.class_names, out_dir / "confusion_matrix.png")
    plot_top_losses(paths, probs_np, labels, spec.class_names, out_dir / "top_losses.png", net=net,
                    data_config=spec.data_config)
    return result


def write_predictions(path: Path, paths: Sequence[str], probs: np.ndarray, labels: np.ndarray,
                      class_names: Sequence[str]) -> Path:
    """One row per image, in the split's order: its label, the predicted class and its probability, and whether
    it is right. An image that could not be read has empty fields: like report.json, it is not scored."""
    with atomic_write(path, newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label", "prediction", "probability", "correct"])
        for src, row, label in zip(paths, probs, labels):
            if np.isnan(row).any():
                out.writerow([display_path(src), class_names[label], "", "", ""])
                continue
            k = int(row.argmax())
            out.writerow([display_path(src), class_names[label], class_names[k], f"{row[k]:.4f}", int(k == label)])
    return path


def calibration_report(logits: torch.Tensor, probs: np.ndarray, labels: np.ndarray, temperature: float,
                       path: Path) -> dict[str, float]:
    """ECE of the uncalibrated (T = 1) and the model's (calibrated) probabilities, and the reliability diagram."""
    raw = calibrated_probs(logits, 1.0).double().numpy()
    plot_reliability({"uncalibrated": raw, f"temperature {temperature:.2f}": probs}, labels, path)
    return {"temperature": float(temperature), "ece_uncalibrated": ece(raw, labels), "ece": ece(probs, labels)}


def plot_reliability(curves: dict[str, np.ndarray], labels: np.ndarray, path: Path, bins: int = ECE_BINS) -> Path:
    """Accuracy against confidence of the top label, in equal-width bins, one line per set of probabilities."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    edges = np.linspace(0, 1, bins + 1)
    for name, probs in curves.items():
        ok = ~np.isnan(probs).any(axis=1)
        conf, right = probs[ok].max(axis=1), probs[ok].argmax(axis=1) == labels[ok]
        which = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
        xs = [conf[which == b].mean() for b in range(bins) if (which == b).any()]
        ys = [right[which == b].mean() for b in range(bins) if (which == b).any()]
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {ece(probs, labels):.3f})")
    ax.set_xlabel("confidence (top label)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return path


def metric_names(split: str, mode: str) -> tuple[str, str]:
    suffix = "_tta" if is_multi_crop(mode) else ""
    return f"{split}_acc{suffix}", f"{split}_acc_top5{suffix}"


def evaluate_splits(net: nn.Module, spec: ModelSpec, splits: dict[str, Sequence[Sample]], mode: str,
                    output: Path, exclude: Sequence[str] = (),
                    precomputed: dict[str, Outputs] | None = None,
                    leaked: dict[str, Collection[str]] | None = None, **kwargs: Any) -> dict[str, float]:
    """Evaluate each named split (report files under OUTPUT/evaluation/<split>/); return the metrics but `exclude`.

    With `leaked` (split -> images duplicated in train), also `<split>_acc[_tta]_no_leakage` and
    `<split>_leaked_images`: the same predictions without those images. With a `scoring` (kwargs),
    `<split>_ece[_tta]` / `<split>_ece_uncalibrated[_tta]` and `<split>_unknown_share[_tta]`."""
    metrics: dict[str, float] = {}
    for name, samples in splits.items():
        if not samples:
            continue
        result = evaluate_samples(net, spec, samples, mode, output / "evaluation" / name,
                                  outputs=(precomputed or {}).get(name),
                                  leaked=None if leaked is None else leaked.get(name, ()), **kwargs)
        top1, top5 = metric_names(name, mode)
        suffix = top1[len(f"{name}_acc"):]
        metrics[top1], metrics[top5] = result["top1"], result["top5"]
        metrics[f"{top1}_ci95_low"], metrics[f"{top1}_ci95_high"] = result["top1_ci95"]
        metrics[f"{name}_ece{suffix}"] = result["calibration"]["ece"]
        metrics[f"{name}_ece_uncalibrated{suffix}"] = result["calibration"]["ece_uncalibrated"]
        if "unknown" in result:
            metrics[f"{name}_unknown_share{suffix}"] = result["unknown"]["share"]
        if "no_leakage" in result:
            metrics[f"{top1}_no_leakage"] = result["no_leakage"]["top1"]
            metrics[f"{name}_leaked_images"] = result["no_leakage"]["leaked_images"]
        log.info("%s: top-1 %.4f (95%% interval %.4f-%.4f) top-5 %.4f ECE %.4f (uncalibrated %.4f) (tta %s, %d images)",
                 name, result["top1"], *result["top1_ci95"], result["top5"], result["calibration"]["ece"],
                 result["calibration"]["ece_uncalibrated"], mode, result["images"])
    return {k: v for k, v in metrics.items() if k not in exclude}


@timing.timed("evaluate")
def after_training(net: nn.Module, spec: ModelSpec, splits: FolderSplits, cfg: Any, output: Path,
                   rt: runtime.Runtime, mode: str, center_outputs: dict[str, Outputs] | None = None,
                   leaked: dict[str, Collection[str]] | None = None, scoring: Scoring | None = None
                   ) -> dict[str, float]:
    """The report of a finished training run: val and test, each read once, after every choice was made.

    `val_acc` / `test_acc` are the centre crop's; `val_acc_tta` / `test_acc_tta` are added when the model's
    crop mode (`mode`) is multi-crop. Both with the model's temperature (`scoring`). `center_outputs` (split ->
    outputs from cached centre-crop features) spares a network pass for the centre crop. Nothing is sent to
    MLflow here (the caller sends the report with the run's other results). `leaked` (split -> images with a
    duplicate in train, from the audit) adds `val_acc_no_leakage` / `val_leaked_images` (and test's), from the
    same predictions.
    """
    parts = {"val": splits.val, "test": splits.test}
    kwargs = dict(batch_size=cfg.batch_size, max_pixels=cfg.max_image_pixels, rt=rt, leaked=leaked, scoring=scoring)
    metrics = evaluate_splits(net, spec, parts, "center", Path(output), precomputed=center_outputs, **kwargs)
    if is_multi_crop(mode):  # the mode's report files replace the centre crop's
        metrics.update(evaluate_splits(net, spec, parts, mode, Path(output), **kwargs))
    return metrics
