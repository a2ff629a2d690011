"""embclf.report.load (one DataFrame row per run dir), the figures a user pointed at (issue 17: titles that
overlapped with 16 runs, one line per seed), embclf.liveness, and no module-level table changed by a call."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from report_fixtures import ae_run, clf_run

from embclf import liveness, report, runs
from embclf.report import figures, tables


def _sweep(t):
    """ae and vae at latent 8, seeds 0-2, each with a classify run (stage=all job dirs)."""
    for m in ("ae", "vae"):
        for s in range(3):
            job = t / "sw" / f"model={m},seed={s},stage=all"
            e = ae_run(job / "autoencode", m, 8, s, mse=0.02 + 0.01 * s)
            clf_run(job / "classify", e, 0.30 + 0.1 * s)
    return t / "sw"


def test_load_is_one_row_per_run_dir_with_summary_fields_and_identity_keys(tmp_path):
    sw = _sweep(tmp_path)
    (tmp_path / "sw" / "torn").mkdir()
    (tmp_path / "sw" / "torn" / runs.SUMMARY).write_text("{")
    df = report.load(sw)
    assert len(df) == 13 and df["run_dir"].is_unique
    torn = df[df["status"] == "unreadable"]
    assert len(torn) == 1 and "not valid JSON" in torn["error"].iloc[0]
    ok = df[df["status"] == "completed"]
    assert sorted(ok["stage"].value_counts().items()) == [("autoencode", 6), ("classify", 6)]
    # summary fields (nested ones flattened) and identity keys (dotted) are columns
    for col in ("test_mse", "test_psnr", "test_accuracy", "per_class_accuracy.cat", "wall_seconds",
                "model.name", "latent", "seed", "data.root", "head.name", "encoder.model.name"):
        assert col in df.columns, col
    assert {"model.name", "seed", "latent"} <= set(df.attrs["identity_keys"])
    ae = ok[ok["stage"] == "autoencode"]
    # config_id: the experiment without its seed -> a notebook's mean ± std over seeds
    g = ae.groupby(["model.name", "latent"])["test_mse"].agg(["mean", "std", "count"])
    assert g.loc[("ae", 8), "mean"] == pytest.approx(0.03) and g.loc[("ae", 8), "count"] == 3
    assert ae.groupby("config_id").ngroups == 2
    clf = ok[ok["stage"] == "classify"]
    assert set(clf["encoder_run_dir"]) == set(ae["run_dir"])
    assert clf.groupby("encoder.model.name")["test_accuracy"].mean().to_dict() == pytest.approx({"ae": 0.4, "vae": 0.4})
    # a job dir and a run dir are paths too
    assert len(report.load(sw / "model=ae,seed=0,stage=all")) == 2
    assert len(report.load(sw / "model=ae,seed=0,stage=all" / "classify")) == 1
    with pytest.raises(report.ReportError, match="does not exist"):
        report.load(tmp_path / "nope")


def test_reconstructions_title_never_overlaps_a_run_label(tmp_path):
    """Issue 17: with 16 runs the composite figure's title sat on the first run's label."""
    for n in (1, 16, 45):
        strips = [(f"ae-z{i} autoencode.lr=0.001 s0 (epoch 20)", np.zeros((98, 982, 3), np.uint8)) for i in range(n)]
        fig = figures.strips_figure(strips, "reconstructions of the same test images, one row per run")
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        title = fig._suptitle.get_window_extent(renderer)
        boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes]
        images = [ax.get_window_extent(renderer) for ax in fig.axes]
        assert title.y0 >= max(b.y1 for b in boxes) and not any(title.overlaps(b) for b in boxes), n
        for i, b in enumerate(boxes):  # each label above its own image, below the previous image
            assert b.y0 >= images[i].y1 - 0.5 and (i == 0 or b.y1 <= images[i - 1].y0 + 0.5), (n, i)
        assert title.y1 <= fig.bbox.y1 and min(im.y0 for im in images) >= -0.5  # all inside the canvas
        figures._plt().close(fig)


def test_per_epoch_curves_are_one_line_per_configuration_with_a_band(tmp_path):
    """Issue 17: two seeds drew two lines per configuration; now one mean line and a min-max band each."""
    sw = _sweep(tmp_path)
    rows = [r for r in report.collect([sw]) if r["used"]]
    assert len(rows) == 6
    metrics = figures._metrics([r["run_dir"] for r in rows], ["psnr"])
    fig = figures.curves_figure(rows, "run_dir", (("val", "psnr", "val PSNR"),), metrics)
    ax = fig.axes[0]
    assert len(ax.lines) == 2 == len({r["label"] for r in rows})  # lines = configurations, not seeds
    assert len(ax.collections) == 2  # one band each
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert figures.BAND in legend and "ae-z8 (n=3)" in legend
    figures._plt().close(fig)


def test_formats_and_headers_are_not_changed_by_a_report(tmp_path):
    """report.md's per-class table once added its columns to the module's FORMATS/HEADERS on every call."""
    sw = _sweep(tmp_path)
    before = (dict(tables.FORMATS), dict(tables.HEADERS))
    res = report.report([sw], out=tmp_path / "rep", figures=False)
    assert (dict(tables.FORMATS), dict(tables.HEADERS)) == before
    assert "| cat " in (tmp_path / "rep" / "report.md").read_text() and res["agg"]
    with pytest.raises(TypeError):
        tables.FORMATS["x"] = "{}"


def test_liveness_states(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    assert liveness.pid_alive(os.getpid()) and not liveness.pid_alive(dead.pid)
    assert liveness.process_state({"hostname": here, "pid": os.getpid()}) == (liveness.RUNNING, "")
    assert liveness.process_state({"hostname": here, "pid": dead.pid})[0] == liveness.DEAD
    assert liveness.process_state({"hostname": "node17", "pid": 1})[0] == liveness.UNKNOWN
    assert liveness.status_text({"status": "running", "hostname": here, "pid": dead.pid}) == "interrupted"
    assert liveness.status_text({"status": "running", "debug": "fast"}) == "debug=fast"
    # a zombie (exited, not reaped) is dead
    z = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(100):
        if liveness._ask(["cat", f"/proc/{z.pid}/stat"])[1].rpartition(")")[2].split()[0] == "Z":
            break
        import time

        time.sleep(0.05)
    assert not liveness.pid_alive(z.pid)
    z.wait()


def test_config_is_read_as_omegaconf_reads_it(tmp_path):
    """The report reads config.yaml with libyaml (60x faster than OmegaConf.load at 1,000 runs); the values
    must be OmegaConf's: ``1e-3`` a float, lists, nulls, paths."""
    from embclf.report import rows

    d = ae_run(tmp_path / "r", "vae", 8, 0, dotlist=["autoencode.lr=1e-3", "head.hidden=[256,128]",
                                                      "data.train_size=null"])
    cfg = d / runs.CONFIG
    assert "lr: 0.001\n" in cfg.read_text()
    cfg.write_text(cfg.read_text().replace("lr: 0.001\n", "lr: 1e-3\n"))  # as a hand edit writes it
    fast, why = rows.read_config(d)
    assert why is None and fast == runs.read_config(d)
    assert fast["autoencode"]["lr"] == 1e-3 and isinstance(fast["autoencode"]["lr"], float)
    (tmp_path / "r" / runs.CONFIG).write_text("a: [1,\n")
    assert "cannot be read" in rows.read_config(d)[1]


def test_the_report_and_run_dir_readers_import_no_torch():
    """``python -m embclf.report`` (and ``benchmarks/packing.py``, which reads run dirs with ``embclf.references``)
    start without importing torch or torchvision: ~2 s less per call, and a report needs neither."""
    code = ("import sys, embclf.report.cli, embclf.report, embclf.references, embclf.runs, embclf.locks; "
            "print(sorted(m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
