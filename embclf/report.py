"""``python -m embclf.report PATH [PATH ...] [--out DIR]``: one table and the reference study's figures for a sweep.

PATH is a sweep dir, a run dir, or a whole ``outputs/``; every run dir under it (a dir holding summary.json)
is read, never modified, and nothing is trained. Written into ``--out`` (default: the PATH, or the common
parent of several PATHs):

- ``report.csv``: one row per run. An autoencode run and the classify run(s) trained on its encoder
  (summary ``encoder_run``) share a row, so every row reads: model, latent, seed, stage, status, epochs,
  test MSE / PSNR / KL, active units (VAE), val/test accuracy, wall time. A classify run whose encoder is
  not among the PATHs gets its own row, its reconstruction numbers read from the encoder's run dir.
- ``report.md``: the same table (mean ± std over seeds when a configuration ran with several seeds), the
  runs that did not complete with their status and error, and the figures below.
- ``figures/``: ``val_psnr.png``, ``val_mse.png``, ``val_accuracy.png``, ``ce.png`` (train solid, val dashed)
  per epoch, one line per run labelled like ``vae-z64``; ``vs_latent.png`` (test PSNR, MSE, accuracy and
  active units against latent size, one line per model, error bars over seeds); ``prior_samples.png`` (the
  first row of each autoencode run's last ``samples_eNNN.png``, one row per run).

The table is also printed to the terminal. Exit status 2 with a one-paragraph message when a PATH does
not exist or holds no run dirs.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import re
import socket
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from . import runs

COLUMNS = ["label", "model", "latent", "seed", "stage", "status", "epochs", "test_mse", "test_psnr", "test_kl",
           "active_units", "val_accuracy", "test_accuracy", "wall_seconds", "head", "run_dir", "classify_dir", "error"]
NUMERIC = ["test_mse", "test_psnr", "test_kl", "active_units", "val_accuracy", "test_accuracy", "wall_seconds"]
FORMATS = {"test_mse": "{:.5f}", "test_psnr": "{:.2f}", "test_kl": "{:.2f}", "active_units": "{:.1f}",
           "val_accuracy": "{:.4f}", "test_accuracy": "{:.4f}", "wall_seconds": "{:.0f}"}
HEADERS = {"label": "run", "test_mse": "test MSE", "test_psnr": "test PSNR (dB)", "test_kl": "test KL (nats)",
           "active_units": "active units", "val_accuracy": "val acc", "test_accuracy": "test acc",
           "wall_seconds": "wall (s)", "epochs": "epochs"}
# overrides that never tell two configurations apart in a label (paths, tracking, what the label already says)
_LABEL_SKIP = re.compile(r"^(model|latent|seed|stage|output_dir|data\.root|data\.cache_dir|classify\.encoder|"
                         r"logger(\..*)?|hydra\..*|device|threads)=")


class ReportError(RuntimeError):
    """A PATH that is missing or holds no run dirs; the message says what was searched."""


# --- reading run dirs -----------------------------------------------------------------------------

def _status(s: dict) -> str:
    """The summary's status; "running" whose process is gone on this host reads "interrupted"; a debug run
    (``debug=fast|overfit``) reads "debug=<mode>", so it is listed apart from the results, never in the table."""
    st = s.get("status", "unknown")
    if s.get("debug"):
        return f"debug={s['debug']}"
    if st == "running" and s.get("hostname") == socket.gethostname() and s.get("pid"):
        try:
            os.kill(int(s["pid"]), 0)
        except ProcessLookupError:
            return "interrupted"
        except (PermissionError, OSError, ValueError):
            pass
    return st


def _epochs_done(run_dir: Path) -> int:
    return max((int(r.get("epoch", 0)) for r in runs.read_metrics(run_dir) if r.get("split") == "train"), default=0)


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def collect(paths: Sequence[Path]) -> List[dict]:
    """Rows (dicts with ``COLUMNS`` keys, numbers as float or None) for every run dir under ``paths``.

    Raises ``ReportError`` when a path does not exist or no run dir is found.
    """
    dirs: Dict[Path, dict] = OrderedDict()
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise ReportError(f"{p} does not exist. Pass a sweep dir, a run dir or the output_dir (e.g. outputs/).")
        for d in runs.iter_run_dirs(p):
            s = runs.read_summary(d)
            if s is not None:
                dirs[d.resolve()] = s
    if not dirs:
        raise ReportError(f"no run dirs (directories with {runs.SUMMARY}) under {', '.join(map(str, paths))}. "
                          "Pass a sweep dir, a run dir or the output_dir (e.g. outputs/).")

    def ae_fields(d: Path, s: dict) -> dict:
        status = _status(s)
        return {"model": s.get("model"), "latent": s.get("latent"), "seed": s.get("seed"),
                "status": status, "epochs": f"{_epochs_done(d)}/{s.get('epochs', '?')}",
                "test_mse": _num(s.get("test_mse")), "test_psnr": _num(s.get("test_psnr")),
                "test_kl": _num(s.get("test_kl")), "active_units": _num(s.get("test_active_units")),
                "wall_seconds": _num(s.get("wall_seconds")), "run_dir": str(d), "overrides": s.get("overrides") or [],
                "error": s.get("error") if status != "completed" else None}

    classify_by_encoder = defaultdict(list)
    rows = []
    for d, s in dirs.items():
        if s.get("stage") == "classify":
            enc = s.get("encoder_run")
            classify_by_encoder[Path(enc).resolve() if enc else None].append((d, s))
    for d, s in dirs.items():
        if s.get("stage") != "autoencode":
            continue
        base = {**ae_fields(d, s), "stage": "autoencode"}
        for cd, cs in classify_by_encoder.pop(d, []) or [(None, None)]:
            rows.append(_join(base, cd, cs))
    # classify runs whose encoder is not in the report (or unknown): own row, encoder numbers read if possible
    for enc, items in classify_by_encoder.items():
        for cd, cs in items:
            es = runs.read_summary(enc) if enc is not None else None
            base = {**(ae_fields(enc, es) if es else {"status": "completed", "epochs": "", "run_dir": str(enc or "")}),
                    "stage": "classify"}
            for k in ("model", "latent", "seed"):
                base[k] = cs.get(k, base.get(k))
            base["overrides"] = cs.get("overrides") or []
            base["wall_seconds"] = None  # the encoder's training is not part of this report
            base["error"] = None
            rows.append(_join(base, cd, cs, joined_stage="classify"))
    _label(rows)
    rows.sort(key=lambda r: (str(r["model"]), r["latent"] if isinstance(r["latent"], int) else -1,
                             r["label"], r["seed"] if isinstance(r["seed"], int) else -1))
    return rows


def _join(base: dict, cd: Optional[Path], cs: Optional[dict], joined_stage: str = "autoencode+classify") -> dict:
    """``base`` (autoencode fields) joined with a classify run: accuracy, combined status, summed wall time."""
    row = {**base, "head": None, "classify_dir": None, "val_accuracy": None, "test_accuracy": None}
    if cs is None:
        return row
    cst = _status(cs)
    row.update(stage=joined_stage, head=cs.get("head"), classify_dir=str(cd),
               val_accuracy=_num(cs.get("val_accuracy")), test_accuracy=_num(cs.get("test_accuracy")))
    ep = f"{_epochs_done(cd)}/{cs.get('epochs', '?')}"
    row["epochs"] = f"{row['epochs']} + {ep}" if row.get("epochs") else ep
    if row["status"] == "completed" and cst != "completed":
        row["status"] = cst if joined_stage == "classify" else f"{cst} (classify)"
        row["error"] = cs.get("error")
    elif row["status"] != "completed":
        row["status"] = f"{row['status']} (autoencode)"
    w = _num(cs.get("wall_seconds"))
    row["wall_seconds"] = (row["wall_seconds"] or 0) + w if w is not None else row["wall_seconds"]
    return row


def _label(rows: List[dict]) -> None:
    """``label`` = ``<model>-z<latent>`` plus the overrides that differ between rows (not seed, not paths)."""
    per_row = [[o for o in r.pop("overrides") if not _LABEL_SKIP.match(o)] for r in rows]
    common = set.intersection(*map(set, per_row)) if per_row else set()
    for r, ovs in zip(rows, per_row):
        extra = " ".join(o for o in ovs if o not in common)
        r["label"] = f"{r['model']}-z{r['latent']}" + (f" {extra}" if extra else "") + (
            f" [{r['head']}]" if r.get("head") and r["head"] != "mlp" else "")


# --- tables ---------------------------------------------------------------------------------------

def aggregate(rows: List[dict]) -> List[dict]:
    """One row per (label, stage) over completed runs: numbers as "mean ± std" (sample std) when several
    seeds ran, with ``n`` the number of seeds. Runs that did not complete are left out (listed separately)."""
    groups: Dict[tuple, List[dict]] = OrderedDict()
    for r in rows:
        if r["status"] == "completed":
            groups.setdefault((r["label"], r["stage"]), []).append(r)
    out = []
    for (label, stage), rs in groups.items():
        a = {"label": label, "model": rs[0]["model"], "latent": rs[0]["latent"], "stage": stage, "n": len(rs),
             "seed": ",".join(str(r["seed"]) for r in rs), "status": "completed", "epochs": rs[0]["epochs"]}
        for k in NUMERIC:
            vals = [r[k] for r in rs if r[k] is not None]
            a[k] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None) if vals else None
        out.append(a)
    return out


def _fmt(k: str, v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, tuple):
        mean, std = v
        return _fmt(k, mean) + (f" ± {FORMATS.get(k, '{}').format(std)}" if std is not None else "")
    if k in FORMATS and isinstance(v, (int, float)):
        return FORMATS[k].format(v)
    return str(v)


def markdown_table(rows: List[dict], cols: Sequence[str]) -> str:
    """A GitHub-markdown table of ``rows`` (dicts) over ``cols``; numbers formatted per column. Columns
    that are empty in every row are dropped (e.g. test KL in a sweep without VAEs)."""
    cols = [c for c in cols if any(r.get(c) not in (None, "") for r in rows)]
    head = [HEADERS.get(c, c) for c in cols]
    body = [[_fmt(c, r.get(c)) for c in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def write_csv(rows: List[dict], path: Path) -> None:
    """``report.csv``: one row per run, ``COLUMNS`` in order, numbers unformatted."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


# --- figures --------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve_labels(rows: List[dict]) -> Dict[str, str]:
    """run dir -> legend label; ``-s<seed>`` is added only where a label ran with several seeds."""
    count = defaultdict(int)
    for r in rows:
        count[r["label"]] += 1
    return {r["run_dir"]: r["label"] + (f" s{r['seed']}" if count[r["label"]] > 1 else "") for r in rows}


def _series(run_dir: Optional[str], split: str, key: str):
    if not run_dir:
        return [], []
    pts = sorted((int(m["epoch"]), m[key]) for m in runs.read_metrics(Path(run_dir))
                 if m.get("split") == split and isinstance(m.get(key), (int, float)))
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(rows: List[dict], out: Path) -> List[Path]:
    """val_psnr.png, val_mse.png (autoencode), val_accuracy.png and ce.png (classify): one line per run."""
    plt = _plt()
    labels = _curve_labels(rows)
    written = []
    specs = [("val_psnr.png", "run_dir", [("val", "psnr", "-")], "val PSNR (dB)"),
             ("val_mse.png", "run_dir", [("val", "mse", "-")], "val MSE (per pixel)"),
             ("val_accuracy.png", "classify_dir", [("val", "accuracy", "-")], "val accuracy"),
             ("ce.png", "classify_dir", [("train", "loss", "-"), ("val", "loss", "--")], "cross-entropy (train —, val --)")]
    for name, dir_key, series, ylabel in specs:
        fig, ax = plt.subplots(figsize=(8, 5))
        drawn = 0
        for i, r in enumerate(rows):
            color = plt.get_cmap("tab10")(i % 10) if len(rows) <= 10 else plt.get_cmap("turbo")(i / max(1, len(rows) - 1))
            for split, key, style in series:
                x, y = _series(r.get(dir_key), split, key)
                if x:
                    ax.plot(x, y, style, color=color, marker="." if len(x) < 20 else None,
                            label=labels[r["run_dir"]] if style == "-" else None)
                    drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    return written


def plot_vs_latent(agg: List[dict], out: Path) -> Optional[Path]:
    """vs_latent.png: test PSNR, test MSE, test accuracy, active units against latent size (log2 axis),
    one line per model (per label without the ``-z<latent>`` part), error bars = std over seeds."""
    plt = _plt()
    panels = [("test_psnr", "test PSNR (dB)"), ("test_mse", "test MSE"), ("test_accuracy", "test accuracy"),
              ("active_units", "active units (VAE)")]
    panels = [p for p in panels if any(a.get(p[0]) for a in agg)]
    if not panels:
        return None
    lines: Dict[str, List[dict]] = OrderedDict()
    for a in agg:
        lines.setdefault(re.sub(r"-z\d+", "", a["label"], count=1), []).append(a)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2 + 0.2 * len(lines)), squeeze=False)
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(lines)}  # same model, same colour
    for ax, (key, title) in zip(axes[0], panels):
        for name, pts in lines.items():
            pts = sorted((p for p in pts if p.get(key)), key=lambda p: p["latent"])
            if pts:
                ax.errorbar([p["latent"] for p in pts], [p[key][0] for p in pts], yerr=[p[key][1] or 0 for p in pts],
                            marker="o", capsize=3, color=colors[name], label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("latent size")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", label=n) for n, c in colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(3, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * math.ceil(len(handles) / 3), 1, 1))
    path = out / "vs_latent.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_prior_samples(rows: List[dict], out: Path) -> Optional[Path]:
    """prior_samples.png: per autoencode run, the top row of its last ``images/samples_eNNN.png``."""
    from PIL import Image

    from .stages.autoencode import N_SAMPLES

    strips = []
    seen = set()
    labels = _curve_labels(rows)
    for r in rows:
        d = Path(r["run_dir"]) if r.get("run_dir") else None
        if d is None or d in seen:
            continue
        seen.add(d)
        files = sorted((d / "images").glob("samples_e*.png"))
        if not files:
            continue
        img = np.asarray(Image.open(files[-1]).convert("RGB"))
        # make_grid(nrow=8, padding=1) of N_SAMPLES images: rows of (size + 1) pixels plus one border pixel
        row_h = (img.shape[0] - 1) // math.ceil(N_SAMPLES / 8)
        strips.append((f"{labels[r['run_dir']]} ({files[-1].stem.split('_e')[-1].lstrip('0') or 0})", img[:row_h + 1]))
    if not strips:
        return None
    plt = _plt()
    w = strips[0][1].shape[1]
    fig, axes = plt.subplots(len(strips), 1, figsize=(max(6.0, w / 40), 0.4 + len(strips) * (strips[0][1].shape[0] / 40 + 0.3)),
                             squeeze=False)
    for ax, (label, strip) in zip(axes[:, 0], strips):
        ax.imshow(strip, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(label, loc="left", fontsize=8)
    fig.suptitle("samples from the prior N(0, I) (label: run, epoch)", fontsize=9)
    fig.tight_layout()
    path = out / "prior_samples.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- the command ----------------------------------------------------------------------------------

def report(paths: Sequence[Path], out: Optional[Path] = None, figures: bool = True) -> Dict[str, object]:
    """Write report.csv, report.md and figures/ for the runs under ``paths`` into ``out``.

    Returns {"rows": per-run rows, "table": the markdown table printed, "files": paths written}.
    Raises ``ReportError`` (see ``collect``).
    """
    paths = [Path(p) for p in paths]
    rows = collect(paths)
    if out is None:
        out = paths[0] if len(paths) == 1 else Path(os.path.commonpath([p.resolve() for p in paths]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(rows)
    several_seeds = any(a["n"] > 1 for a in agg)
    cols = ["label", "stage", "seed", "n", "epochs", *NUMERIC] if several_seeds else \
        ["label", "stage", "seed", "status", "epochs", *NUMERIC]
    table = markdown_table(agg if several_seeds else [r for r in rows if r["status"] == "completed"], cols)
    bad = [r for r in rows if r["status"] != "completed"]
    files = [out / "report.csv", out / "report.md"]
    write_csv(rows, files[0])
    figs: List[Path] = []
    if figures:
        fig_dir = out / "figures"
        fig_dir.mkdir(exist_ok=True)
        figs = plot_curves(rows, fig_dir)
        figs += [p for p in (plot_vs_latent(aggregate(rows), fig_dir), plot_prior_samples(rows, fig_dir)) if p]
    md = [f"# embclf report: {', '.join(str(p) for p in paths)}", "",
          f"{len(rows)} rows ({sum(r['status'] == 'completed' for r in rows)} completed)"
          + (", mean ± std over seeds (n = number of seeds)" if several_seeds else "") + ". "
          "MSE per pixel on [0, 1] images; PSNR in dB; KL in nats per image; accuracy of the best-on-val head; "
          "wall time of autoencode + classify. Per-run numbers: report.csv.", "", table, ""]
    if bad:
        md += ["## Not completed", "", markdown_table(
            [{**r, "error": (r.get("error") or "").strip().splitlines()[-1][:160] if r.get("error") else ""} for r in bad],
            ["label", "seed", "stage", "status", "epochs", "error", "run_dir"]), ""]
    if figs:
        md += ["## Figures", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figs] + [""]
    files[1].write_text("\n".join(md))
    return {"rows": rows, "table": table, "not_completed": bad, "files": files + figs}


def main(argv: Optional[Iterable[str]] = None) -> int:
    """CLI entry point (see module docstring). Returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m embclf.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="sweep dir, run dir, or output_dir")
    ap.add_argument("--out", type=Path, default=None, help="where to write report.md/.csv and figures/ "
                    "(default: the PATH, or the common parent of several)")
    ap.add_argument("--no-figures", action="store_true", help="table only (no matplotlib)")
    args = ap.parse_args(None if argv is None else list(argv))
    try:
        res = report(args.paths, args.out, figures=not args.no_figures)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["table"])
    for r in res["not_completed"]:
        print(f"{r['status']}: {r['label']} seed {r['seed']} ({r.get('classify_dir') or r['run_dir']})")
    print(f"wrote {res['files'][1]} , report.csv and {len(res['files']) - 2} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
