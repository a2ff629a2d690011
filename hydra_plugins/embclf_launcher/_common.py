"""What embclf's local and SLURM launchers share: composing every job up front, skipping completed
jobs, recording failures in run dirs, the final table and the whole-sweep error.

Both launchers plan a sweep the same way (:func:`plan_jobs`): compose the config of every job in the
launcher process *before* anything starts, so a bad override in job 7 fails the sweep at once instead
of after six jobs have trained (or sat in a SLURM queue).  Composing also yields each job's run dir,
which is what resuming, skipping and failure recording need.
"""

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger("embclf.launcher")


# Both derive from CompactHydraException so that Hydra prints just the message (which names every
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
        from embclf.config import problems
    except ImportError:  # the launcher without embclf installed: Hydra's own checks only
        return []
    return problems(cfg)


def _absolute_paths(app: dict, base: str) -> dict:
    try:
        from embclf.config import absolute_paths
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
    for run_dir in stage_run_dirs(job):
        s = _read_json(run_dir / "summary.json") or {}
        if s.get("status") != "running":
            continue
        jid = s.get("slurm_job_id")
        if jid:
            try:
                out = subprocess.run(["squeue", "-h", "-j", str(jid), "-o", "%T"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                continue  # no SLURM client here: cannot tell, so do not block
            if out.returncode == 0 and out.stdout.strip():
                return f"SLURM job {jid} ({out.stdout.split()[0]}); see squeue -j {jid}"
        elif s.get("hostname") == socket.gethostname() and s.get("pid"):
            pid = int(s["pid"])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass  # exists, owned by someone else
            if _pid_runs_python(pid):
                return f"process {pid} on this host"
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


@contextlib.contextmanager
def holding_sweep_dir(config: Any) -> Iterator[None]:
    """Hold the sweep dir (``embclf.locks``) while the launcher plans, starts (or submits) and waits for its jobs.

    Hydra's ``on_multirun_start`` callback (``embclf.locks.HoldOutputDirs``) normally holds it already, from
    before ``multirun.yaml`` is written; this covers a launcher used without it. Held without the heartbeat
    thread (the local launcher forks only without other threads): the polling loops call :func:`beat`.
    A sweep dir another live process holds: its message on stderr and exit status 2, nothing started.
    """
    try:
        from embclf import locks
    except ImportError:  # the launcher without embclf: no lock
        yield
        return
    try:
        lock = locks.acquire(str(config.hydra.sweep.dir), heartbeat=False)
    except locks.EmbclfError as e:  # in use, or the lock cannot be written there
        print(f"embclf: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        yield
    finally:
        lock.release()


def _restore_sweep_record(config: Any) -> None:
    try:
        from embclf.locks import restore_sweep_record
    except ImportError:
        return
    try:
        restore_sweep_record(str(config.hydra.sweep.dir))
    except OSError as e:
        log.warning("could not restore the earlier sweep record in %s: %s", config.hydra.sweep.dir, e)


def beat() -> None:
    """Refresh the heartbeat of the locks this launcher holds (cheap when none is due); call while polling."""
    try:
        from embclf.locks import refresh
    except ImportError:
        return
    refresh()


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
    """Write status "failed" and ``error`` into the job's run dir(s) with ``embclf.runs.mark_failed``.

    The core already does this for an exception inside a stage; this covers a worker that was killed
    (out of memory, scancel) or died before the stage started.  Stage run dirs that completed are
    left alone (mark_failed never overwrites a completed summary).  ``status``, ``reason`` and
    ``extra`` are passed on to ``mark_failed`` ("killed", "out of memory", ``{"signal": "SIGKILL"}``).
    Never raises: failing to record a failure must not hide the other jobs' results.
    """
    try:
        from embclf.runs import SUMMARY, base_summary, mark_failed, write_json_atomic
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


# SLURM job states (sacct's State, first word) of a job that ended from outside: (status, reason, what happened)
SLURM_ENDINGS = {
    "OUT_OF_MEMORY": ("killed", "out of memory", "SLURM killed it for exceeding its memory (--mem)"),
    "CANCELLED": ("cancelled", "cancelled", "cancelled (scancel, or an administrator)"),
    "NODE_FAIL": ("killed", "node failure", "its node failed"),
    "BOOT_FAIL": ("killed", "node failure", "its node failed to boot"),
    "PREEMPTED": ("interrupted", "preempted", "preempted by a higher-priority job"),
}


def slurm_outcome(state: Optional[str]) -> Optional[Tuple[str, str, str]]:
    """(status, reason, error) for a SLURM job that ended in ``state`` (e.g. "OUT_OF_MEMORY", "CANCELLED by
    1000") from outside, or None for any other state (its own error, or a time limit, is recorded elsewhere)."""
    word = (state or "").split(" ")[0].upper()
    if word not in SLURM_ENDINGS:
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


def _tail(text: str, lines: int = 6) -> str:
    kept = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _fmt_seconds(s: Optional[float]) -> str:
    return "-" if s is None else f"{s:.1f}s"


def report(jobs: Sequence[PlannedJob], sweep_dir: Any, what: str, raise_on_failure: bool = True) -> None:
    """Log the end-of-sweep table (overrides, status, time, run dir) and raise if any job failed.

    Raises :class:`SweepJobsFailedError` naming every failed job's overrides and error, unless
    ``raise_on_failure`` is false: then the failures are logged as a warning and the caller returns every
    job's ``JobReturn`` (a failed one with status FAILED), which is how a sweeper that launches batches
    (Optuna) records a failed trial and goes on.
    """
    rows = [("#", "overrides", "status", "time", "run dir")]
    for job in jobs:
        label = job.label if len(job.label) <= 70 else job.label[:67] + "..."  # full: run dir's .hydra/
        rows.append((str(job.idx), label, job.status, _fmt_seconds(job.seconds), str(job.run_dir)))
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


def sweeper_handles_failures(config: Any) -> bool:
    """True when the sweep is driven by a sweeper other than Hydra's basic one (e.g. Optuna's), which
    launches batches and reads each job's status itself: a failed job (trial) must then come back as a
    failed ``JobReturn``, not as an exception that ends the whole search."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    return bool(target) and not target.endswith("BasicSweeper")


def now() -> float:
    return time.time()


def prepare_sweep(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
    """What both launchers do before starting anything: plan and validate every job, make the sweep dir,
    skip completed jobs (logging each), refuse if earlier jobs of this sweep dir still run.

    Returns (all jobs, jobs to run, sweep dir). Raises what ``plan_jobs``/``refuse_if_running`` raise.
    """
    try:
        jobs = plan_jobs(launcher, job_overrides, initial_job_idx)
    except SweepConfigError:
        _restore_sweep_record(launcher.config)  # nothing started: the sweep dir's record stays the earlier one
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
