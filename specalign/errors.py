"""One error type for bad input: the CLI prints its message on one line and exits non-zero."""


class SpecalignError(Exception):
    """Bad input or an unusable file. The message names the file and the problem, on one line."""


def fail(path, problem: str) -> SpecalignError:
    """Build the error for `path`: `raise fail(path, "no events")`."""
    return SpecalignError(f"{path}: {problem}")


def one_line(e: BaseException, limit: int = 200) -> str:
    """A third-party exception as one short line for our messages: its first non-empty line, else its type."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(e).__name__
