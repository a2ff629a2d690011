"""Ctrl-C on a single run and its first minute: the run says where it writes; Ctrl-C gives one line (what was
saved, read from the run dir's files, and the exact command that resumes it), no traceback, exit status 130;
the printed command resumes the run."""
from __future__ import annotations

import os
import shlex
import signal
import sys

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import MINI, SMALL_MODEL, embclf_env, run_module

from embclf import __main__ as entry
from embclf import faults, runs, tracking
from embclf.config import Stage


HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


def _interrupted(cfg, job, hc, caplog) -> int:
    """``entry._interrupted`` (Ctrl-C on a single run) in this process: its exit status, its line in ``caplog``.
    It ignores SIGINT/SIGTERM/SIGUSR2 (it exits next): their handlers are restored for the tests after it."""
    old = {s: signal.getsignal(s) for s in HANDLED}
    try:
        with caplog.at_level("WARNING"), pytest.raises(SystemExit) as e:
            entry._interrupted(cfg, job, hc)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return e.value.code


def _run(cmd, cwd, kill_at=None):
    """``cmd`` (argv: ``python -m embclf ...``) as a user's shell runs it, in a process of its own without the
    interpreter's start-up (``conftest.run_module``): SIGINT at its default there (a test runner started in the
    background would pass it on ignored, and Python would then never raise KeyboardInterrupt)."""
    env = embclf_env(cwd)
    env.pop(faults.KILL_AT_ENV, None)
    if kill_at:
        env[faults.KILL_AT_ENV] = kill_at  # the process sends itself SIGINT there, as Ctrl-C would
    assert cmd[0] == sys.executable and cmd[1:3] == ["-m", "embclf"], cmd
    return run_module("embclf", cmd[3:], cwd, env, timeout=600)


def _interrupted_line(proc, how="Ctrl-C", status=130):
    out = proc.stdout + proc.stderr
    assert proc.returncode == status, out[-4000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
    (line,) = [ln for ln in out.splitlines() if f"interrupted ({how})" in ln]
    saved, cmd = line.split(f"interrupted ({how}); ", 1)[1].split(". Resume with: ")
    return saved, cmd


@pytest.mark.slow
def test_ctrl_c_on_a_single_run_says_what_was_saved_and_how_to_resume(tmp_path, cifar_root):
    first = [sys.executable, "-m", "embclf", *MINI, *SMALL_MODEL, "autoencode.epochs=2", "threads=1",
             f"output_dir={tmp_path / 'out'}"]
    # Ctrl-C right after start-up: the run dir holds its config and summary, no epoch
    proc = _run(first, tmp_path, "startup:1:INT")
    (announced,) = [ln.split("run dir: ", 1)[1] for ln in proc.stdout.splitlines() if "run dir: " in ln]
    run_dir = announced.strip()
    assert os.path.isdir(run_dir) and run_dir.startswith(str(tmp_path / "out"))
    saved, cmd = _interrupted_line(proc)
    assert saved == f"saved in {run_dir}: nothing to resume from (no epoch had finished: the run starts over)"
    assert cmd.endswith(f"\"hydra.run.dir='{run_dir}'\"")  # quoted as the README does
    assert runs.read_summary(run_dir)["status"] == "interrupted"
    # the printed command, Ctrl-C inside epoch 2 (step 2 of 6): epoch 1's checkpoint is kept, epoch 2 is redone
    proc = _run(shlex.split(cmd), tmp_path, "autoencode.step:8:INT")
    saved, cmd2 = _interrupted_line(proc)
    assert saved == (f"saved in {run_dir}: checkpoints/last.pt at the end of epoch 1 of 2 "
                     "(the unfinished epoch 2 is redone on resume)")
    assert cmd2 == cmd and f"run dir: {run_dir}" in proc.stdout
    # the printed command once more: it resumes at epoch 1 and completes
    proc = _run(shlex.split(cmd), tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "resuming from" in proc.stdout and "at epoch 1" in proc.stdout
    s = runs.read_summary(run_dir)
    assert s["status"] == "completed" and s["attempts"] == 3
    assert [r["epoch"] for r in runs.read_metrics(run_dir) if r["split"] == "train"] == [1, 2]


@pytest.mark.slow
def test_sigterm_and_sigusr2_on_a_single_run_say_what_was_saved_and_how_to_resume(tmp_path, cifar_root):
    """SIGTERM (a scheduler, `kill`, a closing terminal session) and SIGUSR2 outside SLURM: the same one line as
    Ctrl-C, exit status 128 + signum (143, 140), and the printed command resumes the run."""
    first = [sys.executable, "-m", "embclf", *MINI, *SMALL_MODEL, "autoencode.epochs=2", "threads=1", "logger=none",
             f"output_dir={tmp_path / 'out'}"]
    # SIGTERM inside epoch 2 (step 2 of 6): the checkpoint holds the position inside the epoch
    proc = _run(first, tmp_path, "autoencode.step:8:TERM")
    (run_dir,) = [ln.split("run dir: ", 1)[1].strip() for ln in proc.stdout.splitlines() if "run dir: " in ln]
    saved, cmd = _interrupted_line(proc, "SIGTERM", 143)
    assert saved == (f"saved in {run_dir}: checkpoints/last.pt at step 2 of epoch 2 of 2 (the resume continues "
                     "with the next batch)")
    assert cmd.endswith(f"\"hydra.run.dir='{run_dir}'\"") and runs.read_summary(run_dir)["status"] == "interrupted"
    # SIGUSR2 (no SLURM, no submitit handler): the same, 128 + 12
    proc = _run(shlex.split(cmd), tmp_path, "startup:1:USR2")
    saved, cmd2 = _interrupted_line(proc, "SIGUSR2", 140)
    assert cmd2 == cmd and saved.startswith(f"saved in {run_dir}: checkpoints/last.pt at step 2 of epoch 2 of 2")
    proc = _run(shlex.split(cmd), tmp_path)  # the printed command completes the run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert runs.read_summary(run_dir)["status"] == "completed"


def _summary(d, **kw):
    runs.write_json_atomic(d / runs.SUMMARY, {"status": "interrupted", "stage": "autoencode", "epochs": 5, **kw})


def test_saved_state_is_read_from_the_files(tmp_path):
    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    _summary(d)
    assert tracking.saved_state(d) == "nothing to resume from (no epoch had finished: the run starts over)"
    torch.save({"state": {"epoch": 2}}, d / "checkpoints" / "last.pt")
    assert tracking.saved_state(d) == ("checkpoints/last.pt at the end of epoch 2 of 5 (the unfinished epoch 3 "
                                       "is redone on resume)")
    torch.save({"state": {"epoch": 2}, "epoch_position": {"epoch": 3, "step": 4}}, d / "checkpoints" / "last.pt")
    assert tracking.saved_state(d) == ("checkpoints/last.pt at step 4 of epoch 3 of 5 (the resume continues "
                                       "with the next batch)")
    torch.save({"state": {"epoch": 5}}, d / "checkpoints" / "last.pt")
    assert tracking.saved_state(d) == ("checkpoints/last.pt after the training's last epoch (5; the resume redoes "
                                       "only what follows the training: the test evaluation and after)")
    # a head stopped early (classify.patience=2: no better val accuracy since epoch 1) has finished training too
    _summary(d, stage="classify")
    torch.save({"state": {"epoch": 3, "best_epoch": 1}, "config": {"classify": {"patience": 2}}},
               d / "checkpoints" / "last.pt")
    assert "after the training's last epoch (3;" in tracking.saved_state(d)
    torch.save({"state": {"epoch": 3, "best_epoch": 2}, "config": {"classify": {"patience": 2}}},
               d / "checkpoints" / "last.pt")
    assert "at the end of epoch 3 of 5 (the unfinished epoch 4 is redone on resume)" in tracking.saved_state(d)
    _summary(d)
    (d / "checkpoints" / "last.pt").write_bytes(b"torn")
    assert "unreadable" in tracking.saved_state(d)
    (d / "checkpoints" / "last.pt").unlink()
    (d / "embeddings.pt").write_bytes(b"")
    assert tracking.saved_state(d).startswith("embeddings.pt (no head epoch had finished")
    _summary(d, status="completed")
    assert tracking.saved_state(d) == "completed"


@pytest.mark.parametrize("name", ["model=ae,latent=8,stage=all-1a2b3c4d", "it's $HOME \"x\" `y` a\\b !",
                                  "q\\'z\\"])
def test_the_resume_command_passes_the_run_dir_through_shell_and_hydra(tmp_path, name):
    run_dir = tmp_path / name
    cmd = tracking.resume_command(["model=ae", "head.hidden=[32,16]"], ["hydra.mode=RUN", "hydra.verbose=true"],
                                  run_dir)
    argv = shlex.split(cmd)
    assert argv[:3] == [sys.executable, "-m", "embclf"]
    assert argv[3:6] == ["model=ae", "head.hidden=[32,16]", "hydra.verbose=true"]
    (override,) = OverridesParser.create().parse_overrides([argv[6]])
    assert override.key_or_group == "hydra.run.dir" and override.value() == str(run_dir)
    if name.startswith("model="):
        assert cmd.endswith(f"\"hydra.run.dir='{run_dir}'\"")


def test_ctrl_c_in_a_stage_all_job_names_each_stage(tmp_path, caplog):
    job = tmp_path / "job"
    for name in ("autoencode", "classify"):
        (job / name / "checkpoints").mkdir(parents=True)
    _summary(job / "autoencode", status="completed")
    _summary(job / "classify", stage="classify", epochs=30)
    torch.save({"state": {"epoch": 3}}, job / "classify" / "checkpoints" / "last.pt")
    cfg = OmegaConf.create({"stage": Stage.all})
    hc = OmegaConf.create({"overrides": {"task": ["stage=all"], "hydra": ["hydra.mode=RUN"]}})
    code = _interrupted(cfg, job, hc, caplog)
    assert code == 130
    assert (f"interrupted (Ctrl-C); saved in {job}: autoencode/ completed; classify/ checkpoints/last.pt at the "
            "end of epoch 3 of 30 (the unfinished epoch 4 is redone on resume). Resume with: ") in caplog.text
    assert caplog.text.rstrip().endswith(f"stage=all \"hydra.run.dir='{job}'\"")


def test_ctrl_c_before_the_run_started_leaves_no_run_dir(tmp_path, caplog):
    """Interrupted while the data loads (nothing of the run written yet): the dir holding only Hydra's record
    is removed, as after bad input, and the line says nothing was saved."""
    job = tmp_path / "job"
    (job / ".hydra").mkdir(parents=True)
    (job / "embclf.log").write_text("")
    cfg = OmegaConf.create({"stage": Stage.autoencode})
    hc = OmegaConf.create({"overrides": {"task": ["latent=8"], "hydra": []}})
    code = _interrupted(cfg, job, hc, caplog)
    assert code == 130 and not job.exists()
    assert ("interrupted (Ctrl-C); nothing was saved (interrupted before the run started). Start it again with: "
            in caplog.text)
