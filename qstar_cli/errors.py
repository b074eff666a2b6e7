"""Errors caused by what the user asked for (a missing file, an unknown model, a bad flag).

The command line prints their message on one line, without a traceback, and exits with code 2;
any other exception is a run error (exit code 1).
"""


class QstarInputError(ValueError):
    """Bad usage or bad input: the message alone tells the user what to fix."""
