"""INT8 calibration data built from the benchmark's training split, and calibrators (issue: engines)."""
