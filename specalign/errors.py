"""One error type for bad input: the CLI prints its message on one line and exits non-zero."""


class SpecalignError(Exception):
    """Bad input or an unusable file. The message names the file and the problem, on one line."""


def fail(path, problem: str) -> SpecalignError:
    """Build the error for `path`: `raise fail(path, "no events")`."""
    return SpecalignError(f"{path}: {problem}")
