"""Metrics: each returns a per-query vector where the metric is a mean over queries."""
