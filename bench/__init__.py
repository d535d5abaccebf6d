"""bench: a benchmark harness for uncertainty methods in deep metric learning."""

__version__ = "0.1.0"

# Run folders record this; `bench report` refuses folders written by another format version.
RUN_FORMAT_VERSION = 1


def load(path):
    """A fitted method exported with `python -m bench export` (`bench.export.FittedMethod`): its
    `embed(inputs)` and `retrieve(queries, gallery, k)`; BenchError (one line) for a damaged file or one
    of another format version."""
    from bench.export import load as _load

    return _load(path)
