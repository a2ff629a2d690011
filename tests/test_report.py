"""python -m embclf.report over real sweeps: rows joined across stages, files, failed runs, mean ± std."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from conftest import REPO

from embclf import report, runs

FIGURES = ["val_psnr.png", "val_mse.png", "val_accuracy.png", "ce.png", "vs_latent.png", "prior_samples.png",
           "reconstructions.png", "per_class_accuracy.png"]


def test_report_over_outputs_joins_classify_to_its_encoder(tiny_sweep, tmp_path):
    res = report.report([tiny_sweep["out"]], out=tmp_path)
    rows = res["rows"]
    assert [r["label"] for r in rows] == ["ae-z8", "ae-z16", "vae-z8", "vae-z16"]
    for r in rows:
        assert r["stage"] == "autoencode+classify" and r["status"] == "completed" and r["seed"] == 0
        ae_epochs, clf_epochs = (runs.read_summary(r[k])["epochs"] for k in ("run_dir", "classify_dir"))
        assert r["epochs"] == f"{ae_epochs}/{ae_epochs} + {clf_epochs}/{clf_epochs}"
        assert 5 < r["test_psnr"] < 40 and 0 < r["test_mse"] < 0.2 and 0 < r["test_accuracy"] <= 1
        assert 0 < r["val_accuracy"] <= 1 and r["wall_seconds"] > 0
        assert (r["test_kl"] is not None) == (r["active_units"] is not None) == (r["model"] == "vae")
    with open(tmp_path / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and list(table[0])[:len(report.COLUMNS)] == report.COLUMNS
    assert float(table[0]["test_accuracy"]) == pytest.approx(rows[0]["test_accuracy"])
    md = (tmp_path / "report.md").read_text()
    assert res["table"] in md and "Not completed" not in md
    for name in FIGURES:
        assert (tmp_path / "figures" / name).stat().st_size > 5000, name
        assert f"(figures/{name})" in md


def test_report_cli_prints_the_table(tiny_sweep, tmp_path):
    # only the autoencode sweep: its rows have no classifier, so the accuracy columns are left out
    ae_sweep = next(p.parent.parent for p in tiny_sweep["out"].glob("*/*/summary.json")
                    if runs.read_summary(p.parent)["stage"] == "autoencode")
    out = subprocess.run([sys.executable, "-m", "embclf.report", str(ae_sweep), "--out", str(tmp_path), "--no-figures"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("| run ") and "test PSNR (dB)" in lines[0] and "test acc" not in lines[0]
    assert sum(line.startswith("| ae-z") or line.startswith("| vae-z") for line in lines) == 4
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "figures").exists()


def test_report_lists_failed_runs(failing_sweep, tmp_path):
    res = report.report([failing_sweep["sweep"]], out=tmp_path)
    rows = res["rows"]
    assert sorted(r["status"] for r in rows) == ["completed", "failed"]
    for r in rows:  # classify runs on an encoder outside this sweep: their reconstruction numbers are joined in
        assert r["stage"] == "classify" and r["label"].startswith("vae-z8") and r["test_mse"] > 0
    failed = next(r for r in rows if r["status"] == "failed")
    assert "injected failure at classify.metrics" in failed["error"] and failed["test_accuracy"] is None
    md = (tmp_path / "report.md").read_text()
    assert "## Not completed" in md and "injected failure at classify.metrics" in md.split("## Not completed")[1]


def test_mean_and_std_over_seeds():
    rows = [{"label": "vae-z8", "model": "vae", "latent": 8, "stage": "autoencode", "status": "completed", "seed": s,
             "epochs": "2/2", **{k: None for k in report.NUMERIC}, "test_mse": v, "wall_seconds": 10.0}
            for s, v in [(0, 0.01), (1, 0.03)]]
    rows.append({**rows[0], "seed": 2, "status": "failed", "test_mse": 9.0})  # not averaged in
    (agg,) = report.aggregate(rows)
    assert agg["n"] == 2 and agg["seed"] == "0,1"
    assert agg["test_mse"][0] == pytest.approx(0.02) and agg["test_mse"][1] == pytest.approx(0.0141421, rel=1e-4)
    assert agg["wall_seconds"] == (10.0, 0.0)
    assert "0.02000 ± 0.01414" in report.markdown_table([agg], ["label", "n", "test_mse"])


def test_missing_path_is_a_clear_error(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert report.main([str(tmp_path)]) == 2
    assert "no run dirs" in capsys.readouterr().err
