"""Test helper: run ``python -m embclf ARGS`` again and again in one run dir, killing it at named points.

Usage: ``python tests/resume_harness.py SPEC.json`` where SPEC is
``{"args": [...], "runs": {"name": {"run_dir": PATH, "kills": ["startup", "autoencode.step:3", ...],
"extra_args": [...]}}}`` (``extra_args`` optional, appended to ``args`` for that run).
For each run: one attempt per entry of ``kills`` with ``EMBCLF_KILL_AT`` set to it (see
``embclf.faults.fault_point``), then attempts without it until one exits 0 (at most 3) -- the same command each
time, as a user or a batch system restarting a killed job would. Prints one JSON object: for each run the
list of attempts, ``{"kill_at": spec or null, "signal": name or null, "exit": code or null, "statuses": {run dir
relative to run_dir: its summary's status}}``.

Each attempt is a ``fork()`` of the calling process, which has imported embclf (torch, Hydra, the stages)
once: an attempt then costs its own work, not an interpreter start (~10 s of CPU each on the CI machine).
Each child runs the real entrypoint, ``embclf.__main__.main`` under Hydra, as ``python -m embclf`` does, with
one torch thread (set before anything runs, so no OpenMP pool inherited from the parent is ever used).
``test_resume.py`` calls :func:`run_sequences` in the pytest process when it runs no other thread (fork copies
only the calling thread), and runs this file as a script otherwise.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from pathlib import Path


def reset_signals() -> None:
    """Give a forked child the signal dispositions a fresh interpreter starts with (SIGINT: Python's
    KeyboardInterrupt handler; SIGTERM, SIGUSR1/2, SIGHUP: the default action). A fork inherits the test
    process's, and an earlier test in the same pytest worker may have left one ignored or handled (the
    entrypoint's interrupt path ignores further signals, as a process about to exit may). Then
    ``embclf.lifecycle.stop_on_signals``, which takes over only default dispositions, left the run running on
    through a signal: test_signals failed that way in full-suite runs on a busy machine."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def attempt(args, run_dir: Path, kill_at, log_path: Path, timeout_s: float = 300) -> dict:
    """One run of the entrypoint in a forked child; returns how it ended."""
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # the child never scans (copies) this process's objects (as conftest.run_module)
    pid = os.fork()
    if pid == 0:  # the child: the real entrypoint with the real command line
        code = 1
        try:
            import torch

            reset_signals()  # a fresh interpreter's dispositions, not the test process's
            torch.set_num_threads(1)
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # the streams may be pytest's capture objects, not fds 1/2: the log must reach the file
            sys.stdout = sys.stderr = open(fd, "a", buffering=1, closefd=False)
            if kill_at:
                os.environ["EMBCLF_KILL_AT"] = kill_at
            else:
                os.environ.pop("EMBCLF_KILL_AT", None)
            sys.argv = ["embclf", *args, f"hydra.run.dir={run_dir}"]
            from embclf.__main__ import main

            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    gc.unfreeze()
    deadline = time.time() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:  # never hang a test run
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"attempt {kill_at or '(no kill)'} in {run_dir} ran over {timeout_s}s; see {log_path}")
        time.sleep(0.05)
    # what each run dir's summary.json said when the attempt ended ({"autoencode": "interrupted", ...})
    statuses = {}
    for summary in sorted(Path(run_dir).rglob("summary.json")):
        try:
            statuses[summary.parent.relative_to(run_dir).as_posix()] = json.loads(summary.read_text()).get("status")
        except ValueError:
            statuses[summary.parent.relative_to(run_dir).as_posix()] = "unreadable"
    if os.WIFSIGNALED(status):
        return {"kill_at": kill_at, "signal": signal.Signals(os.WTERMSIG(status)).name, "exit": None,
                "statuses": statuses}
    return {"kill_at": kill_at, "signal": None, "exit": os.WEXITSTATUS(status), "statuses": statuses}


def run_sequences(spec: dict) -> dict:
    """Run every run of ``spec`` (see the module docstring); returns {run name: [attempt, ...]}."""
    import embclf.__main__  # noqa: F401  -- imported once, before any fork
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # what the classify stage's figures import, also once
    import sklearn.metrics  # noqa: F401

    out = {}
    for name, run in spec["runs"].items():
        run_dir = Path(run["run_dir"])
        log_path = run_dir.parent / f"{run_dir.name}.attempts.log"
        args = spec["args"] + run.get("extra_args", [])
        attempts = [attempt(args, run_dir, k, log_path) for k in run.get("kills", [])]
        for _ in range(3):  # restart until it completes
            attempts.append(attempt(args, run_dir, None, log_path))
            if attempts[-1]["exit"] == 0:
                break
        out[name] = attempts
    return out


def run_spec(tmp: Path, spec: dict, env: dict) -> dict:
    """Run ``spec`` (:func:`run_sequences`) with ``env`` as the environment and ``tmp`` as the working dir:
    by forking the calling process when it is single-threaded (no second import of torch), else running this file
    as a child of the test zygote (``conftest.zygote_python``: fork would copy only the calling thread). Returns what
    run_sequences does."""
    import threading

    if threading.active_count() == 1 and hasattr(os, "fork"):
        old, cwd = os.environ.copy(), os.getcwd()
        os.environ.update(env)
        os.chdir(tmp)
        try:
            return run_sequences(spec)
        finally:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(old)
    import subprocess

    from conftest import zygote_python

    (Path(tmp) / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([zygote_python(tmp), str(Path(__file__).resolve()), str(Path(tmp) / "spec.json")], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(spec_path: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(json.dumps(run_sequences(json.loads(Path(spec_path).read_text()))))


if __name__ == "__main__":
    main(sys.argv[1])
