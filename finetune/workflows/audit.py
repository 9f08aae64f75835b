"""`finetune audit`: scan the folder as `train` would, read (or extract) the pretrained features of every
split, run the audit (`finetune.strategy.audit`) and write audit.json and contact sheets. Nothing in the
folder is moved or deleted; a reviewed list of paths goes back in with `--exclude`."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from finetune.config import TrainConfig
from finetune.data.folders import FolderSplits, data_name, read_exclude_list, scan_folder
from finetune.data.images import ImageError, display_path, load_rgb
from finetune.data.profile import profile_splits
from finetune.errors import UserError
from finetune.evaluation.evaluate import pyplot
from finetune.files import atomic_write, write_json
from finetune.model.backbone import create_backbone
from finetune.strategy.audit import AuditTable, run_audit
from finetune.model.features import FINAL, cached_features
from finetune import runtime, timing
from finetune.strategy.measure import process_runtime

log = logging.getLogger(__name__)

SHEET_IMAGES = 16  # findings per contact sheet


def audit_table(cfg: TrainConfig, splits: FolderSplits, rt: runtime.Runtime | None = None
                ) -> tuple[AuditTable, dict[str, float]]:
    """Final features of train, val and test (from the cache when `plan`/`train` extracted them)."""
    backbone = create_backbone(cfg.model, cfg.weights, max(2, len(splits.classes)), cfg.image_size,
                               keep_source_head=True)  # as `plan` builds it: the same cache entries
    rt = rt or process_runtime(cfg)
    paths, labels, names, xs, valid, seconds = [], [], [], [], [], {}
    for name in ("train", "val", "test"):
        samples = getattr(splits, name)
        if not samples:
            continue
        feats = cached_features(backbone, samples, batch_size=cfg.batch_size, max_pixels=cfg.max_image_pixels, rt=rt)
        x, y = feats.matrix(FINAL, only_valid=False)
        paths += [display_path(s.path) for s in samples]
        labels.append(y)
        names += [name] * len(samples)
        xs.append(x)
        valid.append(feats.valid)
        seconds[f"features_{name}_s"] = round(feats.seconds, 2)
    label_sets = ([s.labels for name in ("train", "val", "test") for s in getattr(splits, name)]
                  if splits.multi_label else None)
    table = AuditTable(paths, np.concatenate(labels), names, np.concatenate(xs), np.concatenate(valid),
                       list(splits.classes), label_sets)
    return table, seconds


def default_output(cfg: TrainConfig) -> Path:
    return Path(cfg.output or Path("outputs") / f"audit-{data_name(cfg.data_dir)}-"
                                                f"{time.strftime('%Y%m%d-%H%M%S')}")


def audit_folder(cfg: TrainConfig) -> dict[str, Any]:
    """Audit the folder of `cfg`; returns what audit.json holds (plus `output`)."""
    if cfg.register is not None:
        raise UserError("--register: `finetune audit` trains and registers nothing. Leave it out.")
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_image_pixels,
                         exclude=read_exclude_list(cfg.exclude), min_classes=1, multi_label=True)
    return audit_splits(cfg, splits, default_output(cfg))


def audit_splits(cfg: TrainConfig, splits: FolderSplits, output: Path, rt: runtime.Runtime | None = None
                 ) -> dict[str, Any]:
    """Audit scanned splits: OUTPUT/audit.json and the contact sheets; returns audit.json's content
    plus `sheets` and `output` (what `plan` and `train` run too, on the splits they scanned)."""
    output.mkdir(parents=True, exist_ok=True)
    table, timings = audit_table(cfg, splits, rt)
    started = time.perf_counter()
    audit = run_audit(table, seed=cfg.seed)
    timings["audit_s"] = round(time.perf_counter() - started, 2)
    result = {"data_dir": str(Path(cfg.data_dir).resolve()), "layout": splits.layout, "classes": splits.classes,
              "model": cfg.model, "profile": profile_splits(splits).to_dict(),
              "unreadable": [{"path": s.path, "reason": s.reason} for s in splits.skipped],
              "excluded": splits.excluded, **audit.to_dict(), "timings": timings,
              "about": {"label_issues.score": "out-of-fold probability of the given label (lower: more suspect)",
                        "duplicates.kind": "leakage: train vs val/test; conflicting: two classes; redundant: one class",
                        "outliers.distance": "cosine distance to the nearest class centroid of train"}}
    write_json(output / "audit.json", result)
    result["sheets"] = write_sheets(result, output)
    result["output"] = str(output.resolve())
    return result


@timing.timed("audit")
def audit_or_note(cfg: TrainConfig, splits: FolderSplits, output: Path, weights_source: str,
                  rt: runtime.Runtime | None = None) -> dict[str, Any]:
    """`audit_splits` for `plan` and `train`, which go on without it: a failure (or random-init weights,
    whose features mean nothing) gives {"skipped": why} and a warning instead of an error."""
    if weights_source == "none":
        return {"skipped": "no pretrained weights (--weights none): no features to audit"}
    try:
        return audit_splits(cfg, splits, output, rt)
    except Exception as e:  # KeyboardInterrupt and SystemExit still stop the run
        log.warning("The audit failed (%s: %s); going on without it", type(e).__name__, e)
        return {"skipped": f"the audit failed: {type(e).__name__}: {str(e)[:300]}"}


def leaked_images(result: dict[str, Any]) -> dict[str, list[str]]:
    """The val and test images with an exact or near duplicate in train (each once), per split."""
    leaked: dict[str, set[str]] = {"val": set(), "test": set()}
    for pair in result.get("duplicates", []):
        if pair["kind"] == "leakage":  # the training image is `a`
            leaked.setdefault(pair["b_split"], set()).add(pair["b"])
    return {split: sorted(paths) for split, paths in leaked.items()}


def audit_counts(result: dict[str, Any]) -> dict[str, int]:
    """The counts `train` logs as params (`audit.label_issues`, `audit.leakage_pairs`, ...)."""
    c = result.get("counts", {})
    return {"label_issues": c.get("label_issues", 0), "leakage_pairs": c.get("leakage", 0),
            "conflicting_pairs": c.get("conflicting", 0), "redundant_pairs": c.get("redundant", 0),
            "outliers": c.get("outliers", 0)}


# --- contact sheets ------------------------------------------------------------------------------

def _show(ax, path: str, title: str) -> None:
    ax.axis("off")
    try:
        img = load_rgb(path, draft_size=(160, 160))
        img.thumbnail((160, 160))
        ax.imshow(img)
    except (ImageError, OSError):
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
    ax.set_title(title, fontsize=7)


def _sheet(cells: Sequence[Sequence[tuple[str, str]]], title: str, path: Path) -> Path:
    """A grid: one row per finding, one image per cell (path, caption)."""
    plt = pyplot()
    width = max((len(r) for r in cells), default=1)
    cols = max(1, 4 // width) * width  # several findings side by side
    per_row = cols // width
    rows = max(1, math.ceil(len(cells) / per_row))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not cells:
        axes[0, 0].text(0.5, 0.5, "none found", ha="center", va="center")
    for k, finding in enumerate(cells):
        for m, (image, caption) in enumerate(finding):
            _show(axes[k // per_row, (k % per_row) * width + m], image, caption)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return path


def write_sheets(result: dict[str, Any], output: Path) -> list[str]:
    issues = [[(f["path"], f"given {f['given']}\nsuggested {f['suggested']} ({f['score']:.2f})")]
              for f in result["label_issues"][:SHEET_IMAGES]]
    pairs = [[(p["a"], f"{p['kind']} {p['match']} {p['similarity']:.3f}\n{p['a_split']}: {p['a_label']}"),
              (p["b"], f"\n{p['b_split']}: {p['b_label']}")] for p in result["duplicates"][:SHEET_IMAGES // 2]]
    far = [[(o["path"], f"{o['split']}: {o['label']}\ndistance {o['distance']:.3f}")]
           for o in result["outliers"][:SHEET_IMAGES]]
    return [str(_sheet(issues, "Likely mislabeled (most suspect first)", output / "label_issues.png")),
            str(_sheet(pairs, "Duplicate pairs (leakage, conflicting, redundant)", output / "duplicates.png")),
            str(_sheet(far, "Outliers (farthest from every class)", output / "outliers.png"))]


def summary_lines(result: dict[str, Any], top: int = 3) -> list[str]:
    """The one-screen console summary of an audit."""
    p, c = result["profile"], result["counts"]
    lines = [f"Data:        {p['n_train']} train / {p['n_val']} val / {p['n_test']} test images, {p['n_classes']} "
             f"classes ({p['per_class_min']}-{p['per_class_max']} per class, imbalance {p['imbalance_ratio']}), "
             f"grayscale {p['grayscale_share']:.0%}, {len(result['unreadable'])} unreadable, "
             f"{len(result['excluded'])} excluded"]
    lines.append(f"Label issues: {c.get('label_issues', 0)}")
    lines += [f"  {f['path']}: given {f['given']}, suggested {f['suggested']} (score {f['score']:.2f})"
              for f in result["label_issues"][:top]]
    for kind in ("leakage", "conflicting", "redundant"):
        lines.append(f"Duplicates, {kind}: {c.get(kind, 0)}")
        lines += [f"  {d['a']} ({d['a_split']}, {d['a_label']}) ~ {d['b']} ({d['b_split']}, {d['b_label']}): "
                  f"{d['match']} {d['similarity']:.3f}" for d in result["duplicates"] if d["kind"] == kind][:top]
    lines.append(f"Outliers:    {c.get('outliers', 0)}")
    lines += [f"  {o['path']} ({o['split']}, {o['label']}): distance {o['distance']:.3f}" for o in result["outliers"][:top]]
    lines += [f"Note: {n}" for n in result["notes"]]
    lines += [f"Report:      {result['output']}/audit.json", f"Sheets:      {', '.join(Path(s).name for s in result['sheets'])}"]
    return lines
