"""Shared fixtures and helpers: the real CIFAR-10 subset from ../shared, running embclf, the shared sweeps.

- ``run_embclf``: the product's own command line, ``python -m embclf ARGS`` (or another ``-m`` module), as a
  separate process. By default that process is a fork of this pytest process, which imported torch, Hydra and
  embclf once (:func:`run_module`): each run then costs its own work, not ~7 s of CPU for the interpreter's
  start-up. Sweeps (``-m``) are children of the zygote instead (:class:`_Zygote`: a ``python`` per test process
  that imported the same once and never runs a torch op, so its children may use any number of torch threads);
  ``start_module`` starts such a child in the background (a Popen-like handle) for the tests that signal, stop or
  watch a run. A benchmark script's ``python`` is :func:`zygote_python`: its ``python -m``/``-c``/``-``/``SCRIPT``
  commands run as children of the zygote too. A run may be another user (``user=``, as ``setpriv`` makes it) or
  have a ``preexec`` (a resource limit: ``ulimit -f``). ``fresh=True`` and ``EMBCLF_TEST_FRESH=1`` (the
  whole suite) start a new interpreter; the tests whose subject is a new interpreter (what it imports, signals it
  inherits ignored, a CUDA driver initialised in the launcher, a hidden optional package) start it with
  ``subprocess``.
- Session fixtures built once and only read by the tests that use them: ``tiny_sweep`` (a 2x2 sweep, both
  stages), ``failing_sweep`` (a sweep with one failing job), ``slurm_cluster`` (a real local SLURM).
- Markers (registered in pyproject.toml): ``slow`` (trains through the CLI, runs a benchmark script or fresh interpreters, or needs root), ``slurm`` (needs the
  local SLURM cluster). ``pytest -m "not slow and not slurm"`` is the quick subset (≤ 1 min, no root, no SLURM).
  Tests using ``slurm_cluster`` are marked ``slurm`` and tests using ``small_tmpfs`` ``slow`` here, automatically.
- Under pytest-xdist (``-n 2 --dist loadfile``, pyproject's addopts) each test file runs on one worker, so a
  module fixture is built once; the shared sweeps are built once per session by whichever worker asks first
  (``_once``: a file lock in the base temp dir the workers share), the other worker reads the record.
  (``--dist loadgroup`` would not do: with pytest 9 its ``xdist_group`` marks are not applied, checked with
  pytest 9.2 / pytest-xdist 3.8.) Files are handed out longest first (``LONGEST_FIRST``), and each test process
  and every run it starts use cores // workers torch threads (``pytest_configure``): never more threads than cores.

Helpers for hand-written run dirs are in ``report_fixtures.py``, those of the launcher/SLURM tests in
``slurm_fixture.py``, the kill-and-resume driver in ``resume_harness.py``, the wandb log reader in ``wandb_log.py``.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest


REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"

# A few hundred real images and 2 epochs: enough for above-chance probes, seconds per job. A two-layer conv
# encoder (32 px -> 8x8 x 64 channels): the reference model's 5 layers cost ~25x its compute, and nothing the
# shared sweeps' tests check depends on them.
SMALL_MODEL = ["model.channels=[32,64]", "model.strides=[2,2]"]
TINY = ["data=folder", f"data.root={CIFAR}", "data.train_size=500", "data.test_size=200",
        "autoencode.epochs=2", "autoencode.batch_size=50", "autoencode.image_epochs=[1]",
        "classify.epochs=30", *SMALL_MODEL]

# Smaller still, for tests that check mechanics (layout, resume), not accuracy.
MINI = ["data=folder", f"data.root={CIFAR}", "data.train_size=300", "data.test_size=100",
        "autoencode.batch_size=50", "autoencode.image_epochs=[1]", "classify.epochs=3",
        "logger.projections=[pca]"]

SECRET = "embclf-test-secret-" + "0123456789abcdef" * 2  # shaped like a real 40-character WANDB_API_KEY


# ------------------------------------------------------------------------------------------------
# running embclf



def embclf_env(tmp: Path) -> dict:
    """Environment for embclf runs: offline wandb, caches inside the test's tmp dir, this checkout first on the
    path (its embclf package and its hydra_plugins/)."""
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", XDG_CACHE_HOME=str(tmp / "xdg-cache"),
               HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("WANDB_API_KEY", None)
    return env


def _can_fork() -> bool:
    # fork copies only the calling thread: with another thread alive (one an earlier test left running) a lock
    # it held would stay locked in the child forever
    return hasattr(os, "fork") and threading.active_count() == 1 and os.environ.get("EMBCLF_TEST_FRESH") != "1"


_WARM = False


def _warm_imports() -> None:
    """Import once, in this process, what every run imports: each forked run then starts at once."""
    global _WARM
    if not _WARM:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
        import sklearn.metrics  # noqa: F401 -- the classify stage's probes

        import embclf.__main__  # noqa: F401 -- torch, Hydra, the stages, the launcher's imports
        _WARM = True


def _child(module: str, args: List[str], cwd: Path, env: Dict[str, str], out_fd: int, err_fd: int,
           zygote: bool = False, in_fd: Optional[int] = None, form: str = "-m", user: Optional[int] = None) -> None:
    """In the forked child: ``python -m MODULE ARGS`` as the interpreter runs it, then ``os._exit``. ``zygote``: a
    child of the zygote (:class:`_Zygote`), which never ran a torch op: its exit handlers are the ones a fresh
    interpreter has and torch keeps its default thread count, as in a fresh interpreter. ``form`` (for
    :func:`zygote_python`, stdin ``in_fd``): ``-c`` (MODULE is the code), ``-`` (the code is read from stdin) or
    ``path`` (MODULE is a script's path), as ``python -c CODE ARGS``, ``python - ARGS``, ``python PATH ARGS``.
    ``user``: the run is that user (its group, no supplementary groups), as ``setpriv --reuid=U --regid=U
    --clear-groups`` makes it (from root)."""
    code = 1
    try:
        if user is not None:
            os.setgroups([])
            os.setgid(user)
            os.setuid(user)
        import atexit
        import runpy
        import signal

        if in_fd is not None:  # zygote_python: the caller's stdin (a script's here-document, say)
            os.dup2(in_fd, 0)
            sys.stdin = open(0, "r", closefd=False)
        elif zygote:  # the zygote's stdin/stdout are its pipes to the test process
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        # pytest's capture objects stand in for sys.stdout/err here: the child's output must reach fds 1 and 2
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        # a fresh interpreter's signal dispositions, as resume_harness.reset_signals gives a forked attempt (not
        # imported: the zygote took tests/ off sys.path after importing this file)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)
        if zygote and env.get("OMP_NUM_THREADS", "").isdigit():  # read at start-up by a fresh interpreter
            import torch

            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        if not zygote:
            atexit._clear()  # pytest's exit handlers are not this process's to run
            import torch

            # one thread: no OpenMP pool inherited from the parent is ever used (its threads do not exist here)
            torch.set_num_threads(1)
        identity = sys.modules.get("embclf.identity")
        if identity is not None:  # its per-process token (sweep and run dir names), drawn anew as a new process does
            identity._SWEEP_TOKEN = os.urandom(3).hex()
        if form in ("-c", "-"):  # sys.path[0] is the working dir, as the interpreter's
            sys.argv = [form, *args]
            sys.path.insert(0, "")
            source = module if form == "-c" else sys.stdin.read()
            exec(compile(source, "<string>" if form == "-c" else "<stdin>", "exec"), {"__name__": "__main__"})
        elif form == "path":  # sys.path[0] is the script's dir
            sys.argv = [module, *args]
            sys.path.insert(0, os.path.dirname(os.path.abspath(module)))
            runpy.run_path(module, run_name="__main__")
        else:
            sys.argv = [module, *args]
            # what runs as __main__ was imported above (_warm_imports): not in sys.modules, as in a fresh
            # interpreter (runpy would warn, on stderr, that it found it there)
            sys.modules.pop(module + ".__main__" if hasattr(sys.modules.get(module), "__path__") else module, None)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"): printed, status 1, as the interpreter does
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 -- as the interpreter would: traceback on stderr, status 1
        import traceback

        traceback.print_exc()
    finally:
        try:
            import atexit
            import logging

            atexit._run_exitfuncs()  # what the run registered (wandb's teardown and such)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _zygote_main() -> None:
    """The zygote process (:class:`_Zygote`): import what every run imports, never run a torch op, then for each
    request line on stdin (JSON: module, args, cwd, env, out, err) fork a child that runs ``python -m MODULE ARGS``
    (:func:`_child`) with its stdout/stderr in the files named and print ``pid PID``; whenever a child ends print
    ``exit PID STATUS CPU`` (``os.waitpid``'s status; the user+sys seconds of the run and what it waited for).
    Several children may run at once. Ends at the end of stdin (its test process ended).

    It also serves :func:`zygote_python`'s callers on the Unix socket ``EMBCLF_TEST_ZYGOTE_SOCKET``: one
    connection per call brings the caller's stdin/stdout/stderr (SCM_RIGHTS) and then its argv, working dir and
    environment (JSON); the child runs with those, and the caller is sent ``exit STATUS`` when it ends."""
    import json
    import select
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.environ["EMBCLF_TEST_ZYGOTE_SOCKET"])
    server.listen(16)
    callers: Dict[int, "socket.socket"] = {}  # child pid -> its zygote_python caller's connection
    _warm_imports()
    # every child's first full collection would walk (and so copy) the ~500,000 objects imported here: ~0.3 s of
    # CPU and ~130 MB of copied pages per run. Frozen, they are never scanned (the gc.freeze recipe in the Python
    # docs; the local launcher does the same for its forked workers, forked_job.py)
    gc.freeze()
    while True:
        ready, _, _ = select.select([sys.stdin, server], [], [], 0.05)
        while True:  # report every child that ended
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            print(f"exit {pid} {status} {usage.ru_utime + usage.ru_stime:.3f}", flush=True)
            conn = callers.pop(pid, None)
            if conn is not None:  # a shell's status: 128 + N for signal N
                code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                try:
                    conn.sendall(f"exit {code}\n".encode())
                except OSError:
                    pass
                conn.close()
        if server in ready:
            conn, _ = server.accept()
            _, fds, _, _ = socket.recv_fds(conn, 1, 3)
            data = b""
            while chunk := conn.recv(1 << 16):
                data += chunk
            req = json.loads(data)
            argv = req["argv"]
            form = argv[0] if argv[0] in ("-m", "-c", "-") else "path"
            module, args = (argv[1], argv[2:]) if form in ("-m", "-c") else (argv[0], argv[1:])
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                server.close()
                _child(module, args, Path(req["cwd"]), req["env"], fds[1], fds[2], zygote=True, in_fd=fds[0],
                       form=form)
            for fd in fds:
                os.close(fd)
            callers[pid] = conn
        if sys.stdin not in ready:
            continue
        line = sys.stdin.readline()
        if not line:
            return
        req = json.loads(line)
        out_fd = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        err_fd = out_fd if req["err"] == req["out"] else os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                                                  0o600)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(req["module"], req["args"], Path(req["cwd"]), req["env"], out_fd, err_fd, zygote=True)
        os.close(out_fd)
        if err_fd != out_fd:
            os.close(err_fd)
        print(f"pid {pid}", flush=True)


class _Zygote:
    """A fork server for the runs that must not be forks of the test process: a ``python`` started once per
    test process (per pytest-xdist worker) that imports torch, Hydra and embclf (~7 s of CPU, what every
    ``python -m embclf`` pays at start) and never runs a torch op, so its children start at once and, unlike forks
    of the test process, may use any number of torch threads: no OpenMP pool exists in them (a fork of a process
    whose OpenMP pool ran hangs in its first parallel region). Sweeps run here (their launcher forks workers that
    set their own thread counts), and the tests' background processes (:func:`start_module`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # one reader/writer of the pipes at a time
        self.ended: Dict[int, int] = {}  # pid -> waitpid status, of children whose end was read
        self.cpu_seconds = 0.0  # user+sys of the runs done here (they are not this process's children)
        self.pythonpath = embclf_env(Path(tempfile.gettempdir()))["PYTHONPATH"]
        self.socket_dir = tempfile.mkdtemp(prefix="embclf-zygote-")
        self.socket = os.path.join(self.socket_dir, "socket")
        env = {**os.environ, "PYTHONPATH": self.pythonpath, "EMBCLF_TEST_ZYGOTE_SOCKET": self.socket}
        self.log = tempfile.NamedTemporaryFile(prefix="embclf-zygote-", suffix=".log", delete=False)
        code = ("import sys; sys.path.insert(0, %r); import conftest; sys.path.remove(%r); conftest._zygote_main()"
                % (str(Path(__file__).parent), str(Path(__file__).parent)))
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log)
        self.buf, self.started = b"", None
        import atexit

        atexit.register(self.close)

    def close(self) -> None:
        """End the zygote (the end of its stdin) and remove its log."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        import shutil

        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def usable(self, env: Dict[str, str]) -> bool:
        # the zygote's sys.path is fixed at its start: a run asking for another PYTHONPATH gets its own python
        # (none at all: this checkout is the one installed, as in the zygote)
        return self.proc.poll() is None and env.get("PYTHONPATH") in (None, self.pythonpath)

    def _read(self, wait: float) -> None:
        """Read what the zygote printed, waiting up to ``wait`` seconds for it (under ``self.lock``)."""
        import select

        if b"\n" not in self.buf:
            ready, _, _ = select.select([self.proc.stdout], [], [], wait)
            if ready:
                data = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not data:
                    raise EOFError(f"the test zygote ended; its log: {self.log.name}")
                self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            words = line.decode().split()
            if words[0] == "pid":
                self.started = int(words[1])
            else:
                self.ended[int(words[1])] = int(words[2])
                self.cpu_seconds += float(words[3])

    def start(self, module: str, args: List[str], cwd: Path, env: Dict[str, str], out: Path, err: Path) -> int:
        """Fork ``python -m MODULE ARGS`` (output appended to ``out``/``err``, may be the same file); its pid."""
        import json

        with self.lock:
            self.started = None
            self.proc.stdin.write((json.dumps({"module": module, "args": [str(a) for a in args], "cwd": str(cwd),
                                               "env": dict(env), "out": str(out), "err": str(err)}) + "\n").encode())
            self.proc.stdin.flush()
            deadline = time.time() + 600  # (the first request waits for the zygote's imports)
            while self.started is None and time.time() < deadline:
                self._read(1.0)
            if self.started is not None:
                return self.started
        raise RuntimeError(f"the test zygote did not start {module}; its log: {self.log.name}")

    def poll(self, pid: int, wait: float = 0.0) -> Optional[int]:
        """The waitpid status of child ``pid`` once it ended, else None (after waiting up to ``wait`` seconds)."""
        deadline = time.time() + wait
        while True:
            with self.lock:
                if pid in self.ended:
                    return self.ended.pop(pid)
                self._read(max(0.0, min(0.2, deadline - time.time())))
                if pid in self.ended:
                    return self.ended.pop(pid)
            if time.time() >= deadline:
                return None


class ZygoteProcess:
    """A run started by :func:`start_module`: the parts of ``subprocess.Popen`` the tests use (``pid``, ``poll``,
    ``wait``, ``send_signal``, ``kill``, ``returncode``; exit status as Popen gives it, ``-N`` for signal N)."""

    def __init__(self, zygote: _Zygote, pid: int, args: List[str], out: Path):
        self.zygote, self.pid, self.args, self.out, self.returncode = zygote, pid, args, out, None

    def poll(self, wait: float = 0.0) -> Optional[int]:
        if self.returncode is None:
            status = self.zygote.poll(self.pid, wait)
            if status is not None:
                self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while self.poll(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.time()))) is None:
            if deadline is not None and time.time() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: Optional[float] = None):
        """Wait for the end; (its output file's text, None)."""
        self.wait(timeout)
        return self.out.read_text(errors="replace") if self.out.exists() else "", None

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(9)


_ZYGOTE: Optional[_Zygote] = None


def _zygote() -> _Zygote:
    global _ZYGOTE
    if _ZYGOTE is None or _ZYGOTE.proc.poll() is not None:
        _ZYGOTE = _Zygote()
    return _ZYGOTE


_CLIENT = """#!{python} -S
# python for the scripts a test runs (tests/conftest.py, zygote_python): the command runs in a child of the test
# process's zygote, which imported torch, Hydra and embclf once; the forms it does not serve run the real python
import json, os, socket, sys
PYTHON, SOCKET = {python!r}, {socket!r}
argv = sys.argv[1:]
if not argv or (argv[0] in ("-m", "-c") and len(argv) < 2) or (argv[0].startswith("-") and argv[0] not in ("-m", "-c", "-")):
    os.execv(PYTHON, [PYTHON, *argv])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(SOCKET)
except OSError:
    os.execv(PYTHON, [PYTHON, *argv])
socket.send_fds(s, [b"Z"], [0, 1, 2])
s.sendall(json.dumps({{"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}}).encode())
s.shutdown(socket.SHUT_WR)
reply = b""
while not reply.endswith(b"\\n"):
    chunk = s.recv(64)
    if not chunk:
        break
    reply += chunk
sys.exit(int(reply.split()[1]) if reply.startswith(b"exit ") else 1)
"""


def zygote_python(tmp: Path) -> str:
    """An executable to give a script as its ``python`` (``PY=...``): ``python -m MODULE``, ``-c CODE``, ``- <<EOF``
    and ``SCRIPT.py`` run as children of this test process's zygote (no interpreter start-up: ~4.5 s of CPU each
    for torch, torchvision and scikit-learn), with the caller's stdin/stdout/stderr, working dir, environment and
    exit status. ``sys.executable`` itself with ``EMBCLF_TEST_FRESH=1``."""
    if os.environ.get("EMBCLF_TEST_FRESH") == "1":
        return sys.executable
    zygote = _zygote()
    path = Path(tmp) / "zygote-python"
    path.write_text(_CLIENT.format(python=sys.executable, socket=zygote.socket))
    path.chmod(0o755)
    return str(path)


def start_module(module: str, args: List[str], cwd: Path, env: Dict[str, str], out: Path,
                 err: Optional[Path] = None):
    """``python -m MODULE ARGS`` started in the background, its stdout (and stderr, unless ``err``) appended to
    ``out``: a child of the zygote (:class:`ZygoteProcess`; no interpreter start-up to pay), or a
    ``subprocess.Popen`` with ``EMBCLF_TEST_FRESH=1`` or another PYTHONPATH. For the tests that signal, stop or
    watch a run while it runs."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    zygote = _zygote() if os.environ.get("EMBCLF_TEST_FRESH") != "1" else None
    if zygote is not None and zygote.usable(env):
        return ZygoteProcess(zygote, zygote.start(module, args, cwd, env, out, err or out), cmd, out)
    with open(out, "ab") as o, open(err or out, "ab") as e:
        return _FreshProcess(cmd, out, cwd=cwd, env=env, stdout=o, stderr=e)


class _FreshProcess(subprocess.Popen):
    """:func:`start_module`'s new interpreter: ``communicate`` returns its output file's text, as
    :meth:`ZygoteProcess.communicate` does."""

    def __init__(self, cmd: List[str], out: Path, **kw):
        super().__init__(cmd, **kw)
        self.out = out

    def communicate(self, input=None, timeout=None):
        self.wait(timeout)
        return self.out.read_text(errors="replace") if self.out.exists() else "", None


def _zygote_run(module: str, args: List[str], cwd: Path, env: Dict[str, str], timeout: float,
                merge_stderr: bool) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="embclf-run-") as d:
        out, err = Path(d) / "out", Path(d) / ("out" if merge_stderr else "err")
        proc = start_module(module, args, cwd, env, out, err)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:  # never hang a test run
            proc.kill()
            proc.wait()
            raise
        texts = [p.read_bytes().decode("utf-8", "replace") if p.exists() else "" for p in (out, err)]
    return subprocess.CompletedProcess(proc.args, proc.returncode, texts[0], "" if merge_stderr else texts[1])


def run_module(module: str, args: List[str], cwd: Path, env: Dict[str, str], timeout: float = 600,
               merge_stderr: bool = False, fresh: bool = False, preexec=None,
               user: Optional[int] = None) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in ``cwd`` with ``env``: a CompletedProcess with text stdout and stderr (stderr
    in stdout when ``merge_stderr``). A fork of this process unless ``fresh`` (see the module docstring); raises
    ``subprocess.TimeoutExpired`` (the process killed) after ``timeout`` seconds either way. ``preexec``: called in
    the new process before the run, as ``subprocess``'s ``preexec_fn`` (a resource limit). ``user``: the run is
    that user (root only), as ``setpriv --reuid=U --regid=U --clear-groups`` makes it; a new interpreter is started
    with ``setpriv`` when this process cannot fork. Neither is ever the zygote's child: the zygote has not imported
    everything a run imports, and a Python under root's 0700 home cannot import more as another user (setpriv
    keeps root's capabilities up to its exec, so its new interpreter may fall back to a system-wide stdlib)."""
    cmd = [sys.executable, "-m", module, *args]
    # sweeps (-m) are not forks of this process: a launcher forked from here forks its workers in turn, and a
    # worker that sets its torch threads above one can hang on the OpenMP pool an earlier in-process test started
    # here (seen: three sweeps that never ended, under pytest-xdist); they are children of the zygote, which never
    # ran a torch op (_Zygote). Single runs fork this process and keep one thread (see _child).
    sweep = "-m" in args or "--multirun" in args
    if (not fresh and os.environ.get("EMBCLF_TEST_FRESH") != "1" and (sweep or not _can_fork()) and preexec is None
            and user is None):
        if _zygote().usable(env):
            return _zygote_run(module, args, cwd, env, timeout, merge_stderr)
    if fresh or not _can_fork() or sweep:
        if user is not None:  # (not subprocess's user=: it drops root's capabilities before its exec)
            import shutil

            if shutil.which("setpriv") is None:  # as the tests did before forks could drop root
                pytest.skip("this process cannot fork, and setpriv (util-linux) is not installed")
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        return subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True,
                              timeout=timeout, preexec_fn=preexec)
    _warm_imports()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # the child never scans (copies) this process's objects; this process goes on as before
        pid = os.fork()
        if pid == 0:
            if preexec is not None:
                try:
                    preexec()
                except BaseException:  # noqa: BLE001 -- as subprocess reports a failed preexec_fn: no run
                    import traceback

                    traceback.print_exc(file=open(err.fileno(), "w", closefd=False))
                    os._exit(255)
            _child(module, [str(a) for a in args], Path(cwd), env, out.fileno(),
                   (out if merge_stderr else err).fileno(), user=user)
        gc.unfreeze()
        deadline = time.time() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() > deadline:  # never hang a test run
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(cmd, timeout)
            time.sleep(0.02)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", "replace"))
    return subprocess.CompletedProcess(cmd, code, texts[0], "" if merge_stderr else texts[1])


def run_embclf(args, tmp: Path, check: bool = True, timeout: int = 600, module: str = "embclf",
               env: Optional[Dict[str, str]] = None, fresh: bool = False, preexec=None,
               user: Optional[int] = None) -> subprocess.CompletedProcess:
    """Run ``python -m embclf ARGS`` (or ``-m MODULE``) in ``tmp`` and return the CompletedProcess (stdout and
    stderr as text); ``check``: raise AssertionError with both streams' tails unless it exits 0. ``fresh``,
    ``preexec``, ``user``: as :func:`run_module`'s."""
    proc = run_module(module, list(args), tmp, env or embclf_env(tmp), timeout=timeout, fresh=fresh,
                      preexec=preexec, user=user)
    if check and proc.returncode != 0:
        raise AssertionError(f"embclf {' '.join(map(str, args))} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


# ------------------------------------------------------------------------------------------------
# shared fixtures


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    if not (CIFAR / "train").is_dir():
        pytest.fail(f"real CIFAR-10 ImageFolder tree not found at {CIFAR} (expected ../shared beside the repo)")
    return CIFAR


def _encode(v):
    if isinstance(v, Path):
        return {"path": str(v)}
    if isinstance(v, subprocess.CompletedProcess):
        return {"proc": [v.args, v.returncode, v.stdout, v.stderr]}
    return {"value": v}


def _decode(v):
    if "path" in v:
        return Path(v["path"])
    if "proc" in v:
        return subprocess.CompletedProcess(*v["proc"])
    return v["value"]


def _once(tmp_path_factory, name: str, build) -> dict:
    """``build(tmp_dir)`` once per test session, also under pytest-xdist: there the first worker to ask builds it
    under a file lock in the base temp dir all workers share and records the result (a dict of paths,
    CompletedProcesses and plain values); the others wait for it and read the record."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    import json

    shared = tmp_path_factory.getbasetemp().parent
    record = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if record.is_file():
            return {k: _decode(v) for k, v in json.loads(record.read_text()).items()}
        tmp = shared / name
        tmp.mkdir(exist_ok=True)
        result = build(tmp)
        record.write_text(json.dumps({k: _encode(v) for k, v in result.items()}))
        return result


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, cifar_root):
    """A 2x2 sweep (model=ae,vae x latent=8,16): autoencode, then classify, as two separate sweeps.

    Returns dict with the tmp dir, the output dir and both processes. Built once per session (``_once``).
    """
    def build(tmp):
        out = tmp / "outputs"
        common = ["-m", "model=ae,vae", "latent=8,16", *TINY, f"output_dir={out}"]
        ae = run_embclf([*common, "stage=autoencode"], tmp)
        clf = run_embclf([*common, "stage=classify"], tmp)
        return {"tmp": tmp, "out": out, "ae": ae, "clf": clf}

    return _once(tmp_path_factory, "sweep", build)


@pytest.fixture(scope="module")
def sweep(tiny_sweep):
    """``tiny_sweep``, with this process reading the data cache its jobs wrote (no image is decoded again): for
    tests that evaluate, embed or report its runs in-process (test_evaluate.py, test_readonly_results.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tiny_sweep["tmp"] / "xdg-cache"))
        yield tiny_sweep


@pytest.fixture(scope="session")
def failing_sweep(tiny_sweep, tmp_path_factory):
    """A real sweep with a failing job (test_tracking.py, test_report.py).

    Two classify jobs in one process (Hydra's basic launcher) on the vae-z8 encoder of ``tiny_sweep``: the first
    (``head=mlp``) fails after its wandb run started (an injected failure after its first epoch:
    ``EMBCLF_KILL_AT``), the second (``head=knn``, no epochs) completes. A fake ``WANDB_API_KEY`` (``SECRET``) is
    set so the tests can check it is never written anywhere.

    Returns dict: out (output_dir), sweep (the sweep dir), proc (CompletedProcess), encoder (the vae-z8 run dir).
    Built once per session (``_once``).
    """
    return _once(tmp_path_factory, "failing", lambda tmp: _failing_sweep(tiny_sweep, tmp))


def _failing_sweep(tiny_sweep, tmp: Path) -> dict:
    from embclf import references, runs

    summaries = {d: runs.read_summary(d) for d in references.iter_run_dirs(tiny_sweep["out"])}
    encoder = next(d for d, s in summaries.items() if (s["stage"], s["model"], s["latent"]) == ("autoencode", "vae", 8))
    out = tmp / "outputs"
    env = embclf_env(tmp)
    env["WANDB_API_KEY"] = SECRET  # with mode=offline given explicitly: nothing may try to use it online
    # the mlp job fails after its first epoch (its wandb run has started); knn trains no epochs and completes
    env["EMBCLF_KILL_AT"] = "classify.metrics:1:raise"
    # quoted: run dir names contain '=' and ',' which Hydra's override grammar would otherwise split on
    tiny = [a for a in TINY if not a.startswith("classify.epochs=")]
    args = ["-m", "stage=classify", f"classify.encoder='{encoder}'", *tiny, "classify.epochs=2",
            "head=mlp,knn", "logger.wandb.mode=offline", "logger.projections=[pca]", f"output_dir={out}"]
    proc = run_embclf(args, tmp, check=False, timeout=300, env=env)
    sweeps = [p for p in out.iterdir() if p.is_dir()]
    assert len(sweeps) == 1, (proc.stdout[-3000:], proc.stderr[-3000:])
    return {"out": out, "sweep": sweeps[0], "proc": proc, "encoder": encoder}


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node SLURM with 2 fake GPUs on 127.0.0.1, started once per test session (needs root).

    See ``slurm_fixture.start_slurm``. Yields the SLURM_CONF path, also exported into os.environ so the
    launcher's sbatch/squeue/sacct calls find the cluster."""
    from slurm_fixture import start_slurm

    yield from start_slurm()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A factory: ``small_tmpfs(size_bytes, ro=False)`` mounts a tmpfs of that size (read-only if ``ro``) and
    returns its path: a real full (or read-only) file system. Unmounted at teardown. Needs root (skipped
    otherwise)."""
    mounted = []

    def mount(size: int, ro: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


# ------------------------------------------------------------------------------------------------
# markers


def pytest_configure(config):
    """Never oversubscribe the cores: each test process (one per xdist worker) and every run it starts use
    cores // workers torch threads, as the local launcher gives its concurrent jobs (two 2-thread jobs on 2 cores
    train ~2x slower than two 1-thread jobs: docs/performance.md). Set before any test module imports torch; runs
    inherit it through ``embclf_env``. A value already in the environment is kept. The xdist controller runs no
    test: its workers, which it starts with its environment, decide."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    if "OMP_NUM_THREADS" not in os.environ:
        from hydra_plugins.embclf_launcher.gpus import usable_cores  # the launcher's count (no torch import)

        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(max(1, usable_cores() // workers))


# The files that take longest run first (the list is the order measured 2026-12-07, when gpu_check took ~88 s; on
# 2026-12-08 at 68561b3, seconds on one worker of the 2-core CI-like machine: SLURM ~114, launcher_local ~53, e2e ~39,
# gpu_check ~20, gpu_fork_guard ~17, the others 15 or less; the two workers ended 7 s apart): xdist hands out whole files
# (--dist loadfile) in collection order (pyproject: --no-loadscope-reorder; its default puts the files with the
# most tests first, which started test_slurm.py and test_gpu_check.py last and left one worker idle at the end)
LONGEST_FIRST = ("test_slurm.py", "test_gpu_check.py", "test_launcher_local.py", "test_e2e.py",
                 "test_gpu_fork_guard.py", "test_signals.py", "test_evaluate.py", "test_readonly_results.py",
                 "test_locks.py", "test_relocate.py", "test_identity.py", "test_heads.py", "test_gate.py",
                 "test_resume.py", "test_probe_resume.py", "test_gpu_env.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    for item in items:
        names = set(item.fixturenames)
        if "slurm_cluster" in names:  # a real local SLURM, started as root
            item.add_marker(pytest.mark.slurm)
        if names & {"small_tmpfs", "tiny_sweep", "failing_sweep", "relocated"}:  # mounts a file system (root); a sweep
            item.add_marker(pytest.mark.slow)
