"""One process per run dir and per sweep dir (embclf/locks.py), and the record of every sweep into one sweep dir.

The process tests run the real ``python -m embclf`` (a subprocess each) on a tiny real CIFAR-10 subset. A first process is held in
place deterministically, without sleeps: ``EMBCLF_KILL_AT=startup:1:STOP`` makes it stop itself (SIGSTOP) once its
run dir and summary exist, the second process runs against it, and SIGCONT lets the first finish.
"""
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CIFAR, start_module
from embclf import hold_dirs, liveness, locks
from embclf.report import commands

ARGS = ["data=folder", f"data.root={CIFAR}", "data.train_size=60", "data.val_size=10", "data.test_size=20", "autoencode.batch_size=50",
        "autoencode.image_epochs=[1]", "autoencode.epochs=2", "logger=none"]


class Proc:
    """``python -m embclf ARGS`` as a real process of its own (not a fork of this pytest process, which would copy
    whatever threads earlier tests left running: a child of the test zygote, ``conftest.start_module``). Output
    goes to ``log``; ``kill_at`` sets ``EMBCLF_KILL_AT``."""

    def __init__(self, args, log: Path, kill_at: str = ""):
        self.log = log
        env = {k: v for k, v in os.environ.items() if k != "EMBCLF_KILL_AT"}
        env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                         env.get("PYTHONPATH")) if p)
        if kill_at:
            env["EMBCLF_KILL_AT"] = kill_at
        self.popen = start_module("embclf", args, log.parent, env, log)
        self.pid = self.popen.pid
        self.code = None

    def poll(self):
        """The exit status (minus the signal that ended it), or None while it runs."""
        self.code = self.popen.poll()
        return self.code

    def wait(self, timeout: float = 300) -> int:
        try:
            self.code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise TimeoutError(self.output()[-3000:]) from None
        return self.code

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def _start(args, tmp: Path, log: str, kill_at: str = "") -> Proc:
    return Proc(args, tmp / log, kill_at)


def _run(args, tmp: Path, log: str) -> Proc:
    proc = _start(args, tmp, log)
    proc.wait()
    return proc


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


def _wait_stopped(pid: int, proc: Proc = None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while _state(pid) != "T":
        assert time.time() < deadline, f"pid {pid} never reached its stop point"
        assert proc is None or proc.poll() is None, f"exited before its stop point: {proc.output()[-3000:]}"
        time.sleep(0.1)


def _snapshot(d: Path) -> dict:
    """Every file under ``d`` -> md5 of its content; a lock file -> its record without the heartbeat.

    A live holder rewrites its heartbeat every ``locks.HEARTBEAT_S`` seconds: on a loaded machine a refused second
    command can take longer than that, so the heartbeat is the one field that may move (who holds it may not)."""
    def content(p: Path):
        if p.name == ".embclf.lock":
            return {k: v for k, v in json.loads(p.read_text()).items() if k != "heartbeat"}
        return hashlib.md5(p.read_bytes()).hexdigest()
    # a heartbeat's temporary (``.embclf.lock.<token>.<ns>.tmp``) lives for a moment: not part of what is kept
    return {str(p.relative_to(d)): content(p) for p in sorted(d.rglob("*"))
            if p.is_file() and not (p.name.startswith(".embclf.lock.") and p.name.endswith(".tmp"))}


def _epochs(run_dir: Path) -> list:
    return [(r["epoch"], r["split"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def _no_lock_files(d: Path) -> list:
    return [str(p) for p in Path(d).rglob(".embclf.lock*")]


REFUSAL = r"embclf: error: {dir} is in use by pid {pid} on host {host} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d"


# --- the lock record: stale or live ---------------------------------------------------------------

def _record(**fields) -> dict:
    rec = locks._me("x" * 32)
    rec.update(fields)
    return rec


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_same_host_dead_or_reused_pid_is_stale_live_pid_holds():
    assert "no longer runs" in locks.stale_reason(_record(pid=_dead_pid(), proc_start=None))
    parent = os.getppid()
    assert locks.stale_reason(_record(pid=parent, proc_start=liveness.proc_start(parent))) is None
    # the pid now belongs to a process that started at another time: reused, so the holder is gone
    assert "no longer runs" in locks.stale_reason(_record(pid=parent, proc_start="1"))
    # a rebooted host: every pid of the record is from before
    assert "rebooted" in locks.stale_reason(_record(pid=parent, proc_start=liveness.proc_start(parent), boot_id="old"))


def test_other_host_is_judged_by_its_heartbeat():
    now = time.time()
    fresh = _record(host="node-b", pid=1234, heartbeat=now - 10)
    assert locks.stale_reason(fresh, now=now) is None
    old = _record(host="node-b", pid=1234, heartbeat=now - locks.STALE_S - 1)
    assert "heartbeat" in locks.stale_reason(old, now=now)
    # another pid namespace on this host (a container): its pids mean nothing here, the heartbeat decides
    assert locks.stale_reason(_record(pid=_dead_pid(), pid_ns="pid:[1]", heartbeat=now), now=now) is None


def test_a_requeued_slurm_job_takes_over_its_own_lock():
    now = time.time()
    rec = _record(host="node-a", pid=1234, heartbeat=now, slurm_job_id="77_3", slurm_restart_count=0)
    me_other_node = dict(locks._me("y" * 32), host="node-b", slurm_job_id="77_3", slurm_restart_count=1)
    assert "requeued" in locks.stale_reason(rec, now=now, me=me_other_node)
    # requeued onto the same node's name without a restart count (another node is what matters)
    assert "requeued" in locks.stale_reason(rec, now=now, me=dict(me_other_node, slurm_restart_count=0))
    # another SLURM job's fresh lock holds
    assert locks.stale_reason(rec, now=now, me=dict(me_other_node, slurm_job_id="78")) is None
    # on the holder's own host the process table decides, even for the same SLURM job id
    live = _record(pid=os.getppid(), proc_start=liveness.proc_start(os.getppid()), slurm_job_id="77_3")
    assert locks.stale_reason(live, me=dict(locks._me("z" * 32), slurm_job_id="77_3", slurm_restart_count=1)) is None


# --- acquire / refuse / take over / release, in this process --------------------------------------

@pytest.mark.slow
def test_refused_while_a_live_process_holds_it_and_nothing_changes(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        d = tmp_path / "run"
        d.mkdir()
        (d / "summary.json").write_text("{}")
        rec = _record(pid=holder.pid, proc_start=liveness.proc_start(holder.pid))
        (d / ".embclf.lock").write_text(json.dumps(rec))
        before = _snapshot(d)
        with pytest.raises(locks.InUseError) as e:
            locks.acquire(d)
        assert re.match(REFUSAL.replace("embclf: error: ", "").format(dir=re.escape(str(d)), pid=holder.pid,
                                                                        host=re.escape(socket.gethostname())),
                        str(e.value)), str(e.value)
        assert _snapshot(d) == before
        assert locks.holder(d)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing (kill -9): the next start takes its lock over
    assert locks.holder(d) is None
    lock = locks.acquire(d, heartbeat=False)
    assert locks.read_record(d)["pid"] == os.getpid() and locks.read_record(d)["token"] == lock.record["token"]
    lock.release()
    assert not (d / ".embclf.lock").exists() and sorted(p.name for p in d.iterdir()) == ["summary.json"]
    # a record nobody can read (not written by embclf, or cut short) and not just being written: stale too
    (d / ".embclf.lock").write_text("{")
    os.utime(d / ".embclf.lock", (time.time() - 60, time.time() - 60))
    with locks.hold(d, heartbeat=False):
        assert locks.read_record(d)["pid"] == os.getpid()
    assert not (d / ".embclf.lock").exists()


def test_reentrant_heartbeat_and_release(tmp_path, monkeypatch):
    threads = threading.active_count()
    a = locks.acquire(tmp_path / "d")
    b = locks.acquire(tmp_path / "d")  # the same process again (the callback, then run_job): one record
    assert a is b and locks.holder(tmp_path / "d") is None  # not held against itself
    assert threading.active_count() == threads + 1  # the heartbeat thread
    first = locks.read_record(tmp_path / "d")["heartbeat"]
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.0)
    locks.refresh()
    assert locks.read_record(tmp_path / "d")["heartbeat"] > first
    a.release()
    assert (tmp_path / "d" / ".embclf.lock").exists()
    b.release()
    assert _no_lock_files(tmp_path) == []
    assert threading.active_count() == threads  # no thread left behind (the fork-based tests need that)


# --- real processes -------------------------------------------------------------------------------

@pytest.mark.slow
def test_second_single_run_into_one_run_dir_is_refused_and_the_first_completes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*ARGS, f"hydra.run.dir={run_dir}"]
    first = _start(args, tmp_path, "first.log", kill_at="startup:1:STOP")
    try:
        _wait_stopped(first.pid, first)
        before = _snapshot(run_dir)
        assert ".hydra/overrides.yaml" in before and "embclf.log" in before and ".embclf.lock" in before
        second = _run(args, tmp_path, "second.log")
        assert second.code == 2, second.output()[-3000:]
        assert re.search(REFUSAL.format(dir=re.escape(str(run_dir)), pid=first.pid,
                                        host=re.escape(socket.gethostname())), second.output()), second.output()[-2000:]
        assert "Traceback" not in second.output()
        assert _snapshot(run_dir) == before  # not .hydra/, not embclf.log, not summary.json, not the lock
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.output()[-3000:]
    assert _epochs(run_dir) == [(1, "train"), (1, "val"), (2, "train"), (2, "val"), (2, "test")]
    assert json.loads((run_dir / "summary.json").read_text())["attempts"] == 1
    assert _no_lock_files(run_dir) == []  # released on completion


@pytest.mark.slow
def test_stale_lock_after_kill9_does_not_block_resume_and_every_exit_releases(tmp_path):
    runs = {name: tmp_path / name for name in ("killed", "raised", "sigterm", "bad_input")}
    runs["bad_input"].mkdir()
    (runs["bad_input"] / "keep.txt").write_text("not Hydra's: the run dir stays")
    kills = {"killed": "autoencode.metrics:1", "raised": "startup:1:raise",
             "sigterm": "autoencode.step:1:TERM", "bad_input": ""}
    procs = {}
    for name, d in runs.items():
        extra = [f"data.root={tmp_path / 'missing'}"] if name == "bad_input" else []
        procs[name] = _start([*ARGS, *extra, f"hydra.run.dir={d}"], tmp_path, f"{name}.log",
                             kill_at=kills[name])
    codes = {name: p.wait(timeout=300) for name, p in procs.items()}
    assert codes["killed"] == -signal.SIGKILL, codes
    assert codes["raised"] == 1 and codes["sigterm"] == 128 + signal.SIGTERM and codes["bad_input"] == 2, codes
    for name in ("raised", "sigterm", "bad_input"):  # exception, SystemExit from a signal, bad input: released
        assert _no_lock_files(runs[name]) == [], (name, (tmp_path / f"{name}.log").read_text()[-2000:])
    # kill -9 leaves its lock; the same command resumes at once: the dead holder is recognised as stale
    assert locks.read_record(runs["killed"])["pid"] == procs["killed"].pid
    resumed = _run([*ARGS, f"hydra.run.dir={runs['killed']}"], tmp_path, "resumed.log")
    assert resumed.code == 0, resumed.output()[-3000:]
    assert "taking over a stale lock (pid %d no longer runs" % procs["killed"].pid in resumed.output()
    assert _epochs(runs["killed"]) == [(1, "train"), (1, "val"), (2, "train"), (2, "val"), (2, "test")]
    assert _no_lock_files(runs["killed"]) == []


@pytest.mark.slow
def test_second_launcher_into_one_sweep_dir_is_refused_and_every_sweep_command_is_kept(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *ARGS, "seed=0", f"hydra.sweep.dir={sweep}"]
    first = _start(args, tmp_path, "first.log", kill_at="startup:1:STOP")
    worker = None
    try:
        deadline = time.time() + 120
        while not list(sweep.glob("*/.embclf.lock")):  # the job's worker holds its run dir
            assert time.time() < deadline and first.poll() is None, first.output()[-3000:]
            time.sleep(0.1)
        job_dir = next(sweep.glob("*/.embclf.lock")).parent
        worker = locks.read_record(job_dir)["pid"]
        _wait_stopped(worker)
        before = _snapshot(sweep)
        t0 = time.time()
        second = _run(args, tmp_path, "second.log")
        assert second.code == 2, second.output()[-3000:]
        assert re.search(REFUSAL.format(dir=re.escape(str(sweep)), pid=first.pid,
                                        host=re.escape(socket.gethostname())), second.output()), second.output()[-2000:]
        assert "start #" not in second.output()  # refused before planning anything
        assert _snapshot(sweep) == before  # multirun.yaml, the job's record and log untouched
        assert time.time() - t0 < 60
    finally:
        if worker is not None:
            os.kill(worker, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.output()[-3000:]
    assert _epochs(job_dir) == [(1, "train"), (1, "val"), (2, "train"), (2, "val"), (2, "test")]
    assert _no_lock_files(sweep) == []

    # a second sweep into the sweep dir (another seed) keeps the first's record; the report lists both commands
    third = _run(["-m", *ARGS, "seed=1", "autoencode.epochs=1", f"hydra.sweep.dir={sweep}"], tmp_path, "third.log")
    assert third.code == 0, third.output()[-3000:]
    assert sorted(p.name for p in sweep.glob("multirun*.yaml")) == ["multirun.001.yaml", "multirun.yaml"]
    assert "seed=0" in OmegaConf.load(sweep / "multirun.001.yaml").hydra.overrides.task
    assert "seed=1" in OmegaConf.load(sweep / "multirun.yaml").hydra.overrides.task
    cmds = commands([{"run_dir": str(d)} for d in sweep.iterdir() if (d / "summary.json").is_file()])
    assert len(cmds) == 2 and "seed=0" in cmds[0] and "seed=1" in cmds[1], cmds


# --- the sweep record, without processes ----------------------------------------------------------

def _multirun(task) -> str:
    return OmegaConf.to_yaml(OmegaConf.create({"hydra": {"overrides": {"task": task}}}))


def test_sweep_records_are_archived_in_order_and_the_report_lists_each_command_once(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "job").mkdir(parents=True)
    (sweep / "job" / "summary.json").write_text("{}")
    (sweep / "multirun.yaml").write_text(_multirun(["model=ae"]))
    assert hold_dirs.archive_sweep_record(sweep, _multirun(["model=ae"])) is None  # the same command again
    for task in (["model=vae"], ["model=vae"], ["seed=1"]):  # Hydra writes the new record after the archive
        hold_dirs.archive_sweep_record(sweep, _multirun(task))
        (sweep / "multirun.yaml").write_text(_multirun(task))
    assert [p.name for p in hold_dirs.sweep_record_archives(sweep)] == ["multirun.001.yaml", "multirun.002.yaml"]
    cmds = commands([{"run_dir": str(sweep / "job")}])
    assert [c.split("    #")[0] for c in cmds] == ["python -m embclf -m model=ae", "python -m embclf -m model=vae",
                                                    "python -m embclf -m seed=1"]
    # a sweep refused before any job started restores the earlier record
    hold_dirs.archive_sweep_record(sweep, _multirun(["bad=1"]))
    (sweep / "multirun.yaml").write_text(_multirun(["bad=1"]))
    hold_dirs.restore_sweep_record(sweep)
    assert (sweep / "multirun.yaml").read_text() == _multirun(["seed=1"])
    assert len(hold_dirs.sweep_record_archives(sweep)) == 2


@pytest.mark.slow
def test_launcher_sees_a_job_held_seconds_ago_before_its_summary_exists(tmp_path):
    from hydra_plugins.embclf_launcher.sweep_plan import PlannedJob, still_running

    job = PlannedJob(idx=0, overrides=["seed=0"], cfg=OmegaConf.create({"stage": "autoencode"}), run_dir=tmp_path / "j")
    assert still_running(job) is None
    holder = subprocess.Popen(["sleep", "60"])
    try:
        job.run_dir.mkdir()
        rec = _record(pid=holder.pid, proc_start=liveness.proc_start(holder.pid))
        (job.run_dir / ".embclf.lock").write_text(json.dumps(rec))  # no summary.json yet
        assert still_running(job).startswith(f"its run dir is in use by pid {holder.pid} on host ")
    finally:
        holder.kill()
        holder.wait()
    assert still_running(job) is None  # its holder died: stale, the job is resumed


@pytest.mark.parametrize("mode", ["single", "sweep", "sweep-dir", "not-permitted"])
def test_an_output_dir_that_cannot_be_written_is_one_paragraph_naming_the_key(tmp_path, small_tmpfs, mode):
    """output_dir on a read-only file system (a tmpfs mounted ro), or a directory this user may not write (run as
    nobody: a fork of this process that drops root as setpriv would, run_embclf's ``user``; root may write
    anywhere): one paragraph naming the key that put the run dir there and the fix, exit status 2, nothing written.
    A sweep dir set by hydra.sweep.dir names that key."""
    from conftest import embclf_env, run_embclf

    ro = small_tmpfs(1 << 20, ro=True)
    args = ["model=ae", "logger=none", f"output_dir={ro}/out"]
    env, key, cwd, user = embclf_env(tmp_path), "output_dir", tmp_path, None
    if mode == "sweep":
        args.insert(0, "-m")
    elif mode == "sweep-dir":
        args[0:0] = ["-m", f"hydra.sweep.dir={ro}/sweep"]
        key = "hydra.sweep.dir"
    elif mode == "not-permitted":
        locked = Path("/tmp") / f"embclf-locked-{os.getpid()}"
        locked.mkdir(mode=0o755, exist_ok=True)  # root's: nobody may read it, not write it
        args[-1] = f"output_dir={locked}/out"
        env.update(HOME="/tmp", XDG_CACHE_HOME="/tmp")
        cwd, user = Path("/tmp"), 65534
    # python -m embclf ARGS without the interpreter's start-up (a fork; a sweep: a child of the zygote)
    proc = run_embclf(args, cwd, check=False, timeout=300, env=env, user=user)
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stdout[-2000:] + err[-3000:]
    assert "Traceback" not in err and err.count("embclf: error:") == 1 and len(err.splitlines()) == 1, err
    why = "permission denied" if mode == "not-permitted" else "the file system is read-only"
    assert f"{why}. {key}=" in err and f"Set {key} to a directory you can write" in err, err
    if mode == "not-permitted":
        assert list(locked.iterdir()) == []
        locked.rmdir()
