"""`finetune explain MODEL_URI IMAGE...`: Grad-CAM overlays of a logged or registered model's predictions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from finetune import runtime
from finetune.data.images import ImageError, display_path, load_rgb
from finetune.errors import UserError
from finetune.files import atomic_write
from finetune.evaluation.explain import check_explainable, explain_image, overlay_names, titled


@dataclass
class Explained:
    """What `explain_images` did: the overlays written, and one line per image it could not read."""

    written: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def class_index(target: str | None, class_names: Sequence[str]) -> int | None:
    """`--target`: a class name, or a class index; None explains each image's predicted class."""
    if target is None:
        return None
    if target in class_names:
        return list(class_names).index(target)
    if target.isdigit() and int(target) < len(class_names):
        return int(target)
    raise UserError(f"Unknown --target {target!r}. Valid classes: {', '.join(class_names)} "
                    f"(or an index 0..{len(class_names) - 1}).")


def explain_images(model_uri: str, images: Sequence[str], output: str | Path | None = None,
                   target: str | None = None) -> Explained:
    """Write `<stem>_cam.png` per image into `output` (default outputs/explain), titled with the prediction.

    An image that cannot be read is reported in `errors` and the others are still done.
    """
    from finetune.tracking.pyfunc import load_logged_model

    model = load_logged_model(model_uri)
    spec = model.spec
    cls = class_index(target, spec.class_names)
    check_explainable(model.net)
    out = Path(output or Path("outputs") / "explain")
    out.mkdir(parents=True, exist_ok=True)
    result = Explained()
    with runtime.evaluating_on(model.net, model.device):
        for image, name in zip(images, overlay_names(images)):
            try:
                img = load_rgb(image, model.max_pixels)
            except (ImageError, OSError) as e:
                result.errors.append(f"{display_path(image)}: {e}")
                continue
            cam, probs = explain_image(model.net, img, spec.data_config, cls)
            pred = int(probs.argmax())
            text = f"{spec.class_names[pred]} {probs[pred]:.2f}"
            if cls is not None and cls != pred:
                text += f"\nheatmap for {spec.class_names[cls]} {probs[cls]:.2f}"
            path = out / name
            with atomic_write(path, "wb") as f:
                titled(cam, text).save(f, format="PNG")
            result.written.append(path)
    return result
