"""Scoring every model of a run on held-out rows and writing the report."""
