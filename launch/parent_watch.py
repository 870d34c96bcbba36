"""A launched worker ends when its launcher is gone. mpirun, torchrun's agent or srun may be killed without a
chance to stop their ranks (SIGKILL, a crash, an impatient Ctrl-C); the ranks are then re-parented and would train
on, unseen. Each worker watches its parent process id and exits once it changes. The simulated cluster's workers
also get this from the kernel (``PR_SET_PDEATHSIG``), which a launcher outside Hecate does not set."""

from __future__ import annotations

import os
import sys
import threading

POLL_S = 1.0
EXIT_ORPHANED = 3  # "the launcher went away"; distinct from 1 (traceback) and 2 (user error)


def watch_parent(describe: str) -> threading.Thread:
    """Start a daemon thread that ends this process (exit code :data:`EXIT_ORPHANED`) when its parent changes."""
    parent = os.getppid()

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(POLL_S):
            if os.getppid() != parent:
                try:  # the launcher held the other end of stderr: the line may have nowhere to go
                    print(
                        f"hecate worker: error: {describe}: the launcher (pid {parent}) is gone; stopping",
                        file=sys.stderr,
                        flush=True,
                    )
                finally:
                    os._exit(EXIT_ORPHANED)

    thread = threading.Thread(target=watch, name="hecate-parent-watch", daemon=True)
    thread.start()
    return thread
