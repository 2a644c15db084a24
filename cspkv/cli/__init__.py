"""Console scripts: csp-export, csp-run, csp-eval, csp-bench (one module each).

They import the heavy layers (models, export, evaluation: torch and transformers) inside the command
that needs them, so `--help` is instant and `csp-run --engine` loads only what running an export needs.
"""
