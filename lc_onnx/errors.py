"""The errors a user can act on; the CLI turns each into one line on stderr and its exit code."""

from __future__ import annotations


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (checkers and runtimes spread theirs over several), cut to `limit`."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LcOnnxError(Exception):
    exit_code = 2


class InputError(LcOnnxError):
    """The model, a path or an option is unusable (exit 2)."""

    exit_code = 2


class ValidationError(LcOnnxError):
    """The optimized model's outputs differ from the original's beyond the tolerance (exit 1)."""

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
