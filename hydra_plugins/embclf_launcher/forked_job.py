"""A sweep job in a worker forked from the launcher (``hydra.launcher.fork=true``), driven like a
``submitit.LocalJob``.

``python -m embclf`` has already imported torch, torchvision, scikit-learn and the stages and composed the
job's config before the first job starts; a fresh interpreter would do all of that again (measured: importing
``embclf.__main__`` is 3-8 s, tearing the interpreter down at exit another ~2 s, each on the job's critical
path).  The forked worker still runs submitit's own job body (``submitit.core.submission.process_job``: the
pickled launcher + overrides, submitit's signal handlers, requeue on USR2, logs and the result pickle in
``<sweep dir>/.submitit/<pid>/``) with the environment submitit's local controller would give it; the
launcher plays the controller's part (time limit, requeue, stop) in :class:`ForkedJob`.

This leans on submitit internals (listed in ``SUBMITIT_INTERNALS`` below and checked by
``tests/test_submitit_internals.py``), which is why pyproject pins submitit to the tested minor range.
"""
import atexit
import gc
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from omegaconf import DictConfig

from .gpus import cuda_driver_state, cuda_runtime_used

log = logging.getLogger("embclf.launcher")

# The submitit names (module, attribute path) this file, local_launcher.py and slurm_launcher.py use beyond
# submitit's public executor API, with what for. tests/test_submitit_internals.py fails naming any that an upgrade removed.
SUBMITIT_INTERNALS = (
    ("submitit.core.submission", "process_job", "the forked worker's job body"),
    ("submitit.core.utils", "JobPaths", "the job folder's file names (pickles, logs, result)"),
    ("submitit.core.utils", "JobPaths.get_first_id_independent_folder", "where the submission pickle goes"),
    ("submitit.core.utils", "JobPaths.move_temporary_file", "renaming the pickle after the worker's pid"),
    ("submitit.core.utils", "DelayedSubmission", "the pickled call the worker runs"),
    ("submitit.core.utils", "DelayedSubmission.set_timeout", "the time limit and requeue count in the pickle"),
    ("submitit.core.utils", "UncompletedJobError", "a worker that ended without a result"),
    ("submitit.core.utils", "FailedJobError", "a worker whose job raised"),
    ("submitit.local.local", "LOCAL_REQUEUE_RETURN_CODE", "the exit status that asks for a requeue"),
    ("submitit.local.local", "LocalJobEnvironment._usr_sig", "the signal that tells a job to checkpoint"),
    ("submitit.local.local", "LocalJob", "reading a forked worker's result as submitit would"),
    ("submitit.local.local", "LocalJob._process", "reaping a fork=false controller (slot_pool._stop_workers)"),
    ("submitit.core.core", "Job._results_timeout_s", "no wait for the result of a fork=false task that ended (slot_pool)"),
    ("submitit.slurm.slurm", "SlurmJob.watcher", "the SLURM array's state, shared by its jobs (slurm_launcher)"),
    ("submitit.core.core", "InfoWatcher.update", "one sacct read of every job's state (slurm_launcher._wait)"),
)

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

    CUDA: torch's own flag (``torch.cuda.is_initialized``), the launcher's GPU count through the CUDA runtime
    (``gpus.cuda_runtime_used``), and the driver's own state (``gpus.cuda_driver_state``), which also sees
    what initialised the driver behind torch's back (``torch.cuda.is_available()``, ``is_bf16_supported()``,
    cuDNN, triton's driver probe).
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
    if cuda_initialized or cuda_runtime_used():
        return "CUDA is initialised in the launcher process"
    return cuda_driver_state()


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
    # compile=true: inductor read TORCHINDUCTOR_COMPILE_THREADS when the launcher imported its config, with the
    # launcher's environment; give this job its share (gpus.job_env) as an exec'd worker would read it
    inductor = sys.modules.get("torch._inductor.config")
    share = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")
    if inductor is not None and share and share.isdigit():
        inductor.compile_threads = int(share)


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
