"""The local launcher (``hydra/launcher=local``, the default for ``-m``) with the real ``python -m
embclf`` on a tiny real CIFAR-10 subset: one GPU per concurrent job, queueing, failure isolation,
killed jobs, re-invoking a finished sweep.

GPU assignment is tested on this CPU-only machine with ``hydra.launcher.gpus=[0,1]``: each job is
started with its slot's CUDA_VISIBLE_DEVICES, finds no CUDA device behind it, falls back to CPU and
records what it was given in its own summary.json.
"""
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import start_module
from slurm_fixture import (
    cifar_root,
    assert_no_gpu_shared_while_overlapping,
    embclf_env,
    overrides_of,
    run_dirs,
    run_embclf,
    summary,
    tiny_args,
    REPO,
    SLOW_STEPS,
)


@pytest.fixture(scope="module")
def gpu_sweep(tmp_path_factory):
    """5 jobs on 2 (fake) GPUs with jobs_per_gpu=1: at most 2 run at a time, 3 wait in the queue."""
    tmp = tmp_path_factory.mktemp("gpu_sweep")
    sweep_dir = tmp / "sweep"
    # data.root relative to the launch dir (REPO), as in the README: the re-invocation test then shows that the
    # launcher compares it as the jobs store it (absolute)
    rel = os.path.relpath(cifar_root(), REPO)
    args = [*[a if not a.startswith("data.root=") else f"data.root={rel}" for a in tiny_args(tmp, small=True)],
            "seed=1,2,3,4,5", "hydra.launcher.gpus=[0,1]", f"hydra.sweep.dir={sweep_dir}"]
    t0 = time.time()
    proc = run_embclf(*args)
    return {"proc": proc, "sweep_dir": sweep_dir, "args": args, "seconds": time.time() - t0}


@pytest.mark.slow
def test_one_gpu_per_concurrent_job(gpu_sweep):
    proc, sweep_dir = gpu_sweep["proc"], gpu_sweep["sweep_dir"]
    assert proc.returncode == 0, proc.stdout[-4000:]
    dirs = run_dirs(sweep_dir)
    assert len(dirs) == 5, [d.name for d in dirs]
    records = [summary(d) for d in dirs]
    assert sorted(r["seed"] for r in records) == [1, 2, 3, 4, 5]
    for d, r in zip(dirs, records):
        assert r["status"] == "completed", (d, r)
        # the job saw exactly one GPU id, found no CUDA behind it and said so
        assert r["cuda_visible_devices"] in ("0", "1"), r
        assert r["device"] == "cpu" and r["device_fallback"] is True, r
        assert "falling back to CPU" in (d / "embclf.log").read_text()
    assert_no_gpu_shared_while_overlapping(records)
    assert {r["cuda_visible_devices"] for r in records} == {"0", "1"}, "every GPU must be used"
    # it really ran in parallel: some pair of jobs overlapped in time
    assert any(
        a["start_time"] < b["end_time"] and b["start_time"] < a["end_time"]
        for i, a in enumerate(records) for b in records[i + 1:]
    ), "no two jobs ran at the same time"
    # one start and one end line per job, naming the GPU
    out = proc.stdout
    assert out.count("start #") == 5 and out.count("end   #") == 5, out[-3000:]
    # the workers were forked from the launcher (the default) and each used the threads it was given
    assert "workers forked from the launcher" in out, out[-3000:]
    threads = int(re.search(r"(\d+) thread\(s\) per job", out).group(1))
    for d in dirs:
        assert _threads_used(d) == threads, d
    assert "CUDA_VISIBLE_DEVICES=0" in out and "CUDA_VISIBLE_DEVICES=1" in out
    # each job keeps its own log and full overrides in its run dir (data.root has '/', the dir is flat)
    for d in dirs:
        assert d.parent == sweep_dir and (d / "embclf.log").is_file()
        assert any(o.startswith("data.root=") and "/" in o for o in overrides_of(d))


@pytest.mark.slow
def test_reinvoking_a_finished_sweep_skips_completed_jobs(gpu_sweep):
    sweep_dir = gpu_sweep["sweep_dir"]
    before = {d.name: summary(d) for d in run_dirs(sweep_dir)}
    proc = run_embclf(*gpu_sweep["args"])
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert proc.stdout.count("skip  #") == 5 and "start #" not in proc.stdout, proc.stdout[-3000:]
    after = {d.name: summary(d) for d in run_dirs(sweep_dir)}
    assert after == before  # nothing was retrained or rewritten


@pytest.mark.slow
def test_failed_jobs_are_isolated_recorded_and_all_named(tmp_path):
    """Two jobs fail at run time (a test subset larger than the 10,000 test images: only the data can
    tell); the third completes; the command exits non-zero naming both failed overrides."""
    sweep_dir = tmp_path / "sweep"
    proc = run_embclf(
        *tiny_args(tmp_path, small=True), "data.test_size=20000,100,30000", "hydra.launcher.gpus=[]",
        "hydra.launcher.max_parallel=2", f"hydra.sweep.dir={sweep_dir}",
    )
    assert proc.returncode != 0, proc.stdout[-3000:]
    out = proc.stdout
    assert "2 of 3 sweep jobs failed" in out, out[-3000:]
    tail = out[out.index("2 of 3 sweep jobs failed"):]
    assert "test_size=20000" in tail and "test_size=30000" in tail and "test_size=100 " not in tail, tail
    by_size = {}
    for d in run_dirs(sweep_dir):
        size = [o for o in overrides_of(d) if o.startswith("data.test_size=")][-1]
        by_size[size] = summary(d)
    assert by_size["data.test_size=100"]["status"] == "completed"
    for bad in ("data.test_size=20000", "data.test_size=30000"):
        assert by_size[bad]["status"] == "failed" and "test_size" in by_size[bad]["error"], by_size[bad]
    # the table lists every job with its status
    assert "completed" in out and out.count("failed") >= 2


@pytest.mark.slow
def test_invalid_values_fail_before_any_job_starts(tmp_path):
    """Value ranges are checked for every job in the launcher: nothing starts, every bad job is named with
    its key, and no sweep dir is left behind."""
    out_dir = tmp_path / "out"
    proc = run_embclf("latent=0,8,-3", "model.beta=-1", "logger=none", f"output_dir={out_dir}")
    assert proc.returncode != 0
    out = proc.stdout
    assert "3 of 3 sweep jobs have an invalid config, so nothing was started" in out, out[-3000:]
    assert "latent=0 is invalid" in out and "latent=-3 is invalid" in out and "latent=8 is invalid" not in out
    assert "model.beta=-1.0 is invalid" in out
    assert "start #" not in out and not any(out_dir.glob("*")), list(out_dir.glob("*"))


def _start_sweep(args, log: Path, env=None):
    """``python -m embclf -m ARGS`` in the background (conftest.start_module), its output in ``log``; ``env``: more
    environment (``SLOW_STEPS``)."""
    return start_module("embclf", ["-m", *args], REPO, embclf_env(env), log)


def _wait_training(sweep_dir, pattern, n, proc, timeout=180):
    """Wait until ``n`` job dirs matching ``pattern`` are training and have saved last.pt; returns
    {run dir: summary}."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {}
        for d in sweep_dir.glob(pattern) if sweep_dir.is_dir() else []:
            s = d / "summary.json"
            if s.is_file() and (d / "checkpoints" / "last.pt").is_file():
                rec = json.loads(s.read_text())
                if rec.get("status") == "running":
                    found[d] = rec
        if len(found) >= n:
            return found
        assert proc.poll() is None, f"the sweep ended early: {proc.communicate()[0][-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {n} training jobs matching {pattern}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _sweep_killing_one(sweep_dir, *args, epochs=4):
    """Run the 2-job sweep ``autoencode.epochs=1,<epochs>`` (2 slots, CPU, ``SLOW_STEPS``) and SIGKILL the longer
    job's worker from outside once it trains; returns (the sweep's command-line args, its exit code, its output,
    the killed job's run dir)."""
    args = [*args, f"autoencode.epochs=1,{epochs}", "hydra.launcher.gpus=[]", "hydra.launcher.max_parallel=2",
            f"hydra.sweep.dir={sweep_dir}"]
    proc = _start_sweep(args, Path(sweep_dir).parent / "sweep.log", SLOW_STEPS)
    try:
        victim, rec = next(iter(_wait_training(sweep_dir, f"*epochs={epochs}*", 1, proc).items()))
        os.kill(rec["pid"], signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return args, proc.returncode, out, victim


@pytest.mark.slow
def test_killed_job_is_recorded_killed_and_reinvoking_resumes_it(tmp_path):
    """A worker killed from outside (SIGKILL, as the OOM killer does) writes nothing itself: the
    launcher records it in its run dir as status "killed" with the signal (not a bare log tail), the
    sweep report shows it, the other job completes, the command exits non-zero.
    Re-invoking the same sweep into its sweep dir skips the completed job and resumes the killed one
    from its last.pt."""
    sweep_dir = tmp_path / "sweep"
    epochs = 4
    args, code, out, victim = _sweep_killing_one(sweep_dir, *tiny_args(tmp_path, small=True), epochs=epochs)
    assert code != 0, out[-3000:]
    assert "1 of 2 sweep jobs failed" in out and f"autoencode.epochs={epochs}" in out, out[-3000:]
    killed = summary(victim)
    assert killed["status"] == "killed" and killed["signal"] == "SIGKILL", killed
    assert killed["error"].startswith("killed by SIGKILL (signal 9)") and "Traceback" not in killed["error"], killed
    assert killed["reason"] in ("SIGKILL", "out of memory"), killed  # the OOM killer's own kill reads the latter
    from embclf import report

    row = next(r for r in report.collect([sweep_dir]) if Path(r["run_dir"]) == victim.resolve())
    assert row["status"] == "killed" and "SIGKILL" in row["error"], row
    other = [d for d in run_dirs(sweep_dir) if d != victim]
    assert [summary(d)["status"] for d in other] == ["completed"]
    other_before = summary(other[0])

    again = run_embclf(*args)
    assert again.returncode == 0, again.stdout[-4000:]
    assert again.stdout.count("skip  #") == 1 and again.stdout.count("start #") == 1, again.stdout[-3000:]
    assert summary(other[0]) == other_before  # the completed job was not touched
    final = summary(victim)
    assert final["status"] == "completed" and final["epochs"] == epochs, final
    assert final.get("resumed_from_epoch", 0) >= 1, final
    assert "resuming from" in (victim / "embclf.log").read_text()
    assert run_dirs(sweep_dir) == sorted([victim, other[0]])  # same run dirs, no new ones


@pytest.mark.slow
def test_stopping_the_launcher_stops_its_jobs(tmp_path):
    """While a sweep runs, a second invocation into its sweep dir refuses to start its jobs again.
    SIGTERM (or Ctrl-C) to the launcher stops every running job -- no orphaned workers -- and
    records them "interrupted", so a re-invoked sweep resumes them."""
    sweep_dir = tmp_path / "sweep"
    args = [*tiny_args(tmp_path, small=True), "autoencode.epochs=40", "seed=1,2,3", "hydra.launcher.gpus=[]",
            "hydra.launcher.max_parallel=2", f"hydra.sweep.dir={sweep_dir}"]
    proc = _start_sweep(args, tmp_path / "first.log", SLOW_STEPS)
    try:
        running = _wait_training(sweep_dir, "*", 2, proc)
        # a second invocation into the same sweep dir is refused at once: the launcher holds it (embclf.locks)
        second = run_embclf(*args, timeout=120)
        assert second.returncode == 2 and f"{sweep_dir} is in use by pid {proc.pid} on host " in second.stdout, \
            second.stdout[-3000:]
        assert "start #" not in second.stdout
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert out.count("stopping #") == 2, out[-3000:]
    for d, rec in running.items():
        assert not _alive(rec["pid"]), f"job {d.name} (pid {rec['pid']}) still runs after the launcher stopped"
        after = summary(d)
        # the launcher's record, or the core's own when the signal reached it first: "interrupted", never "failed"
        assert after["status"] == "interrupted", after
    assert len(run_dirs(sweep_dir)) == 2  # the queued third job never started
    # one message saying how to resume, not a traceback
    assert "sweep interrupted" in out and f"hydra.sweep.dir={sweep_dir}" in out and "Traceback" not in out, out[-3000:]


@pytest.mark.slow
def test_two_sweeps_started_together_never_share_a_dir(tmp_path):
    """Same command, same output_dir, same second: each invocation gets its own sweep dir (the
    random token in the sweep dir name), so their run dirs cannot collide."""
    args = [*tiny_args(tmp_path, small=True), "latent=8", "hydra.launcher.gpus=[]"]
    procs = [_start_sweep(args, tmp_path / f"sweep{i}.log") for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    sweeps = sorted(d for d in (tmp_path / "out").iterdir() if d.is_dir() and (d / "multirun.yaml").is_file())
    assert len(sweeps) == 2, sweeps
    for sweep in sweeps:
        dirs = run_dirs(sweep)
        assert len(dirs) == 1 and summary(dirs[0])["status"] == "completed"


@pytest.mark.slow
def test_invalid_job_config_fails_before_any_job_starts(tmp_path):
    """Hydra's sweeper checks that each job composes (stopping at the first); the launcher also
    resolves every job's whole config and names every bad job before starting any. Here two of
    three jobs interpolate an environment variable that is not set."""
    sweep_dir = tmp_path / "sweep"
    proc = run_embclf(*tiny_args(tmp_path, small=True),
                      "classify.encoder=${oc.env:EMBCLF_TEST_UNSET_A},null,${oc.env:EMBCLF_TEST_UNSET_B}",
                      f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode != 0
    out = proc.stdout
    assert "2 of 3 sweep jobs have an invalid config, so nothing was started" in out, out[-3000:]
    assert "EMBCLF_TEST_UNSET_A" in out and "EMBCLF_TEST_UNSET_B" in out and "start #" not in out
    assert not (sweep_dir / ".submitit").exists()


def _threads_used(run_dir):
    """The torch thread count the job logged at its start (``device cpu (cpu), 1 threads, ...``)."""
    m = re.search(r"device .*?, (\d+) threads", (run_dir / "embclf.log").read_text())
    assert m, f"no thread count in {run_dir}/embclf.log"
    return int(m.group(1))


@pytest.mark.slow
def test_fork_false_runs_each_job_in_a_fresh_interpreter(tmp_path):
    """hydra.launcher.fork=false: submitit's own local executor (a controller process and a fresh
    ``python -m submitit.core._submit`` per job) -- the fallback where forking is unsafe.  Two jobs at
    once: each uses the thread count the launcher printed; one killed from outside is recorded "killed"
    with its signal (submitit's controller discards the task's exit status: the exit_status wrapper
    keeps it), the other completes; ``.submitit/`` holds one folder per job and no literal ``%j``."""
    sweep_dir = tmp_path / "sweep"
    _, code, out, victim = _sweep_killing_one(sweep_dir, *tiny_args(tmp_path, small=True), "hydra.launcher.fork=false")
    assert code != 0, out[-4000:]
    assert "workers fresh python per job (hydra.launcher.fork=false)" in out, out[-3000:]
    printed = int(re.search(r"(\d+) thread\(s\) per job", out).group(1))
    killed = summary(victim)
    assert killed["status"] == "killed" and killed["signal"] == "SIGKILL", killed
    assert killed["error"].startswith("killed by SIGKILL (signal 9)"), killed
    (other,) = [d for d in run_dirs(sweep_dir) if d != victim]
    rec = summary(other)
    assert rec["status"] == "completed", rec
    for d in (victim, other):
        assert _threads_used(d) == printed, (d, printed, out[-2000:])
    # each job ran in submitit's task process (under the exit-status wrapper), not in its controller,
    # whose pid names the job's folder; no folder is left named after the pattern itself
    folders = sorted(f for f in (sweep_dir / ".submitit").iterdir() if f.is_dir())
    assert len(folders) == 2 and all(f.name.isdigit() for f in folders), [f.name for f in folders]
    done = next(f for f in folders if (f / f"{f.name}_0_result.pkl").is_file())
    assert rec["pid"] != int(done.name)
    assert json.loads((done / f"{done.name}_0_exit.json").read_text())["returncode"] == 0


# --- ForkedJob on its own: plain functions instead of Hydra jobs, run in forks of this test process.
# (Module-level functions, so that cloudpickle pickles them by reference.)

def _return_value(x):
    return {"x": x, "pid": os.getpid(), "omp": os.environ.get("OMP_NUM_THREADS"),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "job": os.environ.get("SUBMITIT_LOCAL_JOB_ID")}


def _raise_value_error(msg):
    raise ValueError(msg)


def _requeue_once(marker):
    """First start: ask to be requeued (what submitit's USR2 handler does after a checkpoint)."""
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    marker = Path(marker)
    if not marker.exists():
        marker.write_text("started once")
        sys.exit(LOCAL_REQUEUE_RETURN_CODE)
    return os.getpid()


def _sleep(seconds):
    time.sleep(seconds)
    return "slept"


def _sleep_ignoring_signals(seconds):
    for sig in (signal.SIGUSR2, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    time.sleep(seconds)
    return "slept"


def _forked(tmp_path, fn, *args, timeout_s=600.0, signal_delay_s=60.0):
    from submitit.core.utils import DelayedSubmission

    from hydra_plugins.embclf_launcher.forked_job import ForkedJob

    delayed = DelayedSubmission(fn, *args)
    delayed.set_timeout(1, 3)
    tmp = tmp_path / f"{fn.__name__}.pkl"
    delayed.dump(tmp)
    env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_GLOBALID": "0",
           "SUBMITIT_LOCAL_LOCALID": "0", "CUDA_VISIBLE_DEVICES": "3", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    return ForkedJob(str(tmp_path / "submitit" / "%j"), tmp, env, 1, timeout_s=timeout_s,
                     signal_delay_s=signal_delay_s, plan=(0, (), None))


def _wait(job, limit=60.0):
    deadline = time.time() + limit
    while not job.done():
        assert time.time() < deadline, "forked job did not end"
        time.sleep(0.05)


def test_forked_job_returns_fails_requeues_and_dies_like_a_submitit_job(tmp_path):
    from submitit.core.utils import FailedJobError, UncompletedJobError

    ok = _forked(tmp_path, _return_value, 7)
    _wait(ok)
    value = ok.result()
    # the worker is a separate process with the job's environment; its folder is named after its pid
    assert value["x"] == 7 and value["pid"] == ok.pid != os.getpid(), value
    assert (value["omp"], value["cuda"], value["job"]) == ("1", "3", ok.job_id), value
    folder = tmp_path / "submitit" / ok.job_id
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{ok.job_id}_{n}" for n in ("0_log.err", "0_log.out", "0_result.pkl", "submitted.pkl"))
    assert os.environ.get("SUBMITIT_LOCAL_JOB_ID") is None  # nothing leaked into this process

    bad = _forked(tmp_path, _raise_value_error, "no good")
    _wait(bad)
    with pytest.raises(FailedJobError, match="ValueError: no good"):
        bad.result()

    again = _forked(tmp_path, _requeue_once, str(tmp_path / "marker"))
    _wait(again)
    # a second worker (its own pid) under the same job id and folder
    assert again.starts == 2 and again.result() == again.pid != int(again.job_id)

    t0 = time.time()
    killed = _forked(tmp_path, _sleep, 60)
    time.sleep(0.5)
    os.kill(killed.pid, signal.SIGKILL)
    _wait(killed)
    with pytest.raises(UncompletedJobError, match="SIGKILL"):
        killed.result()
    assert time.time() - t0 < 10  # no waiting for a result file that a dead worker cannot write


def test_a_result_left_by_an_earlier_worker_of_the_same_pid_is_never_read(tmp_path, monkeypatch):
    """The job folder is named after the worker's pid; pids repeat (a new container, a reboot), so an
    earlier sweep into the same sweep dir may have left a result there. A killed worker must read as
    killed, not as that earlier job's success."""
    import submitit
    from submitit.core.utils import JobPaths, UncompletedJobError

    from hydra_plugins.embclf_launcher import forked_job

    reused = "424242"  # the pid both workers had
    old = JobPaths(str(tmp_path / "submitit" / "%j"), job_id=reused, task_id=0)
    old.folder.mkdir(parents=True)
    submitit.core.utils.cloudpickle_dump(("success", "the earlier job's result"), old.result_pickle)

    class SamePid(forked_job.ForkedJob):  # the worker gets the earlier worker's pid, as after a reboot
        def _start(self, tmp_pickle=None):
            self.job_id = self.job_id or reused
            super()._start(tmp_pickle)

    monkeypatch.setattr(forked_job, "ForkedJob", SamePid)
    job = _forked(tmp_path, _sleep, 60)
    assert job.job_id == reused
    deadline = time.time() + 30
    while not old.submitted_pickle.exists():  # the worker has set up its folder and started the job
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    _wait(job)
    with pytest.raises(UncompletedJobError, match="SIGKILL"):
        job.result()


@pytest.mark.slow
def test_forked_job_is_signalled_then_stopped_at_its_time_limit(tmp_path):
    """USR2 ``signal_delay_s`` before the limit (submitit's handler: not checkpointable, so the job
    ends with an error result), and a job still running at the limit is stopped."""
    from submitit.core.utils import UncompletedJobError

    job = _forked(tmp_path, _sleep, 60, timeout_s=3.0, signal_delay_s=2.0)
    t0 = time.time()
    _wait(job, limit=20)
    assert time.time() - t0 < 10
    with pytest.raises(UncompletedJobError, match="timed-out and not checkpointable"):
        job.result()
    assert job.timeouts == 1  # the launcher knows it ran out of time (status "timeout", not "failed")

    deaf = _forked(tmp_path, _sleep_ignoring_signals, 60, timeout_s=2.0, signal_delay_s=1.0)
    t0 = time.time()
    _wait(deaf, limit=20)
    assert time.time() - t0 < 10  # SIGINT at the limit is ignored: SIGKILL a second later
    with pytest.raises(UncompletedJobError, match="SIGKILL"):
        deaf.result()


@pytest.mark.slow
def test_a_job_out_of_time_is_a_timeout_row_with_its_limit(tmp_path):
    """A job that keeps reaching hydra.launcher.timeout_min is told (USR2), saves, is restarted
    max_num_timeout times, then ends with status "timeout" naming both keys; its run dir says so too. A
    short limit is signalled a quarter of the limit before its end, not at once (signal_delay_s=60)."""
    sweep_dir = tmp_path / "sweep"
    proc = run_embclf(*tiny_args(tmp_path, epochs=500, small=True), "hydra.launcher.timeout_min=0.08",
                      "hydra.launcher.max_num_timeout=1", "hydra.launcher.max_parallel=1",
                      f"hydra.sweep.dir={sweep_dir}", env=SLOW_STEPS)
    out = proc.stdout
    assert proc.returncode != 0, out[-3000:]
    (d,) = run_dirs(sweep_dir)
    s = summary(d)
    assert s["status"] == "timeout" and s["timeout_min"] == 0.08 and s["max_num_timeout"] == 1, s
    assert "hydra.launcher.timeout_min=0.08" in s["error"] and "max_num_timeout=1" in s["error"]
    assert "model" in s and "latent" in s  # still a row for the report
    assert re.search(r"end   #0 .*\| timeout in", out), out[-3000:]
