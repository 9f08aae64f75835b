"""`python -m bench NAME [ARGS...]`: run one benchmark (bench/NAME.py's `main(ARGS)`); `python -m bench --help`
lists them. Run from the repository root, which `-m` puts on the path (finetune, serve, bench)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"__init__", "__main__", "common"}
SCRIPTS = {"gpu_check.sh": "the GPU check on an offline GPU machine (CONTRIBUTING.md, 'GPU check')",
           "gpu_domains.sh": "the domain bench in one command on an offline GPU machine"}


def benchmarks() -> dict[str, str]:
    """Each benchmark's name and the first line of its docstring, read without importing it (most import torch)."""
    found = {}
    for path in sorted(HERE.glob("*.py")):
        if path.stem not in NOT_BENCHMARKS:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            found[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


def usage(names: dict[str, str]) -> str:
    width = max(map(len, names))
    lines = ["usage: python -m bench NAME [ARGS...]   (python -m bench NAME --help: that benchmark's options)",
             "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in names.items()]
    lines += ["", "shell scripts (bash bench/NAME):"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in SCRIPTS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = benchmarks()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(names), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0].replace("-", "_"), argv[1:]
    if name not in names:
        print(f"unknown benchmark {argv[0]!r}; one of: {', '.join(names)}", file=sys.stderr)
        return 2
    # argparse names the program after sys.argv[0]: usage lines and errors then say how this one was run.
    sys.argv = [f"python -m bench {name}", *rest]
    result = importlib.import_module(f"bench.{name}").main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
