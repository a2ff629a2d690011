"""figures/probe_vs_epoch.png: does longer reconstruction training help or hurt the linear probe?

Per configuration (the row label), against epoch: the linear probe's val accuracy (``probe_accuracy``, recorded
by ``autoencode.probe_every``; ``embclf/probe.py``) and val PSNR, each the mean over the configuration's seeds
with a min–max band over them (the report's other curves' convention, ``figures.curves_figure``). Only the
autoencode runs that recorded a probe are drawn; with none, no figure is written.

Reads each autoencode run's metrics.jsonl once (``figures._metrics``)."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import List, Optional, Tuple

import pandas as pd

from . import figures

NAME = "probe_vs_epoch.png"
PANELS = (("val", "probe_accuracy", "linear probe val accuracy"), ("val", "psnr", "val PSNR (dB)"))


def probe_vs_epoch(rows: List[dict], out: Path) -> Tuple[Optional[Path], pd.DataFrame]:
    """Write ``out``/probe_vs_epoch.png from the report's rows (``rows.collect``: ``label``, ``run_dir`` = the
    autoencode run dir). Returns (the PNG's path, or None when no run recorded ``probe_accuracy``; the plotted
    numbers: one row per (metric, label, epoch) with columns ``metric`` ("probe_accuracy" or "psnr"), ``label``,
    ``epoch``, ``mean``, ``min``, ``max`` over the label's runs and ``count`` = how many runs have that epoch).
    A resumed epoch's last record counts once."""
    dirs = list(OrderedDict((r["run_dir"], None) for r in rows if r.get("run_dir")))
    metrics = figures._metrics(dirs, [k for _, k, _ in PANELS])
    probed = set(metrics.loc[metrics["split"].eq("val") & metrics["probe_accuracy"].notna(), "run_dir"])
    rows = [r for r in rows if r.get("run_dir") in probed]
    empty = pd.DataFrame(columns=["metric", "label", "epoch", "mean", "min", "max", "count"])
    if not rows:
        return None, empty
    label_of = {}
    for r in rows:  # an encoder shared by several heads is one run (as curves_figure counts them)
        label_of.setdefault(r["run_dir"], r["label"])
    frame = pd.concat([figures._bands(metrics, label_of, split, key).reset_index().assign(metric=key)
                       for split, key, _ in PANELS], ignore_index=True)[list(empty.columns)]
    fig = figures.curves_figure(rows, "run_dir", PANELS, metrics)
    if fig is None:
        return None, frame
    fig.suptitle("linear probe (ridge, autoencode.probe_every) and reconstruction against epoch", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))  # room for the title above the panels
    figures._savefig(fig, out / NAME, bbox_inches="tight")
    return out / NAME, frame
