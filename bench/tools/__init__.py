"""Developer tools that are not part of a benchmark run (e.g. `hessian-bench`)."""
