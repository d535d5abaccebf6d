"""Uncertainty scores, one module per score, each registered with `bench.registry.register_score`:
`fn(inputs: bench.metrics.uncertainty.ScoreInputs) -> np.ndarray [N]`, larger = more uncertain.
Adding a score is one new module here; evaluation, results and reports pick it up by name."""
