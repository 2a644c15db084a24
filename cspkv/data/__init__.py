"""Data the package reads from installed packages: easy-VQA's images and their labels."""
