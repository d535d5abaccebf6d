"""`bench grid`: many runs (datasets x settings x methods x seeds) as tasks on a local process pool or
Ray, one grid folder of run folders (one per cell) with merged tables, resumable cell by cell."""

from bench.grid.driver import ExecutorOptions, create_grid, run_grid
from bench.grid.spec import GridSpec

__all__ = ["ExecutorOptions", "GridSpec", "create_grid", "run_grid"]
