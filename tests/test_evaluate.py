"""python -m embclf.evaluate / embclf.embed and the debug modes, on the session's tiny real sweep (tiny_sweep).

Evaluations and exports run in-process (their main()), with the sweep's data cache; debug=overfit runs its
loops in-process on a narrow conv AE; debug=fast runs once end to end through `python -m embclf`."""
import csv
import json
import zipfile
from pathlib import Path

import pytest

from conftest import MINI, run_embclf

from embclf import debug, embed, evaluate, references, report, runs
from embclf.runtime import EmbclfError

REL = 1e-5


def _run(out: Path, stage: str, model: str, latent: int) -> Path:
    for s in out.rglob("summary.json"):
        d = json.loads(s.read_text())
        if d.get("stage") == stage and d.get("model") == model and d.get("latent") == latent:
            return s.parent
    raise AssertionError(f"no {stage} run {model} z{latent} under {out}")


def _evaluate(run_dir: Path, *args: str) -> dict:
    before = set((run_dir / "eval").iterdir()) if (run_dir / "eval").is_dir() else set()
    assert evaluate.main([str(run_dir), "threads=1", *args]) == 0
    (new,) = set((run_dir / "eval").iterdir()) - before
    rows = list(csv.DictReader((new / "per_sample.csv").open()))
    s = json.loads((new / "summary.json").read_text())
    assert (new / "worst.png").read_bytes()[:4] == b"\x89PNG" and len(s["worst"]) == 16
    return {"dir": new, "rows": rows, "summary": s}


def _mean(rows, key):
    return sum(float(r[key]) for r in rows) / len(rows)


def test_evaluate_autoencode_equals_the_stage(sweep):
    run_dir = _run(sweep["out"], "autoencode", "vae", 8)
    stage = runs.read_summary(run_dir)
    test = _evaluate(run_dir)
    assert test["dir"].name == "test-best" and len(test["rows"]) == stage["n_test"] == 200
    assert all(r["path"].endswith(".jpg") and "/test/" in r["path"] for r in test["rows"])
    for k in ("mse", "psnr", "kl"):
        assert _mean(test["rows"], k) == pytest.approx(test["summary"][k], rel=REL), k
        assert test["summary"][k] == pytest.approx(stage[f"test_{k}"], rel=REL), k
    assert test["summary"]["active_units"] == stage["test_active_units"]
    # the worst reconstructions are the rows with the highest MSE, worst first
    assert test["summary"]["worst"][0]["mse"] == max(float(r["mse"]) for r in test["rows"])
    val = _evaluate(run_dir, "split=val")
    assert len(val["rows"]) == stage["n_val"] and "/train/" in val["rows"][0]["path"]
    for k in ("mse", "psnr", "kl"):  # the best checkpoint's own val metrics, and not the test ones
        assert _mean(val["rows"], k) == pytest.approx(stage[f"val_{k}"], rel=REL), k
        assert val["summary"][k] != pytest.approx(test["summary"][k], rel=1e-3), k
    # an earlier evaluation is never overwritten: an explicit name that exists is refused, before any work
    assert evaluate.main([str(run_dir), "name=test-best"]) == 2
    assert json.loads((test["dir"] / "summary.json").read_text()) == test["summary"]


def test_evaluate_classify_equals_the_stage(sweep):
    run_dir = _run(sweep["out"], "classify", "ae", 16)
    stage = runs.read_summary(run_dir)
    test = _evaluate(run_dir)
    s = test["summary"]
    assert _mean(test["rows"], "correct") == pytest.approx(s["accuracy"], rel=REL)
    assert s["accuracy"] == pytest.approx(stage["test_accuracy"], rel=REL)
    assert s["confusion_matrix"] == stage["confusion_matrix"] and s["per_class_accuracy"] == stage["per_class_accuracy"]
    # the grid's images are misclassified, most confident first
    probs = [w["probability"] for w in s["worst"]]
    assert probs == sorted(probs, reverse=True) and all(w["class"] != w["predicted_class"] for w in s["worst"])
    last = _evaluate(run_dir, "checkpoint=last")
    assert _mean(last["rows"], "correct") == pytest.approx(stage["final_test_accuracy"], rel=REL)
    val = _evaluate(run_dir, "split=val")
    assert _mean(val["rows"], "correct") == pytest.approx(stage["val_accuracy"], rel=REL)
    # another split: other images, other values (accuracies of 100 and 300 images may coincide; confidences do not)
    assert len(val["rows"]) == 50 and _mean(val["rows"], "probability") != pytest.approx(_mean(test["rows"], "probability"))


def test_evaluate_bad_input_is_one_clear_line(sweep, capsys):
    run_dir = _run(sweep["out"], "autoencode", "ae", 8)
    assert evaluate.main([str(run_dir), "latent=32"]) == 2
    assert "latent is fixed by the run's checkpoint" in capsys.readouterr().err
    assert evaluate.main([str(run_dir), "data.test_size=abc"]) == 2
    assert "data.test_size=abc" in capsys.readouterr().err
    assert evaluate.main([str(run_dir.parent), "split=test"]) == 2  # the sweep dir is not a run dir
    assert "holds no summary.json" in capsys.readouterr().err
    assert not (run_dir / "eval").exists()


def test_export_is_deterministic_and_equals_the_classifier_input(sweep, tmp_path):
    import numpy as np

    ae = _run(sweep["out"], "autoencode", "vae", 16)
    clf = runs.load_checkpoint(_run(sweep["out"], "classify", "vae", 16) / "embeddings.pt")
    for fmt in ("npz", "pt"):
        a, b = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
        for p in (a, b):
            assert embed.main([str(ae), "threads=1", f"format={fmt}", f"out={p}"]) == 0
        assert a.read_bytes() == b.read_bytes(), fmt
    # no wall-clock time inside (numpy.savez stamps each entry with it; two calls in one second would hide that)
    assert {i.date_time for i in zipfile.ZipFile(tmp_path / "a.npz").infolist()} == {(1980, 1, 1, 0, 0, 0)}
    z = np.load(tmp_path / "a.npz")
    assert z["embeddings"].dtype == np.float32 and z["embeddings"].shape == (200, 16)
    assert np.array_equal(z["embeddings"], clf["test"]["z"].numpy())  # mu, as the classifier saw it
    assert np.array_equal(z["labels"], clf["test"]["labels"].numpy()) and z["paths"][0].endswith(".jpg")
    # another split into an existing file: refused, the file kept
    before = (tmp_path / "a.npz").read_bytes()
    assert embed.main([str(ae), "split=val", f"out={tmp_path / 'a.npz'}"]) == 2
    assert (tmp_path / "a.npz").read_bytes() == before


def _debug_cfg(tmp: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from embclf.config import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", overrides=[*MINI, "logger=none", "threads=1", f"output_dir={tmp / 'o'}",
                                           f"data.cache_dir={tmp / 'cache'}", *overrides])
    debug.apply(cfg)
    return cfg


# A narrow conv AE (channels 8..32) keeps this test at a few seconds; the default widths fit a 32-image batch
# too (measured: conv AE latent 64, 16 images, lr 1e-3: 25.8 dB after 125 steps)
@pytest.mark.slow
@pytest.mark.parametrize("model", ["ae", "vae"])
def test_debug_overfit_fits_one_batch(tmp_path, cifar_root, model):
    cfg = _debug_cfg(tmp_path, "debug=overfit", f"model={model}", "latent=16", "model.channels=[8,16,16,32,32]",
                     "debug.batch_size=4", "autoencode.lr=5e-3", "debug.train_size=100", "debug.test_size=20")
    ae_dir = debug.overfit_autoencoder(cfg, tmp_path / "ae", [])
    s = runs.read_summary(ae_dir)
    assert s["debug"] == "overfit" and s["status"] == "completed" and s["overfit_passed"]
    assert s["overfit_psnr"] > 25.0 and s["overfit_steps"] <= 500 and s["overfit_batch"] == 4
    clf = debug.overfit_head(cfg, tmp_path / "clf", [], encoder=ae_dir)
    c = runs.read_summary(clf)
    assert c["overfit_accuracy"] == 1.0 and c["status"] == "completed"
    # the check can fail: one step is not enough, and the run says so
    short = _debug_cfg(tmp_path, "debug=overfit", f"model={model}", "latent=16", "model.channels=[8,16,16,32,32]",
                       "debug.batch_size=4", "debug.steps=1", "debug.train_size=100", "debug.test_size=20")
    with pytest.raises(EmbclfError, match="did not fit one batch of 4 images"):
        debug.overfit_autoencoder(short, tmp_path / "short", [])
    s = runs.read_summary(tmp_path / "short")
    assert s["status"] == "failed" and s["reason"] == "overfit" and not s["overfit_passed"]


@pytest.mark.slow
def test_debug_fast_end_to_end_and_kept_apart(tmp_path, cifar_root):
    out = tmp_path / "o"
    proc = run_embclf(["stage=all", "debug=fast", "model=ae", "latent=8", *MINI, "logger=none", "debug.train_size=120",
                       "debug.test_size=40", f"output_dir={out}"], tmp_path)
    assert "DEBUG RUN (debug=fast)" in proc.stderr + proc.stdout
    (job,) = list(out.iterdir())
    for stage in ("autoencode", "classify"):
        s = runs.read_summary(job / stage)
        assert s["status"] == "completed" and s["debug"] == "fast" and s["epochs"] == 1, stage
        assert runs.read_config(job / stage)["data"]["train_size"] == 120
    for f in ("autoencode/checkpoints/best.pt", "autoencode/images/recon_e001.png", "classify/embeddings.pt",
              "classify/images/confusion.png"):
        assert (job / f).is_file(), f
    # a real (non-debug) classifier with the same settings never finds the debug encoder; a debug one does
    real = runs.read_config(job / "autoencode")
    assert references.find_encoder_run(real, out) == job / "autoencode"
    real.pop("debug")
    assert references.find_encoder_run(real, out) is None
    # the report lists it apart from the results
    rows = report.collect([out])
    assert len(rows) == 1 and rows[0]["status"].startswith("debug=fast")


# --- a run trained with the supervised and decorrelation terms (every experiment=improved run) ---------------

def _tiny_stage_cfg(tmp: Path, *overrides: str):
    """100 real CIFAR-10 images at 16x16, a narrow conv model: an in-process autoencode run of a few seconds."""
    from hydra import compose, initialize_config_dir

    from conftest import CIFAR
    from embclf.config import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=[
            "data=folder", f"data.root={CIFAR}", "data.train_size=100", "data.test_size=50", "data.image_size=16",
            f"data.cache_dir={tmp / 'cache'}", "autoencode.batch_size=25", "autoencode.image_epochs=[1]",
            "model.channels=[8,16,16,32,32]", "latent=8", "logger=none", "threads=1", f"output_dir={tmp / 'o'}",
            *overrides])


def test_evaluate_of_an_improved_run_uses_its_objective(tmp_path, cifar_root, caplog):
    """Issue 17: evaluate reported a loss without the joint head's CE and the decorrelation penalty, and warned
    that the run dir "was changed". Every mean now equals the run's own test_* (best checkpoint)."""
    import logging

    from embclf.stages import autoencode

    cfg = _tiny_stage_cfg(tmp_path, "model=vae", "model.ce_weight=10", "model.decorrelation_weight=1",
                          "autoencode.epochs=2")
    run_dir = autoencode.run(cfg, tmp_path / "run", [])
    stage = runs.read_summary(run_dir)
    assert stage["status"] == "completed" and "test_ce" in stage and "test_decorrelation" in stage
    with caplog.at_level(logging.WARNING):
        s = _evaluate(run_dir)["summary"]
    assert "was the run dir changed" not in caplog.text
    for k in ("loss", "mse", "sse", "psnr", "kl", "ce", "joint_head_accuracy", "decorrelation"):
        assert s[k] == pytest.approx(stage[f"test_{k}"], rel=REL), k
    assert s["run_metrics"]["loss"] == stage["test_loss"] and "ce" in s["run_metrics"]


def test_worst_png_is_readable_and_labelled(sweep):
    """Issue 17: worst.png was a 264x66 px strip without labels; now each image is ~4x enlarged with its class
    and its PSNR/MSE (autoencode) or true/predicted class (classify) under it."""
    from PIL import Image

    ae = _evaluate(_run(sweep["out"], "autoencode", "ae", 8), "name=worst-figure")
    w, h = Image.open(ae["dir"] / "worst.png").size
    assert w >= 800 and h >= 400, (w, h)
    clf = _evaluate(_run(sweep["out"], "classify", "ae", 8), "name=worst-figure")
    assert min(Image.open(clf["dir"] / "worst.png").size) >= 200


def test_worst_figure_captions_name_class_and_error(tmp_path):
    import torch

    from embclf import images

    x = torch.rand(3, 3, 16, 16)
    caps = ["cat\nPSNR 12.3 dB\nMSE 0.0589", "dog\nPSNR 13.0 dB\nMSE 0.0500", "ship\nPSNR 14.1 dB\nMSE 0.0389"]
    drawn = images.worst_figure(x, caps, tmp_path / "w.png", "worst", below=x)
    assert drawn == caps and (tmp_path / "w.png").read_bytes()[:4] == b"\x89PNG"


def test_a_plain_autoencoders_samples_come_from_its_codes_not_black(tmp_path, cifar_root):
    """Issue 17: a plain AE decoded z ~ N(0, I), which its codes are not: black squares. It now decodes draws from
    a Gaussian fitted to its training codes, and the saved samples say so; a VAE keeps its prior."""
    from embclf import images
    from embclf.stages import autoencode

    for model in ("ae", "vae"):
        run_dir = autoencode.run(_tiny_stage_cfg(tmp_path, f"model={model}", "autoencode.epochs=1"),
                                 tmp_path / model, [])
        s = images.read_samples(run_dir)
        assert s["samples"].dtype.is_floating_point is False and s["samples"].shape == (64, 3, 16, 16)
        assert s["epoch"] == 1
        if model == "ae":
            assert s["source"].startswith("Gaussian fitted to the codes of"), s["source"]
        else:
            assert s["source"] == images.PRIOR
        r = images.read_reconstructions(run_dir)
        # not black: the samples' brightness is the reconstructions' (images like the data), within 15%
        assert abs(s["samples"].float().mean() - r["reconstructions"].float().mean()) < 0.15 * 255
        assert r["originals"].shape == r["reconstructions"].shape == (20, 3, 16, 16) and r["epoch"] == 1
