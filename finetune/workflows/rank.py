"""`finetune rank DATA --candidates SPEC`: rank pretrained backbones on the user's training images before training.

For each candidate: the pooled final features of the training images at the candidate's own input size (one
pass over the images for the candidates together, each file decoded once; each candidate's entry cached exactly
as `plan` and `train` cache it, so the run that follows reads it back), the transferability scores of
`strategy.rank` on them, its parameter count, and its inference latency on this machine (eager torch at the
run's precision: batch 1 and batch 32, ms per image, median of a few timed passes on random input after a
warm-up). Only the training split is read; val and test are not.

SPEC: a folder of weight files with sidecars (`<file>.json` naming the `architecture`), a text file with one
candidate per line (a timm name, a weights file with a sidecar, or `NAME FILE`; `#` starts a comment), or
timm names separated by commas (weights from the hub).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from finetune import runtime
from finetune.config import TrainConfig
from finetune.data.folders import read_exclude_list, scan_folder
from finetune.errors import UserError
from finetune.model.backbone import WEIGHT_FILE_SUFFIXES, Backbone, create_backbone, read_sidecar
from finetune.model.features import FeatureSet
from finetune.model.stages import FINAL
from finetune.strategy.decide import load_thresholds
from finetune.strategy.measure import preserved_rng, process_runtime, train_features_many
from finetune.strategy.rank import Candidate, knn_accuracy, logme, rank

log = logging.getLogger(__name__)

# Batch size -> timed passes. One warm-up pass at batch 1 first: a pass at 32 costs as much as 32 images of the
# feature extraction, so batch 32 is timed once (the ranking of four backbones stays within 3 extraction passes
# of the largest).
LATENCY_RUNS = {1: 5, 32: 1}
# Candidates share one extraction pass while their parameters add up to at most this many (1.6 GB in float32, held
# on the device together); a longer list is extracted in several passes, so memory does not grow with its length.
JOINT_MAX_PARAMS = 400_000_000


def parse_candidates(spec: str) -> list[tuple[str, str]]:
    """(timm name, weights) of each candidate SPEC names: 'hub' or a weights file."""
    path = Path(spec)
    if path.is_dir():
        found = [_from_file(p) for p in sorted(path.iterdir())
                 if p.suffix in WEIGHT_FILE_SUFFIXES and p.with_suffix(".json").is_file()]
        if not found:
            raise UserError(f"--candidates {spec}: no weights file with a sidecar <file>.json in that folder.")
        return found
    if path.is_file():
        found = []
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) == 1:
                found.append(_from_file(Path(words[0])) if Path(words[0]).suffix in WEIGHT_FILE_SUFFIXES
                             else (words[0], "hub"))
            elif len(words) == 2:
                found.append((words[0], words[1]))
            elif words:
                raise UserError(f"--candidates {spec}: a line holds a timm name, a weights file, or both: {line!r}")
        if not found:
            raise UserError(f"--candidates {spec}: the file names no candidate.")
        return found
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names or any("/" in n for n in names):
        raise UserError(f"--candidates {spec}: not a folder or file, and not a comma-separated list of timm names.")
    return [(n, "hub") for n in names]


def _from_file(path: Path) -> tuple[str, str]:
    arch = read_sidecar(path).get("architecture")
    if not arch:
        raise UserError(f"The sidecar {path.with_suffix('.json')} names no 'architecture' (the timm model name).")
    return str(arch), str(path)


def latency_ms(model: torch.nn.Module, size: tuple[int, int], rt: runtime.Runtime) -> dict[str, float]:
    """Milliseconds per image of a forward pass at batch 1 and batch 32 on random input (median of the timed
    passes, after one warm-up pass at batch 1)."""
    result = {}
    with runtime.evaluating_on(model, rt.device), torch.inference_mode(), rt.autocast():
        model(torch.randn(1, 3, *size, device=rt.device))  # warm-up: allocator, kernels
        for batch, runs in LATENCY_RUNS.items():
            x = torch.randn(batch, 3, *size, device=rt.device)
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                model(x)
                if rt.device.type == "cuda":
                    torch.cuda.synchronize(rt.device)
                times.append(time.perf_counter() - started)
            result[f"batch{batch}"] = round(1000 * statistics.median(times) / batch, 2)
    return result


def measure_candidate(name: str, weights: str, backbone: Backbone, feats: FeatureSet, rt: runtime.Runtime
                      ) -> Candidate:
    """One candidate's scores, size and latency, from its cached training features."""
    started = time.perf_counter()
    x, y = feats.matrix(FINAL)
    size = tuple(backbone.data_config["input_size"][1:])
    candidate = Candidate(name=name, weights=weights, image_size=int(size[0]),
                          params=_params(backbone),
                          knn=round(knn_accuracy(x, y), 4), logme=round(logme(x, y), 4),
                          latency_ms=latency_ms(backbone.model, size, rt), seconds=0.0)
    candidate.seconds = round(feats.seconds + time.perf_counter() - started, 1)
    log.info("%s: k-NN %.3f, LogME %.3f, %.1fM parameters, %.1f ms per image at batch 1 (%.1f s)", candidate.name,
             candidate.knn, candidate.logme, candidate.params / 1e6, candidate.latency_ms["batch1"],
             candidate.seconds)
    return candidate


def _params(backbone: Backbone) -> int:
    return sum(p.numel() for p in backbone.model.parameters())


def _measure_group(cfg: TrainConfig, group: list[tuple[str, str, Backbone]], splits, rt: runtime.Runtime
                   ) -> list[Candidate]:
    """The candidates of `group`, their features not cached extracted in one pass over the images."""
    features = train_features_many(cfg, [b for _, _, b in group], splits, load_thresholds().probe_max_images, rt)
    return [measure_candidate(name, weights, b, f, rt) for (name, weights, b), f in zip(group, features)]


def rank_backbones(cfg: TrainConfig, spec: str, max_latency_ms: float | None = None,
                   rt: runtime.Runtime | None = None) -> dict[str, Any]:
    """Measure and rank every candidate of `spec` on `cfg.data_dir`'s training split: the features not cached are
    extracted in one pass over the images for as many candidates as `JOINT_MAX_PARAMS` allows (each file decoded
    once per pass)."""
    started = time.perf_counter()
    pairs = parse_candidates(spec)
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_image_pixels,
                         exclude=read_exclude_list(cfg.exclude))
    rt = rt or process_runtime(cfg)
    measured: list[Candidate] = []
    group: list[tuple[str, str, Backbone]] = []  # built, waiting for the pass they share
    with preserved_rng():
        for name, weights in pairs:
            # Built as `plan` and `train` build it (the source head kept, at --image-size when given): the features'
            # cache entry is theirs too.
            backbone = create_backbone(name, weights, len(splits.classes), cfg.image_size, keep_source_head=True)
            if group and sum(_params(b) for _, _, b in group) + _params(backbone) > JOINT_MAX_PARAMS:
                measured += _measure_group(cfg, group, splits, rt)
                group = []
            group.append((name, weights, backbone))
        measured += _measure_group(cfg, group, splits, rt)
    ordered = rank(measured, max_latency_ms)
    kept = [c for c in ordered if c.excluded is None]
    if not kept:
        raise UserError(f"No candidate is within --max-latency-ms {max_latency_ms:g}: the fastest takes "
                        f"{min(c.latency_ms['batch1'] for c in measured):.1f} ms per image at batch 1.")
    return {"data_dir": cfg.data_dir, "train_images": len(splits.train), "classes": len(splits.classes),
            "candidates": [c.to_dict() for c in ordered], "best": kept[0].name, "best_weights": kept[0].weights,
            "max_latency_ms": max_latency_ms, "image_size": cfg.image_size,
            "seconds": round(time.perf_counter() - started, 1), "device": str(rt.device)}


def table(result: dict[str, Any]) -> str:
    """The ranking as `finetune rank` prints it."""
    lines = [f"{'#':>2}  {'model':<28} {'size':>4} {'params':>7} {'k-NN':>6} {'LogME':>7} {'ms/img b1':>9} "
             f"{'ms/img b32':>10}  why"]
    for i, c in enumerate(result["candidates"], 1):
        mark = "*" if c["pareto"] else " "
        lines.append(f"{i:>2}{mark} {c['name'][:28]:<28} {c['image_size']:>4} {c['params'] / 1e6:>6.1f}M "
                     f"{c['knn']:>6.3f} {c['logme']:>7.3f} {c['latency_ms']['batch1']:>9.1f} "
                     f"{c['latency_ms']['batch32']:>10.1f}  {'; '.join(c['reasons'])}")
    lines += ["", f"* the accuracy-latency front. Ranked on {result['train_images']} training images in "
                  f"{result['seconds']:.0f} s on {result['device']} (features cached for plan and train).",
              f"Next: finetune train {result['data_dir']} --model {result['best']} --weights {result['best_weights']}"
              + (f" --image-size {result['image_size']}" if result.get("image_size") else "")]
    return "\n".join(lines)
