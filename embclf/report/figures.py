"""Figures of a report: per-epoch curves (mean and min-max band over seeds per configuration), results
against latent size, prior samples and reconstructions side by side, per-class accuracy. Each figure is one
function of the rows (``collect``) or configurations (``aggregate``) that writes one PNG atomically.

Cost at scale: every curve reads each run's metrics.jsonl once (one pass per figure file set, not per
panel); the image strips read one PNG per run for at most ``MAX_STRIPS`` runs."""
from __future__ import annotations

import math
import re
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from .. import runs
from .aggregation import class_names
from .tables import _atomic

MAX_STRIPS = 40  # image strips per figure: beyond this a figure is taller than anyone looks at; the title says


def _savefig(fig, path: Path, **kw) -> None:
    """``fig.savefig`` as a PNG at 100 dpi, atomically (``_atomic``); closes the figure whatever happens."""
    try:
        with _atomic(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, **kw)
    finally:
        _plt().close(fig)


def _plt():
    from ..images import pyplot  # the one place that picks matplotlib's file-only backend

    return pyplot()


def _curve_labels(rows: List[dict]) -> Dict[str, str]:
    """run dir -> legend label; `` s<seed>`` is added where a label ran with several seeds, and ``(run k)``
    where one seed ran more than once."""
    count = defaultdict(int)
    for r in rows:
        count[r["label"]] += 1
    seen = defaultdict(int)
    out = {}
    for r in rows:
        seen[(r["label"], r["seed"])] += 1
        k = seen[(r["label"], r["seed"])]
        key = r.get("classify_dir") or r["run_dir"]
        out[key] = r["label"] + (f" s{r['seed']}" if count[r["label"]] > 1 else "") + (f" (run {k})" if k > 1 else "")
    return out


def _metrics(run_dirs: Sequence[str], keys: Sequence[str]) -> pd.DataFrame:
    """The metrics.jsonl records of ``run_dirs`` as one DataFrame: ``run_dir``, ``epoch`` and ``split``, and
    ``keys`` only (the report holds many runs' metrics at once, so nothing else is kept); non-numbers NaN."""
    recs = [(d, m.get("epoch"), m.get("split"), *(m.get(k) for k in keys))
            for d in run_dirs for m in runs.read_metrics(Path(d))]
    df = pd.DataFrame.from_records(recs, columns=["run_dir", "epoch", "split", *keys])
    for k in ("epoch", *keys):
        df[k] = pd.to_numeric(df[k], errors="coerce")
    return df


def _bands(metrics: pd.DataFrame, label_of: Dict[str, str], split: str, key: str) -> pd.DataFrame:
    """Per (label, epoch): the mean, min and max of ``key`` on ``split`` over the label's runs (seeds;
    ``label_of``: run dir -> label), and how many runs have that epoch. A resumed epoch counts once (its
    last record)."""
    sel = metrics.loc[(metrics["split"] == split) & metrics["run_dir"].isin(label_of.keys()),
                      ["run_dir", "epoch", key]].dropna()
    sel = sel.drop_duplicates(["run_dir", "epoch"], keep="last")
    sel = sel.assign(label=sel["run_dir"].map(label_of))
    return sel.groupby(["label", "epoch"], sort=True)[key].agg(["mean", "min", "max", "count"])


LINESTYLES = ("-", "--", "-.", ":")


def styles(labels: Sequence[str]) -> Dict[str, dict]:
    """label -> matplotlib line style: tab10 colours, then the same colours dashed, dash-dotted, dotted
    (40 distinguishable lines); beyond that colours from the continuous turbo map."""
    plt = _plt()
    out = {}
    for i, name in enumerate(labels):
        if len(labels) <= 40:
            out[name] = {"color": plt.get_cmap("tab10")(i % 10), "linestyle": LINESTYLES[i // 10]}
        else:
            out[name] = {"color": plt.get_cmap("turbo")(i / (len(labels) - 1)), "linestyle": LINESTYLES[i % 4]}
    return out


def _legend(fig, handles, n: int) -> None:
    """A legend right of the axes that never shrinks them: the figure is saved with bbox_inches="tight",
    which grows the canvas to hold it; long legends wrap into columns of at most 25 entries."""
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8, frameon=False,
               ncol=max(1, math.ceil(n / 25)))


CURVES = (("val_psnr.png", "run_dir", (("val", "psnr", "val PSNR (dB)"),)),
          ("val_mse.png", "run_dir", (("val", "mse", "val MSE (per pixel)"),)),
          ("val_accuracy.png", "classify_dir", (("val", "accuracy", "val accuracy"),)),
          ("ce.png", "classify_dir", (("train", "loss", "train cross-entropy (nats)"),
                                      ("val", "loss", "val cross-entropy (nats)"))))
BAND = "line: mean over seeds; band: min–max over seeds"


def curves_figure(rows: List[dict], dir_key: str, panels: Sequence[tuple], metrics: pd.DataFrame):
    """One figure of per-epoch curves (one panel per (split, key, y label) of ``panels``) over the run dirs
    under ``dir_key`` of ``rows``: one line per configuration (the row label) at the mean over its seeds,
    with a shaded band from the min to the max over its seeds where it has more than one (the legend says
    so). ``metrics``: the runs' ``_metrics``, read once per run. Returns the figure, or None when no
    run has any of the panels' metrics."""
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    labels = list(OrderedDict((r["label"], None) for r in rows))
    sty = styles(labels)
    label_of: Dict[str, str] = {}
    for r in rows:
        d = r.get(dir_key)
        if d and d not in label_of:  # an encoder shared by several heads is one run
            label_of[d] = r["label"]
    n_runs = pd.Series(list(label_of.values())).value_counts()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    used, banded = OrderedDict(), False
    for ax, (split, key, ylabel) in zip(axes[0], panels):
        bands = _bands(metrics, label_of, split, key) if key in metrics.columns else None
        present = set(bands.index.get_level_values(0)) if bands is not None else set()
        for label in (lab for lab in labels if lab in present):
            st = bands.loc[label]
            x = st.index.to_numpy()
            ax.plot(x, st["mean"].to_numpy(), lw=1.3, marker="." if len(x) < 20 else None, **sty[label])
            if st["count"].max() > 1:
                ax.fill_between(x, st["min"].to_numpy(), st["max"].to_numpy(), alpha=0.2, lw=0,
                                color=sty[label]["color"])
                banded = True
            used[label] = int(n_runs[label])
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if not used:
        plt.close(fig)
        return None
    handles = [Line2D([], [], lw=1.5, label=lab + (f" (n={n})" if n > 1 else ""), **sty[lab])
               for lab, n in used.items()]
    if banded:
        handles.append(Patch(color="grey", alpha=0.3, label=BAND))
    _legend(fig, handles, len(handles))
    fig.tight_layout()
    return fig


def plot_curves(rows: List[dict], out: Path) -> List[Path]:
    """val_psnr.png, val_mse.png (autoencode), val_accuracy.png and ce.png (classify; train and val panels)
    against epoch (integer ticks): per configuration (the row label) the mean over seeds and a min–max band
    (``curves_figure``), the legend outside the axes. Each run's metrics.jsonl is read once."""
    metrics = pd.DataFrame()
    written, held = [], None
    for name, dir_key, panels in CURVES:
        if dir_key != held:  # the autoencode runs' metrics, then the classify runs': one set held at a time
            held = dir_key
            keys = sorted({k for _, dk, ps in CURVES if dk == dir_key for _, k, _ in ps})
            metrics = _metrics(list(OrderedDict((r[dir_key], None) for r in rows if r.get(dir_key))), keys)
        fig = curves_figure(rows, dir_key, panels, metrics)
        if fig is None:
            continue
        _savefig(fig, out / name, bbox_inches="tight")
        written.append(out / name)
    from .curves import probe_vs_epoch  # probe accuracy and val PSNR per epoch (autoencode.probe_every)
    return written + [p for p in probe_vs_epoch(rows, out)[:1] if p]


def plot_vs_latent(agg: List[dict], out: Path) -> Optional[Path]:
    """vs_latent.png: test PSNR, test MSE, test accuracy, active units against latent size (log2 axis),
    one line per configuration without its latent (the label without ``-z<latent>``), error bars = std over
    seeds."""
    plt = _plt()
    from matplotlib.lines import Line2D

    panels = [("test_psnr", "test PSNR (dB)"), ("test_mse", "test MSE"), ("test_accuracy", "test accuracy"),
              ("active_units", "active units (VAE)")]
    panels = [p for p in panels if any(a.get(p[0]) for a in agg)]
    if not panels:
        return None
    lines: Dict[str, List[dict]] = OrderedDict()
    for a in agg:
        lines.setdefault(re.sub(r"-z\d+", "", a["label"], count=1), []).append(a)
    sty = styles(list(lines))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for name, pts in lines.items():
            pts = sorted((p for p in pts if p.get(key)), key=lambda p: p["latent"])
            if pts:
                ax.errorbar([p["latent"] for p in pts], [p[key][0] for p in pts], yerr=[p[key][1] or 0 for p in pts],
                            marker="o", capsize=3, label=name, **sty[name])
        ax.set_xscale("log", base=2)
        latents = sorted({a["latent"] for a in agg if isinstance(a.get("latent"), int)})
        ax.set_xticks(latents, [str(z) for z in latents])  # the latent sizes themselves, not powers of 2
        ax.minorticks_off()
        ax.set_xlabel("latent size")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="o", label=n, **sty[n]) for n in lines]
    _legend(fig, handles, len(handles))
    fig.tight_layout()
    path = out / "vs_latent.png"
    _savefig(fig, path, bbox_inches="tight")
    return path


# the strips figures' layout, in inches: the title's band, each strip's label band, the gap below a strip
TITLE_IN, LABEL_IN, GAP_IN, DPI = 0.45, 0.26, 0.06, 100


def strips_figure(strips: List[tuple], title: str):
    """One image strip per row (its label above it), at one screen pixel per image pixel, under ``title``.
    Every element has its own band of fixed height in inches (title ``TITLE_IN``, each label ``LABEL_IN``),
    so the title never overlaps a label however many strips there are (``tight_layout`` once squeezed 16
    strips' labels into the title). Returns the figure."""
    plt = _plt()
    width = max(6.0, max(s[1].shape[1] for s in strips) / DPI)
    height = TITLE_IN + sum(LABEL_IN + s[1].shape[0] / DPI + GAP_IN for s in strips)
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    fig.suptitle(title, fontsize=10, y=1 - TITLE_IN / 2 / height, va="center")
    y = height - TITLE_IN
    for label, strip in strips:
        h, w = strip.shape[0] / DPI, strip.shape[1] / DPI
        y -= LABEL_IN + h
        ax = fig.add_axes((0.0, y / height, w / width, h / height))
        ax.imshow(strip, interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        ax.set_title(label, loc="left", fontsize=9, pad=3)
        y -= GAP_IN
    return fig


def _capped(items: List[tuple], what: str) -> tuple:
    """``items`` cut to ``MAX_STRIPS`` and the title's note saying so ("" when nothing was cut)."""
    if len(items) <= MAX_STRIPS:
        return items, ""
    return items[:MAX_STRIPS], f" (the first {MAX_STRIPS} of {len(items)} {what}, in table order)"


def _ae_runs(rows: List[dict]) -> List[tuple]:
    """(legend label, autoencode run dir) per distinct autoencode run of the used rows, in table order."""
    labels = _curve_labels([r for r in rows if r.get("used", True)])
    out, seen = [], set()
    for r in rows:
        d = Path(r["run_dir"]) if r.get("run_dir") else None
        if d is None or d in seen or not r.get("used", True):
            continue
        seen.add(d)
        lab = labels.get(r.get("classify_dir") or r["run_dir"], r["label"])
        out.append((re.sub(r" (head|classify)\.\S+", "", lab), d))  # head settings do not change an encoder
    return out


def plot_prior_samples(rows: List[dict], out: Path) -> Optional[Path]:
    """prior_samples.png: per autoencode run, the first 8 of its last decoded samples (``images.read_samples``;
    a VAE's from its prior N(0, I), a plain AE's from a Gaussian fitted to its training codes: the label says)."""
    from .. import images

    found = [(lab, d, images.read_samples(d)) for lab, d in _ae_runs(rows)]
    ae, note = _capped([f for f in found if f[2] is not None], "runs")
    strips = [(f"{label} (epoch {s['epoch']}; {s['source']})", images.strip(s["samples"][:8])) for label, _, s in ae]
    if not strips:
        return None
    fig = strips_figure(strips, "8 decoded samples per run (same draws in every run)" + note)
    _savefig(fig, out / "prior_samples.png")
    return out / "prior_samples.png"


def plot_reconstructions(rows: List[dict], out: Path) -> Optional[Path]:
    """reconstructions.png: the same class-balanced test images (top) and every autoencode run's
    reconstruction of them (one row per run, from ``images.read_reconstructions``, the uint8 images the stage
    saved beside its last ``images/recon_eNNN.png``; at most ``MAX_STRIPS`` runs, the title says when more
    were left out)."""
    from .. import images

    found = [(lab, d, images.read_reconstructions(d)) for lab, d in _ae_runs(rows)]
    ae, note = _capped([f for f in found if f[2] is not None], "runs")
    strips = []
    for label, _, r in ae:
        n = min(images.RECON_COLS, len(r["originals"]))
        if not strips:
            strips.append(("test images (a fixed class-balanced set, the same in every run)",
                           images.strip(r["originals"][:n])))
        strips.append((f"{label} (epoch {r['epoch']})", images.strip(r["reconstructions"][:n])))
    if not strips:
        return None
    fig = strips_figure(strips, "reconstructions of the same test images, one row per run" + note)
    _savefig(fig, out / "reconstructions.png")
    return out / "reconstructions.png"


def plot_per_class(agg: List[dict], out: Path) -> Optional[Path]:
    """per_class_accuracy.png: test accuracy per class (columns: every class of any configuration) for every
    configuration with a classifier (rows; mean over seeds) as a heat map; values printed in the cells up to 20 classes
    and 40 configurations; a class a configuration's data does not have is a grey cell."""
    rs = [a for a in agg if a.get("per_class_accuracy")]
    if not rs:
        return None
    plt = _plt()
    classes = class_names(rs)
    m = np.array([[a["per_class_accuracy"].get(c, np.nan) for c in classes] for a in rs], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(classes) + 3) if len(classes) <= 20 else 16,
                                    1.2 + 0.35 * len(rs)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # NaN: a class not in that configuration's data
    im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(rs)), [a["label"] for a in rs], fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8 if len(classes) <= 20 else 5)
    if len(classes) <= 20 and len(rs) <= 40:  # numbers readable (and 4,000 texts cost a minute to lay out)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isnan(m[i, j]):
                    continue
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < 0.5 else "black")
    ax.set_title("test accuracy per class (best-on-val head, mean over seeds"
                 + ("; grey: the class is not in that configuration's data)" if np.isnan(m).any() else ")"),
                 fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    path = out / "per_class_accuracy.png"
    _savefig(fig, path, bbox_inches="tight")
    return path


