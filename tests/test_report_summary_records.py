"""The report reads what the run's own summary.json records rather than Hydra's ``.hydra/`` files: the
``experiment=`` preset from ``choices``, a single run's command from ``overrides`` (``.hydra/`` only for a
summary without them); and ``embclf.report.load`` keeps integer columns integer (nullable ``Int64``) when
some rows lack them."""
from __future__ import annotations

import json

import pandas as pd
from report_fixtures import ae_run, clf_run

from embclf.report import collect, commands, load, preset


def _edit_summary(run_dir, **fields):
    p = run_dir / "summary.json"
    s = json.loads(p.read_text())
    s.update(fields)
    p.write_text(json.dumps(s))


def _hydra_record(run_dir, experiment):
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  runtime:\n    choices:\n      experiment: {experiment}\n")


def test_preset_is_read_from_the_summary_choices(tmp_path):
    a = ae_run(tmp_path / "a", "ae", 8, 0)
    _edit_summary(a, choices={"experiment": "improved", "model": "ae", "head": "mlp"})
    s = json.loads((a / "summary.json").read_text())
    assert preset(a, s) == "improved"  # no .hydra/ at all
    _hydra_record(a, "quick")  # a disagreeing Hydra record: the summary wins
    assert preset(a, s) == "improved"
    _edit_summary(a, choices={"experiment": None, "model": "ae"})  # composed without a preset
    assert preset(a, json.loads((a / "summary.json").read_text())) is None


def test_a_summary_without_choices_falls_back_to_hydra_yaml(tmp_path):
    a = ae_run(tmp_path / "a", "ae", 8, 0)
    s = json.loads((a / "summary.json").read_text())
    assert "choices" not in s and preset(a, s) is None
    _hydra_record(a, "quick")
    assert preset(a, s) == "quick" and preset(a) == "quick"


def test_rows_are_labelled_by_the_summary_preset(tmp_path):
    for name, acc in (("quick", 0.3), ("improved", 0.4)):
        e = ae_run(tmp_path / name / "autoencode", "ae", 8, 0, dotlist=["classify.patience=20"] if name == "improved"
                   else None)
        c = clf_run(tmp_path / name / "classify", e, acc)
        for d in (e, c):
            _edit_summary(d, choices={"experiment": name, "model": "ae"})
    assert sorted(r["label"] for r in collect([tmp_path])) == ["ae-z8 experiment=improved", "ae-z8 experiment=quick"]


def test_single_run_command_is_rebuilt_from_the_summary_overrides(tmp_path):
    a = ae_run(tmp_path / "run1", "ae", 8, 0)
    _edit_summary(a, overrides=["model=ae", "latent=8", "data.root=/my data"])
    # Hydra's record says something else: the summary is the run's own record and wins
    (a / ".hydra").mkdir()
    (a / ".hydra" / "overrides.yaml").write_text("- model=vae\n")
    assert commands(collect([tmp_path])) == ["python -m embclf model=ae latent=8 'data.root=/my data'    # run1"]


def test_single_run_command_falls_back_to_overrides_yaml_without_the_field(tmp_path):
    a = ae_run(tmp_path / "run1", "ae", 8, 0)
    s = json.loads((a / "summary.json").read_text())
    del s["overrides"]
    (a / "summary.json").write_text(json.dumps(s))
    (a / ".hydra").mkdir()
    (a / ".hydra" / "overrides.yaml").write_text("- model=ae\n- latent=8\n")
    assert commands(collect([tmp_path])) == ["python -m embclf model=ae latent=8    # run1"]


def test_load_keeps_integer_columns_integer_when_some_rows_lack_them(tmp_path):
    a = ae_run(tmp_path / "ae", "ae", 8, 0)
    clf_run(tmp_path / "clf", a, 0.3)
    df = load(tmp_path).sort_values("stage").reset_index(drop=True)  # autoencode, classify
    # encoder.latent: only the classify run has an encoder; n_train: only the autoencode summary
    assert str(df["encoder.latent"].dtype) == "Int64"
    assert df["encoder.latent"].isna().tolist() == [True, False] and df.loc[1, "encoder.latent"] == 8
    assert str(df["n_train"].dtype) == "Int64" and df.loc[0, "n_train"] == 270 and df.loc[1, "n_train"] is pd.NA
    assert df["latent"].dtype == "int64"  # every row has it: a plain integer column
    assert df["test_psnr"].dtype == "float64"  # floats stay floats
