"""Console scripts: csp-export, csp-run, csp-eval, csp-bench (one module each)."""
