"""Exact resume: a run killed at any instant and started again with the same command ends with exactly the
metrics of an uninterrupted run (CPU, bit-identical records apart from timing), and the bookkeeping of attempts.

The kills come from the test-only ``EMBCLF_KILL_AT`` (``embclf.faults.fault_point``); ``resume_harness.py`` runs
the real entrypoint once per attempt in a forked child, so a dozen attempts cost seconds, not interpreter starts.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CIFAR, embclf_env
from resume_harness import run_spec

TIMING = {"seconds", "images_per_second"}  # the only fields that may differ between attempts
# a small VAE (the reparameterization draws from the global RNG, so RNG restores are checked too), 16 px
ARGS = ["stage=all", "model=vae", "latent=4", "data=folder", "data.train_size=300", "data.test_size=100",
        "data.image_size=16", "model.channels=[8,16]", "model.strides=[2,2]", "autoencode.batch_size=50",
        "autoencode.image_epochs=[1]", "autoencode.epochs=2", "classify.epochs=3", "logger=none",
        "logger.projections=[]", "threads=1"]
# 270 training images in batches of 50: 6 optimizer steps per epoch. The order matters: each attempt starts
# from what the previous ones left (no checkpoint, best.pt only, last.pt of epoch 1, ...).
KILLS = [
    "startup",              # run dir and summary written, nothing trained
    "autoencode.metrics",   # epoch 1 recorded in metrics.jsonl, no checkpoint yet: the redo must replace it
    "autoencode.best",      # best.pt of epoch 1 written, last.pt not
    "checkpoint:2",         # while last.pt of epoch 1 is written (temp file, not renamed)
    "autoencode.step:9",    # mid-epoch 2 (step 3 of 6), after last.pt of epoch 1
    "autoencode.test",      # during the final test evaluation (test metrics appended)
    "classify.metrics:2",   # head epoch 2 recorded, its checkpoint not written
    "classify.test",        # head trained, during its test evaluation
]


def _small_tree(root: Path, per_class_train: int = 30, per_class_test: int = 10) -> Path:
    """An ImageFolder tree of symlinks to the first real CIFAR-10 JPEGs: scanning it costs nothing (the
    full tree's 60,000 files take ~1 s per attempt to list)."""
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for cls in sorted(p.name for p in (CIFAR / split).iterdir() if p.is_dir()):
            d = root / split / cls
            d.mkdir(parents=True)
            for f in sorted((CIFAR / split / cls).iterdir())[:n]:
                (d / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, cifar_root):
    """Three runs of ARGS: uninterrupted ("ref"), killed at each of KILLS ("kill"), SIGTERM mid-epoch 2
    ("term", stage=autoencode). Returns {"runs": {name: run dir}, "attempts": {name: [attempt, ...]}}."""
    tmp = tmp_path_factory.mktemp("resume")
    tree = _small_tree(tmp / "data")
    args = [*ARGS, f"data.root={tree}", f"data.cache_dir={tmp / 'cache'}"]
    runs = {"ref": tmp / "ref", "kill": tmp / "kill", "term": tmp / "term"}
    spec = {"args": args, "runs": {
        "ref": {"run_dir": str(runs["ref"])},
        "kill": {"run_dir": str(runs["kill"]), "kills": KILLS},
        "term": {"run_dir": str(runs["term"]), "kills": ["autoencode.step:9:TERM"], "extra_args": ["stage=autoencode"]},
    }}
    attempts = run_spec(tmp, spec, embclf_env(tmp))
    return {"runs": runs, "attempts": attempts, "tmp": tmp}


def _records(run_dir: Path) -> list:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _results(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in s.items() if k.startswith(("test_", "final_test_", "val_"))
            or k in ("status", "best_epoch", "per_class_accuracy", "confusion_matrix", "posterior_collapse")}


def _log(resumed, name: str) -> str:
    return (resumed["tmp"] / f"{name}.attempts.log").read_text()


@pytest.mark.slow
def test_kill_at_any_instant_resumes_exactly(resumed):
    attempts = resumed["attempts"]["kill"]
    log = _log(resumed, "kill")
    # every planned kill happened, where it was planned, and the next plain start completed the run
    assert [a["kill_at"] for a in attempts] == [*KILLS, None], attempts
    assert all(a["signal"] == "SIGKILL" for a in attempts[:-1]), attempts
    assert attempts[-1]["exit"] == 0, log[-3000:]
    ref, kill = resumed["runs"]["ref"], resumed["runs"]["kill"]
    for stage in ("autoencode", "classify"):
        want, got = _records(ref / stage), _records(kill / stage)
        epochs = [(r["epoch"], r["split"]) for r in got]
        assert len(epochs) == len(set(epochs)), f"{stage}: an epoch recorded twice: {epochs}"
        assert got == want, f"{stage}: metrics.jsonl differs from the uninterrupted run's"
        assert _results(kill / stage) == _results(ref / stage)
        assert _results(ref / stage)["status"] == "completed"
        leftovers = sorted(p.name for p in (kill / stage).rglob(".*.tmp*"))
        assert not leftovers, f"temporary files of killed writes left behind: {leftovers}"
    s = json.loads((kill / "autoencode" / "summary.json").read_text())
    # starts of the autoencode stage: 7 killed in it + the one that completed it; resumed from epoch 1 by the
    # kills after checkpoint:2, then from epoch 2 after the kill in the test evaluation
    assert s["attempts"] == 7 and s["resumed_from_epoch"] == [1, 2], s
    assert len(s["attempt_times"]) == s["attempts"]
    assert 0 < s["compute_seconds"] <= s["wall_seconds"]
    c = json.loads((kill / "classify" / "summary.json").read_text())
    assert c["attempts"] == 3 and c["resumed_from_epoch"] == [1, 3], c
    assert "resuming the head's training" in log


@pytest.mark.slow
def test_sigterm_mid_epoch_resumes_exactly(resumed):
    """SIGTERM (a SLURM time limit, preemption) at step 3 of epoch 2: last.pt holds that position and the
    restart continues with step 4, so the result equals the uninterrupted run's."""
    attempts = resumed["attempts"]["term"]
    assert [(a["signal"], a["exit"]) for a in attempts] == [(None, 128 + signal.SIGTERM), (None, 0)], attempts
    ref, term = resumed["runs"]["ref"] / "autoencode", resumed["runs"]["term"]
    assert _records(term) == _records(ref), "metrics.jsonl differs from the uninterrupted run's"
    assert _results(term) == _results(ref)
    log = _log(resumed, "term")
    assert "resuming from" in log and "at epoch 1, step 3 of epoch 2" in log, log[-3000:]
    s = json.loads((term / "summary.json").read_text())
    assert s["attempts"] == 2 and s["resumed_from_epoch"] == 1


# --- the bookkeeping, in-process --------------------------------------------------------------------

def test_attempts_compute_and_wall_seconds(tmp_path):
    """compute_seconds sums the attempts; wall_seconds spans first start to end, idle gaps included."""
    from embclf import lifecycle, runs

    t0 = time.time() - 1000
    first = {"start_time": t0}
    lifecycle.start_attempt(first, None)
    first["attempt_times"][-1] = [t0, t0 + 10]  # ran 10 s, then was killed
    first["resumed_from_epoch"] = 3
    second = {"start_time": t0 + 500}  # restarted 490 s later
    lifecycle.start_attempt(second, first, resumed_from=4)
    assert second["start_time"] == t0 and second["attempts"] == 2 and second["resumed_from_epoch"] == [3, 4]
    lifecycle.touch_attempt(second, t0 + 520)
    assert second["compute_seconds"] == pytest.approx(30)
    # a failure in this process ends its attempt; one recorded by a launcher for a dead job does not
    second["pid"] = os.getpid()
    runs.write_json_atomic(tmp_path / runs.SUMMARY, second)
    lifecycle.mark_failed(tmp_path, "boom")
    s = runs.read_summary(tmp_path)
    assert s["compute_seconds"] > 500 and s["wall_seconds"] >= s["compute_seconds"]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    from embclf import runs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / f".last.pt.tmp{dead.pid}-1"
    live = tmp_path / "checkpoints" / f".last.pt.tmp{os.getppid()}-1"  # a writer that is still alive
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    assert runs.remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


@pytest.mark.slow
def test_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """Each attempt of a run dir logs to the same wandb run: the id is kept in ``wandb_run_id`` and passed to
    ``wandb.init(id=..., resume="allow")`` (offline here: each attempt writes an offline-run-*-<id> folder)."""
    from hydra import compose, initialize_config_dir
    from wandb_log import records

    from embclf import tracking
    from embclf.config import conf_dir

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", overrides=["logger=wandb", "logger.wandb.mode=offline", "logger.projections=[]",
                                           "data=folder", f"data.root={CIFAR}", "latent=8"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ids = []
    for epoch, exit_code in ((1, 1), (2, 0)):  # a first attempt that failed, then the resumed one
        tracker = tracking.start(cfg, run_dir, "autoencode")
        assert tracker.run is not None
        tracker.log_epoch(epoch, train={"mse": 0.1 / epoch})
        ids.append(tracker.run.id)
        tracker.finish({"test_mse": 0.05} if exit_code == 0 else None, exit_code=exit_code)
    stored = (run_dir / tracking.WANDB_ID_FILE).read_text().strip()
    assert ids == [stored, stored]
    logs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    # what `wandb sync` uploads: one transaction log per attempt, both of the same run (the id names them)
    assert [p.name for p in logs] == [f"run-{stored}.wandb"] * 2, logs
    first = {r.run.run_id for r in records(logs[0]) if r.WhichOneof("record_type") == "run"}
    assert first == {stored}


def test_killed_outcome_names_the_signal_and_out_of_memory():
    """How the local launcher records a worker that died from a signal (the kill -9 itself is exercised in
    test_launcher_local.py); the OOM case is read from the memory cgroup's oom_kill counter."""
    from hydra_plugins.embclf_launcher.outcomes import killed_outcome, oom_kill_count

    error, reason, extra = killed_outcome(signal.SIGKILL, 2, 3)
    assert reason == "out of memory" and "out of memory" in error and extra == {"signal": "SIGKILL"}
    error, reason, _ = killed_outcome(signal.SIGKILL, 2, 2)
    assert reason == "SIGKILL" and error.startswith("killed by SIGKILL (signal 9)") and "kill -9" in error
    assert killed_outcome(signal.SIGKILL, None, None)[1] == "SIGKILL"  # cannot tell: says both causes
    assert killed_outcome(signal.SIGTERM, 0, 0)[:2] == ("killed by SIGTERM (signal 15) from outside the job", "SIGTERM")
    n = oom_kill_count()
    assert n is None or n >= 0


def test_slurm_endings_are_recorded_as_what_they_are():
    from hydra_plugins.embclf_launcher.outcomes import slurm_outcome

    assert slurm_outcome("OUT_OF_MEMORY")[:2] == ("killed", "out of memory")
    status, reason, error = slurm_outcome("CANCELLED by 1000")
    assert (status, reason) == ("cancelled", "cancelled") and "CANCELLED by 1000" in error
    assert slurm_outcome("NODE_FAIL")[:2] == ("killed", "node failure")
    assert slurm_outcome("FAILED") is None and slurm_outcome("COMPLETED") is None and slurm_outcome(None) is None
