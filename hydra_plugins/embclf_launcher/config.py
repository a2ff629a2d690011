"""Structured configs of embclf's two Hydra launchers, registered in group ``hydra/launcher``.

* ``hydra/launcher=local`` -- :class:`LocalLauncherConf`: a pool of local worker processes, one job per
  GPU slot (or ``max_parallel`` CPU jobs), see ``local_launcher.py``.
* ``hydra/launcher=slurm`` -- :class:`SlurmLauncherConf`: hydra-submitit-launcher's SLURM launcher with
  defaults for this workload (1 GPU per job, requeue on time limit/preemption) and whole-sweep
  validation and failure reporting, see ``slurm_launcher.py``.

This module is imported by Hydra's plugin discovery on every start, so it must stay light: no torch,
no submitit import here.
"""

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf


@dataclass
class LocalLauncherConf:
    """``hydra/launcher=local``: run the sweep's jobs as concurrent local processes.

    GPU mode (``gpus`` non-empty, or null with GPUs visible): ``len(gpus) * jobs_per_gpu`` slots; each
    job is started with ``CUDA_VISIBLE_DEVICES`` set to its slot's GPU id; jobs beyond the slots wait.
    CPU mode (``gpus: []``, or null with no GPU visible): ``max_parallel`` slots (null = number of
    usable cores, at most the number of jobs).  In both modes each job gets
    ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``threads_per_job`` (null = max(1, cores // concurrent
    jobs)) so the jobs together do not oversubscribe the machine.
    """

    _target_: str = "hydra_plugins.embclf_launcher.local_launcher.LocalPoolLauncher"
    # submitit's per-job folder (pickles, stdout/stderr of the worker); %j = the pid of the job's
    # first worker (fork: true) or of its submitit controller (fork: false)
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    # true: start each job as a fork() of the launcher, which has imported torch & co. and composed
    # the job's config already (a fresh interpreter spends seconds on both, per job); used on Linux
    # when safe (no other thread, CUDA not initialised in the launcher), else as false.
    # false: a fresh `python -m submitit.core._submit` under submitit's local controller per job.
    fork: bool = True
    # GPU ids (as in nvidia-smi / CUDA_VISIBLE_DEVICES). null = all visible: the parent's
    # CUDA_VISIBLE_DEVICES if set, else torch.cuda.device_count(). [] = CPU mode. An explicit list is
    # used as given even where no GPU exists (the jobs then fall back to CPU; tests rely on that).
    gpus: Optional[List[int]] = None
    # jobs sharing one GPU at a time (small models leave a GPU mostly idle)
    jobs_per_gpu: int = 1
    # NVIDIA MPS for jobs sharing a GPU (mps.py, docs/launchers.md): auto = use a daemon that serves already;
    # on = also start one for the sweep (pipes and logs under <sweep dir>/.mps, stopped at the end); off
    mps: str = "auto"
    # CPU mode only: concurrent jobs; null = usable cores, at most the number of jobs
    max_parallel: Optional[int] = None
    # OMP/MKL threads per job; null = max(1, cores // concurrent jobs)
    threads_per_job: Optional[int] = None
    # a job running longer than this is signalled (USR2: it saves last.pt and is started again, resuming)
    # and, if still running at the limit, stopped; 3 days. Each start gets the whole limit again.
    timeout_min: float = 4320
    # USR2 this many seconds before the limit; at most a quarter of the limit (timeout_min=1 is signalled
    # 15 s before its end, not at its start)
    signal_delay_s: int = 60
    # restarts allowed after reaching the time limit; when they run out the job ends with status "timeout"
    max_num_timeout: int = 3
    # seconds between polls of the running jobs (a poll is a waitpid per job: cheap; a job's end is
    # noticed, and the next queued job started, on average half of this later)
    poll_interval_s: float = 0.1


@dataclass
class SlurmLauncherConf(SlurmQueueConf):
    """``hydra/launcher=slurm``: submit the sweep as one SLURM job array through submitit.

    Defaults sized for one autoencoder/classifier job on a CIFAR-scale dataset: 1 GPU, 8 CPUs, 32 GB,
    4 h; ``partition``/``account``/``qos`` are left to the user (``hydra.launcher.partition=...`` or
    sbatch's own ``SBATCH_PARTITION``/``SBATCH_ACCOUNT``/``SBATCH_QOS`` environment variables, which
    sbatch reads when the option is absent).  ``max_num_timeout`` > 0 with ``signal_delay_s``: SLURM
    sends USR2 that many seconds before the time limit (or on preemption); the training loop saves
    ``last.pt``, submitit requeues the job and it resumes in the same run dir.
    """

    _target_: str = "hydra_plugins.embclf_launcher.slurm_launcher.EmbclfSlurmLauncher"
    # inside the sweep dir, so a sweep dir holds everything about its jobs (%j = SLURM job id)
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    timeout_min: int = 240
    cpus_per_task: Optional[int] = 8
    gpus_per_node: Optional[int] = 1
    tasks_per_node: int = 1
    mem_gb: Optional[int] = 32
    nodes: int = 1
    # USR2 this many seconds before the time limit: ample for saving a checkpoint, and SLURM may
    # deliver it up to 60 s early
    signal_delay_s: int = 120
    # requeues allowed after time limits (preemptions do not count against it)
    max_num_timeout: int = 3
    # at most this many array tasks run at once (be fair to a shared cluster)
    array_parallelism: int = 64
    # Lines run in the sbatch script before the job starts. torch's default thread count is the
    # node's core count, not the job's allocation: on a shared node that oversubscribes the CPUs, so
    # use the cpus_per_task SLURM gave us (1 if unset; bash arithmetic, no ${} to escape for Hydra).
    setup: Optional[List[str]] = field(
        default_factory=lambda: [
            "export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK > 0 ? SLURM_CPUS_PER_TASK : 1 ))",
            "export MKL_NUM_THREADS=$OMP_NUM_THREADS",
        ]
    )


ConfigStore.instance().store(
    group="hydra/launcher", name="local", node=LocalLauncherConf, provider="embclf"
)
ConfigStore.instance().store(
    group="hydra/launcher", name="slurm", node=SlurmLauncherConf, provider="embclf"
)
