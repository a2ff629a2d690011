"""``hydra/launcher=local``: run a sweep's jobs as concurrent local processes, one per GPU slot.

Why not the launchers Hydra ships: ``basic`` runs jobs one after another, and ``submitit_local``
starts every job at once and gives each the *same* first ``gpus_per_node`` GPUs (submitit 1.5.4:
``range(n_gpus)``).  This launcher keeps a pool of slots -- ``len(gpus) * jobs_per_gpu`` with GPUs,
``max_parallel`` without -- starts one job per free slot and queues the rest.

How a job's process starts (``hydra.launcher.fork``):

* ``fork: true`` (the default, on Linux): the worker is a ``fork()`` of the launcher process
  (:class:`ForkedJob`).  ``python -m embclf`` has already imported torch, torchvision, scikit-learn and
  the stages and composed the job's config before the first job starts; a fresh interpreter would
  do all of that again (measured: importing ``embclf.__main__`` is 3-8 s, tearing the interpreter
  down at exit another ~2 s, each paid on the job's critical path) -- that was almost all of a 1-job
  sweep's overhead over a plain run.  The forked worker still runs submitit's own job body
  (``submitit.core.submission.process_job``: the pickled launcher + overrides, submitit's signal
  handlers, requeue on USR2, logs and the result pickle in ``<sweep dir>/.submitit/<pid>/``) with the
  environment submitit's local controller would give it; the launcher plays the controller's part
  (time limit, requeue, stop).  It is used only where forking is safe: Linux, no other thread in the
  launcher, CUDA not initialised in the launcher (see :func:`fork_unsafe_reason`).
* ``fork: false``, or where forking is unsafe: each job is one ``submitit.LocalExecutor`` submission
  (a controller process starting ``python -m submitit.core._submit``, a fresh interpreter).

Either way each job gets its slot's ``CUDA_VISIBLE_DEVICES`` and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``
and runs through hydra-submitit-launcher's ``__call__`` (Hydra's ``run_job``), exactly as it would on
SLURM.  Only the slot scheduling and the process start are ours.
"""
import atexit
import gc
import logging
import os
import shlex
import signal
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, setup_globals
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import DictConfig

from .exit_status import read_exit_status
from ._common import (
    SweepInterruptedError,
    announce_outcome,
    beat,
    compose_and_run,
    holding_sweep_dir,
    timed_out,
    mark_timeout,
    PlannedJob,
    now,
    oom_kill_count,
    outcome_from_result,
    prepare_sweep,
    record_failure,
    report,
    sweeper_handles_failures,
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

    # Count through NVML, which does not initialise CUDA in this process: forked workers (fork=true)
    # could not use CUDA after that.  torch.cuda.device_count() tries NVML first as well but falls
    # back to the CUDA runtime silently; do that fallback here, where it can be recorded.
    # (A CPU-only or ROCm build of torch: device_count() as before, counted as possibly initialising.)
    global _CUDA_RUNTIME_USED
    n = -1
    if torch.backends.cuda.is_built() and not torch.version.hip:
        try:
            n = int(torch.cuda._device_count_nvml())  # private, hence the guard; < 0: NVML unavailable
        except Exception:  # noqa: BLE001
            n = -1
    if n < 0:
        n = torch.cuda.device_count()
        _CUDA_RUNTIME_USED = _CUDA_RUNTIME_USED or n > 0
    return list(range(n))


# True once the launcher asked the CUDA runtime (not NVML) how many GPUs there are: the CUDA driver is
# then initialised in this process, and a forked child could not use CUDA.
_CUDA_RUNTIME_USED = False


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


# --- workers forked from the launcher (hydra.launcher.fork=true) ------------------------------------

# submitit's local controller restarts a task at most this often (submitit 1.5.4: Controller.run)
_MAX_STARTS = 6

# In a forked worker only: (job number, overrides, composed config) of the job it runs, so that
# LocalPoolLauncher.__call__ reuses the config the launcher composed and checked in plan_jobs
# instead of composing it a third time.  Never pickled: set in the child right after fork().
_FORKED_PLAN: Optional[Tuple[int, Tuple[str, ...], DictConfig]] = None


def fork_unsafe_reason() -> Optional[str]:
    """Why a worker must not be forked from this process now, or None when it may.

    fork() copies only the calling thread: a lock held by another thread stays locked forever in the
    child, and CUDA cannot be used in the child of a process that initialised it.  macOS frameworks
    are not fork-safe either, so forking is used on Linux only.
    """
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return f"no fork() on {sys.platform}"
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        return f"other threads run in the launcher ({', '.join(others[:3])})"
    torch = sys.modules.get("torch")
    try:
        cuda_initialized = bool(torch is not None and torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001 -- a partly imported torch: be safe
        cuda_initialized = True
    if cuda_initialized or _CUDA_RUNTIME_USED:
        return "CUDA is initialised in the launcher process"
    return None


def _limit_threads(threads: int) -> None:
    """Make this (forked) process use ``threads`` threads for torch, OpenMP and BLAS.

    An exec'd worker gets that from ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` in its environment, read
    when the libraries load; in a fork they were loaded by the launcher, with the launcher's
    environment, so set the limits directly.  (The job's own ``threads`` key still wins: the core
    calls ``torch.set_num_threads`` after this.)
    """
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits  # scikit-learn's dependency: numpy/scipy BLAS, OpenMP

        threadpool_limits(limits=threads)
    except Exception:  # noqa: BLE001 -- not installed, or an unknown library: torch's limit still holds
        pass


def _forked_worker(folder: str, job_id: str, tmp_pickle: Optional[Path], env: Dict[str, str], threads: int,
                   plan: Tuple[int, Tuple[str, ...], DictConfig], sigmask: Any) -> int:
    """The body of a forked worker: what ``python -m submitit.core._submit <folder>`` does under
    submitit's local controller, minus starting an interpreter.  Returns the exit status; never raises.

    Order matters: the launcher's SIGTERM handler, exit handlers and log handlers are not the job's;
    stdout/stderr go to submitit's log files before anything is logged; the submitted pickle is moved
    to its final name (which holds this process's pid) before ``process_job`` looks for it.  At the
    end the job's exit handlers run and the streams are flushed, but the interpreter is not torn down
    (``os._exit`` in the caller, as ``multiprocessing`` does): tearing down torch & co. takes ~2 s
    that the launcher would wait for before it saw the job end.
    """
    global _FORKED_PLAN
    code = 1
    try:
        _FORKED_PLAN = plan
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's: SIGTERM -> KeyboardInterrupt
        signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)  # blocked by the parent around fork()
        clear = getattr(atexit, "_clear", None)
        if clear is not None:
            clear()  # the launcher's exit handlers; the job's own (registered from here on) run at the end
        root = logging.getLogger()
        for handler in list(root.handlers):  # the launcher's console (Hydra's hydra_logging); run_job
            root.removeHandler(handler)      # sets up the job's logging, as in a fresh interpreter
        os.environ.update(env)
        from submitit.core.submission import process_job
        from submitit.core.utils import JobPaths

        paths = JobPaths(folder, job_id=job_id, task_id=0)
        paths.folder.mkdir(parents=True, exist_ok=True)
        # A result already here is not this start's: its folder is named after a pid, and an earlier sweep
        # into this sweep dir may have had a worker of the same pid (pids restart in a new container or
        # after a reboot); were this worker killed, the launcher would read that old result as its own.
        # (A requeued start of this job leaves none: it exits without a result.)
        paths.result_pickle.unlink(missing_ok=True)
        for fd, path in ((1, paths.stdout), (2, paths.stderr)):  # as the controller opens them: append
            log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log_fd, fd)
            os.close(log_fd)
        if tmp_pickle is not None:
            paths.move_temporary_file(tmp_pickle, "submitted_pickle")
        _limit_threads(threads)
        process_job(folder)
        code = 0
    except SystemExit as e:  # submitit's requeue (LOCAL_REQUEUE_RETURN_CODE), or the job's sys.exit
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 -- as the interpreter would: traceback on stderr, status 1
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    try:
        # No more signals into Python code: an exception now would escape into the launcher's code.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        run = getattr(atexit, "_run_exitfuncs", None)
        if run is not None:
            run()  # exit handlers the job registered (e.g. a tracker's)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except BaseException:  # noqa: BLE001
        pass
    return code


class ForkedJob:
    """One sweep job in a worker forked from the launcher; driven like a ``submitit.LocalJob``.

    ``job_id`` is the first worker's pid and names the job's submitit folder (``%j``), as the
    controller's pid does for submitit.  The launcher also plays the part of submitit's local
    controller: :meth:`done` sends the preemption signal (USR2) ``signal_delay_s`` before
    ``timeout_min``, stops the worker at ``timeout_min`` (SIGINT, then SIGKILL a second later), and
    starts the job again when it exits with submitit's requeue status (it checkpointed on USR2; the
    restarted job resumes from the rewritten submitted pickle), at most ``_MAX_STARTS`` times.
    """

    def __init__(self, folder: str, tmp_pickle: Path, env: Dict[str, str], threads: int, timeout_s: float,
                 signal_delay_s: float, plan: Tuple[int, Tuple[str, ...], DictConfig], max_num_timeout: int = 3) -> None:
        self.folder = folder
        self.max_num_timeout = max_num_timeout
        self.timeouts = 0  # starts that reached the time limit (the job is then told, and later stopped)
        self.env = env
        self.threads = threads
        self.timeout_s = timeout_s
        self.signal_delay_s = signal_delay_s
        self.plan = plan
        self.job_id = ""
        self.pid = 0
        self.exit_code: Optional[int] = None
        self.starts = 0
        self.stopping = False
        self._start(tmp_pickle)

    def _start(self, tmp_pickle: Optional[Path] = None) -> None:
        for stream in (sys.stdout, sys.stderr):  # else the child inherits (and writes) buffered output
            stream.flush()
        # Objects that exist now are not garbage collected in the child: its collector then does not
        # touch (and copy) the launcher's pages (the gc.freeze recipe in the Python docs).
        gc.freeze()
        env = dict(self.env)
        # Hold back SIGINT/SIGTERM across fork(): in the child, a KeyboardInterrupt raised by the
        # launcher's handlers before the worker's try block would run the launcher's code in the
        # child.  The child unblocks them once its own handlers are in place; the parent at once.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            pid = os.fork()
        except BaseException:  # no child (out of memory, process limit): the launcher's error
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            gc.unfreeze()
            raise
        if pid == 0:  # the worker: never returns into the launcher's code
            code = 1
            try:
                job_id = self.job_id or str(os.getpid())
                env.update(SUBMITIT_LOCAL_JOB_ID=job_id)
                code = _forked_worker(self.folder, job_id, tmp_pickle, env, self.threads, self.plan, mask)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        gc.unfreeze()
        self.pid = pid
        self.job_id = self.job_id or str(pid)
        self.starts += 1
        self.started = time.time()
        self.signalled = False
        self.interrupted_at: Optional[float] = None

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except OSError:
            pass

    def done(self) -> bool:
        """Whether the job ended (reaps the worker); enforces the time limit and restarts a requeue."""
        if self.exit_code is not None:
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: it ended, status unknown
            pid, status = self.pid, 1 << 8
        if pid == 0:
            self._enforce_time_limit()
            return False
        code = os.waitstatus_to_exitcode(status)
        from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

        if code == LOCAL_REQUEUE_RETURN_CODE and not self.stopping and self.starts < _MAX_STARTS + self.max_num_timeout:
            log.info("job %s checkpointed and asked to be requeued: starting it again", self.job_id)
            self._start()
            return False
        self.exit_code = code
        return True

    def _enforce_time_limit(self) -> None:
        elapsed = time.time() - self.started
        if not self.signalled and elapsed >= self.timeout_s - self.signal_delay_s:
            self.signalled = True
            self.timeouts += 1
            from submitit.local.local import LocalJobEnvironment

            log.warning("job %s reaches its time limit in %.0fs: signalling it to checkpoint",
                        self.job_id, self.timeout_s - elapsed)
            self._signal(LocalJobEnvironment._usr_sig())
        if elapsed >= self.timeout_s:
            if self.interrupted_at is None:
                self.interrupted_at = time.time()
                self._signal(signal.SIGINT)
            elif time.time() - self.interrupted_at >= 1.0:
                self._signal(signal.SIGKILL)

    def cancel(self, check: bool = True) -> None:  # noqa: ARG002 -- submitit's signature
        """SIGINT to the worker (as submitit's ``LocalJob.cancel`` sends to its controller)."""
        self.stopping = True
        if self.exit_code is None:
            self._signal(signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL the worker if it still runs, and reap it."""
        self.stopping = True
        if self.exit_code is None:
            self._signal(signal.SIGKILL)
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.exit_code = -signal.SIGKILL

    def result(self) -> Any:
        """The job's return value (a Hydra ``JobReturn``), as ``submitit.LocalJob.result`` gives it.

        Raises submitit's ``FailedJobError`` (with the job's traceback) when the job raised, and
        ``UncompletedJobError`` at once when the worker ended without a result (killed, crashed) --
        submitit would wait 15 s for a result file that a dead local process can no longer write.
        """
        from submitit.core.utils import JobPaths, UncompletedJobError
        from submitit.local.local import LocalJob

        paths = JobPaths(self.folder, job_id=self.job_id, task_id=0)
        if not paths.result_pickle.exists():
            code = self.exit_code
            how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exited with status {code}")
            message = [f"Job {self.job_id} (task: 0) with path {paths.result_pickle}",
                       f"has not produced any output: the worker (pid {self.pid}) {how}"]
            try:
                err = paths.stderr.read_text(errors="replace").strip()
            except OSError:
                err = ""
            if err:
                message.extend(["Error stream produced:", "-" * 40, *err.splitlines()[-40:]])
            raise UncompletedJobError("\n".join(message))
        return LocalJob(folder=self.folder, job_id=self.job_id, process=None).result()


def _timed_out(sj: Any, error: Optional[str]) -> bool:
    """Whether a failed job ended because of its time limit (forked: it reached the limit; submitit's own
    local job: its worker said so when it stopped requeuing)."""
    if isinstance(sj, ForkedJob):
        return sj.timeouts > 0
    return timed_out(error)


def _stop_workers(jobs: List[Any], grace_s: float = 3.0) -> None:
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
        plan = _FORKED_PLAN
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
        self._run_pool(todo, slots, threads)
        report(jobs, sweep_dir, "local", raise_on_failure=not sweeper_handles_failures(self.config))
        return [job.job_return for job in jobs]  # type: ignore[misc]

    def _run_pool(self, todo: List[PlannedJob], slots: List[Optional[int]], threads: int) -> None:
        pending = list(todo)
        free = list(range(len(slots)))
        running: Dict[int, Tuple[PlannedJob, Any]] = {}  # slot index -> (job, submitit job)
        poll = float(self.params.get("poll_interval_s", 0.1))
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
                    running[slot] = (job, self._submit(job, gpu, threads))
                finished = [slot for slot, (_, sj) in running.items() if sj.done()]
                for slot in finished:
                    job, sj = running.pop(slot)
                    job.end = now()
                    outcome_from_result(job, sj.result, killed_by=_killed_by(sj))
                    if job.status == "failed" and _timed_out(sj, job.error):
                        mark_timeout(job, float(self.params["timeout_min"]),
                                     int(self.params.get("max_num_timeout", 3)), getattr(sj, "timeouts", None))
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
            _stop_workers([sj for _, sj in running.values()])
            why = "Ctrl-C" if isinstance(e, KeyboardInterrupt) and not str(e) else f"{type(e).__name__}: {e}"
            for job, _ in running.values():
                job.end, job.status = now(), "interrupted"
                job.error = f"interrupted: the launcher stopped ({why}); it resumes from last.pt when re-run"
                record_failure(job, job.error, status="interrupted")
            if not isinstance(e, KeyboardInterrupt):
                raise
            sweep_dir = self.config.hydra.sweep.dir if self.config is not None else "<sweep dir>"
            # one message, not a traceback per frame: the user asked for this
            raise SweepInterruptedError(
                f"sweep interrupted ({why}): stopped {len(running)} running job(s) (recorded \"interrupted\"), "
                f"{len(pending)} not started. Re-run the same command with hydra.sweep.dir={sweep_dir} to resume "
                "them; completed jobs are skipped.") from None
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            _remove_template_dir(str(self.params["submitit_folder"]))
