"""Is the per-epoch cost of the frozen backbone gone? A small-similar run vs one extraction pass.

Measures, in one process on the same images (train + val of DATA_DIR, default hymenoptera):

1. one feature-extraction pass of the frozen backbone (cold cache);
2. a whole `finetune train --scenario small-similar --epochs 10` with a cold cache (scan, backbone,
   extraction, similarity probe, 10 head epochs x the weight-decay grid, saving, the after-training
   evaluation report -- one more network pass over the validation images -- and MLflow);
3. the same run again with the features cached.

and prints the ratios 2/1 and 3/1. Issue 3's bar: ratio 2/1 <= 1.5.

    uv run python bench/small_similar_speed.py [DATA_DIR] [--epochs 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import finetune.workflows.train  # noqa: E402,F401  (imports out of the timed region)
from finetune import runtime  # noqa: E402
from finetune.model.backbone import create_backbone  # noqa: E402
from finetune.config import TrainConfig  # noqa: E402
from finetune.data.folders import scan_folder  # noqa: E402
from finetune.strategy.features import CACHE_ENV, cached_features  # noqa: E402

SHARED = ROOT.parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", type=Path, default=SHARED / "data" / "hymenoptera")
    parser.add_argument("--model", default="mobilenetv2_100")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenetv2_100.coral_in1k.safetensors")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        tmp = Path(tmp)
        splits = scan_folder(args.data)
        bb = create_backbone(args.model, str(args.weights), len(splits.classes), keep_source_head=True)
        t0 = time.perf_counter()
        for part in (splits.train, splits.val):
            cached_features(bb, part, batch_size=args.batch_size, cache_dir=tmp / "extract-only",
                            rt=runtime.resolve(workers=args.num_workers))
        extract = time.perf_counter() - t0
        n = len(splits.train) + len(splits.val)
        print(f"one extraction pass: {n} images in {extract:.1f}s ({n / extract:.1f} img/s)", flush=True)

        os.environ[CACHE_ENV] = str(tmp / "run-cache")
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        times = []
        for label in ("cold cache", "warm cache"):
            cfg = TrainConfig(data_dir=str(args.data), model=args.model, weights=str(args.weights),
                              scenario="small-similar", epochs=args.epochs, batch_size=args.batch_size,
                              num_workers=args.num_workers, output=str(tmp / f"run-{len(times)}"),
                              experiment="bench-small-similar-speed")
            t0 = time.perf_counter()
            summary = finetune.workflows.train.train(cfg)
            times.append(time.perf_counter() - t0)
            print(f"small-similar run, {args.epochs} epochs, {label}: {times[-1]:.1f}s, "
                  f"val_acc {summary['metrics']['val_acc']:.4f}", flush=True)
    print(f"\nratio run/extraction: cold cache {times[0] / extract:.2f}, warm cache {times[1] / extract:.2f} "
          f"(bar: <= 1.5)")


if __name__ == "__main__":
    main()
