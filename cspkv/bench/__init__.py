"""Benchmarks: the CI latency regression check (issue: benchmarks adds csp-bench)."""
