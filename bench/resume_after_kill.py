"""Kill a training run with SIGKILL mid-epoch, resume it, and compare it with an uninterrupted run.

    uv run python -m bench resume_after_kill                       # generated images, tiny model (~2 min)
    uv run python -m bench resume_after_kill --data ../shared/data/hymenoptera --model mobilenetv2_100 \
        --weights ../shared/weights/mobilenetv2_100.coral_in1k.safetensors --image-size 128 --batch-size 16

Runs three commands: an uninterrupted `finetune train`, the same command killed (SIGKILL, no chance to
save anything) half-way through epoch `--kill-in-epoch`, and `finetune train DATA --resume RUN_ID`.
Prints a table and exits non-zero unless the resumed run logged the same epochs (one val point per
epoch, same steps) and ends within `--tolerance` accuracy points of the uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT


def make_data(root: Path, per_class: int) -> Path:
    from tests.conftest import make_folder

    return make_folder(root, classes=("red", "blue", "green"), per_class=per_class, size=64)


def command(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "finetune.cli", "train", str(data), "--model", args.model, "--weights",
           args.weights, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", "0",
           "--num-workers", str(args.num_workers), "--output", str(out), "--accelerator", "cpu", "--tta", "none"]
    if args.image_size:
        cmd += ["--image-size", str(args.image_size)]
    return cmd


def run(cmd: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.monotonic() - started


def kill_mid_epoch(cmd: list[str], env: dict[str, str], last: Path, kill_in_epoch: int) -> dict:
    """Start the run; when `kill_in_epoch - 1` epochs are checkpointed, wait half an epoch and SIGKILL it."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    writes: list[float] = []
    seen = None
    while len(writes) < kill_in_epoch - 1:
        if proc.poll() is not None:
            raise SystemExit(f"the run ended (code {proc.returncode}) before epoch {kill_in_epoch}")
        if last.exists() and last.stat().st_mtime != seen:
            seen = last.stat().st_mtime
            writes.append(time.monotonic())
        time.sleep(0.02)
    epoch_s = writes[-1] - writes[-2]  # the time one epoch (train + val) takes
    time.sleep(epoch_s / 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"epoch_s": epoch_s, "returncode": proc.returncode}


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in sorted(MlflowClient(uri).get_metric_history(run_id, key),
                                                key=lambda m: (m.step, m.timestamp))]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="image folder (default: generated colours, 3 classes)")
    p.add_argument("--per-class", type=int, default=48, help="generated images per class")
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--weights", default="none")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--kill-in-epoch", type=int, default=3, help="1-based epoch to kill half-way through")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1.0, help="allowed final accuracy gap, in points")
    p.add_argument("--workdir", help="keep outputs here (default: a temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    """0 when every check passed, else 1."""
    args = _parser().parse_args(argv)
    assert 3 <= args.kill_in_epoch <= args.epochs

    work = Path(args.workdir or tempfile.mkdtemp(prefix="resume-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve() if args.data else make_data(work / "data", args.per_class)
    uri = f"sqlite:///{work}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}

    full_s = run(command(args, data, work / "full"), env)
    last = work / "killed" / "checkpoints" / "last.ckpt"
    killed = kill_mid_epoch(command(args, data, work / "killed"), env, last, args.kill_in_epoch)
    killed_summary_exists = (work / "killed" / "summary.json").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = next(r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name("finetune").experiment_id])
        if r.data.tags.get("finetune.output") == str(work / "killed"))
    points_at_kill = len(history(uri, run_id, "val_acc"))
    resume_s = run([sys.executable, "-m", "finetune.cli", "train", str(data), "--resume", run_id], env)

    full = json.loads((work / "full" / "summary.json").read_text())
    resumed = json.loads((work / "killed" / "summary.json").read_text())
    h_full, h_res = history(uri, full["mlflow_run_id"], "val_acc"), history(uri, run_id, "val_acc")
    loss_full, loss_res = history(uri, full["mlflow_run_id"], "val_loss"), history(uri, run_id, "val_loss")
    gap = abs(full["metrics"]["val_acc"] - resumed["metrics"]["val_acc"]) * 100
    checks = {
        "killed by SIGKILL": killed["returncode"] == -signal.SIGKILL and not killed_summary_exists,
        "killed mid-epoch (epochs logged at kill)": points_at_kill == args.kill_in_epoch - 1,
        "resumed into the same run": resumed["mlflow_run_id"] == run_id,
        "same epochs logged (val_acc points)": len(h_res) == len(h_full) == args.epochs,
        "same steps, none duplicated": [s for s, _ in h_res] == [s for s, _ in h_full],
        f"final val_acc within {args.tolerance} point": gap <= args.tolerance,
    }
    print(f"\ndata {data}  model {args.model}  epochs {args.epochs}  killed half-way through epoch "
          f"{args.kill_in_epoch} (epoch ~{killed['epoch_s']:.1f}s)\n")
    print(f"{'run':<16}{'val_acc points':>16}{'final val_acc':>15}{'wall s':>9}")
    print(f"{'uninterrupted':<16}{len(h_full):>16}{full['metrics']['val_acc']:>15.4f}{full_s:>9.1f}")
    print(f"{'killed+resumed':<16}{len(h_res):>16}{resumed['metrics']['val_acc']:>15.4f}{resume_s:>9.1f}"
          f"  (resume only; {points_at_kill} epoch(s) were logged before the kill)")
    print(f"\nfinal accuracy gap: {gap:.2f} points; per-epoch val_acc identical: {h_res == h_full}; "
          f"per-epoch val_loss identical: {loss_res == loss_full}")
    print("val_loss per epoch, uninterrupted: " + " ".join(f"{v:.4f}" for _, v in loss_full))
    print("val_loss per epoch, resumed:       " + " ".join(f"{v:.4f}" for _, v in loss_res) + "\n")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    print(f"\noutputs: {work}")
    return 0 if all(checks.values()) else 1
