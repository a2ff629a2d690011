"""``hydra/launcher=local``: run a sweep's jobs as concurrent local processes, one per GPU slot.

Why not the launchers Hydra ships: ``basic`` runs jobs one after another, and ``submitit_local``
starts every job at once and gives each the *same* first ``gpus_per_node`` GPUs (submitit 1.5.4:
``range(n_gpus)``).  This launcher keeps a pool of slots -- ``len(gpus) * jobs_per_gpu`` with GPUs,
``max_parallel`` without -- starts one job per free slot and queues the rest.

How a job's process starts (``hydra.launcher.fork``):

* ``fork: true`` (the default, on Linux): the worker is a ``fork()`` of the launcher process
  (:class:`forked_job.ForkedJob`).  ``python -m embclf`` has already imported torch, torchvision, scikit-learn and
  the stages and composed the job's config before the first job starts; a fresh interpreter would
  do all of that again (measured: importing ``embclf.__main__`` is 3-8 s, tearing the interpreter
  down at exit another ~2 s, each paid on the job's critical path) -- that was almost all of a 1-job
  sweep's overhead over a plain run.  The forked worker still runs submitit's own job body
  (``submitit.core.submission.process_job``: the pickled launcher + overrides, submitit's signal
  handlers, requeue on USR2, logs and the result pickle in ``<sweep dir>/.submitit/<pid>/``) with the
  environment submitit's local controller would give it; the launcher plays the controller's part
  (time limit, requeue, stop).  It is used only where forking is safe: Linux, no other thread in the
  launcher, CUDA not initialised in the launcher (see :func:`forked_job.fork_unsafe_reason`).
* ``fork: false``, or where forking is unsafe: each job is one ``submitit.LocalExecutor`` submission
  (a controller process starting ``python -m submitit.core._submit``, a fresh interpreter).

Either way each job gets its slot's ``CUDA_VISIBLE_DEVICES`` and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``
and runs through hydra-submitit-launcher's ``__call__`` (Hydra's ``run_job``), exactly as it would on
SLURM.  Only the slot scheduling and the process start are ours.

Where things live: GPU discovery in ``gpus.py``, the slot pool (scheduling, polling, stopping workers) in
``slot_pool.py``, the forked worker in ``forked_job.py``; this file is the Hydra launcher that ties them
together and starts one job either way.
"""
import logging
import os
import shlex
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, setup_globals
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from . import forked_job, mps
from .forked_job import ForkedJob, fork_unsafe_reason
from .gpus import job_env
from .in_worker import announce_outcome, compose_and_run
from .outcomes import report
from .slot_pool import plan_slots, run_pool
from .sweep_lock import holding_sweep_dir
from .sweep_plan import PlannedJob, prepare_sweep, sweeper_handles_failures

log = logging.getLogger("embclf.launcher")


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


def _remove_template_dir(folder: str) -> None:
    """Remove the empty folder literally named ``%j`` that submitit's local controller makes (``fork:
    false``): it creates its folder argument before expanding the pattern (submitit 1.5.4,
    ``Controller.start_tasks``), while each job's files go to ``.submitit/<job id>/``.  Only an empty
    folder is removed; never raises."""
    if "%" not in folder:
        return
    try:
        os.rmdir(Path(folder).expanduser().absolute())
    except OSError:
        pass


class LocalPoolLauncher(BaseSubmititLauncher):
    """Hydra launcher running sweep jobs concurrently on this machine, one job per slot.

    Parameters come from :class:`hydra_plugins.embclf_launcher.config.LocalLauncherConf`.
    ``launch`` raises ``SweepConfigError`` (before starting anything) when a job's config does not
    compose, ``ValueError`` for invalid launcher settings, and ``SweepJobsFailedError`` after all jobs
    ended when any job failed; ``KeyboardInterrupt`` stops the running jobs and is re-raised.
    """

    _EXECUTOR = "local"
    _job_env: Dict[str, str] = {}  # what every job's environment adds (gpus.job_env), set in _launch

    def slots(self, n_jobs: int) -> Tuple[List[Optional[int]], int]:
        """The slots (a GPU id each, or None for a CPU slot) and the OMP/MKL threads per job
        (``slot_pool.plan_slots``); raises ``ValueError`` naming the key of an invalid setting."""
        return plan_slots(self.params, n_jobs)

    def __call__(
        self,
        sweep_overrides: List[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: Dict[type, Singleton],
    ) -> JobReturn:
        """Run one job inside its worker: hydra-submitit-launcher's ``__call__`` (compose the job's
        config from the master config and the overrides, set ``hydra.job.id``, Hydra's ``run_job``).

        In a forked worker the launcher composed (and checked) this very config in ``plan_jobs``
        before forking; use that instead of composing it again on the job's critical path.  The
        config is the same: same master config (resolver caches included), same overrides.  Any
        other call (a fresh-interpreter worker, a mismatch) composes as the base class does.

        The fork also already holds Hydra's ``Plugins`` singleton, which ``Singleton.get_state``
        leaves out of the pickled state: keep it, or ``set_state`` would scan and execute every
        plugin module again -- time, and new copies of the plugins' config classes, which the
        launcher's config does not use, so cloudpickle would pickle the job's result with those
        classes by value, searching all of ``sys.modules`` for each of their methods (~0.3 s).
        """
        plan = forked_job._FORKED_PLAN  # set in a forked worker only
        if plan is None or plan[0] != job_num or plan[1] != tuple(sweep_overrides):
            # as the base class, but holding the job's run dir (embclf.locks) from before Hydra writes there
            return announce_outcome(compose_and_run(self, sweep_overrides, job_dir_key, job_num, singleton_state))
        from hydra.core.plugins import Plugins

        assert self.hydra_context is not None and self.task_function is not None
        plugins = Singleton._instances.get(Plugins)
        if plugins is not None:
            singleton_state = {**singleton_state, "instances": {**singleton_state["instances"], Plugins: plugins}}
        Singleton.set_state(singleton_state)
        setup_globals()
        return announce_outcome(compose_and_run(self, sweep_overrides, job_dir_key, job_num, singleton_state,
                                                sweep_config=plan[2]))

    def _submit(self, job: PlannedJob, gpu: Optional[int], threads: int) -> Any:
        """Start one job: a forked worker where allowed (see the module docstring), else submitit's."""
        if self.params.get("fork", True) and fork_unsafe_reason() is None:
            return self._fork(job, gpu, threads)
        import submitit  # lazy: keeps plugin discovery fast

        executor = submitit.LocalExecutor(
            folder=self.params["submitit_folder"], max_num_timeout=int(self.params.get("max_num_timeout", 3)),
            # the task runs under a wrapper that records how it ended (submitit's controller discards
            # the task's exit status, so a kill -9 would read as a plain failure): see exit_status.py
            python=f"{shlex.quote(sys.executable)} -m hydra_plugins.embclf_launcher.exit_status",
        )
        executor.update_parameters(
            timeout_min=self.params["timeout_min"],
            signal_delay_s=self.signal_delay_s(),
            # gpus_per_node=0 makes submitit set CUDA_VISIBLE_DEVICES="" (no GPU) for CPU jobs (and for a
            # GPU-/MIG- name, which exit_status.py then sets: submitit takes integer ids only)
            gpus_per_node=1 if isinstance(gpu, int) else 0,
            visible_gpus=(gpu,) if isinstance(gpu, int) else (),
            stderr_to_stdout=False,
        )
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **self._job_env}
        if isinstance(gpu, str):
            env["EMBCLF_CUDA_VISIBLE_DEVICES"] = gpu
        with _environ(env):
            return executor.submit(
                self, job.overrides, "hydra.sweep.dir", job.idx, f"job_id_for_{job.idx}", Singleton.get_state()
            )

    def _fork(self, job: PlannedJob, gpu: Optional[int], threads: int) -> ForkedJob:
        """Start one job in a worker forked from this process (:class:`ForkedJob`).

        The submission is pickled here as submitit's ``LocalExecutor.submit`` pickles it (same
        ``DelayedSubmission``, time limit and requeue count), so the worker's ``process_job``, a
        requeue's ``checkpoint()`` and anyone reading ``.submitit/`` see what they would with submitit.
        """
        from submitit.core.utils import DelayedSubmission, JobPaths

        folder = str(Path(str(self.params["submitit_folder"])).expanduser().absolute())
        timeout_min = float(self.params["timeout_min"])
        signal_delay_s = self.signal_delay_s()
        delayed = DelayedSubmission(
            self, job.overrides, "hydra.sweep.dir", job.idx, f"job_id_for_{job.idx}", Singleton.get_state()
        )
        delayed.set_timeout(timeout_min, int(self.params.get("max_num_timeout", 3)))  # type: ignore[arg-type]
        tmp = JobPaths.get_first_id_independent_folder(folder) / f"{uuid.uuid4().hex}.pkl"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        delayed.dump(tmp)
        # what submitit's start_controller and Controller.start_tasks put in a local task's environment
        # (SUBMITIT_LOCAL_JOB_ID, the pid, is added in the child)
        env = {
            "SUBMITIT_EXECUTOR": "local",
            "SUBMITIT_LOCAL_NTASKS": "1",
            "SUBMITIT_LOCAL_TIMEOUT_S": str(int(60 * timeout_min)),
            "SUBMITIT_LOCAL_SIGNAL_DELAY_S": str(signal_delay_s),
            "SUBMITIT_LOCAL_NODEID": "0",
            "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
            "SUBMITIT_LOCAL_LOCALID": "0",
            "SUBMITIT_LOCAL_GLOBALID": "0",
            "SUBMITIT_STDERR_TO_STDOUT": "",
            "SUBMITIT_LOCAL_WITH_SHELL": "",
            "CUDA_VISIBLE_DEVICES": "" if gpu is None else str(gpu),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            **self._job_env,  # compile workers per job, CUDA_DEVICE_ORDER (gpus.job_env)
        }
        return ForkedJob(folder, tmp, env, threads, timeout_s=60 * timeout_min, signal_delay_s=signal_delay_s,
                         plan=(job.idx, tuple(job.overrides), job.cfg),
                         max_num_timeout=int(self.params.get("max_num_timeout", 3)))

    def signal_delay_s(self) -> int:
        """``signal_delay_s``, at most a quarter of ``timeout_min`` (a short limit is not signalled at once)."""
        limit_s = 60 * float(self.params["timeout_min"])
        return int(max(1, min(int(self.params["signal_delay_s"]), limit_s / 4)))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Run every job of the batch, at most one per slot at a time; see the class docstring."""
        assert self.config is not None
        with holding_sweep_dir(self.config):  # one launcher per sweep dir (embclf.locks)
            return self._launch(job_overrides, initial_job_idx)

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        jobs, todo, sweep_dir = prepare_sweep(self, job_overrides, initial_job_idx)
        slots, threads = self.slots(len(todo))
        self._job_env = job_env(concurrent=min(len(slots), len(todo)))
        gpus = sorted({g for g in slots if g is not None})
        mode = f"GPUs {gpus}, {len(slots) // len(gpus)} job(s) per GPU" if gpus else "CPU"
        if not self.params.get("fork", True):
            start = "fresh python per job (hydra.launcher.fork=false)"
        else:
            unsafe = fork_unsafe_reason()
            start = "forked from the launcher" if unsafe is None else f"fresh python per job ({unsafe})"
        log.info(
            "local launcher: %d jobs (%d skipped), %d slots (%s), %d thread(s) per job, workers %s, sweep dir %s",
            len(jobs), len(jobs) - len(todo), len(slots), mode, threads, start, sweep_dir,
        )
        # MPS (hydra.launcher.mps, mps.py): a per-sweep daemon lives as long as the pool, whatever ends it
        with mps.serving(self.params.get("mps", "auto"), gpus, int(self.params.get("jobs_per_gpu", 1)), sweep_dir):
            self._run_pool(todo, slots, threads)
        report(jobs, sweep_dir, "local", raise_on_failure=not sweeper_handles_failures(self.config))
        return [job.job_return for job in jobs]  # type: ignore[misc]

    def _run_pool(self, todo: List[PlannedJob], slots: List[Optional[int]], threads: int) -> None:
        sweep_dir = self.config.hydra.sweep.dir if self.config is not None else "<sweep dir>"
        try:
            run_pool(todo, slots, threads, self._submit, self.params, sweep_dir)
        finally:
            _remove_template_dir(str(self.params["submitit_folder"]))
