"""Grad-CAM heatmaps: which part of an image a prediction rests on.

pytorch-grad-cam computes them; this module picks the layer from the timm model's own `feature_info`
(the last stage, or for a head on an earlier stage the stage it reads), turns a ViT's tokens back into
the patch grid, and draws the map over the image exactly as the eval transform crops it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw
import torch
from torch import nn

from finetune.data.transforms import eval_crop, eval_transform
from finetune.errors import UserError
from finetune.model.heads import StageClassifier

# A classifier that reads only the class token sees the last block's patch tokens through nothing, so
# their gradients are zero there: the map is taken at that block's first norm (its attention's input).
TOKEN_POOLS = {"token", "map"}


def target_layer(net: nn.Module) -> nn.Module:
    """The layer whose activations and gradients make the map, from timm's `feature_info`."""
    if isinstance(net, StageClassifier):
        return net.trunk.get_submodule(net.trunk.feature_info[net.stage_index]["module"])
    info = getattr(net, "feature_info", None)
    if not info:
        raise ValueError(f"{type(net).__name__} has no feature_info to pick a Grad-CAM layer from")
    layer = net.get_submodule(info[-1]["module"])
    if getattr(net, "global_pool", None) in TOKEN_POOLS and hasattr(layer, "norm1"):
        return layer.norm1
    return layer


def check_explainable(net: nn.Module) -> None:
    """A UserError now, before any work, for a network Grad-CAM has no layer for."""
    try:
        target_layer(net)
    except ValueError as e:
        raise UserError(f"Cannot explain this model: {e}.") from None


def overlay_names(paths: Sequence[str]) -> list[str]:
    """`<stem>_cam.png` per image; a stem that occurs twice gets the image's position too, so none overwrites another."""
    stems = [Path(p).stem for p in paths]
    repeated = {s for s in stems if stems.count(s) > 1}
    return [f"{s}_{i}_cam.png" if s in repeated else f"{s}_cam.png" for i, s in enumerate(stems)]


def token_reshape(net: nn.Module, image_size: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Tokens ``[B, prefix + h*w, C]`` -> ``[B, C, h, w]`` (ViT-style); feature maps pass unchanged."""
    trunk = net.trunk if isinstance(net, StageClassifier) else net
    prefix = int(getattr(trunk, "num_prefix_tokens", 0))
    patch = getattr(getattr(trunk, "patch_embed", None), "patch_size", None)

    def reshape(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or patch is None:
            return x
        h, w = image_size[0] // patch[0], image_size[1] // patch[1]
        return x[:, prefix:, :].reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)

    return reshape


@contextmanager
def _gradients_on(net: nn.Module) -> Iterator[None]:
    """Eval mode, autograd on, no parameter gradients; the network is left exactly as it was.

    The gradients flow from a copy of the input that requires them, so a frozen backbone gets a map
    too, and no parameter's `.grad` or `requires_grad` changes.
    """
    training = net.training
    saved = [(p, p.requires_grad, p.grad) for p in net.parameters()]  # GradCAM calls zero_grad()
    try:
        net.eval()
        for p, _, _ in saved:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        net.train(training)


def heatmaps(net: nn.Module, images: torch.Tensor, targets: Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM maps ``[N, H, W]`` in 0..1 for normalised images ``[N, 3, H, W]``.

    `targets`: the class index to explain per image; None explains each image's predicted class.
    Raises ValueError when the network has no layer to take the map from.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = target_layer(net)
    chosen = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
    device = next(net.parameters()).device
    with _gradients_on(net):
        cam = GradCAM(net, [layer], reshape_transform=token_reshape(net, images.shape[-2:]))
        try:  # not GradCAM's `with`: its exit swallows IndexErrors
            maps = cam(images.detach().float().to(device).requires_grad_(True), targets=chosen)
        finally:
            cam.activations_and_grads.release()
    return np.clip(np.nan_to_num(np.asarray(maps, dtype=np.float32)), 0.0, 1.0)


def overlay(img: Image.Image, heatmap: np.ndarray, data_config: dict[str, Any]) -> Image.Image:
    """The heatmap over the image as the eval transform crops it (so pixels line up with the map)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    crop = eval_crop(data_config)(img.convert("RGB"))
    if crop.size != (heatmap.shape[1], heatmap.shape[0]):  # a transform that does not end at the input size
        crop = crop.resize((heatmap.shape[1], heatmap.shape[0]))
    rgb = np.asarray(crop, dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, heatmap, use_rgb=True))


def titled(img: Image.Image, text: str) -> Image.Image:
    """`img` under a white strip holding `text` (one line per line of text)."""
    lines = text.splitlines() or [""]
    strip = 6 + 12 * len(lines)
    out = Image.new("RGB", (img.width, img.height + strip), "white")
    out.paste(img, (0, strip))
    ImageDraw.Draw(out).multiline_text((4, 3), text, fill="black", spacing=2)
    return out


def explain_image(net: nn.Module, img: Image.Image, data_config: dict[str, Any],
                  target: int | None = None) -> tuple[Image.Image, np.ndarray]:
    """One image's overlay for class `target` (None: the predicted class), and its probabilities ``[K]``.

    The probabilities are the centre crop's, from the same forward pass's preprocessing as the map.
    """
    device = next(net.parameters()).device
    x = eval_transform(data_config)(img.convert("RGB")).unsqueeze(0)
    training = net.training
    try:
        with torch.no_grad():
            probs = net.eval()(x.to(device)).float().softmax(dim=-1)[0].cpu().numpy()
    finally:
        net.train(training)
    cls = int(probs.argmax()) if target is None else int(target)
    return overlay(img, heatmaps(net, x, [cls])[0], data_config), probs
