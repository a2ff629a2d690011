"""Run a submitit task and record how it ended, for ``hydra.launcher.fork=false``.

With ``fork: false`` each job is a ``submitit.LocalExecutor`` submission: a controller process
(``python -m submitit.local._local``) starts the task (``python -u -m submitit.core._submit <folder>``)
and is the only process that sees the task's exit status -- and it throws it away (submitit 1.5.4:
``Controller.run`` exits 0 whatever its tasks did).  A task killed from outside (``kill -9``, the
kernel's OOM killer) then looks to the launcher like any worker that produced no result, and was
recorded "failed" instead of "killed".

The launcher passes ``python="<sys.executable> -m hydra_plugins.embclf_launcher.exit_status"`` to
``LocalExecutor``, so the controller starts this module with the task's own arguments.  It runs the
task as its child, forwards every signal the controller or submitit uses (SIGTERM, SIGINT, SIGUSR1,
SIGUSR2, SIGCONT) to it, and when the task ends writes ``<job folder>/<job id>_<task>_exit.json``
(``{"returncode": -9, "signal": "SIGKILL"}``), then ends the same way the task did (same exit code,
or the same signal) so that the controller's requeue logic sees exactly what it would have.  The task
is started with ``PR_SET_PDEATHSIG=SIGKILL``: if this wrapper is killed, the task goes with it.

Read back with :func:`read_exit_status`.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)


def exit_status_path(folder: str, job_id: str, task_id: int = 0) -> Path:
    """``<folder with %j = job_id>/<job_id>_<task_id>_exit.json``, beside submitit's result pickle."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(folder, job_id=job_id, task_id=task_id)
    return paths.folder / f"{paths.job_id}_{task_id}_exit.json"


def read_exit_status(folder: str, job_id: str, task_id: int = 0) -> Optional[int]:
    """The task's exit code as ``subprocess`` gives it (negative: killed by that signal), or None when
    no status was recorded (the job has not ended, or it did not run under this wrapper)."""
    try:
        return int(json.loads(exit_status_path(folder, job_id, task_id).read_text())["returncode"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1 (Linux)
    except Exception:  # noqa: BLE001 -- not Linux: the controller's SIGKILL reaches the task anyway
        pass


def main(argv) -> int:
    """Run ``sys.executable *argv`` (the submitit task), record its ending, end the same way."""
    procs = []  # the task, once started; handlers go in first, so no signal can end this wrapper alone

    def forward(signum, _frame):
        for proc in procs:
            try:
                proc.send_signal(signum)
            except OSError:
                pass

    for sig in FORWARDED:
        signal.signal(sig, forward)  # exec resets caught signals to their defaults in the task
    # a GPU-/MIG- name the launcher could not pass through submitit (integer ids only): the task's GPU
    token = os.environ.pop("EMBCLF_CUDA_VISIBLE_DEVICES", None)
    if token is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = token
    procs.append(subprocess.Popen([sys.executable, *argv], preexec_fn=_die_with_parent))
    code = procs[0].wait()
    folder, job_id = argv[-1], os.environ.get("SUBMITIT_LOCAL_JOB_ID", "")
    task_id = int(os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0") or 0)
    if job_id:
        record = {"returncode": code, "pid": procs[0].pid}
        if code < 0:
            record["signal"] = signal.Signals(-code).name
        target = exit_status_path(folder, job_id, task_id)
        # written by hand, not with embclf.runs.write_json_atomic: importing embclf would import torch here
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, target)
        except OSError:
            pass  # the launcher then reads the job as "failed", as without the wrapper
    if code < 0:  # end by the same signal, so the controller sees what it would have seen
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
