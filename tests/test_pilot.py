"""The pilot (workflows/pilot.py) scored on folds of train: every training image predicted once, by a run that
did not fit on it."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from finetune import runtime
from finetune.config import TrainConfig
from finetune.data.folders import scan_folder
from finetune.model.backbone import create_backbone
from finetune.strategy.measure import measure_and_decide
from finetune.workflows.pilot import run_pilot
from tests.conftest import TINY_MODEL


def measured(image_folder: Path, weights_file: Path, tmp_path: Path, monkeypatch, **options):
    """A tiny run measured and decided, as `train` does before the pilot (features cached under tmp_path)."""
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig(data_dir=str(image_folder), model=TINY_MODEL, weights=str(weights_file), image_size=32,
                      batch_size=4, num_workers=0, epochs=1, **options)
    rt = runtime.cpu()
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed)
    backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size, keep_source_head=True)
    return cfg, rt, splits, backbone, measure_and_decide(cfg, splits, backbone, rt)


def test_a_k_fold_pilot_scores_every_candidate_on_all_of_train(image_folder: Path, weights_file: Path,
                                                               tmp_path: Path, monkeypatch, caplog):
    cfg, rt, splits, backbone, decision = measured(image_folder, weights_file, tmp_path, monkeypatch)
    candidates = ["small-similar", "large-similar"]
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cold-cache"))  # the pilot finds nothing cached
    with caplog.at_level(logging.INFO, logger="finetune.model.features"):
        three = run_pilot(cfg, decision, candidates, ["test"], backbone, splits, rt, folds=3)
    # The folds' parts are read from the cache entry of the whole training split (which the run after the pilot
    # reads too): no part of it is extracted on its own, whichever network config a candidate builds.
    extracted = [int(m.group(1)) for m in re.finditer(r"Extracted features of (\d+) images x 1 view", caplog.text)]
    assert extracted and set(extracted) == {len(splits.train)}

    # one selection split holds a fifth of train out; three folds hold out each training image once
    assert len(splits.selection(cfg.select_share, cfg.seed).val) < three.select_images == len(splits.train)
    for scenario in candidates:
        assert three.scores[scenario]["folds"] == 3
        # a share of the training images, predicted once each: a multiple of 1/len(train)
        acc = three.scores[scenario]["select_acc"]
        assert acc * len(splits.train) == pytest.approx(round(acc * len(splits.train)), abs=0.01)
        assert three.scores[scenario]["fit_images"] < len(splits.train)
    assert three.winner == max(candidates, key=lambda s: (three.scores[s]["select_acc"], -candidates.index(s)))
    assert all(w + o <= len(splits.train) for w, o in three.unresolved.values())


def test_the_linear_heads_are_scored_on_cached_features_as_a_network_pass_would_score_them(
        image_folder: Path, weights_file: Path, tmp_path: Path, monkeypatch):
    import numpy as np

    from finetune.workflows import pilot

    cfg, rt, splits, backbone, decision = measured(image_folder, weights_file, tmp_path, monkeypatch)
    passes, fits = [], []
    real_predict, real_run_plan = pilot.predict_sources, pilot.run_plan
    monkeypatch.setattr(pilot, "predict_sources", lambda *a, **k: passes.append(a) or real_predict(*a, **k))
    monkeypatch.setattr(pilot, "run_plan", lambda *a, **k: fits.append(real_run_plan(*a, **k)) or fits[-1])
    heads = run_pilot(cfg, decision, ["small-similar", "small-different"], ["test"], backbone, splits, rt)
    assert passes == []  # no image went through the network to score a head
    # The selection images through each fitted network, centre crop: the same score.
    select = splits.selection(cfg.select_share, cfg.seed).val
    labels = np.array([s.label for s in select])
    for scenario, fit in zip(["small-similar", "small-different"], fits):
        probs = real_predict(fit.net, [s.path for s in select], backbone.data_config, "center", cfg.batch_size,
                             cfg.max_image_pixels, rt)[0].numpy()
        assert heads.scores[scenario]["select_acc"] == pytest.approx((probs.argmax(1) == labels).mean(), abs=1e-4)


@pytest.mark.parametrize("aug_views, expected", [(None, "large-"), (2, "small-")])
def test_a_multi_process_run_fine_tunes_without_the_pilot_unless_an_option_asks_for_a_linear_head(
        image_folder: Path, weights_file: Path, tmp_path: Path, monkeypatch, aug_views, expected):
    from finetune.training import distributed
    from finetune.workflows.pilot import settle

    cfg, rt, splits, backbone, decision = measured(image_folder, weights_file, tmp_path, monkeypatch, aug_views=aug_views)
    assert decision.plan.scenario.startswith("small-")  # 12 training images: little data
    monkeypatch.setattr(distributed, "is_multi_process", lambda: True)
    settled = settle(cfg, decision, backbone, splits, rt)
    assert settled.pilot is None and settled.plan.scenario.startswith(expected)
    assert "pilot skipped: a multi-process run cannot pilot" in " ".join(settled.plan.reasons)
