"""figures/probe_vs_epoch.png (``embclf/report/curves.py``) on hand-made run dirs: the figure exists, its plotted
means and bands per epoch are the hand-computed ones, runs without probe records are left out, and the report's
figure step writes it."""
from __future__ import annotations

import pytest
from report_fixtures import resolved_config, write_run

from embclf.report import collect
from embclf.report.curves import probe_vs_epoch


def _ae(d, model, seed, psnr, probe, dotlist=None):
    """An autoencode run of 3 epochs: val psnr[e-1] at epoch e; probe accuracy at the epochs of ``probe``."""
    metrics = []
    for e in (1, 2, 3):
        metrics.append({"epoch": e, "split": "train", "psnr": psnr[e - 1] - 1, "loss": 1.0})
        val = {"epoch": e, "split": "val", "psnr": psnr[e - 1], "loss": 1.0}
        if e in probe:
            val["probe_accuracy"] = probe[e]
        metrics.append(val)
    cfg = resolved_config(model, 8, seed, "autoencode", dotlist)
    return write_run(d, cfg, "autoencode", {"test_mse": 0.02, "test_psnr": 17.0, "final_test_mse": 0.02,
                                            "final_test_psnr": 17.0}, metrics=metrics)


@pytest.fixture
def runs_tree(tmp_path):
    # ae: two seeds, probes at epochs 2 and 3; a resumed epoch 3 of seed 1 (its last record counts)
    _ae(tmp_path / "ae0", "ae", 0, [10.0, 12.0, 13.0], {2: 0.30, 3: 0.40})
    a1 = _ae(tmp_path / "ae1", "ae", 1, [11.0, 13.0, 15.0], {2: 0.20, 3: 0.10})
    with open(a1 / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "split": "val", "psnr": 14.0, "probe_accuracy": 0.50}\n')
    # vae: one seed, probes at every epoch
    _ae(tmp_path / "vae0", "vae", 0, [9.0, 9.5, 10.0], {1: 0.25, 2: 0.35, 3: 0.45})
    # ae at latent 8 with more epochs of a different config (autoencode.lr) and no probe: not drawn
    _ae(tmp_path / "noprobe", "ae", 0, [1.0, 2.0, 3.0], {}, dotlist=["autoencode.lr=0.01"])
    return tmp_path


def test_probe_vs_epoch_means_and_bands(runs_tree, tmp_path):
    rows = collect([runs_tree])
    out = tmp_path / "fig"
    out.mkdir()
    path, frame = probe_vs_epoch(rows, out)
    assert path == out / "probe_vs_epoch.png" and path.stat().st_size > 1000
    labels = {r["run_dir"].rsplit("/", 1)[-1]: r["label"] for r in rows}
    assert labels["noprobe"] not in set(frame["label"])
    got = {(m, lab, int(e)): (mean, lo, hi, int(n)) for m, lab, e, mean, lo, hi, n in frame.itertuples(index=False)}
    ae, vae = labels["ae0"], labels["vae0"]
    assert labels["ae1"] == ae and vae != ae
    approx = pytest.approx
    # by hand: ae probe at epoch 2 = mean(0.30, 0.20); epoch 3 = mean(0.40, 0.50) (seed 1's resumed record)
    assert got[("probe_accuracy", ae, 2)] == approx((0.25, 0.20, 0.30, 2))
    assert got[("probe_accuracy", ae, 3)] == approx((0.45, 0.40, 0.50, 2))
    assert ("probe_accuracy", ae, 1) not in got
    assert got[("psnr", ae, 1)] == approx((10.5, 10.0, 11.0, 2))
    assert got[("psnr", ae, 3)] == approx((13.5, 13.0, 14.0, 2))
    assert [got[("probe_accuracy", vae, e)] for e in (1, 2, 3)] == \
        [approx((0.25, 0.25, 0.25, 1)), approx((0.35, 0.35, 0.35, 1)), approx((0.45, 0.45, 0.45, 1))]
    assert len(got) == 2 * 3 + 3 + 2  # psnr: 3 epochs x 2 labels; probe: vae 3 epochs, ae 2


def test_no_probe_records_no_figure(tmp_path):
    _ae(tmp_path / "runs" / "a", "ae", 0, [1.0, 2.0, 3.0], {})
    path, frame = probe_vs_epoch(collect([tmp_path / "runs"]), tmp_path)
    assert path is None and frame.empty and not (tmp_path / "probe_vs_epoch.png").exists()


def test_report_figure_step_writes_it(runs_tree, tmp_path):
    from embclf.report.figures import plot_curves

    out = tmp_path / "figs"
    out.mkdir()
    written = plot_curves(collect([runs_tree]), out)
    assert out / "probe_vs_epoch.png" in written and (out / "probe_vs_epoch.png").is_file()
