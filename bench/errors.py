"""User-facing errors: one clear line, printed by the CLI, exit code 2."""

import traceback


class BenchError(Exception):
    """An error caused by user input or the environment, shown to the user as one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def require(ok: bool, message: str) -> None:
    """Raise BenchError(message) unless ok: one-line validation of user input."""
    if not ok:
        raise BenchError(message)


def error_record(e: Exception) -> dict[str, str]:
    """How a run or a grid task records a failure it survives: {"error": one line, "traceback": the
    traceback of an unexpected error ("" for a BenchError, whose line says it all)}. Call it inside the
    `except` block (the traceback is the one being handled)."""
    if isinstance(e, BenchError):
        return {"error": str(e), "traceback": ""}
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
