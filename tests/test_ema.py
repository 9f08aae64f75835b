"""The EMA of the weights: Lightning's WeightAveraging with timm's decay warm-up as its averaging function."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.training.callbacks import EMA, ema_warmup_decay
from finetune.training.module import Classifier

DECAY = 0.9


@pytest.mark.parametrize("decay", [0.5, 0.999, 0.9998])
def test_warmup_decay_is_timms(decay):
    timm_ema = ModelEmaV3(nn.Linear(2, 2), decay=decay, use_warmup=True)
    # The n-th averaging step (n = num_averaged, 0 = the copy) is timm's update at global step n + 1.
    for n in (0, 1, 2, 3, 10, 100, 1000, 10**5, 10**7):
        assert ema_warmup_decay(n, decay) == pytest.approx(timm_ema.get_decay(n + 1), abs=1e-12), n
    assert ema_warmup_decay(0, decay) == 0.0  # the first update copies the weights
    assert ema_warmup_decay(1, decay) < 0.4  # early updates average lightly: a random head is forgotten
    assert ema_warmup_decay(10**7, decay) == decay  # later ones use the configured decay


def _module(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))  # BN: float+int buffers
    return Classifier(net, 3, lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9))


def _loaders():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    return (DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8),
            DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8))


def _trainer(epochs: int, callbacks: list[pl.Callback], checkpoint_dir: Path | None = None) -> pl.Trainer:
    if checkpoint_dir is not None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=checkpoint_dir, save_last=True)]
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                      enable_checkpointing=checkpoint_dir is not None, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)


class _Record(pl.Callback):
    """The raw weights after every optimizer step."""

    def __init__(self):
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k


def test_the_average_after_a_fit_is_timms_and_is_what_validates(tmp_path: Path):
    module, record, ema = _module(), _Record(), EMA(DECAY)
    timm_model = copy.deepcopy(module)
    timm_ema = ModelEmaV3(timm_model, decay=DECAY, use_warmup=True)
    train, val = _loaders()
    trainer = _trainer(2, [record, ema])
    trainer.fit(module, train, val)
    assert len(record.states) == 8 and int(ema._average_model.n_averaged) == 8
    # timm's ModelEmaV3 fed the same sequence of weights (the old implementation: update at global step i+1).
    for step, state in enumerate(record.states, start=1):
        timm_model.load_state_dict(state)
        timm_ema.update(timm_model, step=step)
    average = _state(timm_ema.module)
    _assert_same(_state(ema._average_model.module), average)
    assert any(not torch.allclose(average[k], record.states[-1][k]) for k in average if average[k].is_floating_point())
    # The module ends up holding the average (the EMA weights are the model), and the epoch's select_acc was theirs.
    _assert_same(_state(module), average)
    x, y = val.dataset.tensors
    with torch.no_grad():
        expected = (timm_ema.module.eval()(x).argmax(1) == y).float().mean()
    assert float(trainer.callback_metrics["select_acc"]) == pytest.approx(float(expected))


def test_a_checkpoint_round_trip_restores_the_average_and_resume_matches(tmp_path: Path):
    train, val = _loaders()
    full_record, full_ema, full = _Record(), EMA(DECAY), _module()
    _trainer(2, [full_record, full_ema]).fit(full, train, val)

    part_record, part = _Record(), _module()
    _trainer(1, [part_record, EMA(DECAY)], tmp_path / "ckpt").fit(part, train, val)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    # The checkpoint holds the average as the model and the raw weights beside it.
    _assert_same(saved["current_model_state"], part_record.states[-1])
    assert int(saved["averaging_state"]["n_averaged"]) == 4
    assert any(not torch.allclose(saved["state_dict"][k], saved["current_model_state"][k])
               for k in saved["state_dict"] if saved["state_dict"][k].is_floating_point())

    class Restored(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.average, self.raw = _state(resumed_ema._average_model.module), _state(pl_module)

    resumed_ema, restored, resumed = EMA(DECAY), Restored(), _module(seed=5)  # other initial weights
    _trainer(2, [resumed_ema, restored]).fit(resumed, train, val, ckpt_path=tmp_path / "ckpt" / "last.ckpt",
                                             weights_only=True)
    _assert_same(restored.average, saved["state_dict"])
    _assert_same(restored.raw, part_record.states[-1])
    # Continued from there, the average (and the update count of the warm-up) is the uninterrupted run's.
    assert int(resumed_ema._average_model.n_averaged) == 8
    _assert_same(_state(resumed_ema._average_model.module), _state(full_ema._average_model.module))


def test_a_checkpoint_saved_during_validation_keeps_raw_and_average_apart(tmp_path: Path):
    """A second Ctrl+C during validation saves a checkpoint while the average is swapped in."""
    path = tmp_path / "mid-val.ckpt"

    class SaveInValidation(pl.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 0 and not path.exists():
                self.raw = _state(ema._average_model.module)  # swapped in: the raw weights sit here
                trainer.save_checkpoint(path)

    record, ema, saver, module = _Record(), EMA(DECAY), SaveInValidation(), _module()
    train, val = _loaders()
    _trainer(1, [record, ema, saver]).fit(module, train, val)
    saved = torch.load(path, weights_only=True)
    _assert_same(saved["current_model_state"], record.states[-1])
    _assert_same(saved["current_model_state"], saver.raw)
    _assert_same(saved["state_dict"], _state(module))  # training ended: the module holds the average
