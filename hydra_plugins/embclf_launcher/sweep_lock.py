"""The sweep dir's lock (``embclf.locks``), held by a launcher while it plans, starts and waits for its jobs.

Without embclf installed (the launcher on its own) every function here does nothing.
"""

import contextlib
import logging
import sys
from typing import Any, Iterator

log = logging.getLogger("embclf.launcher")


@contextlib.contextmanager
def holding_sweep_dir(config: Any) -> Iterator[None]:
    """Hold the sweep dir (``embclf.locks``) while the launcher plans, starts (or submits) and waits for its jobs.

    Hydra's ``on_multirun_start`` callback (``embclf.locks.HoldOutputDirs``) normally holds it already, from
    before ``multirun.yaml`` is written; this covers a launcher used without it. Held without the heartbeat
    thread (the local launcher forks only without other threads): the polling loops call :func:`beat`.
    A sweep dir another live process holds: its message on stderr and exit status 2, nothing started.
    """
    try:
        from embclf import locks
    except ImportError:  # the launcher without embclf: no lock
        yield
        return
    try:
        lock = locks.acquire(str(config.hydra.sweep.dir), heartbeat=False)
    except locks.EmbclfError as e:  # in use, or the lock cannot be written there
        print(f"embclf: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        yield
    finally:
        lock.release()


def restore_sweep_record(config: Any) -> None:
    """Put back the sweep dir's earlier record (``multirun.yaml``) when a sweep stopped before starting anything;
    never raises."""
    try:
        from embclf.locks import restore_sweep_record as restore
    except ImportError:
        return
    try:
        restore(str(config.hydra.sweep.dir))
    except OSError as e:
        log.warning("could not restore the earlier sweep record in %s: %s", config.hydra.sweep.dir, e)


def beat() -> None:
    """Refresh the heartbeat of the locks this launcher holds (cheap when none is due); call while polling."""
    try:
        from embclf.locks import refresh
    except ImportError:
        return
    refresh()
