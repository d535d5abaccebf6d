"""Metrics on arrays in memory, never paths: retrieval, calibration, sparsification, OOD
separation, bootstrap CIs and the summaries over a run."""
