"""Benchmark tasks, the MileBench loader and scorers."""
