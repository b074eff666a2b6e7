"""What the grading pool's fork server imports before it forks a worker (its preload), and nothing else
imports: the graders, and a quiet ``sys.excepthook``. A worker forked while qstar ends (a grade past
its limit replaced as the pool stops, a run refused as its workers start) fails on the pool's
semaphores, which are gone; the fork server would print that traceback under qstar's last line.
With ``--debug`` (``QSTAR_DEBUG=1``) it is printed."""

import os
import sys

import qstar_cli.grading.graders  # noqa: F401 (loaded once here, so that each forked worker has it)

if os.environ.get("QSTAR_DEBUG", "") in ("", "0"):
    sys.excepthook = lambda *exc_info: None
