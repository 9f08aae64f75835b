"""What `train`'s cuts of its own passes (issue 16) must not change.

Each candidate is scored once: the warm-up head on cached features, the best epoch by its own validation during
the fit; these tests prove the scores read that way are the ones a validation pass gives. A part of a cached
list is read from the list's entry. The audit moves no random generator, so a cold and a warm feature
cache train the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from click.testing import CliRunner

from finetune import runtime, timing
from finetune.cli import cli
from finetune.config import TrainConfig
from finetune.data.folders import scan_folder
from finetune.model.backbone import create_backbone
from finetune.model.features import cached_features, cached_subset
from finetune.strategy.measure import measure_and_decide
from finetune.training import checkpoints
from finetune.training.recipe import resolve_recipe
from finetune.training.network_plans import network_classifier, network_datamodule, prepare_network
from tests.conftest import TINY_MODEL, tiny_train_args


def _validate(module: pl.LightningModule, datamodule) -> dict[str, float]:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    return {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}


@pytest.mark.parametrize("class_weights", ["none", "auto"])
def test_the_warm_up_score_from_cached_features_is_what_validation_gives(image_folder: Path, weights_file: Path,
                                                                         tmp_path: Path, monkeypatch, class_weights):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig(data_dir=str(image_folder), model=TINY_MODEL, weights=str(weights_file), image_size=32,
                      batch_size=4, num_workers=0, scenario="large-similar", epochs=1, class_weights=class_weights)
    rt = runtime.cpu()
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed)
    backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size, keep_source_head=True)
    decision = measure_and_decide(cfg, splits, backbone, rt)
    recipe = resolve_recipe(cfg, "large-similar")
    inner = splits.selection(cfg.select_share, cfg.seed)
    groups, _, info = prepare_network(cfg, decision, recipe, backbone, inner, splits.train, rt)
    module = network_classifier(cfg, recipe, backbone, inner, groups)
    validated = _validate(module, network_datamodule(cfg, recipe, backbone, inner, rt))
    cached = info["warmup"]["select"]
    assert cached["select_acc"] == pytest.approx(validated["select_acc"], abs=1e-6)
    assert cached["select_acc_top5"] == pytest.approx(validated["select_acc_top5"], abs=1e-6)
    assert cached["select_loss"] == pytest.approx(validated["select_loss"], rel=1e-4, abs=1e-5)


def test_a_subset_is_read_from_the_cache_entry_of_the_list_that_holds_it(image_folder: Path, weights_file: Path,
                                                                         tmp_path: Path):
    splits = scan_folder(str(image_folder), 0.2, 0)
    backbone = create_backbone(TINY_MODEL, str(weights_file), len(splits.classes), 32)
    whole = cached_features(backbone, splits.train, cache_dir=tmp_path)
    part = splits.train[1::2]
    with timing.recording() as phases:
        sub = cached_subset(backbone, part, splits.train, cache_dir=tmp_path)
    assert not sub.extracted  # no pass of its own
    assert sub.paths == [s.path for s in part]
    own = cached_features(backbone, part, cache_dir=tmp_path / "own")  # the same images extracted on their own
    for key in own.arrays:
        assert torch.allclose(torch.from_numpy(sub.arrays[key]), torch.from_numpy(whole.arrays[key][:, 1::2]))
        assert torch.allclose(torch.from_numpy(sub.arrays[key]), torch.from_numpy(own.arrays[key]), atol=1e-5)
    assert list(phases.to_dict()) == ["total", "features"]


def test_the_best_epoch_reported_is_what_validating_its_checkpoint_gives(image_folder: Path, weights_file: Path,
                                                                        tmp_path: Path, isolated_mlflow: str):
    out = tmp_path / "out"
    args = tiny_train_args(image_folder, out, "--scenario", "large-similar", "--epochs", "2")
    args[args.index("--weights") + 1] = str(weights_file)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    best = checkpoints.load_checkpoint(checkpoints.checkpoint_dir(out) / "best.ckpt")
    cfg = TrainConfig(data_dir=str(image_folder), model=TINY_MODEL, weights=str(weights_file), image_size=32,
                      batch_size=4, num_workers=0, scenario="large-similar")
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed)
    backbone = create_backbone(cfg.model, cfg.weights, len(splits.classes), cfg.image_size)
    recipe = resolve_recipe(cfg, "large-similar")
    inner = splits.selection(cfg.select_share, cfg.seed)
    module = network_classifier(cfg, recipe, backbone, inner, [{"params": list(backbone.model.parameters()), "lr": 1e-3}])
    module.load_state_dict(best["state_dict"])
    validated = _validate(module, network_datamodule(cfg, recipe, backbone, inner, runtime.cpu()))
    assert m["select_acc_finetuned"] == pytest.approx(validated["select_acc"], abs=1e-6)
    # The phases of the run are in its summary, nested under their parents.
    timing_ = summary["timing"]
    assert {"fit", "fit/lightning fit", "fit/lightning fit/validation", "evaluate", "publish"} <= set(timing_)
    assert timing_["fit/lightning fit/validation"] <= timing_["fit/lightning fit"] <= timing_["fit"] <= timing_["total"]


def test_the_audit_in_train_leaves_the_random_generators_as_it_found_them(image_folder: Path, weights_file: Path,
                                                                          tmp_path: Path, isolated_mlflow: str,
                                                                          monkeypatch):
    import random

    import numpy as np

    from finetune import tracking
    from finetune.workflows.train import _audit

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))  # cold: the audit extracts val's features
    cfg = TrainConfig(data_dir=str(image_folder), model=TINY_MODEL, weights=str(weights_file), image_size=32,
                      batch_size=4, num_workers=0)
    splits = scan_folder(cfg.data_dir, cfg.val_fraction, cfg.seed)
    run_id = tracking.client().create_run(tracking.ensure_experiment("audit-rng")).info.run_id
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    audit = _audit(cfg, splits, tmp_path / "out", run_id, "file", runtime.cpu())
    assert "counts" in audit  # it ran
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]
