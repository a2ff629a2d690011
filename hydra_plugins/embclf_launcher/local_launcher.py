"""``hydra/launcher=local``: run a sweep's jobs as concurrent local processes, one per GPU slot.

Why not the launchers Hydra ships: ``basic`` runs jobs one after another, and ``submitit_local``
starts every job at once and gives each the *same* first ``gpus_per_node`` GPUs (submitit 1.5.4:
``range(n_gpus)``).  This launcher keeps a pool of slots -- ``len(gpus) * jobs_per_gpu`` with GPUs,
``max_parallel`` without -- starts one job per free slot and queues the rest.

The process part is submitit's: each job is one ``submitit.LocalExecutor`` submission (pickled
launcher + overrides, a controller process, logs and the result pickle in
``<sweep dir>/.submitit/<pid>/``), with ``visible_gpus=[gpu]`` so submitit sets that job's
``CUDA_VISIBLE_DEVICES``.  Only the slot scheduling is ours.  Inside the worker the job runs through
hydra-submitit-launcher's ``__call__`` (Hydra's ``run_job``), exactly as it would on SLURM.
"""

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from ._common import (
    PlannedJob,
    now,
    outcome_from_result,
    prepare_sweep,
    record_failure,
    report,
)

log = logging.getLogger("embclf.launcher")


def usable_cores() -> int:
    """CPU cores this process may run on (affinity/cpuset aware, unlike os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def visible_gpu_ids() -> List[int]:
    """GPU ids this process may hand out: the parent's ``CUDA_VISIBLE_DEVICES`` when it is set
    (so a launcher started on GPUs 2,3 hands out 2 and 3, not 0 and 1), else every device
    ``torch.cuda.device_count()`` sees.  An empty ``CUDA_VISIBLE_DEVICES`` means no GPU.

    Raises ``ValueError`` when ``CUDA_VISIBLE_DEVICES`` holds non-integer ids (UUIDs, MIG names):
    submitit hands out integer ids only, so the user must list them in ``hydra.launcher.gpus``.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids: List[int] = []
        for item in (x.strip() for x in env.split(",")):
            if not item:
                continue
            try:
                value = int(item)
            except ValueError:
                raise ValueError(
                    f"CUDA_VISIBLE_DEVICES={env!r} holds a GPU id that is not an integer ({item!r}), "
                    "so the local launcher cannot split it into one GPU per job. Set "
                    "hydra.launcher.gpus=[0,1,...] to the integer ids to use, or unset "
                    "CUDA_VISIBLE_DEVICES."
                ) from None
            if value < 0:  # CUDA stops at the first invalid (negative) id
                break
            ids.append(value)
        return ids
    import torch  # only here: plugin discovery must not pay for importing torch

    return list(range(torch.cuda.device_count()))


@contextmanager
def _environ(values: Dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block (single-threaded launcher only).

    submitit's ``start_controller`` copies ``os.environ`` into the worker's environment, so this is
    how the per-job thread counts reach the worker.  (submitit's ``setup`` option would prepend
    ``export`` lines run through ``/bin/sh``; a shell that execs its last command would then make the
    worker's pid differ from the pid submitit names the job folder after.)
    """
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _children(pid: int) -> List[int]:
    """Direct child pids of ``pid`` (Linux /proc; empty where unavailable)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _stop_workers(jobs: List[Any], grace_s: float = 3.0) -> None:
    """Stop submitit local jobs: each controller process and the task process under it.

    SIGTERM to the tasks first (the core's training loop saves ``last.pt`` on it, so a re-invoked
    sweep resumes), SIGINT to the controllers (submitit's own cancel), then SIGKILL for whatever is
    left after ``grace_s``: the controller forwards/ignores SIGTERM, and processes started from a
    non-interactive shell in the background inherit SIGINT as ignored, so the polite signals alone
    can leave orphans.  All jobs are signalled before waiting, so stopping N jobs takes one grace
    period.  Never raises.
    """
    procs = []  # (submitit job, controller pid, task pids)
    for sj in jobs:
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
        for pid in tasks + ([] if sj.done() else [ctrl]):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            sj._process.wait(timeout=grace_s)  # reap the controller (no zombie left behind)
        except Exception:  # noqa: BLE001
            pass


class LocalPoolLauncher(BaseSubmititLauncher):
    """Hydra launcher running sweep jobs concurrently on this machine, one job per slot.

    Parameters come from :class:`hydra_plugins.embclf_launcher.config.LocalLauncherConf`.
    ``launch`` raises ``SweepConfigError`` (before starting anything) when a job's config does not
    compose, ``ValueError`` for invalid launcher settings, and ``SweepJobsFailedError`` after all jobs
    ended when any job failed; ``KeyboardInterrupt`` stops the running jobs and is re-raised.
    """

    _EXECUTOR = "local"

    def slots(self, n_jobs: int) -> Tuple[List[Optional[int]], int]:
        """The slots (a GPU id each, or None for a CPU slot) and the OMP/MKL threads per job.

        Raises ``ValueError`` naming the key when ``gpus``, ``jobs_per_gpu``, ``max_parallel`` or
        ``threads_per_job`` is invalid.
        """
        p = self.params
        gpus = p.get("gpus")
        if gpus is None:
            gpus = visible_gpu_ids()
        gpus = list(gpus)
        if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus):
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
        cores = usable_cores()
        slots: List[Optional[int]]
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

    def _submit(self, job: PlannedJob, gpu: Optional[int], threads: int) -> Any:
        import submitit  # lazy: keeps plugin discovery fast

        executor = submitit.LocalExecutor(
            folder=self.params["submitit_folder"], max_num_timeout=int(self.params.get("max_num_timeout", 3))
        )
        executor.update_parameters(
            timeout_min=self.params["timeout_min"],
            signal_delay_s=self.params["signal_delay_s"],
            # gpus_per_node=0 makes submitit set CUDA_VISIBLE_DEVICES="" (no GPU) for CPU jobs
            gpus_per_node=0 if gpu is None else 1,
            visible_gpus=() if gpu is None else (gpu,),
            stderr_to_stdout=False,
        )
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with _environ(env):
            return executor.submit(
                self, job.overrides, "hydra.sweep.dir", job.idx, f"job_id_for_{job.idx}", Singleton.get_state()
            )

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Run every job of the batch, at most one per slot at a time; see the class docstring."""
        assert self.config is not None
        jobs, todo, sweep_dir = prepare_sweep(self, job_overrides, initial_job_idx)
        slots, threads = self.slots(len(todo))
        gpus = sorted({g for g in slots if g is not None})
        mode = f"GPUs {gpus}, {len(slots) // len(gpus)} job(s) per GPU" if gpus else "CPU"
        log.info(
            "local launcher: %d jobs (%d skipped), %d slots (%s), %d thread(s) per job, sweep dir %s",
            len(jobs), len(jobs) - len(todo), len(slots), mode, threads, sweep_dir,
        )
        self._run_pool(todo, slots, threads)
        report(jobs, sweep_dir, "local")
        return [job.job_return for job in jobs]  # type: ignore[misc]

    def _run_pool(self, todo: List[PlannedJob], slots: List[Optional[int]], threads: int) -> None:
        pending = list(todo)
        free = list(range(len(slots)))
        running: Dict[int, Tuple[PlannedJob, Any]] = {}  # slot index -> (job, submitit job)
        poll = float(self.params.get("poll_interval_s", 0.25))
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
                    log.info("start #%d %s | %s | %s", job.idx, job.label, job.device, job.run_dir)
                    running[slot] = (job, self._submit(job, gpu, threads))
                finished = [slot for slot, (_, sj) in running.items() if sj.done()]
                for slot in finished:
                    job, sj = running.pop(slot)
                    job.end = now()
                    outcome_from_result(job, sj.result)
                    free.append(slot)
                    log.info(
                        "end   #%d %s | %s | %s in %.1fs%s", job.idx, job.label, job.device, job.status,
                        job.seconds, f": {job.error}" if job.error else "",
                    )
                if not finished:
                    time.sleep(poll)
        except BaseException as e:
            # Ctrl-C, SIGTERM or a launcher bug: do not leave workers running behind the user's back.
            for job, _ in running.values():
                log.warning("stopping #%d %s", job.idx, job.label)
            _stop_workers([sj for _, sj in running.values()])
            for job, _ in running.values():
                job.end, job.status = now(), "failed"
                job.error = f"interrupted: the launcher stopped ({type(e).__name__}: {e})"
                record_failure(job, job.error)
            raise
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
