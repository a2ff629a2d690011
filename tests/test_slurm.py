"""``hydra/launcher=slurm`` against a real SLURM (slurmctld + slurmd + slurmdbd on 127.0.0.1, two fake
GPUs), started once per session by the ``slurm_cluster`` fixture.

The jobs use the preset's real default of one GPU per job; only cpus_per_task/mem_gb are overridden
to fit a 2-core node.  SLURM schedules the fake GPUs and sets CUDA_VISIBLE_DEVICES; the jobs find no
CUDA device behind it, fall back to CPU, and record what they were given.
"""
import json
import subprocess
import time

import pytest

from slurm_fixture import (  # noqa: F401  (slurm_cluster is a fixture)
    REPO,
    assert_no_gpu_shared_while_overlapping,
    embclf_cmd,
    embclf_env,
    overrides_of,
    run_dirs,
    run_embclf,
    slurm,
    slurm_cluster,
    summary,
    tiny_args,
)

# fit two 1-GPU jobs on the 2-CPU test node; everything else is the preset's default
FIT_NODE = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]


def test_sweep_2x2_one_gpu_per_job(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_embclf(*tiny_args(tmp_path), *FIT_NODE, "model=ae,vae", "latent=8,16", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stdout[-4000:]
    dirs = run_dirs(sweep_dir)
    assert len(dirs) == 4, [d.name for d in dirs]
    records = [summary(d) for d in dirs]
    assert sorted((r["model"], r["latent"]) for r in records) == [("ae", 8), ("ae", 16), ("vae", 8), ("vae", 16)]
    for d, r in zip(dirs, records):
        assert r["status"] == "completed" and r["epochs"] == 1, r
        assert r["slurm_job_id"], r  # it ran under SLURM
        assert r["cuda_visible_devices"] in ("0", "1"), r  # SLURM gave it one GPU
        assert r["device"] == "cpu" and r["device_fallback"] is True, r
        assert "test_mse" in r and (d / "checkpoints" / "last.pt").is_file()
    assert_no_gpu_shared_while_overlapping(records)
    # submitit's folder (submission scripts, worker logs, result pickles) lives in the sweep dir
    logs = list((sweep_dir / ".submitit").rglob("*_log.out"))
    assert len(logs) == 4, logs
    assert "completed" in proc.stdout and "watch with: squeue" in proc.stdout


def _wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _train_epochs(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [m["epoch"] for m in lines if m.get("split") == "train"]


@pytest.mark.parametrize("how", ["scontrol-requeue", "usr2-preempt"])
def test_requeued_job_resumes_from_last_checkpoint(slurm_cluster, tmp_path, how):
    """Interrupt a job mid-training and check that it resumes in the same run dir from last.pt and
    completes with the configured number of epochs.

    * ``scontrol-requeue``: SLURM sends SIGTERM (the training loop saves last.pt, submitit ignores
      it), kills the job after KillWait and queues it again.
    * ``usr2-preempt``: the signal SLURM sends ``signal_delay_s`` before a time limit (or a preemption
      notice): the training loop saves last.pt and hands on to submitit's handler, which calls the
      launcher's ``checkpoint()`` and requeues the job itself (``scontrol requeue``).
    """
    epochs = 8
    sweep_dir = tmp_path / "sweep"
    args = [*tiny_args(tmp_path, epochs=epochs), *FIT_NODE, "latent=8", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen(embclf_cmd(*args), cwd=REPO, env=embclf_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        run_dir = _wait_for(lambda: (run_dirs(sweep_dir) or [None])[0] if sweep_dir.is_dir() else None,
                            120, "the job dir", proc)
        _wait_for(lambda: len(_train_epochs(run_dir)) >= 2, 180, "two trained epochs", proc)
        first = summary(run_dir)
        assert first["status"] == "running" and len(_train_epochs(run_dir)) < epochs, first
        job_id = str(first["slurm_job_id"])
        if how == "scontrol-requeue":
            slurm("scontrol", "requeue", job_id)
        else:
            slurm("scancel", "--signal=USR2", job_id)
        # SLURM holds a requeued job back (BeginTime = now + ~2 min); release it so the test is quick
        _wait_for(lambda: "PENDING" in slurm("squeue", "-h", "-j", job_id, "-o", "%T", check=False),
                  60, "the job to be requeued (PENDING)", proc)
        slurm("scontrol", "update", f"jobid={job_id}", "StartTime=now")
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert run_dirs(sweep_dir) == [run_dir]  # the same run dir, no second one
    final = summary(run_dir)
    assert final["status"] == "completed" and final["epochs"] == epochs, final
    assert final["slurm_job_id"] == first["slurm_job_id"] and final["pid"] != first["pid"], (first, final)
    resumed = final.get("resumed_from_epoch")
    assert resumed is not None and 1 <= resumed < epochs, final
    # every epoch trained exactly once in the record: the ones after the checkpoint were redone
    assert _train_epochs(run_dir) == list(range(1, epochs + 1))
    log = (run_dir / "embclf.log").read_text()
    assert "saving checkpoint" in log and "resuming from" in log, log[-3000:]
    if how == "usr2-preempt":
        assert "Caught signal SIGUSR2" in log, log[-3000:]
    states = slurm("sacct", "-j", job_id, "-D", "-X", "-n", "-P", "-o", "State")
    assert "REQUEUED" in states and "COMPLETED" in states, states


def test_failed_job_is_reported_and_the_others_complete(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_embclf(*tiny_args(tmp_path), *FIT_NODE, "latent=0,8", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode != 0, proc.stdout[-3000:]
    out = proc.stdout
    assert "1 of 2 sweep jobs failed" in out, out[-3000:]
    tail = out[out.index("1 of 2 sweep jobs failed"):]
    assert "latent=0" in tail and "latent=8" not in tail, tail
    by_latent = {[o for o in overrides_of(d) if o.startswith("latent=")][0]: summary(d) for d in run_dirs(sweep_dir)}
    assert by_latent["latent=8"]["status"] == "completed"
    assert by_latent["latent=0"]["status"] == "failed" and "latent" in by_latent["latent=0"]["error"]
