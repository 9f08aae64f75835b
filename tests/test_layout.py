"""The house rules, checked: packages follow the data flow and import only from earlier stages, the
decision imports no torch, the inference side imports no Lightning, no function is longer than 60 lines
(finetune/, serve/, bench/), and bench/ is one tool that the product never imports. Read from the source
(imports as written), and from fresh interpreters (imports as run)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "finetune"
BENCH = ROOT / "bench"
# The data flow, first to last; a module may import from its own stage and earlier ones only.
STAGES = ["base", "data", "model", "strategy", "training", "evaluation", "tracking", "workflows", "commands"]
BASE_MODULES = {"errors", "config", "console", "runtime", "files", "timing"}
COMMAND_MODULES = {"cli", "cli_options", "cli_serving", "cli_reference", "demo"}
MAX_FUNCTION_LINES = 60


def stage_of(module: str) -> str:
    """'finetune.strategy.decide' -> 'strategy'; top-level modules are base or commands."""
    parts = module.split(".")
    assert parts[0] == "finetune", module
    if len(parts) == 1:
        return "base"
    head = parts[1]
    if head in BASE_MODULES:
        return "base"
    if head in COMMAND_MODULES:
        return "commands"
    assert head in STAGES, f"{module}: not in a stage package ({', '.join(STAGES[1:-1])}) nor a known top-level module"
    return head


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        out.append((".".join(parts), path))
    return out


def imported(path: Path) -> list[str]:
    """Every finetune module a file imports (module-level and inside functions)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("finetune")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
            if node.module == "finetune":  # from finetune import runtime, tracking
                found += [f"finetune.{a.name}" for a in node.names]
            else:
                found.append(node.module)
    return found


@pytest.mark.parametrize("module, path", modules(), ids=[m for m, _ in modules()])
def test_imports_point_one_way(module: str, path: Path):
    mine = STAGES.index(stage_of(module))
    upward = [m for m in imported(path) if STAGES.index(stage_of(m)) > mine]
    assert not upward, f"{module} ({stage_of(module)}) imports later stages: {upward}"


def test_the_stages_cover_the_package():
    assert {stage_of(m) for m, _ in modules()} == set(STAGES)


def _fresh_interpreter(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_the_decision_imports_no_torch():
    code = "import sys, finetune.strategy.decide; print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))"
    assert _fresh_interpreter(code) == "[]"


def test_model_and_pyfunc_import_no_lightning():
    code = ("import sys, finetune.model.backbone, finetune.model.heads, finetune.model.artifact, "
            "finetune.tracking.pyfunc, finetune.tracking.model_code; "
            "print(sorted(m for m in ('pytorch_lightning', 'lightning') if m in sys.modules))")
    assert _fresh_interpreter(code) == "[]"


@pytest.mark.parametrize("folder", ["finetune", "serve", "bench"])
def test_no_function_is_longer_than_60_lines(folder: str):
    long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, long


def _imports_of(path: Path) -> set[str]:
    """Top-level names of every module a file imports (module level and inside functions)."""
    tree = ast.parse(path.read_text())
    found = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return found | {n.module.split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.module and not n.level}


BENCHMARKS = sorted(p for p in BENCH.glob("*.py") if p.stem not in {"__init__", "__main__", "common"})


@pytest.mark.parametrize("folder", ["finetune", "serve"])
def test_the_product_never_imports_bench(folder: str):
    importers = [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py") if "bench" in _imports_of(p)]
    assert not importers, importers


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_each_benchmark_is_a_module_of_the_tool(path: Path):
    """A docstring (its line in `python -m bench --help`), a `main(argv)` the dispatcher calls, no path tricks:
    `python -m bench` from the repository root finds finetune, serve and bench."""
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path.name}: no module docstring"
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert mains and [a.arg for a in mains[0].args.args] == ["argv"], f"{path.name}: no main(argv)"
    assert "sys.path" not in path.read_text(), f"{path.name}: edits sys.path"


def test_bench_common_is_light():
    """bench/common.py runs on the bare GPU machine and under every benchmark: standard library and
    finetune.files only (no torch, no MLflow)."""
    assert _imports_of(BENCH / "common.py") <= set(sys.stdlib_module_names) | {"finetune"}
    code = "import sys, bench.common; print(sorted(m for m in ('torch', 'mlflow', 'numpy') if m in sys.modules))"
    assert _fresh_interpreter(code) == "[]"


def test_bench_help_lists_every_benchmark_without_importing_them():
    proc = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.argv = ['bench', '--help']; "
                           "runpy.run_module('bench', run_name='__main__')"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert {p.stem for p in BENCHMARKS} <= listed
