"""embclf.lifecycle: one run dir's start, saves, completion and failure, as every stage and debug mode uses it."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from embclf import identity, lifecycle, runs
from embclf.config import conf_dir
from embclf.engine import Diverged
from embclf.runtime import EmbclfError


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=[f"output_dir={tmp_path}", "logger=none", *overrides])


def _open(tmp_path, cfg, name="run"):
    return lifecycle.RunDir(tmp_path / name, cfg, "autoencode", ["latent=8"], identity.identity(cfg, "autoencode"))


def test_start_save_complete_and_a_completed_run_is_left_alone(tmp_path):
    cfg = _cfg(tmp_path, "latent=8")
    run = _open(tmp_path, cfg)
    assert not run.completed() and not (run.path / runs.SUMMARY).exists()  # nothing written before start
    run.start(device="cpu")
    s = runs.read_summary(run.path)
    assert s["status"] == "running" and s["attempts"] == 1 and s["device"] == "cpu" and s["overrides"] == ["latent=8"]
    assert runs.read_config(run.path)["latent"] == 8
    run.save(epoch_note=1)
    assert runs.read_summary(run.path)["epoch_note"] == 1
    run.complete(test_mse=0.5)
    s = runs.read_summary(run.path)
    assert s["status"] == "completed" and s["test_mse"] == 0.5 and s["wall_seconds"] >= 0
    # the same experiment again: completed, nothing to do; a failure recorded afterwards changes nothing
    again = _open(tmp_path, cfg)
    assert again.completed()
    lifecycle.record_failure(again.path, RuntimeError("late"))
    assert runs.read_summary(run.path)["status"] == "completed"
    # another experiment in the same run dir is refused, naming the key
    with pytest.raises(EmbclfError, match="latent"):
        _open(tmp_path, _cfg(tmp_path, "latent=16")).completed()


def test_failure_and_interruption_are_recorded_and_a_second_attempt_counts(tmp_path):
    cfg = _cfg(tmp_path, "latent=8")
    run = _open(tmp_path, cfg)
    run.start()
    lifecycle.record_failure(run.path, Diverged("non-finite loss"))
    s = runs.read_summary(run.path)
    assert s["status"] == "failed" and s["reason"] == "diverged" and "non-finite loss" in s["error"]
    resumed = _open(tmp_path, cfg)
    assert not resumed.completed()
    resumed.start(resumed_from=3)
    lifecycle.record_failure(resumed.path, KeyboardInterrupt())
    s = runs.read_summary(resumed.path)
    assert s["status"] == "interrupted" and s["attempts"] == 2 and s["resumed_from_epoch"] == 3


def test_a_sweep_job_that_failed_before_writing_records_who_failed(tmp_path):
    cfg = _cfg(tmp_path, "latent=8")
    d = tmp_path / "job"
    d.mkdir()
    lifecycle.record_failure(d, EmbclfError("bad input"), runs.base_summary(cfg, "autoencode", []))
    s = runs.read_summary(d)
    assert s["status"] == "failed" and s["error"] == "EmbclfError: bad input" and s["stage"] == "autoencode"
    lifecycle.record_failure(tmp_path / "none", EmbclfError("bad input"))  # a single run: nothing written
    assert not (tmp_path / "none").exists()


def test_start_removes_temporaries_a_sigkill_left_in_the_run_dir_checkpoints_and_images(tmp_path):
    cfg = _cfg(tmp_path, "latent=8")
    run = _open(tmp_path, cfg)
    dead = 2 ** 22 + 7  # above Linux's largest pid_max: no such process
    left = [run.path / f".summary.json.tmp{dead}-1", run.path / "checkpoints" / f".last.pt.tmp{dead}-2",
            run.path / "images" / f".samples_e001.pt.tmp{dead}-3"]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    run.start()
    assert not [p for p in left if p.exists()]
