"""``hydra/launcher=slurm`` against a real SLURM (slurmctld + slurmd + slurmdbd on 127.0.0.1, two fake
GPUs), started once per session by the ``slurm_cluster`` fixture.

The jobs use the preset's real default of one GPU per job; only cpus_per_task/mem_gb are overridden
to fit a 2-core node.  SLURM schedules the fake GPUs and sets CUDA_VISIBLE_DEVICES; the jobs find no
CUDA device behind it, fall back to CPU, and record what they were given.
"""
import json
import time
from pathlib import Path

import pytest

from embclf import references
from conftest import start_module
from slurm_fixture import (
    REPO,
    assert_no_gpu_shared_while_overlapping,
    embclf_env,
    overrides_of,
    run_dirs,
    run_embclf,
    slurm,
    summary,
    tiny_args,
    SLOW_STEPS,
)

# fit two 1-GPU jobs on the 2-CPU test node; everything else is the preset's default
FIT_NODE = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]


@pytest.fixture(scope="module")
def ae_sweep(slurm_cluster, tmp_path_factory):
    """The 2x2 autoencode sweep, submitted once; its sweep dir is inside output_dir so that the
    classify sweep below finds the encoders as it would on a cluster's shared filesystem."""
    tmp = tmp_path_factory.mktemp("slurm_ae")
    sweep_dir = tmp / "out" / "ae_sweep"
    proc = run_embclf(*tiny_args(tmp, small=True), *FIT_NODE, "model=ae,vae", "latent=8,16", f"hydra.sweep.dir={sweep_dir}")
    return {"tmp": tmp, "proc": proc, "sweep_dir": sweep_dir}


def test_sweep_2x2_one_gpu_per_job(ae_sweep):
    proc, sweep_dir = ae_sweep["proc"], ae_sweep["sweep_dir"]
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
        # provenance holds the user's sweep command, not the SLURM worker's `submitit` command line
        argv = r["provenance"]["argv"]
        assert argv[1:3] == ["-m", "embclf"] and "model=ae,vae" in argv, argv
    assert_no_gpu_shared_while_overlapping(records)
    # submitit's folder (submission scripts, worker logs, result pickles) lives in the sweep dir
    logs = list((sweep_dir / ".submitit").rglob("*_log.out"))
    assert len(logs) == 4, logs
    script = next((sweep_dir / ".submitit").rglob("*_submission.sh")).read_text()
    assert "#SBATCH --gpus-per-node=1" in script and "#SBATCH --signal=USR2@120" in script, script
    assert "completed" in proc.stdout and "watch with: squeue" in proc.stdout


def test_classify_sweep_finds_each_encoder(ae_sweep):
    """A classify sweep on the cluster picks, for every job, the autoencode run of the same model and
    latent from the shared output dir -- exactly as on one machine."""
    assert ae_sweep["proc"].returncode == 0, "the autoencode sweep failed"
    tmp, ae_dir = ae_sweep["tmp"], ae_sweep["sweep_dir"]
    sweep_dir = tmp / "out" / "clf_sweep"
    # two jobs, each of which must pick its own encoder among the four (by model and latent)
    proc = run_embclf(*tiny_args(tmp, small=True), *FIT_NODE, "stage=classify", "classify.epochs=1", "model=ae,vae",
                      "latent=16", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stdout[-4000:]
    encoders = {(summary(d)["model"], summary(d)["latent"]): d.resolve() for d in run_dirs(ae_dir)}
    records = [(d, summary(d)) for d in run_dirs(sweep_dir)]
    assert len(records) == 2
    for d, r in records:
        assert r["status"] == "completed" and r["stage"] == "classify" and r["slurm_job_id"], r
        assert references.encoder_run_of(d, r) == encoders[(r["model"], r["latent"])], r


def _start_sweep(args, tmp: Path):
    """``python -m embclf -m ARGS`` in the background with ``SLOW_STEPS`` (``conftest.start_module``: a child of the
    test zygote), its stdout and stderr in ``tmp/sweep.log``; ``communicate`` returns that text."""
    return start_module("embclf", ["-m", *args], REPO, embclf_env(SLOW_STEPS), tmp / "sweep.log")


def _wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}: {proc.communicate()[0][-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _train_epochs(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [m["epoch"] for m in lines if m.get("split") == "train"]


def test_requeued_jobs_resume_from_last_checkpoint(slurm_cluster, tmp_path):
    """Interrupt both jobs of a 2-job array mid-training, in the two ways SLURM does it, and check
    that each resumes in the same run dir from its last.pt and completes with the configured epochs.

    * ``latent=8`` -- ``scontrol requeue``: SLURM sends SIGTERM (the training loop saves last.pt;
      submitit ignores SIGTERM), kills the job after KillWait and queues it again.
    * ``latent=16`` -- USR2, what SLURM sends ``signal_delay_s`` before a time limit (and on
      preemption): the training loop saves last.pt and hands on to submitit's handler, which calls
      the launcher's ``checkpoint()`` and requeues the job itself.
    """
    # after SIGTERM a job trains on until SLURM's KillWait (5 s here) ends it: leave it more epochs than it can
    # train by then (an epoch of 180 images is one step, which SLOW_STEPS makes last at least 1.5 s: the signal comes
    # after epoch 2, or 3 if this test polls late, and KillWait allows at most 4 more), so that the kill lands
    # mid-training
    epochs = 10
    sweep_dir = tmp_path / "sweep"
    args = [*tiny_args(tmp_path, epochs=epochs, small=True), *FIT_NODE, "latent=8,16", f"hydra.sweep.dir={sweep_dir}"]
    proc = _start_sweep(args, tmp_path)
    how = {8: "scontrol-requeue", 16: "usr2"}
    try:
        dirs = _wait_for(lambda: len(run_dirs(sweep_dir)) == 2 and run_dirs(sweep_dir) if sweep_dir.is_dir() else None,
                         120, "the job dirs", proc)
        first = {}
        while len(first) < len(dirs):  # each job as soon as it has trained two epochs (SLURM may start them apart)
            d = _wait_for(lambda: next((d for d in dirs if d not in {v[0] for v in first.values()}
                                        and len(_train_epochs(d)) >= 2), None), 180, "two trained epochs", proc)
            rec = summary(d)
            first[rec["latent"]] = (d, rec)
            assert rec["status"] == "running" and len(_train_epochs(d)) < epochs, rec
            job_id = str(rec["slurm_job_id"])
            if how[rec["latent"]] == "scontrol-requeue":
                slurm("scontrol", "requeue", job_id)
            else:
                slurm("scancel", "--signal=USR2", job_id)
        for latent, (d, rec) in first.items():
            job_id = str(rec["slurm_job_id"])
            # SLURM holds a requeued job back (BeginTime = now + ~2 min); release it so the test is quick
            _wait_for(lambda: "PENDING" in slurm("squeue", "-h", "-j", job_id, "-o", "%T", check=False),
                      60, f"job {job_id} to be requeued (PENDING)", proc)
            slurm("scontrol", "update", f"jobid={job_id}", "StartTime=now")
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert run_dirs(sweep_dir) == sorted(d for d, _ in first.values())  # the same run dirs, no new ones
    for latent, (run_dir, rec) in first.items():
        final = summary(run_dir)
        assert final["status"] == "completed" and final["epochs"] == epochs, final
        assert final["slurm_job_id"] == rec["slurm_job_id"] and final["pid"] != rec["pid"], (rec, final)
        resumed = final.get("resumed_from_epoch")
        assert resumed is not None and 1 <= resumed < epochs, final
        # every epoch trained exactly once in the record: the ones after the checkpoint were redone
        assert _train_epochs(run_dir) == list(range(1, epochs + 1))
        log = (run_dir / "embclf.log").read_text()
        assert "saving checkpoint" in log and "resuming from" in log, log[-3000:]
        if how[latent] == "usr2":
            assert "Caught signal SIGUSR2" in log, log[-3000:]
        # the launcher returns once submitit has read the job's result; slurmctld records the job's end a
        # moment later (the batch step still has to exit), so the accounting is polled, not read once
        states = _wait_for(lambda: (lambda s: "COMPLETED" in s and s)(
            slurm("sacct", "-j", str(rec["slurm_job_id"]), "-D", "-X", "-n", "-P", "-o", "State")),
            60, f"sacct to record job {rec['slurm_job_id']} as COMPLETED")
        assert "REQUEUED" in states, states


def test_failed_job_is_reported_and_the_others_complete(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # a test subset larger than the 10,000 test images: only the data can tell, so the job fails at run time
    proc = run_embclf(*tiny_args(tmp_path, small=True), *FIT_NODE, "data.test_size=20000,100", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode != 0, proc.stdout[-3000:]
    out = proc.stdout
    assert "1 of 2 sweep jobs failed" in out, out[-3000:]
    tail = out[out.index("1 of 2 sweep jobs failed"):]
    assert "test_size=20000" in tail and "test_size=100 " not in tail, tail
    by_size = {[o for o in overrides_of(d) if o.startswith("data.test_size=")][-1]: summary(d) for d in run_dirs(sweep_dir)}
    assert by_size["data.test_size=100"]["status"] == "completed"
    assert by_size["data.test_size=20000"]["status"] == "failed" and "test_size" in by_size["data.test_size=20000"]["error"]


def test_invalid_job_config_fails_before_anything_is_submitted(slurm_cluster, tmp_path):
    """One bad value among the sweep's jobs stops the whole sweep before submission, naming it."""
    before = slurm("sacct", "-X", "-n", "-P", "-o", "JobID", "-S", "now-1hour")
    sweep_dir = tmp_path / "sweep"
    proc = run_embclf(*tiny_args(tmp_path, small=True), *FIT_NODE, "classify.encoder=null,${oc.env:EMBCLF_TEST_UNSET}",
                      f"hydra.sweep.dir={sweep_dir}", timeout=120)
    assert proc.returncode != 0
    assert "1 of 2 sweep jobs have an invalid config, so nothing was started" in proc.stdout, proc.stdout[-3000:]
    assert "EMBCLF_TEST_UNSET" in proc.stdout
    assert not (sweep_dir / ".submitit").exists()
    assert slurm("sacct", "-X", "-n", "-P", "-o", "JobID", "-S", "now-1hour") == before  # nothing submitted


def test_cancelled_job_is_recorded_cancelled_with_its_slurm_state(slurm_cluster, tmp_path):
    """``scancel`` of a running job: the job cannot write anything itself, so the launcher asks ``sacct``
    how it ended and records status "cancelled" with the SLURM state in its run dir; the sweep report
    shows that row, and the command exits non-zero naming the job."""
    sweep_dir = tmp_path / "sweep"
    proc = _start_sweep([*tiny_args(tmp_path, epochs=24, small=True), *FIT_NODE, "latent=8",
                         f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    try:
        run_dir = _wait_for(lambda: next((d for d in (run_dirs(sweep_dir) if sweep_dir.is_dir() else [])
                                          if _train_epochs(d)), None), 180, "a trained epoch", proc)
        rec = summary(run_dir)
        assert rec["status"] == "running", rec
        slurm("scancel", str(rec["slurm_job_id"]))
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out[-3000:]
    assert "1 of 1 sweep jobs failed" in out, out[-3000:]
    final = summary(run_dir)
    assert final["status"] == "cancelled" and final["reason"] == "cancelled", final
    assert final["slurm_state"].startswith("CANCELLED"), final
    assert "Traceback" not in final["error"], final
    from embclf import report

    row = next(r for r in report.collect([sweep_dir]) if Path(r["run_dir"]) == run_dir.resolve())
    assert row["status"] == "cancelled", row
