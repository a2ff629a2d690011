"""``hydra.launcher.mps``: NVIDIA's Multi-Process Service for jobs that share a GPU (``jobs_per_gpu > 1``).

Without MPS, processes on one GPU are time-sliced: one process's kernels run at a time, so 8 small jobs on a GPU
give little more than one (docs/performance.md). Under MPS their kernels run concurrently through one server
process per GPU. MPS is transparent to its clients: a CUDA process uses it when an MPS control daemon answers in
its pipe directory (``CUDA_MPS_PIPE_DIRECTORY``, default ``/tmp/nvidia-mps``).

Modes (``hydra.launcher.mps``):

* ``auto`` (default): use a daemon that already serves (the administrator's, or one the user started); never
  start one. With ``jobs_per_gpu > 1`` and none serving, one log line says the jobs are time-sliced.
* ``on``: as ``auto``, and where none serves start a per-sweep daemon (``nvidia-cuda-mps-control -d``, which any
  user may run) with its pipe and log directories under the sweep dir (``<sweep dir>/.mps/pipe``, ``.../log``),
  pass both to every job, and stop it when the sweep ends, also on failure and Ctrl-C
  (``echo quit | nvidia-cuda-mps-control``). Refused when ``nvidia-cuda-mps-control`` is not on the PATH.
* ``off``: neither look nor start. (A daemon already serving the default pipe directory still serves the jobs:
  MPS cannot be declined by a client.)

For the launcher's other checks (a GPU in Exclusive_Process compute mode accepts several processes only
through MPS): :func:`mps_active` says whether a daemon serves this process's environment, :func:`planned` what
:func:`serving` will do (before anything starts), :func:`current` what the running sweep does. Nothing here
imports torch or touches CUDA.
"""
import logging
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional

log = logging.getLogger("embclf.launcher")

MODES = ("auto", "on", "off")
CONTROL = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"  # the MPS daemon's and clients' default (CUDA MPS docs, section 4.2)
# the daemon's pipes live in the pipe directory; a long path (deep sweep dirs) risks the 107-byte limit of a
# Unix socket's path, so a longer one is replaced by a short temporary directory (and logged)
MAX_PIPE_DIR = 80
TEMP_PREFIX = "embclf-mps-"  # the stand-in directory's name prefix (removed when the sweep ends)
START_TIMEOUT_S = 30.0

_CURRENT: Optional[Dict[str, object]] = None


def pipe_dir(environ: Optional[Mapping[str, str]] = None) -> str:
    """The MPS pipe directory a CUDA process started with ``environ`` (default ``os.environ``) would use."""
    env = os.environ if environ is None else environ
    return env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR


def mps_active(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when an MPS control daemon serves a process started with ``environ`` (default ``os.environ``):
    its control pipe (``<pipe dir>/control``) exists. Inside :func:`serving` with ``mode=on`` this is True
    for the jobs' environment, which is then ``os.environ``."""
    return os.path.exists(os.path.join(pipe_dir(environ), "control"))


def current() -> Optional[Dict[str, object]]:
    """What the running sweep does about MPS (set inside :func:`serving`, else None): ``{"mode", "state"}``
    with state ``started`` (a per-sweep daemon), ``present`` (one that already served), ``none`` or ``off``,
    plus ``pipe_dir`` when MPS serves."""
    return None if _CURRENT is None else dict(_CURRENT)


def planned(mode: str, gpus: List[int], jobs_per_gpu: int) -> str:
    """What :func:`serving` will do, decided now without starting anything (for checks made before the pool
    starts, e.g. refusing ``jobs_per_gpu > 1`` on an Exclusive_Process GPU unless MPS will serve): ``present``
    (a daemon serves already), ``start`` (``mode=on`` will start one; ``nvidia-cuda-mps-control`` is on the
    PATH), ``none`` (time-sliced) or ``off`` (mode off, no GPU jobs, or one job per GPU). Raises ``ValueError``
    for an invalid mode."""
    if check_mode(mode) == "off" or not gpus or jobs_per_gpu <= 1:
        return "off"
    if mps_active():
        return "present"
    return "start" if mode == "on" and shutil.which(CONTROL) is not None else "none"


def check_mode(mode: str) -> str:
    """``mode`` when it is one of ``MODES``; raises ``ValueError`` naming ``hydra.launcher.mps`` otherwise."""
    if str(mode) not in MODES:
        raise ValueError(f"hydra.launcher.mps={mode} is invalid: it must be auto (use an MPS daemon that already "
                         "serves), on (also start one for the sweep) or off (e.g. hydra.launcher.mps=on).")
    return str(mode)


def _control(args: List[str], env: Mapping[str, str], stdin: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run([CONTROL, *args], env=dict(env), input=stdin, capture_output=True, text=True,
                          timeout=START_TIMEOUT_S)


def _start(sweep_dir: Path) -> Dict[str, str]:
    """Start a control daemon whose pipe and log directories are under ``sweep_dir``; return their variables.
    Raises ``ValueError`` (one paragraph) when it cannot be started."""
    if shutil.which(CONTROL) is None:
        raise ValueError(f"hydra.launcher.mps=on needs NVIDIA's {CONTROL} on the PATH (it comes with the driver) "
                         "and it is not there. Install the driver's utilities, or use hydra.launcher.mps=auto "
                         "(time-sliced GPU sharing) or hydra.launcher.jobs_per_gpu=1.")
    root = sweep_dir / ".mps"
    pipe, logs = root / "pipe", root / "log"
    if len(str(pipe)) > MAX_PIPE_DIR:
        pipe = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        log.info("MPS pipe directory %s (the sweep dir's path is too long for the daemon's pipes)", pipe)
    for d in (pipe, logs):
        d.mkdir(parents=True, exist_ok=True)
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(logs)}
    try:
        proc = _control(["-d"], {**os.environ, **env})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"hydra.launcher.mps=on: {CONTROL} -d could not be run ({e}). Use hydra.launcher.mps=auto "
                         "or hydra.launcher.jobs_per_gpu=1.") from None
    deadline = time.monotonic() + START_TIMEOUT_S
    while proc.returncode == 0 and not mps_active(env) and time.monotonic() < deadline:
        time.sleep(0.05)  # the daemon forks into the background and then creates its pipes
    if proc.returncode != 0 or not mps_active(env):
        raise ValueError(f"hydra.launcher.mps=on: {CONTROL} -d did not start a daemon (exit {proc.returncode}, "
                         f"{(proc.stderr or proc.stdout).strip()[:300] or 'no output'}; see {logs}/control.log). "
                         "MPS needs an NVIDIA GPU in Default or Exclusive_Process compute mode and no other MPS "
                         "daemon of another user on it. Use hydra.launcher.mps=auto or hydra.launcher.jobs_per_gpu=1.")
    log.info("MPS: started a control daemon for this sweep (pipes %s, logs %s)", pipe, logs)
    return env


def _stop(env: Mapping[str, str]) -> None:
    """Stop the daemon ``env`` names (``echo quit | nvidia-cuda-mps-control``); a failure is logged, not raised."""
    try:
        proc = _control([], {**os.environ, **env}, stdin="quit\n")
        if proc.returncode != 0:
            log.warning("MPS: %s quit exited %d: %s", CONTROL, proc.returncode, (proc.stderr or "").strip()[:300])
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("MPS: could not stop the sweep's daemon (%s); stop it with CUDA_MPS_PIPE_DIRECTORY=%s "
                    "echo quit | %s", e, env.get("CUDA_MPS_PIPE_DIRECTORY"), CONTROL)


@contextmanager
def serving(mode: str, gpus: List[int], jobs_per_gpu: int, sweep_dir: str) -> Iterator[Dict[str, object]]:
    """The block (the launcher's job pool) runs with MPS as ``mode`` says (module docstring) for jobs on
    ``gpus`` (GPU ids; [] = CPU jobs: nothing to do), ``jobs_per_gpu`` of them per GPU (1: nothing to share).

    A per-sweep daemon's variables are set in ``os.environ`` for the block -- forked jobs and submitit's
    controller copy it -- and restored after; the daemon is stopped on the way out, whatever ends the block
    (a failed job, ``KeyboardInterrupt``). Yields :func:`current`'s dict. Raises ``ValueError`` for an invalid
    mode or a daemon that cannot be started (before any job starts)."""
    global _CURRENT
    mode = check_mode(mode)
    info: Dict[str, object] = {"mode": mode, "state": "off"}
    started: Optional[Dict[str, str]] = None
    if mode != "off" and gpus and jobs_per_gpu > 1:
        if mps_active():
            info.update(state="present", pipe_dir=pipe_dir())
            log.info("MPS: a control daemon serves %s: the jobs sharing a GPU run concurrently", pipe_dir())
        elif mode == "on":
            started = _start(Path(sweep_dir).expanduser().absolute())
            info.update(state="started", pipe_dir=started["CUDA_MPS_PIPE_DIRECTORY"])
        else:
            info["state"] = "none"
            log.info("MPS: none serves; the %d jobs per GPU are time-sliced (hydra.launcher.mps=on starts a daemon "
                     "for the sweep: docs/launchers.md)", jobs_per_gpu)
    saved = {k: os.environ.get(k) for k in (started or {})}
    os.environ.update(started or {})
    _CURRENT = info
    try:
        yield dict(info)
    finally:
        _CURRENT = None
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if started is not None:
            _stop(started)
            short = Path(started["CUDA_MPS_PIPE_DIRECTORY"])
            if short.name.startswith(TEMP_PREFIX) and short != Path(sweep_dir) / ".mps" / "pipe":
                shutil.rmtree(short, ignore_errors=True)  # the short stand-in for a long sweep path (_start)
