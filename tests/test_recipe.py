"""The training recipe's pieces, without a Trainer: config validation, presets, mixup, optimizers,
schedules, head init, class imbalance, the initial-loss check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from finetune.data.transforms import PCALighting, eval_transform, make_mixup, train_transform
from finetune.training.callbacks import check_initial_loss
from finetune.config import (AUGMENT_PRESETS, CLASS_WEIGHTS, OPTIMIZERS, SAMPLERS, SCHEDULES, TrainConfig,
                             resolve_config)
from finetune.errors import UserError
from finetune.training.module import Classifier
from finetune.training.optim import create_optimizer, create_scheduler, make_optimizer_factory, split_weight_decay
from finetune.model.heads import DropConnectLinear, init_head
from finetune.training.recipe import (DEFAULT_RECIPES, class_weights, default_recipe, resolve_recipe)
from finetune.data.loaders import balanced_sampler_factory
from tests.conftest import TINY_MODEL

DATA_CONFIG = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear",
                   crop_pct=0.875)


@pytest.mark.parametrize("key, bad, valid", [
    ("augment", "heavy", AUGMENT_PRESETS),
    ("optimizer", "lamb", OPTIMIZERS),
    ("schedule", "linear", SCHEDULES),
    ("class_weights", "inverse", CLASS_WEIGHTS),
    ("sampler", "oversample", SAMPLERS),
])
def test_unknown_choice_lists_the_valid_ones(key, bad, valid):
    with pytest.raises(UserError) as e:
        resolve_config({key: bad}, {"data_dir": "x"})
    message = e.value.message
    assert repr(bad) in message
    assert all(v in message for v in valid), message


@pytest.mark.parametrize("key, bad", [("mixup", -0.1), ("label_smoothing", 1.0), ("dropout", 1.5),
                                      ("drop_path", -0.2), ("ema", 1.0), ("patience", 0), ("lr_gamma", 2.0),
                                      ("weight_decay", -1e-4), ("step_epochs", 0)])
def test_out_of_range_numbers_are_refused(key, bad):
    with pytest.raises(UserError, match=key):
        resolve_config({key: bad}, {"data_dir": "x"})


def test_mixup_needs_an_even_batch():
    with pytest.raises(UserError, match="even"):
        resolve_config({"mixup": 0.2, "batch_size": 5}, {"data_dir": "x"})


def test_yaml_values_are_typed_and_cli_wins():
    cfg = resolve_config({"optimizer": "sgd", "momentum": "0.8", "nesterov": True, "ema": "0.99", "schedule": "step"},
                         {"data_dir": "x", "optimizer": "rmsprop"})
    assert (cfg.optimizer, cfg.momentum, cfg.nesterov, cfg.ema, cfg.schedule) == ("rmsprop", 0.8, True, 0.99, "step")


@pytest.mark.parametrize("values, message", [
    ({"optimizer": "adamw", "momentum": 0.8}, "--momentum applies to --optimizer sgd or rmsprop"),
    ({"schedule": "cosine", "step_epochs": 2}, "--step-epochs applies to --schedule step"),
    ({"lr_gamma": 0.5}, "--lr-gamma applies to --schedule step or exponential"),  # the default schedule: cosine
])
def test_optimizer_and_schedule_options_the_run_would_ignore_are_refused(values, message):
    with pytest.raises(UserError, match=message):
        resolve_recipe(resolve_config({}, {"data_dir": "x", **values}), "large-similar")


@pytest.mark.parametrize("scenario", sorted(DEFAULT_RECIPES))
def test_every_scenario_has_a_complete_default_recipe(scenario):
    recipe = resolve_recipe(TrainConfig(), scenario)
    assert recipe.augment in AUGMENT_PRESETS and recipe.schedule in SCHEDULES
    assert default_recipe(scenario)["augment"] == recipe.augment


def test_config_overrides_the_scenario_default():
    assert default_recipe("large-similar")["ema"] > 0
    recipe = resolve_recipe(TrainConfig(augment="none", ema=0.0), "large-similar")
    assert recipe.augment == "none" and recipe.ema == 0.0
    assert recipe.label_smoothing == default_recipe("large-similar")["label_smoothing"]


def test_unknown_scenario_has_no_recipe():
    with pytest.raises(UserError, match="large-similar"):
        default_recipe("huge-similar")


def test_pca_lighting_shifts_each_channel_by_a_constant():
    torch.manual_seed(0)
    img = torch.rand(3, 8, 8)
    out = PCALighting(0.5)(img)
    shift = out - img
    assert not torch.allclose(shift, torch.zeros_like(shift))
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift), atol=1e-6)  # same shift on every pixel
    assert torch.equal(PCALighting(0.0)(img), img)


@pytest.mark.parametrize("preset, has_lighting", [("light", False), ("standard", True), ("strong", True)])
def test_presets_build_and_standard_adds_lighting(preset, has_lighting):
    t = train_transform(DATA_CONFIG, preset)
    assert any(isinstance(s, PCALighting) for s in t.transforms) == has_lighting
    assert t(Image.new("RGB", (50, 40), (10, 200, 30))).shape == (3, 32, 32)


def test_none_preset_is_the_eval_preprocessing():
    img = Image.new("RGB", (50, 40), (10, 200, 30))
    assert torch.equal(train_transform(DATA_CONFIG, "none")(img), eval_transform(DATA_CONFIG)(img))


def test_mixup_produces_soft_targets():
    np.random.seed(0)
    mixup = make_mixup(0.4, 0.0, 0.1, num_classes=3)
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    mixed, soft = mixup(x.clone(), y)
    assert soft.shape == (4, 3)
    assert torch.allclose(soft.sum(dim=1), torch.ones(4))
    assert (soft.max(dim=1).values < 1.0).all()  # not one-hot: mixed and smoothed
    assert not torch.equal(mixed, x)
    assert make_mixup(0.0, 0.0, 0.1, 3) is None


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_module_trains_on_soft_targets_and_measures_hard_labels():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    mixup = make_mixup(1.0, 0.0, 0.0, num_classes=3)
    module = Classifier(net, 3, lambda m: None, mixup=mixup)
    x, y = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])  # odd batch: one image is dropped
    np.random.seed(1)
    mixed, soft = mixup(x[:4].clone(), y[:4])
    np.random.seed(1)
    loss = module.training_step((x, y), 0)
    assert torch.allclose(loss, F.cross_entropy(net(mixed), soft))
    assert not torch.allclose(loss, F.cross_entropy(net(mixed), y[:4]))


def test_epoch_accuracies_are_the_fraction_of_correct_images():
    """torchmetrics' top-1 and top-5 accuracy per batch, averaged over the epoch by batch size: the fraction
    of images whose label is the argmax (among the 5 highest logits), also with an uneven last batch."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    net = nn.Linear(4, 7)
    x, y = torch.randn(22, 4), torch.randint(0, 7, (22,))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    metrics = trainer.validate(Classifier(net, 7, lambda m: None), DataLoader(TensorDataset(x, y), batch_size=8),
                               verbose=False)[0]
    with torch.no_grad():
        top5 = net(x).topk(5, dim=1).indices
    assert metrics["select_acc"] == pytest.approx(float((top5[:, 0] == y).float().mean()))
    assert metrics["select_acc_top5"] == pytest.approx(float((top5 == y[:, None]).any(dim=1).float().mean()))
    assert 0 < metrics["select_acc"] < metrics["select_acc_top5"] < 1


@pytest.mark.parametrize("batch", [None, (torch.rand(1, 3, 8, 8), torch.tensor([0]))],
                         ids=["all-images-failed", "one-image-left-for-mixup"])
def test_a_batch_with_nothing_to_learn_gives_a_zero_loss_reaching_every_trainable_parameter(batch):
    """Lightning refuses a None loss under DDP, and DDP's all-reduce needs a gradient for every
    trainable parameter on every rank: the loss is 0 and backward reaches each of them (frozen ones not)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.ReLU(), nn.Linear(4, 3))
    net[1].requires_grad_(False)  # a frozen group
    module = Classifier(net, 3, lambda m: None, mixup=make_mixup(1.0, 0.0, 0.0, num_classes=3))
    loss = module.training_step(batch, 0)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and float(loss) == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in net[3].parameters())
    assert all(p.grad is None for p in net[1].parameters())


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_no_weight_decay_on_norms_and_biases():
    net = _net()
    groups = split_weight_decay([{"params": list(net.parameters()), "lr": 0.1, "name": "all"}], 0.05)
    by_name = {g["name"]: g for g in groups}
    assert by_name["all"]["weight_decay"] == 0.05 and by_name["all/no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in by_name["all"]["params"])
    assert {id(p) for p in by_name["all/no_decay"]["params"]} == {
        id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[3].bias)}


def test_vit_position_embedding_and_class_token_get_no_weight_decay():
    """timm's own `no_weight_decay()` names (a ViT's pos_embed, cls_token) are honoured, through the
    Lightning module that wraps the model, not just the 1-d rule (which decayed both)."""
    net = timm.create_model("test_vit", pretrained=False, num_classes=2)
    assert {"pos_embed", "cls_token"} <= set(net.no_weight_decay())
    groups = [{"params": list(net.parameters()), "lr": 1e-3, "name": "all"}]
    module = Classifier(net, 2, make_optimizer_factory(TrainConfig(weight_decay=0.05), groups))
    opt = module.configure_optimizers()
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay_of[id(net.pos_embed)] == 0.0 and decay_of[id(net.cls_token)] == 0.0
    assert decay_of[id(net.patch_embed.proj.weight)] == 0.05  # a real weight matrix keeps its decay
    assert len(decay_of) == sum(1 for _ in net.parameters())  # nothing lost or duplicated


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adagrad", torch.optim.Adagrad),
                                       ("rmsprop", torch.optim.RMSprop), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_each_optimizer_keeps_the_plan_group_lrs(name, cls):
    net = _net()
    head = list(net[3].parameters())
    body = [p for p in net.parameters() if all(p is not h for h in head)]
    groups = [{"params": body, "lr": 1e-4, "name": "body"}, {"params": head, "lr": 1e-2, "name": "head"}]
    opt = create_optimizer(TrainConfig(optimizer=name, weight_decay=0.01), groups)
    assert isinstance(opt, cls)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"body": 1e-4, "body/no_decay": 1e-4, "head": 1e-2, "head/no_decay": 1e-2}


def test_nesterov_is_passed_to_sgd_and_refused_elsewhere():
    params = [{"params": list(_net().parameters()), "lr": 0.1, "name": "all"}]
    assert create_optimizer(TrainConfig(optimizer="sgd", nesterov=True), params).defaults["nesterov"] is True
    assert create_optimizer(TrainConfig(optimizer="sgd", momentum=0.5), params).defaults["momentum"] == 0.5
    with pytest.raises(UserError, match="nesterov"):
        create_optimizer(TrainConfig(optimizer="adam", nesterov=True), params)


def test_frozen_parameters_are_left_out():
    net = _net()
    net[0].weight.requires_grad_(False)
    groups = split_weight_decay([{"params": list(net.parameters()), "lr": 0.1, "name": "all"}], 0.05)
    assert all(p is not net[0].weight for g in groups for p in g["params"])


def _lrs(schedule: str, steps: int, warmup: float = 0.0, **cfg) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
    sched = create_scheduler(TrainConfig(**cfg), opt, schedule, warmup, steps_per_epoch=4, epochs=3)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return out


def test_step_schedule_drops_the_lr_at_the_epoch_boundary():
    lrs = _lrs("step", 12, step_epochs=1, lr_gamma=0.1)
    assert lrs[:4] == [1.0] * 4
    assert lrs[4:8] == pytest.approx([0.1] * 4)
    assert lrs[8:] == pytest.approx([0.01] * 4)


def test_warmup_ramps_up_without_moving_the_step_boundary():
    lrs = _lrs("step", 8, warmup=0.5, step_epochs=1)
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)
    assert lrs[3] == pytest.approx(1.0) and lrs[4] == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_per_iteration_schedules_end_near_zero(schedule):
    lrs = _lrs(schedule, 12, warmup=1.0)
    assert max(lrs) == pytest.approx(1.0, rel=1e-3)
    assert lrs[-1] < 0.05 and lrs[0] < 0.1


def test_exponential_decays_once_per_epoch():
    lrs = _lrs("exponential", 12, lr_gamma=0.5)
    assert lrs == pytest.approx([1.0] * 4 + [0.5] * 4 + [0.25] * 4)


def test_constant_without_warmup_has_no_scheduler():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    assert create_scheduler(TrainConfig(), opt, "constant", 0.0, 4, 3) is None
    factory = make_optimizer_factory(TrainConfig(), [{"params": list(_net().parameters()), "lr": 0.1, "name": "a"}])
    assert isinstance(factory(_net()), torch.optim.AdamW)  # outside a Trainer: the optimizer alone


def test_fresh_head_is_xavier_with_zero_bias_and_starts_near_ln_c():
    torch.manual_seed(0)
    model = timm.create_model(TINY_MODEL, num_classes=10)
    head = init_head(model)
    fan_in, fan_out = head.in_features, head.out_features
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert head.weight.abs().max() <= bound and head.weight.abs().max() > 0.5 * bound
    assert torch.count_nonzero(head.bias) == 0
    # Features with unit variance: the fresh head predicts nearly uniformly, so the loss is near ln(10).
    feats = torch.randn(256, fan_in) / math.sqrt(fan_in) * math.sqrt(2)
    loss = F.cross_entropy(head(feats), torch.randint(0, 10, (256,))).item()
    assert check_initial_loss(loss, 10) is None


def test_drop_connect_head_drops_weights_in_training_only():
    torch.manual_seed(0)
    model = timm.create_model(TINY_MODEL, num_classes=3)
    plain_keys = set(model.state_dict())
    head = init_head(model, drop_connect=0.5)
    assert isinstance(head, DropConnectLinear) and model.get_classifier() is head
    assert set(model.state_dict()) == plain_keys  # saved weights load into the plain timm head
    x = torch.randn(4, head.in_features)
    head.train()
    assert not torch.allclose(head(x), head(x))
    head.eval()
    assert torch.allclose(head(x), F.linear(x, head.weight, head.bias))


def test_initial_loss_warning_has_the_numbers():
    assert check_initial_loss(2.4, 10) is None
    message = check_initial_loss(9.0, 10)
    assert "9.000" in message and "ln(10) = 2.303" in message
    assert check_initial_loss(float("nan"), 10) is not None


def test_class_weights_are_inverse_frequency():
    w = class_weights([0, 0, 0, 1], 3)
    assert w.tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1), 1.0])


def test_balanced_sampler_draws_classes_equally():
    from finetune.data.folders import Sample

    samples = [Sample(f"a{i}", 0) for i in range(90)] + [Sample(f"b{i}", 1) for i in range(10)]
    torch.manual_seed(0)
    drawn = [samples[i].label for i in balanced_sampler_factory(2)(samples)]
    assert len(drawn) == 100
    assert 35 <= sum(drawn) <= 65  # about half from the 10% class


def test_example_config_loads_and_documents_the_recipe():
    from pathlib import Path

    from finetune.config import load_yaml
    from finetune.training.recipe import Recipe

    path = Path(__file__).resolve().parents[1] / "examples" / "config.yaml"
    cfg = resolve_config(load_yaml(path), {"data_dir": "x"})
    text = path.read_text()
    assert all(f"{name}:" in text for name in Recipe.__dataclass_fields__)
    assert cfg.optimizer == "adamw"


def test_model_kwargs_map_to_timm_and_unsupported_ones_are_a_user_error():
    from finetune.model.backbone import create_backbone
    from finetune.training.recipe import model_kwargs

    recipe = resolve_recipe(TrainConfig(dropout=0.3, drop_path=0.1), "small-similar")
    assert model_kwargs(recipe) == {"drop_rate": 0.3, "drop_path_rate": 0.1}
    assert model_kwargs(resolve_recipe(TrainConfig(), "small-similar")) == {}
    backbone = create_backbone(TINY_MODEL, "none", 2, **model_kwargs(recipe))
    assert backbone.model.drop_rate == 0.3
    with pytest.raises(UserError, match="cannot create"):
        create_backbone(TINY_MODEL, "none", 2, no_such_option=1)
