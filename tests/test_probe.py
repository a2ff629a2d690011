"""The linear probe during autoencoding (``embclf/probe.py``, ``autoencode.probe_every``): the closed-form ridge
probe against scikit-learn and brute-force leave-one-out, its accuracy on separable and on shuffled codes, the
class-balanced subset, and an end-to-end run whose val records carry ``probe_accuracy`` while its weights stay
bit-identical to the same run without probes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import MINI, run_embclf
from wandb_log import read_run
from embclf import probe


def _separable(n_per_class: int, n_classes: int = 10, d: int = 16, seed: int = 0):
    """Codes of well separated Gaussian clusters: class means 6 apart on orthogonal axes, unit noise."""
    g = torch.Generator().manual_seed(seed)
    means = 6.0 * torch.eye(n_classes, d)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    z = means[y] + torch.randn(len(y), d, generator=g)
    return z, y


def test_separable_codes_reach_full_accuracy():
    z, y = _separable(50)
    zv, yv = _separable(30, seed=1)
    r = probe.ridge_probe(z, y, zv, yv, 10)
    assert r["accuracy"].item() >= 0.99 and r["loo_accuracy"].item() >= 0.99, r


def test_shuffled_labels_give_chance():
    z, y = _separable(100)
    zv, yv = _separable(300, seed=1)
    g = torch.Generator().manual_seed(2)
    y_shuffled = y[torch.randperm(len(y), generator=g)]
    yv_shuffled = yv[torch.randperm(len(yv), generator=g)]
    acc = probe.ridge_probe(z, y_shuffled, zv, yv_shuffled, 10)["accuracy"].item()
    # chance is 0.1; with 3,000 val codes its standard error is ~0.0055
    assert abs(acc - 0.1) < 0.03, acc


def test_closed_form_matches_sklearn_ridge_and_brute_force_leave_one_out():
    from sklearn.linear_model import Ridge

    g = torch.Generator().manual_seed(0)
    n, d, c = 40, 5, 3
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0],
                                                                            dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    alpha = 0.1
    r = probe.ridge_probe(z, y, z, y, c, alphas=(alpha,))
    lam = alpha * n
    assert r["lambda"].item() == pytest.approx(lam)
    xs = (z - z.mean(0)) / z.std(0, unbiased=False)
    y1 = torch.nn.functional.one_hot(y, c).double()
    sk = Ridge(alpha=lam, fit_intercept=True).fit(xs.numpy(), y1.numpy())
    # the in-sample accuracy of the sklearn fit equals the probe's (val = train here)
    assert (sk.predict(xs.numpy()).argmax(1) == y.numpy()).mean() == pytest.approx(r["accuracy"].item())
    # leave-one-out by refitting n times (standardisation fixed, as in the shortcut)
    hits = 0
    for i in range(n):
        keep = np.arange(n) != i
        fit = Ridge(alpha=lam, fit_intercept=True).fit(xs.numpy()[keep], y1.numpy()[keep])
        hits += int(fit.predict(xs.numpy()[i:i + 1]).argmax(1)[0] == y[i].item())
    assert r["loo_accuracy"].item() == pytest.approx(hits / n)


def test_leave_one_out_predictions_are_exact():
    """The hat-matrix shortcut gives the refitted predictions themselves, not only their argmax."""
    from sklearn.linear_model import Ridge

    g = torch.Generator().manual_seed(1)
    n, d, c = 25, 4, 3
    xs = torch.randn(n, d, generator=g, dtype=torch.float64)
    xs = (xs - xs.mean(0)) / xs.std(0, unbiased=False)
    y = torch.randint(0, c, (n,), generator=g)
    y1 = torch.nn.functional.one_hot(y, c).double()
    lam = 2.0
    a = xs.T @ xs + lam * torch.eye(d, dtype=torch.float64)
    m = torch.linalg.solve(a, xs.T)
    fit = xs @ (m @ (y1 - y1.mean(0))) + y1.mean(0)
    h = 1.0 / n + (xs * m.T).sum(-1)
    loo = (fit - h[:, None] * y1) / (1 - h)[:, None]
    for i in (0, 7, 24):
        keep = np.arange(n) != i
        ref = Ridge(alpha=lam).fit(xs.numpy()[keep], y1.numpy()[keep]).predict(xs.numpy()[i:i + 1])[0]
        np.testing.assert_allclose(loo[i].numpy(), ref, rtol=1e-9, atol=1e-12)


def test_balanced_subset_is_fixed_balanced_and_draws_no_global_rng():
    y = torch.arange(10).repeat_interleave(30)[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    state = torch.get_rng_state()
    idx = probe.balanced_subset(y, 100, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(idx, probe.balanced_subset(y, 100, seed=3))
    assert not torch.equal(idx, probe.balanced_subset(y, 100, seed=4))
    assert torch.bincount(y[idx], minlength=10).tolist() == [10] * 10
    assert len(set(idx.tolist())) == 100
    # more than a class holds: every image of it; fewer than one per class: one each
    assert torch.bincount(y[probe.balanced_subset(y, 1000, 0)]).tolist() == [30] * 10
    assert torch.bincount(y[probe.balanced_subset(y, 3, 0)]).tolist() == [1] * 10


def test_probe_every_and_size_are_validated():
    from omegaconf import OmegaConf

    from embclf import validation
    from embclf.config import Config

    cfg = OmegaConf.structured(Config)
    cfg.model = OmegaConf.structured(Config().model.__class__(name="ae"))
    cfg.autoencode.probe_every = -1
    cfg.autoencode.probe_size = 1
    text = "\n".join(validation.problems(cfg))
    assert "autoencode.probe_every" in text and "autoencode.probe_size" in text, text


def test_quick_preset_probes_every_epoch():
    from hydra import compose, initialize_config_dir

    from embclf.config import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", overrides=["experiment=quick", "model=ae"])
    assert cfg.autoencode.probe_every == 1 and cfg.autoencode.probe_size == 1000


@pytest.mark.slow
def test_probe_cost_benchmark_runs_at_a_tiny_size(cifar_root):
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import probe_cost

    r = probe_cost.measure(cifar_root, [20], 1, extra=["data.train_size=200", "model.channels=[8,16]",
                                                        "model.strides=[2,2]"])
    assert r["n_train"] == 180 and r["actual_subset"] == {20: 20}
    assert r["epoch_s"] > 0 and r["probe_s"][20] > 0 and 0 <= r["probe_accuracy_after_warmup"][20] <= 1


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_probe_records_and_weights_bit_identical_to_a_run_without(tmp_path, cifar_root):
    """probe_every=2 over 3 epochs: probe_accuracy in the val records of epochs 2 and 3 (every 2nd and the last),
    none elsewhere, none in the summary's val_*; the tracker (wandb, offline) logs val/probe_accuracy at those
    epochs; the trained weights (last.pt, best.pt) and every other metric
    equal those of the same run with probe_every=0, bit for bit: the probe only adds measurements."""
    args = [*MINI, "stage=autoencode", "model=vae", "latent=4", "data.image_size=16", "model.channels=[8,16]",
            "model.strides=[2,2]", "autoencode.epochs=3", "threads=1"]
    on, off = tmp_path / "on", tmp_path / "off"
    run_embclf([*args, "autoencode.probe_every=2", "autoencode.probe_size=100", "logger=wandb",
                f"hydra.run.dir={on}"], tmp_path)  # run_embclf's environment: WANDB_MODE=offline
    run_embclf([*args, "logger=none", f"hydra.run.dir={off}"], tmp_path)
    recs = [json.loads(line) for line in (on / "metrics.jsonl").read_text().splitlines()]
    probed = {r["epoch"]: r["probe_accuracy"] for r in recs if "probe_accuracy" in r}
    assert set(probed) == {2, 3} and all(r["split"] == "val" for r in recs if "probe_accuracy" in r)
    assert all(0.0 <= a <= 1.0 for a in probed.values())
    assert all(r["probe_lambda"] > 0 for r in recs if "probe_lambda" in r)
    logged = {row["epoch"]: row["val/probe_accuracy"] for row in read_run(on)["history"]
              if "val/probe_accuracy" in row}
    assert logged == pytest.approx(probed)
    assert not any(k.startswith("val_probe") for k in json.loads((on / "summary.json").read_text()))
    for name in ("last.pt", "best.pt"):
        a, b = _state(on / "checkpoints" / name), _state(off / "checkpoints" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    skip = {"seconds", "images_per_second", "probe_accuracy", "probe_loo_accuracy", "probe_lambda"}
    off_recs = [json.loads(line) for line in (off / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in skip} for r in recs] == \
        [{k: v for k, v in r.items() if k not in skip} for r in off_recs]
    # a how-to-run key: both runs are one experiment
    assert (on / "identity.json").read_text() == (off / "identity.json").read_text()
