"""Experiments: multirun comparison, the paper's tables, the quadratic toy."""
