"""Weights for the vectors (searched, learned) and the exact fold of base + weighted deltas into a model folder."""
