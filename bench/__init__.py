"""bench: a benchmark harness for uncertainty methods in deep metric learning."""

__version__ = "0.1.0"

# Run folders record this; `bench report` refuses folders written by another format version.
RUN_FORMAT_VERSION = 1
