"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher, made safe for whole sweeps.

Differences from ``hydra/launcher=submitit_slurm`` (1.2.0), which collects results with
``[j.results()[0] for j in jobs]`` and so raises on the first failed job and hides the rest:

* every job's config is composed and checked *before* anything is submitted (one bad override must
  not cost a queue wait and then fail);
* jobs whose run dir already holds a completed run are not submitted again, so re-invoking a sweep
  into its sweep dir (``hydra.sweep.dir=<dir>``) finishes only what is unfinished;
* every job's result is collected; failures (exception, non-zero exit, killed by SLURM) are recorded
  in the run dir, and at the end a table lists every job and the error names *all* failed jobs;
* defaults for this workload (see ``config.SlurmLauncherConf``): 1 GPU per job, requeue on time
  limit or preemption (``max_num_timeout`` > 0, ``signal_delay_s``), submitit folder in the sweep dir.

Requeue path: SLURM sends USR2 ``signal_delay_s`` before the time limit (or on preemption); the core's
training loop saves ``checkpoints/last.pt`` and chains to submitit's handler, which calls
``checkpoint()`` (inherited: resubmit the same job with the same arguments) and requeues; the
requeued job runs the same overrides in the same run dir and resumes from ``last.pt``.
"""

import logging
import time
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from .in_worker import announce_outcome, compose_and_run
from .outcomes import mark_timeout, now, outcome_from_result, report, timed_out
from .sweep_lock import beat, holding_sweep_dir
from .sweep_plan import PlannedJob, prepare_sweep, sweeper_handles_failures

log = logging.getLogger("embclf.launcher")


class EmbclfSlurmLauncher(SlurmLauncher):
    """SLURM launcher that validates the whole sweep first and reports every job's outcome.

    ``launch`` raises ``SweepConfigError`` before submitting anything when a job's config does not
    compose, submitit's/sbatch's errors when submission itself fails (e.g. an unknown partition), and
    ``SweepJobsFailedError`` naming all failed jobs once every job has ended.
    """

    # seconds between looks at the jobs (their result files, and the array's state as last read from sacct)
    poll_interval_s: float = 2.0
    # seconds between sacct reads of the array's state (one call for every job). submitit alone re-reads it
    # after half the jobs' age, up to every 10 min: a job that ends without a result (scancel, a node failure,
    # an out-of-memory kill) could be noticed minutes late. Measured here, an scancel 12 s into a job: recorded
    # 24 s later before this read, 20 s with it, of which 15 s are submitit's wait for a result file
    state_check_s: float = 10.0

    def __call__(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: Dict[type, Singleton]) -> JobReturn:
        """Run one job in its SLURM worker (the base class's ``__call__``, holding the job's run dir from before
        Hydra writes there: ``compose_and_run``), saying in the worker log when it failed."""
        return announce_outcome(compose_and_run(self, sweep_overrides, job_dir_key, job_num, singleton_state))

    def _executor(self) -> Any:
        """The submitit executor, built from the launcher parameters as the base class does."""
        import submitit  # lazy: keeps plugin discovery fast

        params = dict(self.params)
        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=params["submitit_folder"],
            slurm_max_num_timeout=params["max_num_timeout"],
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items() if k not in init_keys}
        )
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Validate, submit the unfinished jobs as one array, wait for all, report; see the class."""
        assert self.config is not None
        # the sweep dir is held while this launcher plans, submits and waits; a job that runs on after the
        # launcher ended (its login session closed) is guarded by the lock of its own run dir
        with holding_sweep_dir(self.config):
            return self._launch(job_overrides, initial_job_idx)

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        jobs, todo, sweep_dir = prepare_sweep(self, job_overrides, initial_job_idx)
        if todo:
            executor = self._executor()
            state = Singleton.get_state()
            args = [(job.overrides, "hydra.sweep.dir", job.idx, f"job_id_for_{job.idx}", state) for job in todo]
            submitted = executor.map_array(self, *zip(*args))
            for job, sj in zip(todo, submitted):
                job.extra["slurm_job"] = sj
                job.start = now()
                job.status = "submitted"
                log.info("submitted #%d %s as SLURM job %s -> %s", job.idx, job.label, sj.job_id, job.run_dir)
            log.info(
                "watch with: squeue -j %s ; sacct -j %s ; logs: %s/.submitit/",
                submitted[0].job_id.split("_")[0], submitted[0].job_id.split("_")[0], sweep_dir,
            )
            self._wait(todo)
        report(jobs, sweep_dir, "slurm", raise_on_failure=not sweeper_handles_failures(self.config))
        return [job.job_return for job in jobs]  # type: ignore[misc]

    def _wait(self, todo: List[PlannedJob]) -> None:
        """Wait for every submitted job, logging each start and end; never stops at a failure."""
        remaining: Dict[int, PlannedJob] = {job.idx: job for job in todo}
        checked = time.monotonic()
        while remaining:
            ended = []
            if time.monotonic() - checked >= self.state_check_s:
                # one sacct call refreshes submitit's record of every job (its watcher, shared by all of them);
                # done() and state below read that record
                next(iter(remaining.values())).extra["slurm_job"].watcher.update()
                checked = time.monotonic()
            for idx, job in remaining.items():
                sj = job.extra["slurm_job"]
                if sj.done():
                    ended.append(idx)
                    continue
                if not job.extra.get("started") and sj.state in ("RUNNING", "COMPLETING"):
                    job.extra["started"] = True
                    job.status = "running"
                    log.info("start #%d %s | SLURM job %s running", job.idx, job.label, sj.job_id)
            for idx in ended:
                job = remaining.pop(idx)
                sj = job.extra["slurm_job"]
                job.end = now()
                outcome_from_result(job, lambda sj=sj: sj.results()[0], slurm_state=_final_state(sj))
                job.device = f"SLURM job {sj.job_id}"
                if job.status == "failed" and timed_out(job.error, sj.state):
                    mark_timeout(job, float(self.params["timeout_min"]), int(self.params["max_num_timeout"]))
                log.info(
                    "end   #%d %s | %s | %s after %.1fs%s", job.idx, job.label, job.device, job.status,
                    job.seconds, f": {job.error}" if job.error else "",
                )
            if remaining and not ended:
                beat()  # the sweep dir's lock
                time.sleep(self.poll_interval_s)


def _final_state(sj: Any) -> Optional[str]:
    """The ended job's SLURM state as sacct reports it (via submitit's watcher), or None if unknown."""
    try:
        return str(sj.state)
    except Exception:  # noqa: BLE001 -- no sacct here: the job's own record stands
        return None
