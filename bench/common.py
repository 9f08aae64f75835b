"""What the benchmarks share: where the repository, the shared data and weights and the results are; interleaved
timing; result files written whole and atomically, or appended a row at a time.

Standard library and `finetune.files` only: the offline GPU machine runs the benchmarks with a bare python3.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

from finetune.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
# The shared sets and weights beside the checkout (DESIGN.md); BENCH_DATA / BENCH_WEIGHTS point elsewhere.
DATA = Path(os.environ.get("BENCH_DATA", ROOT.parent / "shared" / "data"))
WEIGHTS = Path(os.environ.get("BENCH_WEIGHTS", ROOT.parent / "shared" / "weights"))
DEFAULT_WEIGHTS = WEIGHTS / "mobilenetv2_100.coral_in1k.safetensors"
RESULTS = ROOT / "bench" / "results"

# One measurement: a name (or several, for a callable that measures more than one row at once) and a callable
# returning its value(s), or None when it has nothing to measure here.
Measure = tuple[str | tuple[str, ...], Callable[[], Any]]


def interleave(measures: Sequence[Measure], repeats: int,
               line: str = "  repeat {repeat}: {name:<44}{value:8.1f} img/s") -> dict[str, list[float]]:
    """Every measure once per repeat, in turn (so a change of load on a shared machine hits every row alike); the
    values of each row in repeat order. Prints `line` for each value as it comes."""
    rows: dict[str, list[float]] = {}
    for r in range(repeats):
        for name, fn in measures:
            value = fn()
            if value is None:
                continue
            names, values = (name, value) if isinstance(name, tuple) else ((name,), (value,))
            for one, v in zip(names, values):
                rows.setdefault(one, []).append(v)
                print(line.format(repeat=r + 1, name=one, value=v), flush=True)
    return rows


def medians(rows: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in rows.items()}


def write_text(path: str | Path, text: str) -> None:
    """The whole file at once: a temporary name beside it, fsynced, renamed (never half a result file)."""
    with atomic_write(path) as f:
        f.write(text)


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """One row, one line, one write in append mode, flushed to disk: rows of parallel processes do not interleave,
    and a run killed at any moment keeps every row it wrote."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
