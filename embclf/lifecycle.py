"""One run dir's life, the same for every command that writes one (the stages, the debug modes):

    run = RunDir(run_dir, cfg, "autoencode", overrides, ident)
    if run.completed():             # the same experiment finished here: nothing to do
        return run.path             # (another experiment here: EmbclfError, nothing changed)
    ... check the input, load the data (nothing written yet) ...
    run.start(resumed_from=epoch, device=...)  # config.yaml, summary.json "running", attempt recorded
    ... train, run.save() after each epoch (compute_seconds so far) ...
    run.complete(test_accuracy=...)           # summary.json "completed", end_time, wall_seconds

The job around it (``embclf.__main__``) holds the job dir (``hold``: the lock and the signal handlers) and, on
any exception, records the failure or the interruption (``record_failure``). Built over ``embclf.runs``
(layout, atomic writes, the attempt bookkeeping) and ``embclf.locks``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from omegaconf import DictConfig, OmegaConf

from . import locks, runs
from .identity import debug_mode
from .runs import FORMAT, SUMMARY, read_summary, write_json_atomic

log = logging.getLogger(__name__)


class RunDir:
    """A run dir of one stage and one experiment (``ident``, ``embclf.identity``), from open to completion.

    Attributes: ``path``; ``prior`` (the summary.json a previous attempt left, or None); ``summary`` (this
    attempt's, from ``base_summary``; add fields to it freely, ``save`` writes it)."""

    def __init__(self, run_dir: Path, cfg, stage: str, overrides: List[str], ident: dict):
        self.path = Path(run_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self.cfg, self.stage, self.ident = cfg, stage, ident
        self.prior = runs.read_summary(self.path)
        self.summary = base_summary(cfg, stage, overrides)

    def completed(self) -> bool:
        """True (and logged) when this experiment completed here already. Raises ``EmbclfError`` naming the
        keys that differ when the run dir holds another experiment (``runs.open_run_dir``); nothing is changed."""
        if runs.open_run_dir(self.path, self.ident, self.stage) == "completed":
            log.info("%s already completed (the same experiment); nothing to do", self.path)
            return True
        return False

    def refuse_changed_data(self, fingerprint: str) -> None:
        """Before a resume: raise ``EmbclfError`` when the unfinished run was started on other images."""
        runs.refuse_changed_data(self.path, self.prior, fingerprint)

    def start(self, resumed_from: Optional[int] = None, **fields) -> None:
        """Accept the run: bad input has failed by now. Removes temporaries a SIGKILL left, records the attempt
        (``start_attempt``; ``resumed_from``: the checkpoint's epoch), writes config.yaml and summary.json
        (status "running", plus ``fields``)."""
        runs.remove_stale_temporaries(self.path)
        start_attempt(self.summary, self.prior, resumed_from)
        runs.write_config(self.path, self.cfg, self.ident, self.stage)
        self.save(**fields)

    def save(self, **fields) -> None:
        """Add ``fields`` to the summary and write it (the attempt extended to now: compute_seconds so far)."""
        self.summary.update(fields)
        touch_attempt(self.summary)
        runs.write_json_atomic(self.path / runs.SUMMARY, self.summary)

    def complete(self, status: str = "completed", **fields) -> dict:
        """Write the final summary: ``fields``, ``status`` (``debug=overfit`` passes "failed" for a check that
        failed), ``end_time``, ``wall_seconds`` (first start to end, gaps included). Returns the summary."""
        s = self.summary
        s.update(fields)
        s.update(status=status, end_time=time.time())
        s["wall_seconds"] = s["end_time"] - s["start_time"]
        touch_attempt(s, s["end_time"])
        runs.write_json_atomic(self.path / runs.SUMMARY, s)
        return s


@contextlib.contextmanager
def hold(job_dir: Path) -> Iterator[None]:
    """For a whole job: the job dir's lock (``locks.hold``: ``InUseError`` when another live process holds it)
    and the signal handlers that turn SIGTERM/SIGUSR2/SIGINT into an exception (``stop_on_signals``), so a
    signal anywhere in the job (data loading, embedding, fits, plots) is recorded "interrupted"."""
    with stop_on_signals(), locks.hold(job_dir):
        yield


OOM_HINT = ("The GPU ran out of memory: lower hydra.launcher.jobs_per_gpu (fewer jobs share the GPU) or the batch "
            "size (autoencode.batch_size, classify.batch_size); nvidia-smi shows what else holds GPU memory.")


def is_cuda_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is CUDA running out of memory: ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``,
    raised by the caching allocator), or an error naming it from a library that raises a plain RuntimeError
    (cuDNN/cuBLAS workspace allocations)."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def record_failure(run_dir: Path, exc: BaseException, base: Optional[dict] = None) -> None:
    """Record that the run in ``run_dir`` ended with ``exc``: status "interrupted" for a signal or a requeue
    (``SystemExit``, ``KeyboardInterrupt``: it resumes from last.pt), else "failed", with the error and the
    exception's ``reason`` (e.g. "diverged"; "out of memory" with :data:`OOM_HINT` for CUDA running out of memory,
    ``is_cuda_oom``); a completed run is left as it is (``mark_failed``).

    ``base``: a summary to write first when the run dir has none (bad input in a sweep job: the launcher's
    table and the report still see who failed and why). A write that fails (the disk is still full) is logged:
    the original error is what matters."""
    stopped = isinstance(exc, (SystemExit, KeyboardInterrupt))
    error, reason = f"{type(exc).__name__}: {exc}", getattr(exc, "reason", None)
    if reason is None and is_cuda_oom(exc):
        error, reason = f"{error}\n{OOM_HINT}", "out of memory"
    try:
        if base is not None and not (run_dir / runs.SUMMARY).is_file():
            runs.write_json_atomic(run_dir / runs.SUMMARY, base)
        if (run_dir / runs.SUMMARY).is_file():
            mark_failed(run_dir, error, "interrupted" if stopped else "failed", reason=reason)
    except runs.WriteError as w:
        log.error("could not record the failure in %s: %s", run_dir, w)


# --- the summary's records: what every summary.json holds, attempts, failures ---------------------------

def slurm_job_id() -> Optional[str]:
    """This process's SLURM job id as squeue/scontrol/sacct read it unambiguously, or None outside SLURM.

    An array task is named ``<array id>_<task id>``: its own ``SLURM_JOB_ID`` equals the array's id for
    task 0, and ``scontrol requeue <that id>`` or ``scancel`` would then act on the whole array.
    """
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def base_summary(cfg: DictConfig, stage: str, overrides: List[str]) -> Dict[str, Any]:
    """Fields every ``summary.json`` carries, filled at the start of a run (status "running"): ``format`` (of
    the run dir's records, ``FORMAT``) and, under Hydra, ``choices``: the option of each config group the job
    was composed with (``experiment``, ``model``, ``head``, ...; Hydra's ``runtime.choices`` without its own
    groups), so a reader needs no ``.hydra/`` record to tell which preset a run used."""
    choices = _choices()
    return {
        "format": FORMAT,
        "status": "running",
        "stage": stage,
        "model": cfg.model.name,
        "latent": cfg.latent,
        "seed": cfg.seed,
        "data": getattr(cfg.data.source, "value", cfg.data.source),
        "epochs": cfg[stage].epochs,
        "overrides": list(overrides),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": slurm_job_id(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        # the MPS daemon the job's CUDA work went through (hydra.launcher.mps), when one was named
        **({"cuda_mps_pipe_directory": os.environ["CUDA_MPS_PIPE_DIRECTORY"]}
           if os.environ.get("CUDA_MPS_PIPE_DIRECTORY") else {}),
        "start_time": time.time(),
        **({"choices": choices} if choices is not None else {}),
        # a debug run says so in its summary, so no reader takes it for a result (embclf/debug.py)
        **({"debug": debug_mode(cfg)} if debug_mode(cfg) != "none" else {}),
    }


def _choices() -> Optional[Dict[str, Optional[str]]]:
    """The config group options of the running Hydra job (``{"experiment": "quick", "model": "vae", ...}``, a
    group left out as None), or None outside a Hydra job."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = OmegaConf.to_container(HydraConfig.get().runtime.choices)
    except Exception:  # noqa: BLE001 -- no Hydra job (a direct call, a test): nothing to record
        return None
    return {str(k): (None if v in (None, "null") else str(v)) for k, v in sorted(choices.items())
            if not str(k).startswith("hydra/") and str(k) != "hydra"}


def mark_failed(run_dir: Path, error: str, status: str = "failed", reason: Optional[str] = None,
                extra: Optional[Dict[str, Any]] = None) -> None:
    """Record a failure in ``summary.json`` unless the run already completed.

    Used by the stages on an exception and by launchers for a job killed from outside. ``status`` is
    "failed", "interrupted" for a run stopped by a signal or a requeue (it resumes from last.pt), or
    "killed" for a process that died from a signal it could not handle (SIGKILL: ``kill -9``, the OOM killer;
    recorded by the launcher). Keeps every other field already written (and never touches checkpoints or
    metrics). ``reason`` (e.g. "diverged", "out of memory") is stored as ``reason`` beside the error message;
    ``extra`` fields (e.g. ``{"signal": "SIGKILL"}``) are added as they are.
    """
    run_dir = Path(run_dir)
    s = read_summary(run_dir) or {}
    if s.get("status") == "completed":
        return
    s.update(status=status, error=str(error)[-4000:], end_time=time.time())
    if reason:
        s["reason"] = reason  # e.g. "diverged"
    s.update(extra or {})
    if "start_time" in s:
        s["wall_seconds"] = s["end_time"] - s["start_time"]
    if s.get("pid") == os.getpid():  # this process's own attempt ends now (a launcher recording a dead job
        touch_attempt(s, s["end_time"])  # does not know when it died: its last recorded time stays)
    write_json_atomic(run_dir / SUMMARY, s)


def start_attempt(summary: Dict[str, Any], prior: Optional[dict], resumed_from: Optional[int] = None) -> None:
    """Record in ``summary`` (in place) that a new attempt of this run starts now, continuing ``prior`` (the
    summary.json the previous attempt left, or None).

    Fields: ``start_time`` (unix s) stays the first attempt's, so ``wall_seconds`` (set at the end:
    ``end_time - start_time``) spans from the first start to the end, idle gaps between attempts included;
    ``attempts`` counts the starts in this run dir; ``attempt_times`` holds [start, last recorded time] per
    attempt (unix s) and ``compute_seconds`` their summed lengths: the time the run really ran. An attempt killed
    with SIGKILL counts up to its last recorded time (the end of its last epoch). ``resumed_from_epoch``: the
    epoch of the checkpoint this attempt resumed from (``resumed_from``; None: a fresh start), appended to the
    earlier attempts' (an int after one resume, a list after several).
    """
    now = time.time()
    started = summary.get("start_time") or now  # base_summary's: when this attempt's stage began
    prior = prior or {}
    times = [list(t) for t in prior.get("attempt_times") or []]
    if not times and prior.get("start_time"):  # a summary written before attempts were recorded
        times = [[prior["start_time"], prior.get("end_time") or prior["start_time"]]]
    times.append([started, now])
    summary["start_time"] = prior.get("start_time") or summary.get("start_time") or now
    summary["attempts"] = len(times)
    summary["attempt_times"] = times
    summary["compute_seconds"] = sum(e - s for s, e in times)
    if resumed_from is not None:
        old = prior.get("resumed_from_epoch")
        chain = ([] if old is None else list(old) if isinstance(old, list) else [old]) + [int(resumed_from)]
        summary["resumed_from_epoch"] = chain[0] if len(chain) == 1 else chain


def touch_attempt(summary: Dict[str, Any], now: Optional[float] = None) -> None:
    """Extend the current attempt (``start_attempt``) to ``now`` and update ``compute_seconds``; call before
    each write of summary.json, so an attempt killed later still counts up to here."""
    times = summary.get("attempt_times")
    if not times:
        return
    times[-1][1] = time.time() if now is None else now
    summary["compute_seconds"] = sum(e - s for s, e in times)


# --- signals: a stage ends recorded, never left "running" --------------------------------------------------------------------------------------

class CheckpointOnSignal:
    """Context manager: on SIGUSR2/SIGTERM, save at the next safe point, then run the previous handler.

    submitit installs its own SIGUSR2 handler to requeue a job near its time limit (and ignores SIGTERM);
    we must save first and then hand on to it rather than replace it. The handler itself only records
    the signal: saving inside it could catch the optimizer between two parameter updates (on the CPU,
    Adam updates parameters in a Python loop). The training loop calls ``poll()`` after every optimizer
    step and epoch, where the state is consistent; ``poll`` saves, then calls the old handler (for the
    default action it raises ``Stopped``, a ``SystemExit(128 + signum)``, so the stage records "interrupted").
    On exit the old handlers are restored.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self, save: Callable[[], None]):
        self.save = save
        self.old: Dict[int, Any] = {}
        self.pending: Optional[tuple] = None

    def _handler(self, signum, frame):
        log.warning("received signal %d: saving checkpoint at the next step", signum)
        self.pending = (signum, frame)

    def poll(self) -> None:
        """If a signal arrived: save, then hand on to the previously installed handler."""
        if self.pending is None:
            return
        signum, frame = self.pending
        self.pending = None
        try:
            self.save()
        except Exception:  # saving must not stop the requeue
            log.exception("checkpoint on signal failed")
        old = self.old.get(signum)
        if callable(old):
            old(signum, frame)
        elif old in (signal.SIG_DFL, None):
            raise Stopped(signum)

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self.old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: no handlers possible
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        if exc[0] is None:
            self.poll()  # a signal during the last steps is still handed on
        return False


class Stopped(SystemExit):
    """SIGTERM or SIGUSR2 ended the job (``stop_on_signals``): a ``SystemExit`` with the shell's exit status for
    the signal (``128 + signum``: 143 for SIGTERM), and ``signum``, so a single run can say what was saved and
    how to resume, as after Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """For a whole job: SIGTERM, SIGUSR2 and SIGINT end it with an exception wherever it is, so the stage's
    ``except`` records the run as "interrupted" and nothing is left "running".

    Only a signal whose action is the default is taken over: SIGTERM's and SIGUSR2's default kills the process
    without running any Python code (no ``except``, no ``finally``), so outside ``CheckpointOnSignal``'s epoch
    loops a single run died "running". Here they raise ``Stopped`` (a ``SystemExit(128 + signum)``: the exit
    status a shell reports for that signal); SIGINT raises ``KeyboardInterrupt`` as Python's own handler does. Handlers someone
    else installed stay: submitit's (SIGUSR2 requeues, SIGTERM is logged and ignored) and a launcher's.
    ``CheckpointOnSignal`` saves and then hands on to these handlers, so its loops end the same way. A second
    signal while the first one's exception unwinds (the failure being recorded) is logged and ignored; kill -9
    still stops the process. The previous handlers are restored on exit."""
    stopping = []

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if stopping:
            log.warning("received %s again: already stopping (the run is being recorded as interrupted)", name)
            return
        stopping.append(signum)
        log.warning("received %s: stopping; the run is recorded as interrupted", name)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped(signum)

    old: Dict[int, Any] = {}
    for s, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGUSR2, signal.SIG_DFL),
                       (signal.SIGINT, signal.default_int_handler)):
        try:
            if signal.getsignal(s) in (default, None):
                old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: no handlers possible
            pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
