"""The two kinds of failure a user is told about in one line, without a traceback.

:class:`QstarInputError`: caused by what the user asked for (a missing file, an unknown model, a bad
flag, damaged run files); exit code 2. :class:`QstarRunError`: the machine or a model failed (a full
disk, NaN log-probabilities); exit code 1, the samples committed so far kept. Any other exception is
a bug: exit code 1 with one line, and the traceback under ``--debug`` or ``QSTAR_DEBUG=1``.
"""


class QstarInputError(ValueError):
    """Bad usage or bad input: the message alone tells the user what to fix."""


class QstarRunError(RuntimeError):
    """The run could not go on (the disk, the device or a model failed); the message says what is saved."""


def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's message on one line: every line of it joined (a library's sentence may run over
    several), cut at ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
