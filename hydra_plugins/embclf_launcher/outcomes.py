"""Recording how each job of a sweep ended: in its run dir(s), in the launcher's end-of-sweep table, and in
the whole-sweep error that names every failed job.

A job's outcome comes from its worker's result (:func:`outcome_from_result`), refined by what only the
launcher can see: the signal that killed a local worker (and whether the OOM killer did it, from the memory
cgroup's counter), a SLURM job's final state, a time limit.  The core records failures inside a stage
itself; :func:`record_failure` covers workers that died before or without doing so.
"""

import logging
import signal
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from .sweep_plan import PlannedJob, SweepJobsFailedError, _one_line, _read_json, stage_run_dirs

log = logging.getLogger("embclf.launcher")


def timed_out(error: Optional[str], state: Optional[str] = None) -> bool:
    """Whether a failed job ended because of its time limit: submitit's worker stopped requeuing it
    ("timed-out too many times"), or SLURM's state says TIMEOUT."""
    return "timed-out" in (error or "") or (state or "").upper().startswith("TIMEOUT")


def mark_timeout(job: PlannedJob, timeout_min: float, max_num_timeout: int, hits: Optional[int] = None) -> None:
    """Turn a failed job that ran out of time into status "timeout" (launcher table, run dir, report).

    ``hits``: how many times the job reached the limit (each time it was told, saved last.pt and was started
    again, up to ``max_num_timeout`` restarts). The run dir's summary gets status "timeout", the limit and the
    error; a re-invoked sweep resumes the job from last.pt.
    """
    runs_ = f" {hits} time(s)" if hits else ""
    job.status = "timeout"
    job.error = (f"timed out: reached hydra.launcher.timeout_min={timeout_min:g}{runs_}, restarted at most "
                 f"hydra.launcher.max_num_timeout={max_num_timeout} time(s); raise either to let it finish "
                 f"(last error: {job.error})")
    record_failure(job, job.error, status="timeout", extra={"timeout_min": timeout_min,
                                                            "max_num_timeout": max_num_timeout})


def record_failure(job: PlannedJob, error: str, status: str = "failed", reason: Optional[str] = None,
                   extra: Optional[dict] = None) -> None:
    """Write status "failed" and ``error`` into the job's run dir(s) with ``embclf.lifecycle.mark_failed``.

    The core already does this for an exception inside a stage; this covers a worker that was killed
    (out of memory, scancel) or died before the stage started.  Stage run dirs that completed are
    left alone (mark_failed never overwrites a completed summary).  ``status``, ``reason`` and
    ``extra`` are passed on to ``mark_failed`` ("killed", "out of memory", ``{"signal": "SIGKILL"}``).
    Never raises: failing to record a failure must not hide the other jobs' results.
    """
    try:
        from embclf.lifecycle import base_summary, mark_failed
        from embclf.runs import SUMMARY, write_json_atomic
    except Exception as e:  # noqa: BLE001
        log.warning("cannot record the failure of %s: embclf.runs unavailable (%s)", job.label, e)
        return
    dirs = stage_run_dirs(job)
    # stage=all: mark the stage that was running (or the first one that never started), not both
    statuses = [(_read_json(d / "summary.json") or {}).get("status") for d in dirs]
    targets = [d for d, s in zip(dirs, statuses) if s != "completed"][:1]
    if status in ("failed", "interrupted"):
        # a stage that raised (or saw the interruption) recorded it itself, with its own error: keep that
        targets = [d for d in targets
                   if (_read_json(d / "summary.json") or {}).get("status") not in ("failed", "interrupted")]
    for run_dir in targets:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (run_dir / SUMMARY).is_file() and "app" in job.extra:
                # died before its stage wrote anything: still a row with its model, latent, seed, overrides
                app = OmegaConf.create(job.extra["app"])
                stage = run_dir.name if run_dir.name in ("autoencode", "classify") and run_dir != job.run_dir \
                    else str(app.stage)
                base = base_summary(app, stage, job.overrides)
                for k in ("pid", "hostname", "start_time"):  # the launcher's, not the job's
                    base.pop(k, None)
                write_json_atomic(run_dir / SUMMARY, base)
            mark_failed(run_dir, error, status=status, reason=reason, extra=extra)
        except Exception as e:  # noqa: BLE001
            log.warning("cannot record the failure of %s in %s: %s", job.label, run_dir, e)


def failed_return(job: PlannedJob) -> JobReturn:
    """A Hydra JobReturn for a job whose worker produced no result (killed, crashed)."""
    ret = JobReturn(overrides=job.overrides, cfg=job.cfg, status=JobStatus.FAILED)
    ret.return_value = RuntimeError(job.error or "job failed")
    return ret


def oom_kill_count() -> Optional[int]:
    """How many processes the kernel's OOM killer has killed in this process's memory cgroup (cgroup v2
    ``memory.events``, v1 ``memory.oom_control``: the ``oom_kill`` counter), or None where unreadable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
    v1 = [ln.split(":", 2)[2] for ln in lines if ":memory:" in ln or ln.split(":")[1:2] == ["memory"]]
    root = Path("/sys/fs/cgroup")
    # inside a container the cgroup namespace's root is mounted at /sys/fs/cgroup: try both places
    candidates = [root / p.lstrip("/") / "memory.events" for p in v2] + [root / "memory.events"]
    candidates += [root / "memory" / p.lstrip("/") / "memory.oom_control" for p in v1]
    candidates += [root / "memory" / "memory.oom_control"]
    for path in candidates:
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


def killed_outcome(signum: int, oom_before: Optional[int], oom_after: Optional[int]) -> Tuple[str, str, dict]:
    """(error, reason, extra fields) for a worker that died from signal ``signum``.

    SIGKILL while the cgroup's OOM-kill counter rose (``oom_before`` < ``oom_after``) reads "out of memory";
    where the counter cannot be read, SIGKILL says that it may have been the OOM killer or ``kill -9``.
    """
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    extra = {"signal": name}
    if signum == signal.SIGKILL and oom_before is not None and oom_after is not None and oom_after > oom_before:
        return (f"killed by {name} (signal {signum}): out of memory -- the kernel's OOM killer ended it (the "
                "memory cgroup's oom_kill count rose while it ran); give it more memory or run fewer jobs at once "
                "(hydra.launcher.max_parallel / jobs_per_gpu)", "out of memory", extra)
    if signum == signal.SIGKILL:
        cause = ("kill -9 or the system; not this cgroup's OOM killer, whose oom_kill count did not change"
                 if oom_before is not None and oom_after is not None else "kill -9 or the kernel's OOM killer")
        return f"killed by {name} (signal {signum}) from outside the job: {cause}", name, extra
    return f"killed by {name} (signal {signum}) from outside the job", name, extra


def slurm_outcome(state: Optional[str]) -> Optional[Tuple[str, str, str]]:
    """(status, reason, error) for a SLURM job that ended in ``state`` (e.g. "OUT_OF_MEMORY", "CANCELLED by
    1000") from outside, or None for any other state (its own error, or a time limit, is recorded elsewhere)."""
    from embclf.liveness import SLURM_ENDINGS, SLURM_FROM_OUTSIDE  # the one SLURM state map

    word = (state or "").split(" ")[0].upper()
    if word not in SLURM_FROM_OUTSIDE:
        return None
    status, reason, what = SLURM_ENDINGS[word]
    return status, reason, f"SLURM state {state}: {what}"


def outcome_from_result(job: PlannedJob, get_result: Any, killed_by: Optional[int] = None,
                        slurm_state: Optional[str] = None) -> None:
    """Fill ``job.status``/``job.error``/``job.job_return`` from a submitit job's result.

    ``get_result`` is a zero-argument callable returning the worker's Hydra ``JobReturn`` or raising
    (submitit raises ``FailedJobError`` with the worker's traceback, ``UncompletedJobError`` when the
    worker died without a result).  Records failures in the run dir via :func:`record_failure`.
    ``killed_by``: the signal that ended the worker, when the launcher knows it; a worker that died from
    a signal without a result is recorded as status "killed" with the signal's name (and "out of memory"
    when the OOM killer did it, see :func:`killed_outcome`), not as a bare log tail.  ``slurm_state``:
    the SLURM job's final state (sacct), which names out of memory, cancelled, node failure and
    preemption (:func:`slurm_outcome`).
    """
    try:
        ret = get_result()
    except Exception as e:  # noqa: BLE001 -- a dead worker is one failed job, not a failed sweep
        job.job_return = failed_return(job)
        if killed_by:
            error, reason, extra = killed_outcome(killed_by, job.extra.get("oom_kills"), oom_kill_count())
            job.status, job.error = "killed", error
            record_failure(job, error, status="killed", reason=reason, extra=extra)
            return
        ending = slurm_outcome(slurm_state)
        if ending is not None:
            status, reason, error = ending
            job.status, job.error = status, error
            record_failure(job, error, status=status, reason=reason, extra={"slurm_state": slurm_state})
            return
        job.status = "failed"
        job.error = f"{type(e).__name__}: {_tail(str(e))}"
        record_failure(job, job.error)
        return
    job.job_return = ret
    if ret.status == JobStatus.COMPLETED:
        job.status = "completed"
    else:
        job.status = "failed"
        job.error = f"{type(ret._return_value).__name__}: {_one_line(str(ret._return_value))}"
        if getattr(ret._return_value, "in_use", False):
            return  # another process holds the run dir (embclf.locks): nothing there is ours to write
        # the core marked the stage failed already; this only adds a record where it could not
        record_failure(job, job.error)


def cpu_fallback(job: PlannedJob) -> bool:
    """Whether any of the job's run dirs records ``device_fallback``: it was given a GPU and ran on the CPU."""
    return any((_read_json(d / "summary.json") or {}).get("device_fallback") for d in stage_run_dirs(job))


def _tail(text: str, lines: int = 6) -> str:
    kept = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _fmt_seconds(s: Optional[float]) -> str:
    return "-" if s is None else f"{s:.1f}s"


def report(jobs: Sequence[PlannedJob], sweep_dir: Any, what: str, raise_on_failure: bool = True) -> None:
    """Log the end-of-sweep table (overrides, status, time, run dir) and raise if any job failed.

    A job that was given a GPU but ran on the CPU (``device_fallback`` in a run dir's summary.json,
    ``embclf.runtime.setup``) reads "<status> (CPU fallback)".

    Raises :class:`SweepJobsFailedError` naming every failed job's overrides and error, unless
    ``raise_on_failure`` is false: then the failures are logged as a warning and the caller returns every
    job's ``JobReturn`` (a failed one with status FAILED), which is how a sweeper that launches batches
    (Optuna) records a failed trial and goes on.
    """
    rows = [("#", "overrides", "status", "time", "run dir")]
    for job in jobs:
        label = job.label if len(job.label) <= 70 else job.label[:67] + "..."  # full: run dir's .hydra/
        status = job.status + (" (CPU fallback)" if cpu_fallback(job) else "")
        rows.append((str(job.idx), label, status, _fmt_seconds(job.seconds), str(job.run_dir)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    log.info("%s sweep finished (%s):\n%s", what, sweep_dir, "\n".join(lines))
    failed = [j for j in jobs if j.status in ("failed", "timeout", "killed", "cancelled", "interrupted")]
    if failed:
        names = "\n".join(f"  #{j.idx} {j.label}: {j.error}  (run dir: {j.run_dir})" for j in failed)
        if not raise_on_failure:
            log.warning("%d of %d jobs of this batch failed (the sweeper records them and goes on):\n%s",
                        len(failed), len(jobs), names)
            return
        raise SweepJobsFailedError(
            f"{len(failed)} of {len(jobs)} sweep jobs failed; the others completed. Failed jobs "
            f"(see embclf.log in each run dir, and the worker logs in {sweep_dir}/.submitit/):\n{names}\n"
            f"Re-run the same command with hydra.sweep.dir={sweep_dir} to retry only the unfinished jobs."
        )


def now() -> float:
    """Wall-clock seconds (``time.time``): a job's start and end in the end-of-sweep table."""
    return time.time()
