"""The report's row identity, probes, figures, help texts, key suggestions and autoencode.keep_last.

Row identity is tested on hand-written run dirs (no training): a row is one configuration, only distinct
seeds are averaged, a repeated seed is reported as such."""
from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import CIFAR, REPO, embclf_env, run_module
from report_fixtures import ae_run, clf_run

from embclf import identity, references, report, runs
from embclf import liveness
from embclf.report import figures, projections as plots, tables
from embclf.config import conf_dir
from embclf.data import Split
from embclf.models import build_model
from embclf import images
from embclf.stages import autoencode
from embclf.runtime import EmbclfError


def _two_sweeps_and_a_rerun(t):
    """Sweep A: stage=all jobs (autoencode/ + classify/ inside each job dir), ae and vae, seeds 0 and 1.
    Sweep B: a second head (head.hidden=[256,128]) on A's encoders. C: a re-run of (ae, seed 0, default head)."""
    encoders = {}
    for m in ("ae", "vae"):
        for s in (0, 1):
            job = t / "A" / f"model={m},seed={s},stage=all"
            e = encoders[m, s] = ae_run(job / "autoencode", m, 8, s, mse=0.02 + 0.01 * s, end_time=1000.0)
            clf_run(job / "classify", e, 0.30 + 0.1 * s, end_time=1001.0)
            clf_run(t / "B" / f"model={m},seed={s}", e, 0.50 + 0.1 * s, dotlist=["head.hidden=[256,128]"],
                    end_time=2000.0)
    clf_run(t / "C" / "model=ae,seed=0", encoders["ae", 0], 0.90, end_time=3000.0)
    return encoders


def test_rows_are_configurations_not_seeds(tmp_path):
    _two_sweeps_and_a_rerun(tmp_path)
    res = report.report([tmp_path / "A", tmp_path / "B", tmp_path / "C"], out=tmp_path / "rep", figures=False)
    agg = {a["label"]: a for a in res["agg"]}
    # the two heads are two rows per model, never averaged together; model.variational follows model.name
    assert sorted(agg) == ["ae-z8 head.hidden=[128,64]", "ae-z8 head.hidden=[256,128]",
                           "vae-z8 head.hidden=[128,64]", "vae-z8 head.hidden=[256,128]"]
    for a in agg.values():
        assert a["n"] == 2 and sorted(a["seed"].split(",")) == ["0", "1"]
    # the re-run of seed 0 replaces (newest) rather than joins seed 0: mean of 0.90 and 0.40, reported as a repeat
    rerun = agg["ae-z8 head.hidden=[128,64]"]
    assert rerun["test_accuracy"][0] == pytest.approx(0.65) and "seed 0 ×2" in rerun["repeats"]
    assert agg["vae-z8 head.hidden=[128,64]"]["test_accuracy"][0] == pytest.approx(0.35)
    assert agg["ae-z8 head.hidden=[256,128]"]["repeats"] == ""
    # every run is in the CSV, the superseded one with used=False, the differing setting as its own column
    with open(tmp_path / "rep" / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9 and sum(r["used"] == "False" for r in table) == 1
    assert {r["cfg:head.hidden"] for r in table} == {"[128,64]", "[256,128]"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## What was run" in md and "`head.hidden`" in md and "best-on-val" in md
    assert "seed 0 ×2 (newest used)" in md and "## Test accuracy per class" in md
    # curve legends tell every run apart
    labels = figures._curve_labels(res["rows"])
    assert len(set(labels.values())) == len(labels) == 9


def test_other_settings_separate_rows_and_keys_that_do_not_count(tmp_path):
    # autoencode.epochs differs: two configurations; threads/device/keep_last/output_dir differ too but do not count
    ae_run(tmp_path / "s1" / "a", "ae", 8, 0, dotlist=["autoencode.epochs=2", "threads=1"])
    ae_run(tmp_path / "s1" / "b", "ae", 8, 1, dotlist=["autoencode.epochs=2", "device=cpu", "autoencode.keep_last=false"])
    ae_run(tmp_path / "s2" / "c", "ae", 8, 0, dotlist=["autoencode.epochs=4", "output_dir=/elsewhere"])
    agg = report.aggregate(report.collect([tmp_path]))
    assert sorted((a["label"], a["n"]) for a in agg) == [("ae-z8 autoencode.epochs=2", 2), ("ae-z8 autoencode.epochs=4", 1)]


def test_probes_get_one_column_each(tmp_path):
    e = ae_run(tmp_path / "a", "ae", 8, 0)
    clf_run(tmp_path / "c", e, 0.4, probes={"linear": {"val_accuracy": 0.41, "test_accuracy": 0.42},
                                            "knn": {"val_accuracy": 0.31, "test_accuracy": 0.32}})
    res = report.report([tmp_path], out=tmp_path / "rep", figures=False)
    (a,) = res["agg"]
    assert a["probe:linear"][0] == pytest.approx(0.42) and a["probe:knn"][0] == pytest.approx(0.32)
    header = res["table"].splitlines()[0]
    assert "test acc (linear)" in header and "test acc (knn)" in header and "0.3200" in res["table"]
    with open(tmp_path / "rep" / "report.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["probe:knn"]) == pytest.approx(0.32) and float(row["probe:linear:val"]) == pytest.approx(0.41)


def test_recon_indices_are_class_balanced():
    labels = torch.arange(10).repeat_interleave(50)  # ordered by class, like the test split
    idx = images.recon_indices(labels)
    assert len(idx) == 20 and sorted(labels[idx[:10]].tolist()) == list(range(10))
    assert torch.equal(idx, images.recon_indices(labels))  # the same images in every run
    many = images.recon_indices(torch.arange(100).repeat_interleave(3))
    assert len(set((many // 3).tolist())) == 20  # 100 classes: 20 different ones


@pytest.mark.slow
def test_figures_exist_with_readable_sizes(tmp_path):
    torch.manual_seed(0)
    labels = torch.arange(10).repeat_interleave(10)
    split = Split(torch.randint(0, 255, (100, 3, 32, 32), dtype=torch.uint8), labels)
    from omegaconf import OmegaConf

    for m, lat in (("ae", 4), ("vae", 8)):
        d = ae_run(tmp_path / "sw" / f"model={m}" / "autoencode", m, lat, 0)
        model = build_model(OmegaConf.create({"name": m, "arch": "conv", "variational": m == "vae", "beta": 0.1,
                                              "channels": [8, 8, 8, 8, 8], "strides": [2, 1, 2, 1, 2]}), lat, 32)
        images.save_images(model, split, "cpu", d, 3)
        clf_run(d.parent / "classify", d, 0.3, classes=[f"c{i}" for i in range(10)])
    recon = Image.open(next((tmp_path / "sw").glob("*/autoencode/images/recon_e003.png")))
    assert recon.size == (10 * 98 + 2, 4 * 98 + 2)  # rows of 10 images enlarged to 96 pixels
    res = report.report([tmp_path / "sw"], out=tmp_path / "rep")
    sizes = {p.name: Image.open(p).size for p in res["files"] if p.suffix == ".png"}
    assert {"val_psnr.png", "val_accuracy.png", "ce.png", "vs_latent.png", "prior_samples.png",
            "reconstructions.png", "per_class_accuracy.png"} <= set(sizes)
    assert all(w >= 600 and h >= 150 for w, h in sizes.values()), sizes
    assert sizes["reconstructions.png"][1] > 3 * 96  # originals + one row per run
    pair = images.read_reconstructions(d)  # the same images as data: nobody parses the PNG's geometry back
    assert pair["originals"].shape == pair["reconstructions"].shape == (20, 3, 32, 32) and pair["epoch"] == 3
    # 100 classes: a heat map without per-cell numbers, fast and large enough to read
    cm = np.random.default_rng(0).integers(0, 5, (100, 100))
    p = plots.confusion(cm, [f"class{i}" for i in range(100)], tmp_path / "cm.png", "100 classes")
    assert Image.open(p).size[0] >= 1000
    xy = np.random.default_rng(0).normal(size=(300, 2))
    p = plots.scatter(xy, np.arange(300) % 100, [f"class{i}" for i in range(100)], tmp_path / "pca.png", "t", "pca")
    assert Image.open(p).size[0] > Image.open(p).size[1]  # the legend sits beside the axes


@pytest.mark.slow
def test_help_texts(tmp_path):
    out = run_module("embclf", ["--help"], REPO, embclf_env(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for want in ("model: ae, resnet, resnet_vae, vae", "head: knn, linear, logreg, mlp", "stage=autoencode", "stage=classify",
                 "stage=all", "autoencode.epochs=80", "classify.epochs=50", "latent=64",
                 "python -m embclf model=vae latent=64 stage=all",
                 "python -m embclf -m model=ae,vae latent=32,64,128,256 stage=all", "hydra/launcher=slurm"):
        assert want in text, want


def test_report_help(capsys):
    with pytest.raises(SystemExit):
        report.main(["--help"])
    text = capsys.readouterr().out
    assert "python -m embclf.report outputs/sweepA outputs/sweepB --out reports/ab" in text
    assert "reconstructions" in text and "distinct" in text


@pytest.mark.slow
def test_keep_last_false_drops_last_pt_and_stays_completed(tmp_path):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", overrides=[
            "data=folder", f"data.root={CIFAR}", "data.train_size=100", "data.test_size=50",
            f"data.cache_dir={tmp_path / 'cache'}", "autoencode.epochs=1", "autoencode.batch_size=50",
            "autoencode.image_epochs=[]", "autoencode.keep_last=false", "logger=none", "threads=1", "latent=4",
            f"output_dir={tmp_path}"])
    run_dir = tmp_path / "run"
    autoencode.run(cfg, run_dir, [])
    assert not (run_dir / "checkpoints" / "last.pt").exists() and (run_dir / "checkpoints" / "best.pt").is_file()
    done = runs.read_summary(run_dir)
    assert done["status"] == "completed"
    cfg.autoencode.keep_last = True  # keep_last changes what is kept, not the experiment
    assert runs.completed_in(run_dir, identity.identity(cfg, "autoencode"), "autoencode")
    assert references.find_encoder_run(cfg, tmp_path) == run_dir
    autoencode.run(cfg, run_dir, [])  # never retrained
    assert runs.read_summary(run_dir)["end_time"] == done["end_time"]
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    # another experiment into this dir (no last.pt to read a config from) is refused, and the result stays
    cfg.latent = 16
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(EmbclfError, match=r"holds a completed run of another experiment \(differs in: latent\)"):
        autoencode.run(cfg, run_dir, [])
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_sweep_hint_is_a_command_that_works_as_printed(tmp_path, caplog):
    from omegaconf import OmegaConf

    from embclf.tracking import AnnounceOutputs

    with caplog.at_level("INFO"):
        AnnounceOutputs().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "a sweep")}}}))
    assert f"{sys.executable} -m embclf.report '{tmp_path / 'a sweep'}'" in caplog.text


def test_a_running_job_is_checked_not_trusted(monkeypatch, tmp_path):
    """A summary that says "running" is checked: a dead process on this host reads "interrupted"; a job on
    another host or on SLURM, which this host cannot ask, says so instead of claiming to run."""
    import socket

    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue/sacct here
    dead = {"status": "running", "hostname": socket.gethostname(), "pid": 2**22 + 12345}
    assert liveness.status_text(dead) == "interrupted"
    assert "cannot check" in liveness.status_text({"status": "running", "hostname": "node17", "pid": 1})
    slurm = liveness.status_text({"status": "running", "hostname": "node17", "slurm_job_id": "123_4"})
    assert slurm.startswith("running?") and "SLURM job 123_4" in slurm
    assert liveness.status_text({"status": "completed"}) == "completed"


def test_counts_print_as_integers_over_seeds_too():
    """Active units are a count: one seed, or several seeds with the same count, print as an integer; a
    mean over seeds that differ keeps one decimal."""
    assert tables._fmt("active_units", 32.0) == "32"
    assert tables._fmt("active_units", (32.0, None)) == "32"
    assert tables._fmt("active_units", (32.0, 0.0)) == "32"
    assert tables._fmt("active_units", (31.5, 0.7071)) == "31.5 ± 0.7"
    assert tables._fmt("test_psnr", (16.0, 0.0)) == "16.00 ± 0.00"  # not a count: the spread is shown


def _preset_record(run_dir, name):
    """Hydra's record of a run composed with ``experiment=<name>`` (only what the report reads of it)."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  runtime:\n    choices:\n      experiment: {name}\n      model: ae\n")


def test_rows_from_presets_are_labelled_by_the_preset(tmp_path):
    """Sweeps of two ``experiment=`` presets: the settings the presets set follow the preset's name, so a row
    reads ``ae-z8 experiment=improved`` (not the preset's settings one by one); report.md names those
    settings and report.csv keeps each as a column. A setting that varies within a preset is still shown."""
    improved = ["model.ce_weight=10.0", "model.decorrelation_weight=1.0", "classify.patience=20"]
    for s in (0, 1):
        for name, dotlist, acc in (("quick", [], 0.3), ("improved", improved, 0.4)):
            e = ae_run(tmp_path / name / f"s{s}" / "autoencode", "ae", 8, s, dotlist=dotlist)
            c = clf_run(tmp_path / name / f"s{s}" / "classify", e, acc, dotlist=dotlist)
            _preset_record(e, name)
            _preset_record(c, name)
    res = report.report([tmp_path], out=tmp_path / "rep", figures=False)
    assert sorted((a["label"], a["n"]) for a in res["agg"]) == [("ae-z8 experiment=improved", 2),
                                                                 ("ae-z8 experiment=quick", 2)]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert ("`experiment` stands for the presets' settings: `classify.patience`, `model.ce_weight`, "
            "`model.decorrelation_weight`") in md
    with open(tmp_path / "rep" / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert {(r["cfg:experiment"], r["cfg:model.ce_weight"]) for r in table} == {("quick", "0.0"), ("improved", "10.0")}
    # one more improved run with another head dropout: that setting varies within a preset, so it is shown
    e = ae_run(tmp_path / "improved" / "s2" / "autoencode", "ae", 8, 2, dotlist=improved)
    c = clf_run(tmp_path / "improved" / "s2" / "classify", e, 0.5, dotlist=[*improved, "head.dropout=0.5"])
    _preset_record(e, "improved")
    _preset_record(c, "improved")
    labels = sorted(a["label"] for a in report.aggregate(report.collect([tmp_path])))
    assert labels == ["ae-z8 experiment=improved head.dropout=0.0", "ae-z8 experiment=improved head.dropout=0.5",
                      "ae-z8 experiment=quick head.dropout=0.0"]


def test_curves_count_a_seed_once_when_its_interrupted_attempt_was_rerun(tmp_path):
    """A seed interrupted and then re-run to completion in a new run dir (e.g. after an identity change) is one seed
    in the curves' mean and band: the figures draw its completed run only. A seed that has only an interrupted
    run still shows (its curve so far)."""
    from report_fixtures import resolved_config, write_run
    from embclf.report.rows import curve_rows

    done0 = ae_run(tmp_path / "s0-done", seed=0)
    cut0 = write_run(tmp_path / "s0-cut", resolved_config(seed=0), "autoencode", {"status": "interrupted"}, epochs=1)
    cut1 = write_run(tmp_path / "s1-cut", resolved_config(seed=1), "autoencode", {"status": "interrupted"}, epochs=1)
    rows = report.collect([tmp_path])
    assert {r["run_dir"] for r in rows} == {str(d.resolve()) for d in (done0, cut0, cut1)}
    assert sorted(r["run_dir"] for r in curve_rows(rows)) == sorted(str(d.resolve()) for d in (done0, cut1))
    # the same when the re-run is a stage=all job (an autoencode and a classify run; its row's settings include
    # the classify part, the interrupted autoencode-only job's do not): seed 1 re-run so
    job = tmp_path / "s1-all"
    clf_run(job / "classify", ae_run(job / "autoencode", seed=1), acc=0.4)
    rows = report.collect([tmp_path])
    assert sorted(r["run_dir"] for r in curve_rows(rows)) == sorted(
        str(d.resolve()) for d in (done0, job / "autoencode"))
