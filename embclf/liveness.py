"""Is the process behind a record still running? One answer for every reader of run dirs.

A run's ``summary.json`` says "running" from its start until it records how it ended. A process killed with
``kill -9``, by the OOM killer or with its node never records it, so a reader must ask the process itself:

- on this host: whether the pid still exists (``os.kill(pid, 0)``; a zombie counts as dead);
- under SLURM (the record has ``slurm_job_id``): ``squeue`` for a job still queued or running, then ``sacct``
  for how it ended (out of memory, node failure, cancelled, timeout, ...);
- on another host without SLURM: nobody here can tell.

``run_state(summary)`` folds these into one word (``STATES``): what the report shows and what a launcher can
act on. ``status_text(summary)`` is the report's phrase for it.
"""
from __future__ import annotations

import os
import socket
import subprocess
from typing import Mapping, Tuple

# the one state map: what is known about a process that a record says is running
RUNNING, PENDING, DEAD, UNKNOWN = "running", "pending", "dead", "unknown"
STATES = (RUNNING, PENDING, DEAD, UNKNOWN)

# sacct's final state (first word) of a job whose summary still says "running": it died without recording it.
# The report's status word for each (COMPLETED: the batch script ended, the run did not record completion).
SLURM_ENDED = {"OUT_OF_MEMORY": "killed (out of memory)", "NODE_FAIL": "killed (node failure)",
               "BOOT_FAIL": "killed (node failure)", "CANCELLED": "cancelled", "TIMEOUT": "timeout",
               "PREEMPTED": "interrupted", "FAILED": "failed", "COMPLETED": "killed"}
SLURM_TIMEOUT_S = 20  # one squeue/sacct call; a slow controller must not hang a report


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie (dead, not yet reaped). A process of
    another user exists too (``PermissionError``). Linux reads the zombie state from ``/proc/PID/stat``."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        pass
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _ask(cmd) -> Tuple[int, str]:
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=SLURM_TIMEOUT_S)
    return out.returncode, out.stdout.strip()


def slurm_state(job_id: str) -> Tuple[str, str]:
    """``(state, detail)`` of SLURM job ``job_id`` (``<array>_<task>`` for an array task).

    ``state`` is one of ``STATES``: RUNNING or PENDING while ``squeue`` lists it (``detail``: squeue's state,
    e.g. "RUNNING", "PENDING", "COMPLETING"), DEAD once it left the queue (``detail``: ``sacct``'s final
    state, e.g. "OUT_OF_MEMORY", or "" when sacct does not know it), UNKNOWN when this host has no
    squeue/sacct or they fail (``detail`` says which)."""
    try:
        rc, live = _ask(["squeue", "-h", "-j", str(job_id), "-o", "%T"])
        if rc == 0 and live:
            word = live.split()[0]
            return (RUNNING if word in ("RUNNING", "COMPLETING") else PENDING), word
        rc, ended = _ask(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"])
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN, "no squeue/sacct here to check"
    word = ended.split()[0].upper() if rc == 0 and ended else ""
    return DEAD, word


def process_state(record: Mapping) -> Tuple[str, str]:
    """``(state, detail)`` of the process a record names: a summary.json's ``slurm_job_id`` (asked from
    SLURM, ``slurm_state``), else its ``hostname`` + ``pid`` (alive on this host, ``pid_alive``), else
    UNKNOWN with ``detail`` naming the host that cannot be checked from here."""
    job = record.get("slurm_job_id")
    if job:
        return slurm_state(str(job))
    host, pid = record.get("hostname"), record.get("pid")
    if host == socket.gethostname() and pid:
        try:
            return (RUNNING if pid_alive(int(pid)) else DEAD), ""
        except ValueError:
            return UNKNOWN, f"pid {pid!r} is not a number"
    return UNKNOWN, f"on {host or 'another host'}: cannot check from here"


def status_text(summary: Mapping) -> str:
    """The report's status of a run from its summary: the recorded status, except that a "running" one is
    checked (``process_state``) and never shown as running when it is dead: "interrupted" (its process on
    this host is gone), SLURM's ending ("killed (out of memory)", "cancelled", "timeout", ...,
    ``SLURM_ENDED``), "running (pending)" for a queued SLURM job, or "running? (...)" with why it cannot be
    checked. A debug run (``debug=fast|overfit``) reads "debug=<mode>" whatever its status."""
    st = summary.get("status", "unknown")
    if summary.get("debug"):
        return f"debug={summary['debug']}"
    if st != "running":
        return st
    state, detail = process_state(summary)
    job = summary.get("slurm_job_id")
    if state in (RUNNING, PENDING):  # on this host, or squeue's word: "running (pending)", "running (completing)"
        return "running" if detail in ("", "RUNNING") else f"running ({detail.lower()})"
    if state == DEAD and not job:
        return "interrupted"
    if state == DEAD and detail in SLURM_ENDED:
        return SLURM_ENDED[detail]
    if state == DEAD:
        return f"running? (SLURM job {job}: {'sacct says ' + detail if detail else 'unknown to squeue and sacct'})"
    return f"running? (SLURM job {job}: {detail})" if job else f"running? ({detail})"

