"""One process per run dir and per sweep dir: a lock record in the directory, safe on NFS/Lustre.

A directory is held through ``DIR/.embclf.lock``, a small JSON record (host, pid, the process's start time,
boot id, pid namespace, SLURM job id and restart count, start time, heartbeat, a random token):

* it is created atomically with ``link()`` from a complete temporary file (atomic on NFS too, where
  ``O_EXCL`` was not always honoured, and a reader never sees a half-written record);
* a daemon thread rewrites its ``heartbeat`` every ``HEARTBEAT_S`` seconds (a launcher, which must not run
  threads while it forks workers, calls :func:`refresh` from its polling loop instead);
* on one host the check-and-take is serialised by ``filelock`` on a host-local file (under the temp dir, so
  it works where the shared file system does not honour ``flock``); across hosts ``link()``/``rename()``
  decide;
* it is removed on every exit path that runs Python code (:meth:`DirLock.release`, and an ``atexit``
  handler for ``sys.exit``, an exception or a signal turned into ``SystemExit``). A process killed with
  ``kill -9`` or a crashed node leaves the record behind; the next start recognises it as stale
  (:func:`stale_reason`): on the same host when its pid is gone or now belongs to another process, or the
  host rebooted; from another host when its heartbeat is older than ``STALE_S`` seconds; and at once when
  the record is an earlier run of this very SLURM job (a requeue, possibly onto another node).

A second process is refused at once with :class:`InUseError` ("DIR is in use by pid N on host H since T")
and changes nothing in the directory: it only reads the record.

Limits: across hosts a holder is trusted while its heartbeat is fresh, so a holder whose host stalls for
longer than ``STALE_S`` (and whose clock is off by more than that) can lose its lock to a new start; two
starts on two hosts that both find the same stale record in the same instant are decided by ``rename()``,
which the file system must make atomic (NFS and Lustre do).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, Optional

from filelock import FileLock

from . import liveness
from .errors import EmbclfError

log = logging.getLogger(__name__)

LOCK_NAME = ".embclf.lock"
# seconds between heartbeats, and the age after which another host's record counts as stale (both
# overridable through the environment, e.g. for a file system with very coarse timestamps or for tests)
HEARTBEAT_S = float(os.environ.get("EMBCLF_LOCK_HEARTBEAT_S", 20))
STALE_S = float(os.environ.get("EMBCLF_LOCK_STALE_S", 180))


class InUseError(EmbclfError):
    """Another live process holds the directory. ``holder`` is its lock record (a dict), ``path`` the directory.

    The entrypoint and the launchers print the message and exit with status 2."""

    in_use = True  # recognised by the launchers without importing this module

    def __init__(self, message: str, holder: Optional[dict] = None, path: Optional[str] = None):
        super().__init__(message)
        self.holder = holder or {}
        self.path = path


# --- who am I ------------------------------------------------------------------------------------

def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_ns() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")  # e.g. 'pid:[4026531836]': containers on one host differ
    except OSError:
        return None


def _slurm() -> tuple:
    from .lifecycle import slurm_job_id  # lifecycle builds on this module: imported here, when needed

    return slurm_job_id(), int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _me(token: str) -> dict:
    now = time.time()
    job, restarts = _slurm()
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": liveness.proc_start(os.getpid()),
            "boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_ns": _pid_ns(),
            "slurm_job_id": job, "slurm_restart_count": restarts, "start_time": now, "heartbeat": now,
            "token": token}


# --- stale or live --------------------------------------------------------------------------------

def stale_reason(record: dict, now: Optional[float] = None, me: Optional[dict] = None) -> Optional[str]:
    """Why the lock ``record`` no longer holds its directory, or None while its process may still run.

    ``me`` describes the asking process (default: this one; the tests pass other hosts and SLURM jobs), ``now``
    the time (unix s). On the asker's own host (same host name, boot and pid namespace) the process table
    decides: stale when the pid is gone, a zombie, or a process with another start time (the pid was reused).
    A record of the same SLURM job id is stale for a later run of that job (a requeue, ``SLURM_RESTART_COUNT``
    higher, or on another node). Otherwise stale when its heartbeat is older than ``STALE_S`` seconds.
    """
    me = me or _me("")
    now = time.time() if now is None else now
    host, pid = record.get("host"), record.get("pid")
    same_host = host == me.get("host")
    if same_host and record.get("boot_id") and me.get("boot_id") and record["boot_id"] != me["boot_id"]:
        return f"host {host} was rebooted since it was taken"
    if same_host and record.get("pid_ns") == me.get("pid_ns") and isinstance(pid, int):
        if not liveness.same_process(pid, record.get("proc_start")):
            return f"pid {pid} no longer runs on host {host}"
        return None
    job = record.get("slurm_job_id")
    if job and job == me.get("slurm_job_id") and (
            int(record.get("slurm_restart_count") or 0) < int(me.get("slurm_restart_count") or 0) or not same_host):
        return f"SLURM job {job} was requeued: its earlier run on host {host} has ended"
    age = now - float(record.get("heartbeat") or 0)
    if age > STALE_S:
        return f"its heartbeat is {age:.0f} s old (a holder on another host beats every {HEARTBEAT_S:g} s; " \
               f"stale after {STALE_S:g} s)"
    return None


def _when(t: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(t or 0)))


def describe(record: dict) -> str:
    """Who holds a lock: "pid N on host H since T"."""
    return f"pid {record.get('pid')} on host {record.get('host')} since {_when(record.get('start_time'))}"


def in_use_message(path, record: dict) -> str:
    """The refusal: "PATH is in use by pid N on host H since T", then what to do (one sentence)."""
    pid, host, job = record.get("pid"), record.get("host"), record.get("slurm_job_id")
    stop = f"kill {pid}" + (f" on {host}" if host != socket.gethostname() else "") + (f" or scancel {job}" if job else "")
    later = ""
    if host != socket.gethostname():
        later = (f"; if {host} is down, its lock counts as stale {STALE_S:g} s after its last heartbeat "
                 f"({_when(record.get('heartbeat'))})")
    return (f"{path} is in use by {describe(record)}. "
            f"Wait for that process to end or stop it ({stop}), then run the same command again{later}; "
            "nothing was changed.")


# --- the record on disk ---------------------------------------------------------------------------

def read_record(directory) -> Optional[dict]:
    """The lock record in ``directory`` (a dict), {} when the file exists but is unreadable, None when absent."""
    try:
        with open(Path(directory) / LOCK_NAME) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        rec = json.loads(text)
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


def _tmp_write(directory: Path, record: dict) -> Path:
    tmp = directory / f"{LOCK_NAME}.{record['token']}.{time.monotonic_ns()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, (json.dumps(record, indent=1) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _create(directory: Path, record: dict) -> bool:
    """Create the lock file holding ``record`` if there is none (link(): atomic, also over NFS). True if made."""
    tmp = _tmp_write(directory, record)
    try:
        os.link(tmp, directory / LOCK_NAME)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        # NFS: the link may have been made although the reply was lost; the link count tells
        with contextlib.suppress(OSError):
            if os.stat(tmp).st_nlink == 2:
                return True
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
        # a file system without hard links: O_EXCL (a reader may briefly see the file empty: acquire waits)
        try:
            fd = os.open(directory / LOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(Path(tmp).read_text())
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _take_over(directory: Path, stale: dict, record: dict) -> bool:
    """Replace the stale record ``stale`` by ``record``. False when another process changed the lock meanwhile."""
    lock = directory / LOCK_NAME
    aside = directory / f"{LOCK_NAME}.stale-{record['token']}"
    try:
        os.rename(lock, aside)  # of several takers only one can move a given file
    except FileNotFoundError:
        return False
    moved = _load(aside)
    if moved.get("token") != stale.get("token"):
        # not the record judged stale: a live lock someone made since; put it back and look again
        with contextlib.suppress(OSError):
            os.link(aside, lock)
        with contextlib.suppress(OSError):
            os.unlink(aside)
        return False
    with contextlib.suppress(OSError):
        os.unlink(aside)
    return _create(directory, record)


def _load(path: Path) -> dict:
    try:
        rec = json.loads(path.read_text())
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def _host_mutex(directory: Path) -> FileLock:
    """A host-local file lock serialising the check-and-take of ``directory`` between processes of this host."""
    key = hashlib.sha1(os.path.realpath(directory).encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / f"embclf-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return FileLock(str(folder / f"{key}.lock"), timeout=60)


# --- holding --------------------------------------------------------------------------------------

class DirLock:
    """This process's hold on one directory (see the module docstring). Reentrant: every :func:`acquire` of the
    same directory by the same process needs its own :meth:`release`; the record goes with the last one."""

    def __init__(self, path: Path, record: dict, heartbeat: bool):
        self.path = path
        self.record = record
        self.heartbeat = heartbeat
        self.count = 1
        self.pid = os.getpid()
        self.last_beat = time.monotonic()
        self.lost = False

    def release(self) -> None:
        """Give up one hold; the last removes the lock file (only if it is still this process's record)."""
        with _guard:
            if self.pid != os.getpid() or _held.get(str(self.path)) is not self:
                return  # a forked child's copy, or already released
            self.count -= 1
            if self.count > 0:
                return
            del _held[str(self.path)]
        if (read_record(self.path) or {}).get("token") == self.record["token"]:
            with contextlib.suppress(OSError):
                os.unlink(self.path / LOCK_NAME)
        _stop_thread_if_idle()

    def beat(self) -> None:
        """Rewrite the heartbeat now (only while the lock file is still this process's record)."""
        self.last_beat = time.monotonic()
        current = read_record(self.path)
        if current is None or current.get("token") != self.record["token"]:
            if not self.lost:
                self.lost = True
                log.error("the lock of %s was removed or taken over by another process (%s): this process "
                          "no longer holds it", self.path, current)
            return
        self.record["heartbeat"] = time.time()
        try:
            tmp = _tmp_write(self.path, self.record)
            os.replace(tmp, self.path / LOCK_NAME)
        except OSError as e:  # a full disk or a gone dir must not end the job; the next beat tries again
            log.warning("could not refresh the lock of %s: %s", self.path, e)
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_guard = threading.Lock()
_held: Dict[str, DirLock] = {}
_thread: Optional[threading.Thread] = None
_stop = threading.Event()
_atexit_pid: Optional[int] = None


def acquire(directory, heartbeat: bool = True) -> DirLock:
    """Hold ``directory`` (made if missing) for this process; returns the :class:`DirLock` to release.

    ``heartbeat``: keep the record fresh from a daemon thread (False in a launcher that forks workers: it calls
    :func:`refresh` itself). Taking over a stale record is logged with the reason.

    Raises :class:`InUseError` when another live process holds it; the directory is then left exactly as it was.
    Raises ``embclf.runs.WriteError`` (an ``EmbclfError``) when the lock file cannot be written (read-only, full).
    """
    path = Path(os.path.abspath(directory))
    with _guard:
        mine = _held.get(str(path))
        if mine is not None and mine.pid == os.getpid():
            mine.count += 1
            if heartbeat and not mine.heartbeat:
                mine.heartbeat = True
                _start_thread()
            return mine
    record = _me(uuid.uuid4().hex)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with _host_mutex(path):
            _take(path, record)
    except OSError as e:  # e.g. a read-only or full file system: one paragraph, not a traceback
        from .runs import _write_error

        raise _write_error(path / LOCK_NAME, e) from e
    lock = DirLock(path, record, heartbeat)
    global _atexit_pid
    with _guard:
        _held[str(path)] = lock
        if _atexit_pid != os.getpid():  # once per process (a forked child registers its own)
            _atexit_pid = os.getpid()
            atexit.register(release_all)
    if heartbeat:
        _start_thread()
    return lock


def _take(path: Path, record: dict) -> None:
    """Create ``path``'s lock file with ``record``, taking over a stale one; raises InUseError when it is held."""
    for _ in range(50):
        current = read_record(path)
        if current is None:
            if _create(path, record):
                return
            continue
        if not current:
            with contextlib.suppress(OSError):
                if time.time() - (path / LOCK_NAME).stat().st_mtime < 5:  # being written (no-link file systems)
                    time.sleep(0.1)
                    continue
        why = "its record is unreadable" if not current else stale_reason(current)
        if why is None:
            raise InUseError(in_use_message(path, current), current, str(path))
        log.warning("%s: taking over a stale lock (%s)", path, why)
        if _take_over(path, current, record):
            return
    raise InUseError(f"{path}: could not take its lock: other processes kept changing it; run the same "
                     "command again.", {}, str(path))


@contextlib.contextmanager
def hold(directory, heartbeat: bool = True) -> Iterator[DirLock]:
    """``with hold(d):`` — :func:`acquire` ``d`` for the block, release on any exit from it."""
    lock = acquire(directory, heartbeat)
    try:
        yield lock
    finally:
        lock.release()


def holder(directory) -> Optional[dict]:
    """The lock record of a live process other than this one holding ``directory``, or None (free, stale, ours)."""
    path = Path(os.path.abspath(directory))
    current = read_record(path)
    if not current:
        return None
    with _guard:
        mine = _held.get(str(path))
    if mine is not None and mine.record["token"] == current.get("token"):
        return None
    return current if stale_reason(current) is None else None


def refresh() -> None:
    """Rewrite the heartbeat of every lock of this process whose last beat is ``HEARTBEAT_S`` old (cheap
    otherwise): for processes that hold locks without the heartbeat thread (launchers)."""
    with _guard:
        due = [lk for lk in _held.values()
               if lk.pid == os.getpid() and time.monotonic() - lk.last_beat >= HEARTBEAT_S]
    for lk in due:
        lk.beat()


def release_all() -> None:
    """Remove every lock this process holds (registered with ``atexit``)."""
    with _guard:
        mine = [lk for lk in _held.values() if lk.pid == os.getpid()]
    for lk in mine:
        lk.count = 1
        lk.release()


def _beat_loop() -> None:
    while not _stop.wait(min(HEARTBEAT_S, 5.0)):
        refresh()


def _start_thread() -> None:
    global _thread
    with _guard:
        if _thread is not None and _thread.is_alive():
            return
        _stop.clear()
        _thread = threading.Thread(target=_beat_loop, name="embclf-lock-heartbeat", daemon=True)
        _thread.start()


def _stop_thread_if_idle() -> None:
    global _thread
    with _guard:
        if any(lk.heartbeat for lk in _held.values()) or _thread is None:
            return
        t, _thread = _thread, None
    _stop.set()
    if t is not threading.current_thread():
        t.join(timeout=5)


def _forget_after_fork() -> None:
    """In a forked child: it holds nothing (the parent does) and has no heartbeat thread; fresh primitives,
    since the parent's may have been held by another thread at the fork."""
    global _guard, _held, _thread, _stop
    _guard, _held, _thread, _stop = threading.Lock(), {}, None, threading.Event()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def forget(directory) -> None:
    """Stop holding ``directory`` without touching its lock file: for a caller about to delete the directory
    itself (a single run that failed on bad input leaves no run dir), so no heartbeat writes into it meanwhile."""
    with _guard:
        _held.pop(str(Path(os.path.abspath(directory))), None)
    _stop_thread_if_idle()
