"""csp-bench (every runtime side by side, by its own tools), the precision table, and CI's latency gate."""
