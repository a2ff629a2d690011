"""What runs inside a sweep job's worker process (forked, a fresh submitit interpreter, or a SLURM job):
compose its config, hold its run dir and run Hydra's ``run_job``; then say in the worker log how it ended.
"""

import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from .sweep_plan import _one_line


def compose_and_run(launcher: Any, sweep_overrides: Sequence[str], job_dir_key: str, job_num: int,
                    singleton_state: Any, sweep_config: Optional[DictConfig] = None) -> JobReturn:
    """In a worker: run one sweep job as hydra-submitit-launcher's ``__call__`` does (compose its config unless
    ``sweep_config`` is given, set ``hydra.job.id``/``num``, Hydra's ``run_job``), holding the job's run dir.

    The run dir is taken (``embclf.locks``) before ``run_job`` writes Hydra's record (``.hydra.new``) and opens
    the job's log there, so a job whose run dir another live process holds changes nothing in it: it returns a
    failed ``JobReturn`` whose error (``InUseError``, ``in_use`` true) names the holder, and the launcher records
    nothing in that run dir.
    """
    import submitit  # lazy: keeps plugin discovery fast

    if sweep_config is None:
        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(sweep_overrides))
    # plan_jobs made ``hydra`` read-only (HydraConfig.set_config); run_job expects that anyway
    with read_write(sweep_config.hydra.job), open_dict(sweep_config.hydra.job):
        sweep_config.hydra.job.id = submitit.JobEnvironment().job_id
        sweep_config.hydra.job.num = job_num

    def run() -> JobReturn:
        return run_job(hydra_context=launcher.hydra_context, task_function=launcher.task_function,
                       config=sweep_config, job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")

    try:
        from embclf import locks
    except ImportError:
        return run()
    saved = HydraConfig.instance().cfg
    try:  # the job dir exactly as run_job computes it
        HydraConfig.instance().set_config(sweep_config)
        run_dir = Path(str(OmegaConf.select(sweep_config, job_dir_key))) / str(
            OmegaConf.select(sweep_config, "hydra.sweep.subdir"))
    finally:
        HydraConfig.instance().cfg = saved
    try:
        lock = locks.acquire(os.path.abspath(run_dir))
    except locks.InUseError as e:
        ret = JobReturn(overrides=list(sweep_overrides), cfg=sweep_config, status=JobStatus.FAILED)
        ret.return_value = e
        return ret
    try:
        return run()
    finally:
        lock.release()


def announce_outcome(ret: JobReturn) -> JobReturn:
    """In the worker, before handing the job's result to submitit: say in the worker log that the job failed.

    Hydra catches the task's exception and returns it inside the ``JobReturn``, so submitit, which only
    sees a returned value, ends every worker log with "Job completed successfully".
    """
    if ret.status == JobStatus.FAILED:
        err = ret._return_value
        print(f"[embclf] the job FAILED: {type(err).__name__}: {_one_line(str(err))} (submitit's "
              "'completed successfully' below only means the worker returned this result)", file=sys.stderr, flush=True)
    return ret
