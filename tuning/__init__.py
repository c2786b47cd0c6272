"""Compression of fine-tuned models: methods (distil, prune, trim vocabulary, int8), the measurement
protocol, and the Ray Tune search with Pareto selection (``python -m tuning.compress``).

May import from `cluster/` and `jobs/`.
"""
