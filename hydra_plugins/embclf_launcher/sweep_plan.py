"""Planning a sweep: compose every job up front, work out its run dir, skip what is done, refuse what runs.

Both launchers plan a sweep the same way (:func:`prepare_sweep`, :func:`plan_jobs`): compose the config of
every job in the launcher process *before* anything starts, so a bad override in job 7 fails the sweep at
once instead of after six jobs have trained (or sat in a SLURM queue).  Composing also yields each job's
run dir, which is what resuming, skipping (:func:`is_completed`) and refusing a job an earlier invocation
still runs (:func:`still_running`) need.  What happens once jobs ran lives in ``outcomes.py``.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from .sweep_lock import restore_sweep_record

log = logging.getLogger("embclf.launcher")


# All derive from CompactHydraException so that Hydra prints just the message (which names every
# job), not a launcher traceback, and exits 1.
class SweepJobsFailedError(CompactHydraException, RuntimeError):
    """Raised at the end of a sweep in which at least one job failed; names every failed job."""


class SweepInterruptedError(CompactHydraException, KeyboardInterrupt):
    """Raised when Ctrl-C or SIGTERM stopped a sweep: its running jobs were stopped and recorded "interrupted"."""


class SweepConfigError(CompactHydraException, ValueError):
    """Raised before any job starts when the composed config of one or more jobs is invalid."""


@dataclass
class PlannedJob:
    """One job of a sweep: its overrides, composed config and run dir (the Hydra job dir)."""

    idx: int
    overrides: List[str]
    cfg: DictConfig
    run_dir: Path
    status: str = "pending"  # pending | running | completed | skipped | failed | killed | cancelled | interrupted
    error: Optional[str] = None
    device: str = ""
    start: Optional[float] = None
    end: Optional[float] = None
    job_return: Optional[JobReturn] = None
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The job's overrides as one string (``model=vae latent=64``), for logs and errors."""
        return " ".join(filter_overrides(self.overrides)) or "(no overrides)"

    @property
    def seconds(self) -> Optional[float]:
        if self.start is None or self.end is None:
            return None
        return self.end - self.start


def plan_jobs(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> List[PlannedJob]:
    """Compose the config of every job of the sweep and work out its run dir.

    ``launcher`` is a Hydra launcher after ``setup()`` (it has ``config`` and ``hydra_context``).
    Every job is composed even after one fails, so the error lists all bad jobs at once.

    Raises :class:`SweepConfigError` naming every job whose config does not compose (unknown key,
    wrong type, missing value, failing interpolation), before anything is started or submitted.
    """
    master = launcher.config
    loader = launcher.hydra_context.config_loader
    # Resolve the sweep dir in the master config first: resolvers such as ``now`` and
    # ``embclf_token`` cache their value there, and Hydra copies that cache into every job's config
    # (load_sweep_config -> copy_cache), so all jobs, here and in the workers, agree on one sweep dir.
    sweep_dir = Path(str(master.hydra.sweep.dir))
    if "%" in str(sweep_dir):
        # submitit expands %j, %t, %A... in its folder and SLURM in its script paths: a literal '%' would put
        # logs and results somewhere else than the run dirs (or nowhere), so refuse before anything starts
        raise SweepConfigError(
            f"the sweep dir {sweep_dir} contains '%', which submitit and SLURM read as a pattern (%j = job id), "
            "so nothing was started. Choose an output_dir (and hydra.sweep.dir) without '%', e.g. "
            f"output_dir={str(OmegaConf.select(master, 'output_dir', default='outputs')).replace('%', 'pct')}.")
    planned: List[PlannedJob] = []
    errors: List[str] = []
    saved = HydraConfig.instance().cfg
    try:
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            overrides = list(overrides)
            try:
                cfg = loader.load_sweep_config(master, overrides)
                with open_dict(cfg.hydra.job):
                    cfg.hydra.job.num = idx
                    # the worker sets its real id (SLURM/submitit job id); nothing here depends on it
                    cfg.hydra.job.id = f"job_id_for_{idx}"
                # Interpolations in hydra.sweep.subdir (and in the app config) read HydraConfig,
                # exactly as in hydra.core.utils.run_job.
                HydraConfig.instance().set_config(cfg)
                run_dir = sweep_dir / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
                # Resolve the whole app config now: a broken interpolation fails here, not in a job.
                app_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
                bad = _config_problems(app_cfg)
                # unknown keys, values out of range: the same check a single run makes. A sweeper that records
                # failed trials (Optuna) may propose such a value: that trial fails (at its start), not the study
                if bad and not sweeper_handles_failures(master):
                    raise ValueError(" ".join(bad))
                app = OmegaConf.to_container(app_cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
                # paths as the job stores them (absolute against the launch dir), so "already completed?"
                # compares one spelling of data.root (the job resolves it the same way)
                app = _absolute_paths(app, os.getcwd())
            except Exception as e:  # noqa: BLE001 -- every composition error is reported together
                label = " ".join(filter_overrides(overrides))
                kind = "" if isinstance(e, ValueError) and type(e) is ValueError else f"{type(e).__name__}: "
                errors.append(f"  #{idx} {label}: {kind}{_one_line(str(e))}")
                continue
            planned.append(PlannedJob(idx=idx, overrides=overrides, cfg=cfg, run_dir=run_dir, extra={"app": app}))
    finally:
        HydraConfig.instance().cfg = saved  # as Hydra had it (set_config rejects None)
    if errors:
        raise SweepConfigError(
            f"{len(errors)} of {len(job_overrides)} sweep jobs have an invalid config, so nothing was "
            "started. Fix these overrides (each line names the job, the key and why) and run the "
            "sweep again:\n" + "\n".join(errors)
        )
    dirs = {}
    for job in planned:
        key = _identity_digest(job) or job.run_dir
        if job.run_dir in dirs or key in dirs:
            other = dirs.get(job.run_dir) or dirs[key]
            raise SweepConfigError(
                f"sweep jobs #{other.idx} ({other.label}) and #{job.idx} "
                f"({job.label}) would share the run dir {job.run_dir}: with embclf's default "
                "hydra.sweep.subdir (${embclf_name:${hydra.overrides.task}}) that means they are the same "
                "experiment (they differ only in how-to-run keys such as threads or device, or in the spelling "
                "of a value), so run it once. A custom hydra.sweep.subdir must be distinct per job (e.g. "
                "include ${hydra.job.num})."
            )
        dirs[job.run_dir] = dirs[key] = job
    return planned


def _identity_digest(job: PlannedJob) -> Optional[str]:
    """The digest of the job's identity (``embclf.identity``): two jobs of one sweep with equal digests are one
    experiment, whatever their overrides say."""
    try:
        from embclf import identity
        return "identity:" + identity.digest(identity.job_identity(job.extra["app"]))
    except Exception:  # noqa: BLE001 -- without embclf (or an odd config): the run dirs alone tell jobs apart
        return None


def _config_problems(cfg: DictConfig) -> List[str]:
    try:
        from embclf.validation import problems
    except ImportError:  # the launcher without embclf installed: Hydra's own checks only
        return []
    return problems(cfg)


def _absolute_paths(app: dict, base: str) -> dict:
    try:
        from embclf.identity import absolute_paths
    except ImportError:
        return app
    return absolute_paths(app, base)


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stage_run_dirs(job: PlannedJob) -> List[Path]:
    """The run dirs one job writes: the job dir itself, or ``autoencode/`` and ``classify/`` in it
    for ``stage=all`` (see CONTRACT: one run dir per stage run)."""
    value = OmegaConf.select(job.cfg, "stage", default="autoencode")
    stage = getattr(value, "value", value)  # an Enum in embclf's schema
    if stage == "all":
        if not (job.run_dir / "autoencode").exists() and (job.run_dir / "classify" / "summary.json").is_file():
            return [job.run_dir / "classify"]  # its head trained on a sibling job's autoencoder (same experiment)
        return [job.run_dir / "autoencode", job.run_dir / "classify"]
    return [job.run_dir]


def is_completed(job: PlannedJob) -> bool:
    """True when a previous invocation already completed this job's experiment in its run dir.

    Decided by the core's one rule (``embclf.runs.completed_in``): every stage run dir of the job holds a
    completed run whose identity (``embclf.identity``) equals the one this job's config gives, however its
    overrides were spelled (``data.root=/x/t/`` and ``data.root=/x/t`` are one experiment; ``threads`` is none
    of it). Anything else (no dir, running, failed, a ``last.pt`` only, another experiment) is launched again;
    the stage then resumes, or refuses another experiment naming the keys that differ.
    """
    try:
        from embclf import identity, runs
        from embclf.runtime import EmbclfError
    except ImportError:  # the launcher without embclf: nothing is known to be done
        return False
    app = job.extra.get("app")
    if app is None:
        return False
    whole = str(app.get("stage", "autoencode")) == "all"
    for run_dir in stage_run_dirs(job):
        stage = run_dir.name if whole else str(app.get("stage", "autoencode"))
        try:
            # stage=all: its classify run's encoder is its own autoencoder (the identity of app itself)
            ident = identity.identity(app, stage, encoder=app if whole else None)
        except EmbclfError:  # classify.encoder unreadable: the job runs and its stage says why
            return False
        if not runs.completed_in(run_dir, ident, stage):
            return False
    return True


def _pid_runs_python(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"python" in f.read()
    except OSError:
        return False


def still_running(job: PlannedJob) -> Optional[str]:
    """Describe where this job is still running from an earlier invocation, or None.

    A live process holds its run dir's lock (``embclf.locks``: seen from the job's first second, before
    it writes anything), or its run dir's ``summary.json`` says "running" and either names a SLURM job that
    ``squeue`` still lists, or (no SLURM) a process on this host that is still alive.  Starting the job again
    would put two processes into one run dir.  A stale "running" or lock (killed machine, finished job)
    returns None, so the job is resumed.
    """
    try:
        from embclf.locks import describe, holder
    except ImportError:  # the launcher without embclf: the summary alone
        holder = None
    record = holder(job.run_dir) if holder is not None else None
    if record:
        return f"its run dir is in use by {describe(record)}"
    from embclf import liveness

    for run_dir in stage_run_dirs(job):
        s = _read_json(run_dir / "summary.json") or {}
        if s.get("status") != "running":
            continue
        state, detail = liveness.process_state(s)  # squeue for a SLURM job, the pid on this host; else UNKNOWN
        if state not in (liveness.RUNNING, liveness.PENDING):
            continue  # dead, or cannot tell from here (no SLURM client, another host): do not block
        jid = s.get("slurm_job_id")
        if jid:
            return f"SLURM job {jid} ({detail}); see squeue -j {jid}"
        if _pid_runs_python(int(s["pid"])):  # a reused pid of another program is not our job
            return f"process {s['pid']} on this host"
    return None


def refuse_if_running(jobs: Sequence[PlannedJob], sweep_dir: Any) -> None:
    """Raise :class:`SweepConfigError` naming every job an earlier invocation is still running.

    Re-invoking a sweep into its sweep dir while its jobs still run (a launcher that was stopped
    while its SLURM jobs went on, or a second terminal) would start them twice in the same run dirs.
    """
    busy = [(job, where) for job in jobs for where in [still_running(job)] if where]
    if busy:
        lines = "\n".join(f"  #{job.idx} {job.label}: {where}" for job, where in busy)
        raise SweepConfigError(
            f"{len(busy)} job(s) of this sweep are still running from an earlier invocation in "
            f"{sweep_dir}, so nothing was started (two runs in one run dir would corrupt it). Wait for "
            f"them to end, or stop them (scancel / kill), then run the same command again:\n{lines}"
        )


def skipped_return(job: PlannedJob) -> JobReturn:
    """A Hydra JobReturn for a job that was not run because it had already completed.

    Its return value is what the task function would have returned: the job's ``objective`` read from the
    last stage's summary.json (``embclf.__main__.objective_value``), so a sweeper that optimizes it (Optuna)
    counts a skipped trial like a run one; the run dir (text) when that cannot be read."""
    ret = JobReturn(overrides=job.overrides, cfg=job.cfg, working_dir=os.getcwd(), status=JobStatus.COMPLETED)
    try:
        from embclf.__main__ import objective_value

        ret.return_value = objective_value(OmegaConf.create(job.extra["app"]), stage_run_dirs(job)[-1])
    except Exception:  # noqa: BLE001 -- not an embclf job, or no such value: the run dir, as before
        ret.return_value = str(job.run_dir)
    return ret


def sweeper_handles_failures(config: Any) -> bool:
    """True when the sweep is driven by a sweeper other than Hydra's basic one (e.g. Optuna's), which
    launches batches and reads each job's status itself: a failed job (trial) must then come back as a
    failed ``JobReturn``, not as an exception that ends the whole search."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    return bool(target) and not target.endswith("BasicSweeper")


def prepare_sweep(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
    """What both launchers do before starting anything: plan and validate every job, make the sweep dir,
    skip completed jobs (logging each), refuse if earlier jobs of this sweep dir still run.

    Returns (all jobs, jobs to run, sweep dir). Raises what ``plan_jobs``/``refuse_if_running`` raise.
    """
    try:
        jobs = plan_jobs(launcher, job_overrides, initial_job_idx)
    except SweepConfigError:
        restore_sweep_record(launcher.config)  # nothing started: the sweep dir's record stays the earlier one
        raise
    # every job's provenance records the user's command, not the worker's (submitit's) argv; a SLURM job
    # inherits the environment of the sbatch call
    argv = [sys.executable, "-m", "embclf", *sys.argv[1:]] if sys.argv[0].endswith("__main__.py") else sys.argv
    os.environ.setdefault("EMBCLF_COMMAND", json.dumps(argv))
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(launcher.config.hydra.sweep.mode), 8))
    todo: List[PlannedJob] = []
    for job in jobs:
        if is_completed(job):
            job.status, job.job_return = "skipped", skipped_return(job)
            log.info("skip  #%d %s: already completed in %s", job.idx, job.label, job.run_dir)
        else:
            todo.append(job)
    refuse_if_running(todo, sweep_dir)
    return jobs, todo, sweep_dir
