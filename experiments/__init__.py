"""Experiment scripts (absl flags, ml_collections configs)."""
