"""How the domain similarity and its components move with the input size (issue 13).

For each dataset and each --image-size, measures what `finetune plan` measures (profile, similarity
components, score, cell) with the shared mobilenetv2_100 weights, plus the details the components come
from (the source classifier's mean top-1 probability, the BatchNorm shift, the middle stage's probe).
Features are cached, so a rerun only probes. clothing is measured on a stratified subset (symlinks) to
bound the CPU time.

    uv run --frozen python bench/similarity_sizes.py
    uv run --frozen python bench/similarity_sizes.py --sizes 160 224 --datasets hymenoptera

Prints one table and writes it as CSV (default bench/results/similarity_sizes.csv).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scenarios import DEFAULT_WEIGHTS, SHARED, capped_folder  # noqa: E402
from finetune.config import TrainConfig  # noqa: E402

CAPS = {"clothing": (500, 100)}  # dataset -> (train cap, val cap)
FIELDS = ["dataset", "image_size", "n_train", "probe", "depth", "source_confidence", "bn_match", "score", "cell",
          "source_top1_prob", "bn_shift", "middle_stage_normalized", "best_stage", "source_image_size"]


def measure_one(folder: Path, size: int | None, weights: Path, workers: int) -> dict:
    from finetune.workflows.plan import plan_folder

    cfg = TrainConfig(data_dir=str(folder), model="mobilenetv2_100", weights=str(weights), image_size=size,
                      num_workers=workers, epochs=1)
    decision, _ = plan_folder(cfg)
    s, p = decision.similarity, decision.profile
    return {"dataset": folder.name, "image_size": size or "default", "n_train": p.n_train, **s.components,
            "score": s.score, "cell": decision.plan.scenario, "best_stage": s.best_stage,
            **{k: s.details.get(k, "") for k in ("source_top1_prob", "bn_shift", "middle_stage_normalized",
                                                  "source_image_size")}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["hymenoptera", "omniglot", "clothing"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[128, 160, 224, 288])
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--csv", type=Path, default=ROOT / "bench" / "results" / "similarity_sizes.csv")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, open(args.csv, "w", newline="") as out:
        writer = csv.DictWriter(out, FIELDS, extrasaction="ignore")
        writer.writeheader()
        for name in args.datasets:
            cap_t, cap_v = CAPS.get(name, (None, None))
            folder, _, _ = capped_folder(SHARED / "data" / name, cap_t, cap_v, 0, Path(tmp))
            for size in args.sizes:
                row = measure_one(folder, size, args.weights, args.num_workers)
                writer.writerow(row)
                out.flush()
                rows.append(row)
                print(" ".join(f"{row.get(k, '')}" for k in FIELDS), flush=True)
    print("\n| " + " | ".join(FIELDS) + " |")
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in FIELDS) + " |")


if __name__ == "__main__":
    main()
