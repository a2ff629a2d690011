"""End to end through `python -m embclf` on the real CIFAR-10 subset: sweeps, stage=all, lookup, resume."""
import json
import signal
from pathlib import Path

import pytest
import torch

from embclf import references

from conftest import MINI, SMALL_MODEL, embclf_env, run_embclf

AE_KEYS = {"status", "stage", "model", "latent", "seed", "epochs", "wall_seconds", "device", "test_mse",
           "test_psnr", "final_test_mse", "final_test_psnr", "best_epoch", "start_time", "end_time"}


def _runs(out: Path, stage: str):
    found = []
    for s in out.rglob("summary.json"):
        d = json.loads(s.read_text())
        if d.get("stage") == stage:  # (an evaluation's eval/*/summary.json has none)
            found.append((s.parent, d))
    return sorted(found, key=lambda t: (t[1]["model"], t[1]["latent"]))


def test_sweep_autoencode_run_dirs(tiny_sweep):
    runs_ = _runs(tiny_sweep["out"], "autoencode")
    assert [(d["model"], d["latent"]) for _, d in runs_] == [("ae", 8), ("ae", 16), ("vae", 8), ("vae", 16)]
    sweep_dirs = {p.parent for p, _ in runs_}
    assert len(sweep_dirs) == 1  # one sweep dir per invocation
    for run_dir, s in runs_:
        assert s["status"] == "completed" and AE_KEYS <= s.keys(), s
        assert s["epochs"] == 2 and s["device"] == "cpu"
        assert ("test_kl" in s) == (s["model"] == "vae")
        assert 5 < s["test_psnr"] < 40 and 0 < s["test_mse"] < 0.2
        assert f"latent={s['latent']}" in run_dir.name and f"model={s['model']}" in run_dir.name
        for f in ("config.yaml", "embclf.log", "metrics.jsonl", ".hydra/overrides.yaml", "checkpoints/last.pt",
                  "checkpoints/best.pt", "images/recon_e001.png", "images/samples_e002.png"):
            assert (run_dir / f).is_file(), f
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [(r["epoch"], r["split"]) for r in recs] == [(1, "train"), (1, "val"), (2, "train"), (2, "val"), (2, "test")]
        assert all({"mse", "sse", "psnr", "loss"} <= r.keys() for r in recs)
        assert all("lr" in r and "seconds" in r for r in recs if r["split"] == "train")


def test_sweep_classify_uses_matching_encoders(tiny_sweep):
    ae = {(d["model"], d["latent"]): p for p, d in _runs(tiny_sweep["out"], "autoencode")}
    clf = _runs(tiny_sweep["out"], "classify")
    assert len(clf) == 4
    for run_dir, s in clf:
        assert s["status"] == "completed"
        # two sweep dirs in one output dir: relative to the run, the absolute path kept as a fallback
        assert not Path(s["encoder_run"]).is_absolute() and s["encoder_run_absolute"]
        assert references.encoder_run_of(run_dir, s) == ae[(s["model"], s["latent"])].resolve()
        # above chance (0.1) on 200 test images, with 450 training images and 2 epochs
        assert s["test_accuracy"] > 0.15, s
        assert set(s["per_class_accuracy"]) == {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                "horse", "ship", "truck"}
        assert len(s["confusion_matrix"]) == 10 and sum(map(sum, s["confusion_matrix"])) == 200
        emb = torch.load(run_dir / "embeddings.pt", weights_only=False)
        assert emb["train"]["z"].shape == (450, s["latent"]) and emb["train"]["z"].dtype == torch.float32
        assert emb["test"]["labels"].shape == (200,)
        assert (run_dir / "images" / "confusion.png").is_file()


@pytest.mark.slow
def test_stage_all_writes_both_run_dirs(tmp_path, cifar_root):
    out = tmp_path / "o"
    run_embclf(["stage=all", "model=vae", "latent=8", *MINI, *SMALL_MODEL, "autoencode.epochs=1", f"output_dir={out}"], tmp_path)
    (job,) = list(out.iterdir())
    ae, clf = json.loads((job / "autoencode/summary.json").read_text()), json.loads((job / "classify/summary.json").read_text())
    assert ae["status"] == clf["status"] == "completed" and ae["stage"] == "autoencode" and clf["stage"] == "classify"
    assert clf["encoder_run"] == "../autoencode" and "encoder_run_absolute" not in clf
    assert references.encoder_run_of(job / "classify", clf) == (job / "autoencode").resolve()
    assert (job / "classify/.hydra/overrides.yaml").is_file() and (job / "autoencode/checkpoints/best.pt").is_file()
    # the lookup treats it like a separately run autoencode stage
    run_embclf(["stage=classify", "model=vae", "latent=8", *MINI, *SMALL_MODEL, "autoencode.epochs=1", f"output_dir={out}"], tmp_path)
    new = [p for p in out.iterdir() if p != job]
    assert references.encoder_run_of(new[0], json.loads((new[0] / "summary.json").read_text())) == (job / "autoencode").resolve()


@pytest.mark.slow
def test_classify_without_encoder_fails_clearly(tmp_path, cifar_root):
    out = tmp_path / "o"
    proc = run_embclf(["stage=classify", "model=vae", "latent=24", *MINI, f"output_dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2
    err = proc.stderr
    assert "found no completed autoencode run" in err and "latent=24" in err and "stage=autoencode" in err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


@pytest.mark.slow
def test_resume_after_sigterm_and_skip_completed(tmp_path, cifar_root):
    run_dir = tmp_path / "run"
    args = ["model=ae", "latent=8", *MINI, *SMALL_MODEL, "autoencode.epochs=3", "logger=none", f"hydra.run.dir={run_dir}"]
    metrics = run_dir / "metrics.jsonl"
    # SIGTERM (as SLURM sends at a time limit or preemption) in the middle of epoch 2 (6 steps per epoch): the
    # process signals itself at an exact step, so a fast small model cannot finish before the signal lands
    env = {**embclf_env(tmp_path), "EMBCLF_KILL_AT": "autoencode.step:9:TERM"}
    proc = run_embclf(args, tmp_path, env=env, check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "interrupted" and (run_dir / "checkpoints/last.pt").is_file()
    done = torch.load(run_dir / "checkpoints/last.pt", weights_only=False)["state"]["epoch"]
    assert done == 1  # epoch 2 was cut short: the run resumes from epoch 1's checkpoint
    run_embclf(args, tmp_path)  # same command, same run dir: resumes
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["resumed_from_epoch"] == done
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in recs if r["split"] == "train"] == [1, 2, 3]  # each epoch once
    before = metrics.read_text()
    proc = run_embclf(args, tmp_path)  # completed: nothing retrained
    assert "already completed" in proc.stderr + proc.stdout and metrics.read_text() == before
    # another config into the same run dir would mix two experiments: refused, naming the key
    other = [a.replace("autoencode.epochs=3", "autoencode.epochs=4") for a in args]
    record = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    proc = run_embclf(other, tmp_path, check=False)
    assert proc.returncode == 2 and "differs in: autoencode.epochs" in proc.stderr
    assert metrics.read_text() == before and json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    # a refused run changes nothing: Hydra's record of the run (.hydra/) is still the original one
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == record
    assert not (run_dir / ".hydra.new").exists()


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["autoencode.epochs=-1", "classify.epochs=0 stage=classify"])
def test_zero_epochs_is_a_clear_error(tmp_path, bad):
    # autoencode.epochs=0 is the random-init control (tests/test_random_init.py); below 0 is the error
    proc = run_embclf([*MINI, *bad.split(), f"output_dir={tmp_path / 'o'}"], tmp_path, check=False)
    assert proc.returncode == 2 and ("epochs=0 is invalid: it must be at least 1" in proc.stderr
                                     or "autoencode.epochs=-1 is invalid: it must be >= 0" in proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing half-written


@pytest.mark.slow
def test_classify_encoder_that_would_run_code_is_refused(tmp_path, cifar_root):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Evil(), "config": {}, "state": {}}, tmp_path / "evil.pt")
    (tmp_path / "head.pt").write_bytes(b"\x00" * 64)  # not a checkpoint at all
    out = tmp_path / "o"
    for bad, said in (("evil.pt", "holds objects other than tensors and plain values"),
                      ("head.pt", "is not a readable torch checkpoint")):
        proc = run_embclf(["stage=classify", *MINI, f"classify.encoder={tmp_path / bad}", f"output_dir={out}"],
                          tmp_path, check=False)
        assert proc.returncode == 2 and f"classify.encoder: {tmp_path / bad} {said}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not marker.exists()  # the pickle's command never ran
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


@pytest.mark.slow
def test_divergence_stops_the_run_and_is_recorded(tmp_path, cifar_root):
    run_dir = tmp_path / "run"
    proc = run_embclf(["model=vae", "latent=8", *MINI, *SMALL_MODEL, "logger=none", "autoencode.epochs=3", "autoencode.lr=1e30",
                       f"hydra.run.dir={run_dir}"], tmp_path, check=False)
    assert proc.returncode == 2 and "non-finite loss at epoch 1, step " in proc.stderr, proc.stderr[-2000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "failed" and s["reason"] == "diverged" and "test_mse" not in s
    assert not (run_dir / "checkpoints" / "best.pt").exists()  # a NaN model is never kept as best
    for line in (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def test_divergence_later_keeps_the_last_finite_checkpoint(tmp_path):
    from embclf.engine import Diverged, check_finite

    last = tmp_path / "last.pt"
    last.write_bytes(b"x")
    with pytest.raises(Diverged, match=r"non-finite loss at epoch 3, step 7 .* the last finite checkpoint, .*last.pt "
                                       r"\(epoch 2\), is kept"):
        check_finite(3, 7, {"loss": 1.0}, {"mse": 0.1}, 1e-3, last)
    with pytest.raises(Diverged, match="epoch 3, the end of the epoch \\(val mse\\)"):
        check_finite(3, 0, {"loss": 1.0}, {"mse": float("nan")}, 1e-3, last)
    check_finite(3, 0, {"loss": 1.0}, {"mse": 0.1}, 1e-3, last)  # finite: nothing happens


@pytest.mark.slow
def test_posterior_collapse_is_flagged(tmp_path, cifar_root):
    run_dir = tmp_path / "run"
    proc = run_embclf(["model=vae", "latent=8", *MINI, *SMALL_MODEL, "logger=none", "autoencode.epochs=1", "model.beta=100",
                       f"hydra.run.dir={run_dir}"], tmp_path)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["test_active_units"] < 1 and s["posterior_collapse"] is True
    assert "posterior collapse" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_fails_clearly_and_leaves_nothing_half_written(tmp_path, cifar_root):
    """`ulimit -f` (4 MB: the data cache and JSON fit, a checkpoint does not) stands in for a full disk. The small
    encoder with a 512-d code: cheap to train, a ~50 MB checkpoint (the reference model's is ~24 MB)."""
    import resource

    run_dir = tmp_path / "run"
    limit = 4 * 2**20
    proc = run_embclf(["model=ae", "latent=512", *MINI, *SMALL_MODEL, "autoencode.epochs=1", "logger=none",
                       f"hydra.run.dir={run_dir}"], tmp_path, check=False,
                      preexec=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot write" in proc.stderr and "/checkpoints/" in proc.stderr and "Traceback" not in proc.stderr
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "failed" and s["reason"] == "disk full", s
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name], list(run_dir.rglob("*.tmp*"))


@pytest.mark.parametrize("mode", ["single", "sweep"])
def test_a_real_full_disk_during_a_checkpoint_is_recorded_as_disk_full(tmp_path, cifar_root, small_tmpfs, mode):
    """The output dir on a real 8 MB file system (a tmpfs; the small encoder with a 512-d code has a ~50 MB
    checkpoint): the partial checkpoint's space is freed before the failure is recorded, so summary.json says
    failed / disk full with the path, in a single run and in a sweep (there the launcher's table and the report
    read it), and no temporary file is left."""
    disk = small_tmpfs(8 << 20)
    args = ["model=ae", "latent=512", *MINI, *SMALL_MODEL, "autoencode.epochs=1", "logger=none"]  # ~50 MB checkpoint
    if mode == "sweep":
        args = ["-m", *args, f"hydra.sweep.dir={disk}/sweep"]
    else:
        args += [f"hydra.run.dir={disk}/run"]
    proc = run_embclf(args, tmp_path, check=False)
    assert proc.returncode != 0, proc.stderr[-3000:]
    (summary,) = list(disk.rglob("summary.json"))
    s = json.loads(summary.read_text())
    assert s["status"] == "failed" and s["reason"] == "disk full", s
    assert "/checkpoints/" in s["error"] and "the disk is full" in s["error"], s
    assert not [p for p in disk.rglob("*") if ".tmp" in p.name], list(disk.rglob("*"))
