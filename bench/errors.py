"""User-facing errors: one clear line, printed by the CLI, exit code 2."""


class BenchError(Exception):
    """An error caused by user input or the environment, shown to the user as one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def require(ok: bool, message: str) -> None:
    """Raise BenchError(message) unless ok: one-line validation of user input."""
    if not ok:
        raise BenchError(message)
