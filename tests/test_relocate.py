"""Relocatable results: a classify run refers to its encoder relative to itself, so a sweep dir (or an output
dir) copied or moved elsewhere works the same at its new place and never reads the original location.

The real runs: one small output dir with a sweep dir S holding a stage=all job (seed 0) and a two-sweep
stage=autoencode then stage=classify layout (seed 1, both into S), plus a sweep dir S2 whose classify run
uses S's encoder. It is copied, and the original renamed away, so any read of it fails.
"""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from embclf import references, report, runs

from conftest import MINI, SMALL_MODEL, embclf_env, run_embclf, zygote_python

COMMON = [*MINI, *SMALL_MODEL, "autoencode.epochs=1", "model=ae", "latent=8", "logger=none"]
# what a report row may differ in between the original and the copy: where the runs are
WHERE = {"run_dir", "classify_dir"}


def _runs_by(root: Path) -> dict:
    """{(stage, seed, sweep dir name): (run dir, summary)} of every run under ``root``."""
    out = {}
    for d in references.iter_run_dirs(root):
        s = runs.read_summary(d)
        if s and s.get("stage") in ("autoencode", "classify"):
            sweep = references.sweep_dir_of(d)
            key = (s["stage"], s["seed"], sweep.name if sweep else None, (d.parent / "autoencode").is_dir())
            assert key not in out, key
            out[key] = (d, s)
    return out


def _comparable(rows):
    return sorted((json.dumps({k: v for k, v in r.items() if k not in WHERE}, sort_keys=True, default=str)
                   for r in rows))


@pytest.fixture(scope="session")
def relocated(tmp_path_factory, cifar_root):
    """The output dir ``orig/outputs`` built, reported, copied to ``copy/outputs``, then moved away."""
    tmp = tmp_path_factory.mktemp("reloc")
    orig = tmp / "orig" / "outputs"
    sweep, sweep2 = orig / "S", orig / "S2"
    run_embclf(["-m", *COMMON, "stage=all", "seed=0", f"output_dir={orig}", f"hydra.sweep.dir={sweep}"], tmp)
    run_embclf(["-m", *COMMON, "stage=autoencode", "seed=1", f"output_dir={orig}", f"hydra.sweep.dir={sweep}"], tmp)
    run_embclf(["-m", *COMMON, "stage=classify", "seed=1", f"output_dir={orig}", f"hydra.sweep.dir={sweep}"], tmp)
    # another sweep dir of the same output dir: its classify run finds S's seed-1 encoder by lookup
    run_embclf(["-m", *COMMON, "stage=classify", "seed=1", f"output_dir={orig}", f"hydra.sweep.dir={sweep2}"], tmp)
    before = {"S": report.collect([sweep]), "outputs": report.collect([orig])}
    copy = tmp / "copy" / "outputs"
    shutil.copytree(orig, copy, symlinks=True)
    gone = tmp / "orig-moved-away"
    (tmp / "orig").rename(gone)  # from now on any read of the original location fails
    return {"tmp": tmp, "orig": orig, "copy": copy, "gone": gone, "before": before}


def test_references_are_relative_inside_the_tree(relocated):
    r = _runs_by(relocated["copy"])
    d, s = r[("classify", 0, "S", True)]  # the stage=all job's classify run: its sibling
    assert (s["encoder_run"], s["encoder_checkpoint"]) == ("../autoencode", "../autoencode/checkpoints/best.pt")
    assert "encoder_run_absolute" not in s and "encoder_checkpoint_absolute" not in s
    ae1 = r[("autoencode", 1, "S", False)][0]
    d, s = r[("classify", 1, "S", False)]  # same sweep dir: a sibling job
    assert s["encoder_run"] == f"../{ae1.name}" and "encoder_run_absolute" not in s
    assert references.encoder_run_of(d, s) == ae1.resolve()
    d, s = r[("classify", 1, "S2", False)]  # another sweep of the same output dir: relative, absolute as fallback
    assert s["encoder_run"] == f"../../S/{ae1.name}"
    assert s["encoder_run_absolute"] == str((relocated["orig"] / "S" / ae1.name).resolve())
    assert references.encoder_run_of(d, s) == ae1.resolve()  # the copy's, not the original's


def test_report_on_a_copy_equals_the_original(relocated):
    copy = relocated["copy"]
    rows = report.collect([copy / "S"])
    assert len(rows) == 2 and {r["stage"] for r in rows} == {"autoencode+classify"}  # one row per job
    assert all(r["test_mse"] is not None and r["test_accuracy"] is not None for r in rows)
    assert all(Path(r["run_dir"]).is_relative_to(copy.resolve()) for r in rows)
    assert _comparable(rows) == _comparable(relocated["before"]["S"])
    # the whole output dir: S2's classify run joins S's encoder in the copy
    whole = report.collect([copy])
    assert len(whole) == 3 and {r["stage"] for r in whole} == {"autoencode+classify"}
    assert _comparable(whole) == _comparable(relocated["before"]["outputs"])
    # the command itself, on the copy
    proc = subprocess.run([zygote_python(relocated["tmp"]), "-m", "embclf.report", str(copy / "S"), "--no-figures"],
                          cwd=relocated["tmp"], env=embclf_env(relocated["tmp"]), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # (report.md quotes the sweeps' command lines, output_dir=ORIGINAL included: a record, not a read)
    table = (copy / "S" / "report.csv").read_text()
    assert str(copy / "S") in table and str(relocated["orig"]) not in table


def test_evaluate_and_embed_on_a_copy_use_the_copys_encoder(relocated):
    tmp, r = relocated["tmp"], _runs_by(relocated["copy"])
    for key in (("classify", 0, "S", True), ("classify", 1, "S", False)):
        d, s = r[key]
        run_embclf([str(d)], tmp, module="embclf.evaluate")
        (ev,) = [json.loads(p.read_text()) for p in (d / "eval").glob("*/summary.json")]
        enc = references.encoder_run_of(d, s)
        assert Path(ev["encoder_checkpoint"]) == enc / "checkpoints" / "best.pt"
        assert enc.is_relative_to(relocated["copy"].resolve())
        assert ev["accuracy"] == pytest.approx(s["test_accuracy"], abs=1e-6)
    # embed exports with the encoder the run was trained on: the copy's (the original is gone)
    d, s = r[("classify", 0, "S", True)]
    enc = references.encoder_run_of(d, s)
    run_embclf([str(d)], tmp, module="embclf.embed")
    run_embclf([str(enc)], tmp, module="embclf.embed")  # the encoder's own export: the same numbers
    a, b = (np.load(p / "export" / "embeddings_test.npz") for p in (d, enc))
    assert np.array_equal(a["embeddings"], b["embeddings"]) and a["embeddings"].shape == (100, 8)


def test_a_classify_run_copied_without_its_encoder_says_so(relocated):
    d, _ = _runs_by(relocated["copy"])[("classify", 0, "S", True)]
    lone = relocated["tmp"] / "lone" / "classify"
    shutil.copytree(d, lone, ignore=shutil.ignore_patterns("eval", "export"))  # (other tests' evaluations)
    proc = run_embclf([str(lone)], relocated["tmp"], module="embclf.evaluate", check=False)
    assert proc.returncode == 2 and "recorded as ../autoencode/checkpoints/best.pt" in proc.stderr, proc.stderr
    assert "is gone" in proc.stderr and not (lone / "eval").exists()


def test_an_encoder_outside_the_tree_is_found_by_its_absolute_path(relocated):
    """classify.encoder=ABSOLUTE path to a run in another dir: recorded absolute; the classify run keeps
    working when moved, reading that encoder where it is."""
    tmp = relocated["tmp"]
    ae1 = _runs_by(relocated["copy"])[("autoencode", 1, "S", False)][0].resolve()
    far = tmp / "far" / "outputs"
    run_embclf([*COMMON, "stage=classify", "seed=1", f"classify.encoder='{ae1}'", f"output_dir={far}"], tmp)
    (d,) = list(references.iter_run_dirs(far))
    s = runs.read_summary(d)
    assert s["encoder_run"] == str(ae1) and s["encoder_checkpoint"] == str(ae1 / "checkpoints" / "best.pt")
    moved = tmp / "far-moved"
    (tmp / "far").rename(moved)
    (d,) = list(references.iter_run_dirs(moved))
    run_embclf([str(d)], tmp, module="embclf.evaluate")
    (ev,) = [json.loads(p.read_text()) for p in (d / "eval").glob("*/summary.json")]
    assert ev["encoder_checkpoint"] == str(ae1 / "checkpoints" / "best.pt")
    assert ev["accuracy"] == pytest.approx(s["test_accuracy"], abs=1e-6)


# --- the rule, on directory trees alone (no training) ---------------------------------------------------------

def _tree(tmp: Path) -> dict:
    out = tmp / "outputs"
    for d in ("S/job_all/autoencode", "S/job_all/classify", "S/ae", "S/clf", "S2/clf", "single/autoencode",
              "single/classify", "single_clf"):
        (out / d).mkdir(parents=True)
    (out / "S/ae/checkpoints").mkdir()
    (out / "S/ae/checkpoints/best.pt").write_bytes(b"")
    for s in ("S", "S2"):
        (out / s / "multirun.yaml").write_text("{}\n")
    (tmp / "elsewhere" / "ae").mkdir(parents=True)
    return {"out": out, "elsewhere": tmp / "elsewhere" / "ae"}


@pytest.mark.parametrize("clf, enc, recorded, absolute", [
    ("S/job_all/classify", "S/job_all/autoencode", "../autoencode", False),  # stage=all in a sweep
    ("S/clf", "S/ae", "../ae", False),  # the same sweep dir
    ("S2/clf", "S/ae", "../../S/ae", True),  # another sweep of the output dir: the absolute as a fallback
    ("single/classify", "single/autoencode", "../autoencode", False),  # a single stage=all run
    ("single_clf", "S/ae", "../S/ae", True),  # a single run on a sweep's encoder
    ("S/clf", None, None, True),  # outside the output dir: absolute only
])
def test_reference_rule(tmp_path, clf, enc, recorded, absolute):
    t = _tree(tmp_path)
    target = t["out"] / enc if enc else t["elsewhere"]
    f = references.reference_fields(t["out"] / clf, t["out"], encoder_run=target)
    if recorded is None:
        assert f == {"encoder_run": str(target.resolve())}
    else:
        assert f["encoder_run"] == recorded and ("encoder_run_absolute" in f) == absolute
        if absolute:
            assert f["encoder_run_absolute"] == str(target.resolve())
    assert references.encoder_run_of(t["out"] / clf, f) == target.resolve()


def test_recorded_path_follows_the_copy_and_falls_back_only_outside_it(tmp_path, caplog):
    t = _tree(tmp_path)
    out = t["out"]
    fields = references.reference_fields(out / "S2/clf", out, encoder_run=out / "S/ae",
                                   encoder_checkpoint=out / "S/ae/checkpoints/best.pt")
    # the whole output dir copied: the copy's encoder
    shutil.copytree(out, tmp_path / "copy")
    assert references.encoder_run_of(tmp_path / "copy/S2/clf", fields) == (tmp_path / "copy/S/ae").resolve()
    assert references.encoder_checkpoint_of(tmp_path / "copy/S2/clf", fields) == \
        (tmp_path / "copy/S/ae/checkpoints/best.pt").resolve()
    # S2 copied alone: its encoder is not in the copy, so the original (where it was recorded) is read, saying so
    shutil.copytree(out / "S2", tmp_path / "lone/S2")
    assert references.encoder_run_of(tmp_path / "lone/S2/clf", fields) == (out / "S/ae").resolve()
    assert "reading it from where it was recorded" in caplog.text
    # and when that is gone too: the relative location, for the caller to report as gone
    shutil.rmtree(out / "S/ae")
    assert references.encoder_run_of(tmp_path / "lone/S2/clf", fields) == (tmp_path / "lone/S/ae").resolve()
    # inside the own tree no absolute is recorded: a copy without its encoder never reads the original
    inside = references.reference_fields(out / "S/job_all/classify", out, encoder_run=out / "S/job_all/autoencode")
    shutil.copytree(out / "S/job_all/classify", tmp_path / "c2/classify")
    assert references.encoder_run_of(tmp_path / "c2/classify", inside) == (tmp_path / "c2/autoencode").resolve()


def test_summaries_with_absolute_paths_stay_readable(tmp_path):
    """Summaries written before references were relative: absolute ``encoder_run`` (and sometimes no
    ``encoder_checkpoint``) are read as they are."""
    enc = tmp_path / "ae"
    assert references.encoder_run_of(tmp_path / "x", {"encoder_run": str(enc)}) == enc
    assert references.encoder_checkpoint_of(tmp_path / "x", {"encoder_run": str(enc)}) == enc / "checkpoints" / "best.pt"
    assert references.encoder_checkpoint_of(tmp_path / "x", {"encoder_checkpoint": str(enc / "e.pt")}) == enc / "e.pt"
    assert references.encoder_run_of(tmp_path / "x", {}) is None and references.encoder_checkpoint_of(tmp_path / "x", {}) is None
