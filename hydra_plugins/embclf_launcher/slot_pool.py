"""The local launcher's slot pool: one job per slot (a GPU id, or a CPU slot), the rest queued.

:func:`plan_slots` turns ``hydra.launcher`` settings into slots and a thread count per job; :func:`run_pool`
starts a job on each free slot, polls the running ones, records each outcome (``outcomes.py``) and, on
Ctrl-C or SIGTERM, stops every worker (:func:`stop_workers`) and records them "interrupted".
"""
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .exit_status import read_exit_status
from .forked_job import ForkedJob
from .gpus import GpuId, check_compute_modes, usable_cores, visible_gpu_ids
from .outcomes import mark_timeout, now, oom_kill_count, outcome_from_result, record_failure, timed_out
from .sweep_lock import beat
from .sweep_plan import PlannedJob, SweepInterruptedError

log = logging.getLogger("embclf.launcher")


def plan_slots(p: Mapping[str, Any], n_jobs: int,
               mps_active: Optional[bool] = None) -> Tuple[List[Optional[GpuId]], int]:
    """The slots (a GPU id each -- an index, or a GPU-/MIG- name from ``CUDA_VISIBLE_DEVICES`` -- or None for a
    CPU slot) and the OMP/MKL threads per job, from the launcher's parameters ``p`` (``hydra.launcher``: gpus,
    jobs_per_gpu, max_parallel, threads_per_job) for ``n_jobs`` jobs.

    Raises ``ValueError`` naming the key when ``gpus``, ``jobs_per_gpu``, ``max_parallel`` or
    ``threads_per_job`` is invalid, and when a GPU's compute mode forbids the planned jobs
    (``gpus.check_compute_modes``: Prohibited, or Exclusive_Process with jobs_per_gpu > 1 and no MPS;
    ``mps_active`` None: detect a running MPS control daemon, True: the caller started one for the sweep).
    """
    given = p.get("gpus")
    gpus = list(visible_gpu_ids() if given is None else given)
    if given is not None and not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus):
        raise ValueError(
            f"hydra.launcher.gpus={gpus} must be a list of GPU ids (integers >= 0) such as [0,1], "
            "[] for CPU only, or null for every visible GPU."
        )
    if len(set(gpus)) != len(gpus):
        raise ValueError(
            f"hydra.launcher.gpus={gpus} lists a GPU twice; to run several jobs per GPU set "
            "hydra.launcher.jobs_per_gpu instead."
        )
    per_gpu = int(p.get("jobs_per_gpu") or 0)
    if per_gpu < 1:
        raise ValueError(f"hydra.launcher.jobs_per_gpu={p.get('jobs_per_gpu')} must be >= 1.")
    if mps_active is None and gpus:
        # MPS serves the jobs when a daemon runs already or hydra.launcher.mps=on will start one (mps.py)
        from . import mps
        mps_active = mps.planned(str(p.get("mps", "auto")), gpus, per_gpu) in ("present", "start") \
            or mps.mps_active()
    check_compute_modes(gpus, per_gpu, mps_active)
    cores = usable_cores()
    slots: List[Optional[GpuId]]
    if gpus:
        # GPU-major order, so the first len(gpus) jobs land on distinct GPUs before any is shared
        slots = [g for _ in range(per_gpu) for g in gpus]
    else:
        max_parallel = p.get("max_parallel")
        if max_parallel is not None and int(max_parallel) < 1:
            raise ValueError(f"hydra.launcher.max_parallel={max_parallel} must be >= 1 (or null = cores).")
        n = int(max_parallel) if max_parallel is not None else cores
        slots = [None] * max(1, min(n, n_jobs))
    concurrent = max(1, min(len(slots), n_jobs))
    threads = p.get("threads_per_job")
    if threads is None:
        threads = max(1, cores // concurrent)
    elif int(threads) < 1:
        raise ValueError(f"hydra.launcher.threads_per_job={threads} must be >= 1 (or null = auto).")
    return slots, int(threads)


def run_pool(todo: List[PlannedJob], slots: List[Optional[GpuId]], threads: int, submit: Callable[..., Any],
             params: Mapping[str, Any], sweep_dir: Any) -> None:
    """Run ``todo``, at most one job per slot at a time, until every job ended; fills each job's status.

    ``submit(job, gpu, threads)`` starts one job and returns a ``ForkedJob`` or a ``submitit.LocalJob``;
    ``params`` are the launcher's (poll_interval_s, timeout_min, max_num_timeout). Ctrl-C or SIGTERM stops
    the running workers, records them "interrupted" and raises :class:`SweepInterruptedError`; any other
    exception stops them as well and is re-raised.
    """
    pending = list(todo)
    free = list(range(len(slots)))
    running: Dict[int, Tuple[PlannedJob, Any]] = {}  # slot index -> (job, submitit job)
    poll = float(params.get("poll_interval_s", 0.1))
    old_term = None
    if threading.current_thread() is threading.main_thread():
        # `kill <launcher>` (or a batch system stopping it) must stop the workers too, not orphan
        # them: treat SIGTERM like Ctrl-C for the duration of the pool.
        def _on_term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"launcher received signal {signum}")

        old_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        while pending or running:
            while pending and free:
                # the free slot on the least busy GPU (jobs_per_gpu > 1: fill GPUs evenly)
                busy = [slots[s] for s in running]
                slot = min(free, key=lambda s: (busy.count(slots[s]) if slots[s] is not None else 0, s))
                free.remove(slot)
                job = pending.pop(0)
                gpu = slots[slot]
                job.device = (
                    f"cpu, {threads} thread(s)"
                    if gpu is None
                    else f"GPU {gpu} (CUDA_VISIBLE_DEVICES={gpu}), {threads} thread(s)"
                )
                job.status, job.start = "running", now()
                job.extra["oom_kills"] = oom_kill_count()  # to tell an OOM kill from a kill -9 at the end
                log.info("start #%d %s | %s | %s", job.idx, job.label, job.device, job.run_dir)
                running[slot] = (job, submit(job, gpu, threads))
            finished = [slot for slot, (_, sj) in running.items() if sj.done()]
            for slot in finished:
                job, sj = running.pop(slot)
                job.end = now()
                if not isinstance(sj, ForkedJob) and read_exit_status(str(sj.paths.folder), str(sj.job_id)) is not None:
                    # a fork=false task whose process has ended (exit_status.py records that after it): its result
                    # file, on this machine's own disk, is there or never will be. submitit would wait 15 s for
                    # one (its allowance for a slow shared file system) before reporting a killed task.
                    sj._results_timeout_s = 0
                outcome_from_result(job, sj.result, killed_by=_killed_by(sj))
                if job.status == "failed" and _timed_out(sj, job.error):
                    mark_timeout(job, float(params["timeout_min"]),
                                 int(params.get("max_num_timeout", 3)), getattr(sj, "timeouts", None))
                free.append(slot)
                log.info(
                    "end   #%d %s | %s | %s in %.1fs%s", job.idx, job.label, job.device, job.status,
                    job.seconds, f": {job.error}" if job.error else "",
                )
            if not finished:
                beat()  # the sweep dir's lock (no heartbeat thread here: workers are forked)
                time.sleep(poll)
    except BaseException as e:
        # Ctrl-C, SIGTERM or a launcher bug: do not leave workers running behind the user's back.
        for job, _ in running.values():
            log.warning("stopping #%d %s", job.idx, job.label)
        stop_workers([sj for _, sj in running.values()])
        why = "Ctrl-C" if isinstance(e, KeyboardInterrupt) and not str(e) else f"{type(e).__name__}: {e}"
        for job, _ in running.values():
            job.end, job.status = now(), "interrupted"
            job.error = f"interrupted: the launcher stopped ({why}); it resumes from last.pt when re-run"
            record_failure(job, job.error, status="interrupted")
        if not isinstance(e, KeyboardInterrupt):
            raise
        # one message, not a traceback per frame: the user asked for this
        raise SweepInterruptedError(
            f"sweep interrupted ({why}): stopped {len(running)} running job(s) (recorded \"interrupted\"), "
            f"{len(pending)} not started. Re-run the same command with hydra.sweep.dir={sweep_dir} to resume "
            "them; completed jobs are skipped.") from None
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _children(pid: int) -> List[int]:
    """Direct child pids of ``pid`` (Linux /proc; empty where unavailable)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []



def _timed_out(sj: Any, error: Optional[str]) -> bool:
    """Whether a failed job ended because of its time limit (forked: it reached the limit; submitit's own
    local job: its worker said so when it stopped requeuing)."""
    if isinstance(sj, ForkedJob):
        return sj.timeouts > 0
    return timed_out(error)


def stop_workers(jobs: List[Any], grace_s: float = 3.0) -> None:
    """Stop local jobs: submitit ones (each controller process and the task process under it) and
    forked ones (:class:`ForkedJob`, the worker itself).

    SIGTERM to the tasks first (the core's training loop saves ``last.pt`` on it, so a re-invoked
    sweep resumes), SIGINT to the controllers (submitit's own cancel) or forked workers, then SIGKILL
    for whatever is left after ``grace_s``: the controller forwards/ignores SIGTERM, submitit's job
    body ignores SIGTERM, and processes started from a non-interactive shell in the background
    inherit SIGINT as ignored, so the polite signals alone can leave orphans.  All jobs are signalled
    before waiting, so stopping N jobs takes one grace period.  Never raises.
    """
    procs = []  # (job, controller pid or None for a forked worker, task pids)
    for sj in jobs:
        if isinstance(sj, ForkedJob):
            procs.append((sj, None, [] if sj.exit_code is not None else [sj.pid]))
            continue
        try:
            ctrl = int(sj.job_id)  # submitit names a local job after its controller's pid
        except (TypeError, ValueError):
            continue
        procs.append((sj, ctrl, _children(ctrl)))
    for sj, _, tasks in procs:
        for pid in tasks:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        try:
            sj.cancel(check=False)
        except Exception:  # noqa: BLE001
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and not all(sj.done() for sj, _, _ in procs):
        time.sleep(0.1)
    for sj, ctrl, tasks in procs:
        if ctrl is None:
            sj.kill()  # SIGKILL if still running, and reap
            continue
        for pid in tasks + ([] if sj.done() else [ctrl]):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            sj._process.wait(timeout=grace_s)  # reap the controller (no zombie left behind)
        except Exception:  # noqa: BLE001
            pass



def _killed_by(sj: Any) -> Optional[int]:
    """The signal that ended a worker from outside (``kill -9``, the OOM killer), or None: it exited, or
    the launcher itself stopped it (time limit, Ctrl-C).  A forked worker's status comes from waitpid; a
    submitit task's (``fork: false``) from the record :mod:`.exit_status` wrote beside its result."""
    if not isinstance(sj, ForkedJob):
        code = read_exit_status(str(sj.paths.folder), str(sj.job_id))  # None: no record, a plain failure
        return -code if code is not None and code < 0 else None
    if sj.exit_code is None or sj.exit_code >= 0:
        return None
    if sj.stopping or getattr(sj, "interrupted_at", None) is not None:
        return None
    return -sj.exit_code
