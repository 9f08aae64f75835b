"""finetune's benchmarks, one tool: `python -m bench NAME [ARGS...]` from the repository root (bench/__main__.py)."""
