"""``python -m qstar_cli`` and the ``qstar`` command: the command line of :mod:`qstar_cli.cli`, run in
a process set up for it."""

import os
import signal
import sys


def interrupt(signum, frame) -> None:
    """Ctrl-C and SIGTERM (Slurm's preemption) stop a command with exit code 130: as a
    KeyboardInterrupt, so that what it was writing is cleaned up (``generate`` installs its own
    handler, which stops the run after saving). While a module is being imported, the process ends
    at once instead: a library may turn an interrupt raised in its import into an import error (exit
    1, a wrong message), and nothing is written while a command's modules load."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            os._exit(130)
        frame = frame.f_back
    raise KeyboardInterrupt


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        from qstar_cli.cli import run

        run()
    except KeyboardInterrupt:  # before the command line could take it
        sys.exit(130)


if __name__ == "__main__":
    main()
