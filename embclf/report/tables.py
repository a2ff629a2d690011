"""Tables: the markdown table (printed and in report.md), report.csv, and report.md's opening (the commands
that wrote the runs, the data, what the numbers are). Cells are formatted per column through pandas.

The format and header tables are read-only (``MappingProxyType``): a call never changes what the next one
prints. Per-class columns (``pc:<class>``) and probe columns (``probe:<name>``) are formatted by prefix."""
from __future__ import annotations

import contextlib
import os
import shlex
from collections import OrderedDict
from pathlib import Path
from types import MappingProxyType
from typing import Dict, List, Optional, Sequence

import pandas as pd

from .aggregation import _value
from .rows import COLUMNS, PROBE_PREFIX, _short, probe_names

# columns that count things: printed as integers where they are whole (a mean over seeds keeps 1 decimal)
COUNTS = frozenset({"active_units"})
FORMATS = MappingProxyType({
    "test_mse": "{:.5f}", "test_psnr": "{:.2f}", "test_kl": "{:.2f}", "active_units": "{:.1f}",
    "val_accuracy": "{:.4f}", "test_accuracy": "{:.4f}", "wall_seconds": "{:.0f}", "final_test_mse": "{:.5f}",
    "final_test_psnr": "{:.2f}", "final_test_accuracy": "{:.4f}"})
HEADERS = MappingProxyType({
    "label": "run", "test_mse": "test MSE", "test_psnr": "test PSNR (dB)", "test_kl": "test KL (nats)",
    "active_units": "active units", "val_accuracy": "val acc", "test_accuracy": "test acc",
    "final_test_mse": "last-epoch test MSE", "final_test_psnr": "last-epoch test PSNR",
    "final_test_accuracy": "last-epoch test acc", "wall_seconds": "wall (s)", "epochs": "epochs",
    "repeats": "repeated seeds"})
PC_PREFIX = "pc:"  # per-class accuracy columns of report.md: "pc:<class>"


def _fmt(k: str, v) -> str:
    """One cell of column ``k``: a (mean, std) pair as "mean ± std" (a count with no spread as the count),
    numbers in the column's format (``FORMATS``; probe columns 4 decimals, per-class columns 2)."""
    if v is None or v == "":
        return ""
    fmt = FORMATS.get(k, "{:.4f}" if k.startswith(PROBE_PREFIX) else "{:.2f}" if k.startswith(PC_PREFIX) else None)
    if isinstance(v, tuple):
        mean, std = v
        if std is None:  # one seed: the value itself (active units are a count)
            return _fmt(k, mean)
        if k in COUNTS and std == 0:  # every seed had the same count: the count, not "32.0 ± 0.0"
            return _fmt(k, mean)
        fmt = fmt or "{}"
        return fmt.format(mean) + f" ± {fmt.format(std)}"
    if k in COUNTS and isinstance(v, (int, float)) and float(v).is_integer():
        return str(int(v))
    if fmt and isinstance(v, (int, float)):
        return fmt.format(v)
    return str(v)


def _header(c: str) -> str:
    if c.startswith(PROBE_PREFIX):
        return f"test acc ({c[len(PROBE_PREFIX):]})"
    if c.startswith(PC_PREFIX):
        return c[len(PC_PREFIX):]
    return HEADERS.get(c, c)


def _cell(r: dict, c: str):
    if c.startswith(PROBE_PREFIX) and not isinstance(r.get(c), tuple):
        return _value(r, c)
    return r.get(c)


def markdown_table(rows: List[dict], cols: Sequence[str]) -> str:
    """A GitHub-markdown table of ``rows`` (dicts) over ``cols``; numbers formatted per column (``_fmt``),
    cells padded to the column's width. Columns that are empty in every row are dropped (e.g. test KL in a
    sweep without VAEs); "" when nothing is left."""
    if not rows:
        return ""
    cells = pd.DataFrame({c: [_fmt(c, _cell(r, c)) for r in rows] for c in cols}, columns=list(cols), dtype=object)
    cells = cells.loc[:, (cells != "").any(axis=0)]
    if cells.shape[1] == 0:  # nothing to show: no table at all rather than a header of empty cells
        return ""
    head = pd.Series([_header(c) for c in cells.columns], index=cells.columns)
    widths = pd.concat([cells.apply(lambda col: col.str.len().max()), head.str.len()], axis=1).max(axis=1)
    padded = pd.concat([head.to_frame().T, cells]).apply(lambda col: col.str.ljust(int(widths[col.name])))
    lines = ("| " + padded.apply(" | ".join, axis=1) + " |").tolist()
    return "\n".join([lines[0], "|" + "|".join("-" * (int(w) + 2) for w in widths) + "|", *lines[1:]])


def _differs(rows: List[dict], best: str, last: str) -> bool:
    """True when some row's last-epoch number differs from its best-on-val one (then both are shown)."""
    def mean(v):
        return v[0] if isinstance(v, tuple) else v
    return any(mean(r.get(last)) is not None and mean(r.get(best)) is not None
               and abs(mean(r.get(last)) - mean(r.get(best))) > 1e-12 for r in rows)


def write_csv(rows: List[dict], path: Path) -> None:
    """``report.csv``: one row per run unit (repeated seeds too, with ``used`` false), ``COLUMNS`` in order,
    then one column per setting that differs between rows (``cfg:<key>``) and per probe (``probe:<name>`` test
    accuracy, ``probe:<name>:val``); numbers unformatted, missing values empty. Written atomically."""
    vary = sorted({v.split("=", 1)[0] for r in rows for v in r.get("varying", [])}
                  | {k for r in rows for k in r.get("preset_keys", [])})  # a preset's settings too
    probes = probe_names(rows)
    df = pd.DataFrame({k: [r.get(k) for r in rows] for k in COLUMNS}, columns=COLUMNS, dtype=object)
    for k in vary:
        df[f"cfg:{k}"] = [None if r.get("config", {}).get(k) is None else _short("", r["config"][k]) for r in rows]
    for p in probes:
        res = [(r.get("probes") or {}).get(p) or {} for r in rows]
        df[f"{PROBE_PREFIX}{p}"] = [x.get("test") for x in res]
        df[f"{PROBE_PREFIX}{p}:val"] = [x.get("val") for x in res]
    with _atomic(path) as tmp:
        df.to_csv(tmp, index=False, na_rep="", lineterminator="\r\n")  # csv.DictWriter's line ends, as before


@contextlib.contextmanager
def _atomic(path: Path):
    """Yield a temporary name beside ``path`` to write, renamed over ``path`` at the end: a report file is the
    old one or the new one, never half of one (a full disk). On any error the temporary file is removed and
    the error (an ``OSError`` naming ``path``: read-only file system, disk full, ...) is raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (str(tmp), tmp):  # name the file the user knows, not its temporary name
            e.filename = str(path)
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()

# --- the command ----------------------------------------------------------------------------------

def _sweep_root(run_dir: Path) -> Optional[Path]:
    """The sweep dir holding ``run_dir`` (the nearest parent with multirun.yaml), or None for a single run."""
    for p in [run_dir, *run_dir.parents][:4]:
        if (p / "multirun.yaml").is_file():
            return p
    return None


def commands(rows: List[dict]) -> List[str]:
    """The command line of every sweep (``multirun.yaml``'s task overrides, and those of the earlier sweeps into
    the same sweep dir, ``multirun.NNN.yaml``) or single run (its summary's ``overrides``: the job's command-line
    overrides, ``lifecycle.base_summary``; ``.hydra/overrides.yaml`` only for a summary without them) that wrote
    the rows' run dirs, oldest first, each once, as shell-quoted strings."""
    from omegaconf import OmegaConf

    seen: Dict[Path, None] = OrderedDict()
    singles: Dict[Path, Optional[list]] = OrderedDict()  # job dir -> its overrides (None: not in the summary)
    for r in rows:
        for d, ovr in ((r.get("run_dir"), r.get("overrides")), (r.get("classify_dir"), r.get("classify_overrides"))):
            if not d:
                continue
            d = Path(d)
            root = _sweep_root(d)
            if root is not None:
                seen[root] = None
            else:
                job = d.parent if d.name in ("autoencode", "classify") and (d.parent / ".hydra").is_dir() else d
                if singles.get(job) is None:
                    singles[job] = list(ovr) if isinstance(ovr, (list, tuple)) else None
    from ..hold_dirs import sweep_record_archives

    out = []
    for root, multi in [(p, True) for p in seen] + [(p, False) for p in singles]:
        if multi:  # a sweep dir swept into more than once keeps each earlier record as multirun.NNN.yaml (embclf.locks)
            records = [*sweep_record_archives(root), root / "multirun.yaml"]
        else:
            records = [singles[root] if singles[root] is not None else root / ".hydra" / "overrides.yaml"]
        for i, rec in enumerate(records):
            try:
                task = (rec if isinstance(rec, list) else
                        list(OmegaConf.load(rec).hydra.overrides.task) if multi else list(OmegaConf.load(rec)))
            except Exception:  # noqa: BLE001 (a missing or foreign file: the command is unknown, the rows stay)
                continue
            cmd = ("python -m embclf " + ("-m " if multi else "") + " ".join(shlex.quote(str(t)) for t in task)
                   + f"    # {root.name}")
            if all(c != cmd for _, _, c in out):  # the same command again (a resume) is listed once
                out.append((root.stat().st_mtime, i, cmd))
    return [c for _, _, c in sorted(out)]


def _values(rows: List[dict], key: str) -> str:
    vals = OrderedDict((str(r[key]), None) for r in rows if r.get(key) not in (None, ""))
    return ", ".join(vals) if vals else "?"


def preamble(rows: List[dict], agg: List[dict]) -> List[str]:
    """report.md's opening: what was run (commands, data, epochs, heads) and where the numbers come from."""
    done = [r for r in rows if r["status"] == "completed"]
    cfgs = [r.get("config", {}) for r in done] or [r.get("config", {}) for r in rows]

    def setting(key: str) -> str:
        vals = OrderedDict((_short(key, c[key]), None) for c in cfgs if key in c)
        return ", ".join(vals) if vals else "—"

    sizes = OrderedDict((f"{r.get('n_train')} / {r.get('n_val')} / {r.get('n_test')}", None) for r in done
                        if r.get("n_train") is not None)
    heads = OrderedDict((str(r["head"]), None) for r in done if r.get("head"))
    probes = probe_names(rows)
    vary = sorted({v.split("=", 1)[0] for r in rows for v in r.get("varying", [])})
    by_preset = sorted({k for r in rows for k in r.get("preset_keys", [])})
    cmds = commands(rows)
    md = ["## What was run", ""]
    md += ["Commands, oldest first (from each sweep's `multirun.yaml` and its earlier sweeps' `multirun.NNN.yaml`, or "
           "each single run's `overrides` in summary.json):", "", "```bash",
           *(cmds or ["(unknown: no multirun.yaml, and no overrides in the summaries)"]), "```", ""]
    md += [f"- data: `{setting('data.source')}` from `{setting('data.root')}`; images train / val / test: "
           f"{', '.join(sizes) or '?'} (data.train_size {setting('data.train_size')}, data.test_size "
           f"{setting('data.test_size')})",
           f"- models: {setting('model.name')}; latent sizes: {setting('latent')}; seeds: {_values(rows, 'seed')}",
           f"- epochs: autoencode {setting('autoencode.epochs')}; classify {setting('classify.epochs')}",
           f"- heads: {', '.join(heads) or 'none (autoencoders only)'}"
           + (f"; probes: {', '.join(probes)}" if probes else ""),
           f"- settings that differ between rows (in the row labels): "
           f"{', '.join(f'`{k}`' for k in vary) if vary else 'none besides model and latent'}"
           + (f" (`experiment` stands for the presets' settings: {', '.join(f'`{k}`' for k in by_preset)})"
              if by_preset else ""),
           "- numbers: test MSE / PSNR / KL / active units are of the autoencoder's best-on-val checkpoint (lowest "
           "val `autoencode.select_on` metric: the val objective by default, val MSE for an AE without extra terms "
           "alike); accuracies are of the head's best-on-val epoch (highest val accuracy); `last-epoch` columns "
           "(shown where they differ) are the last epoch's, as the reference study reported. MSE per pixel on "
           "[0, 1] images; PSNR in dB (mean of per-image PSNR); KL in nats per image; wall time of autoencode + "
           "classify.",
           "- rows: one per configuration; mean ± sample std over distinct seeds (`n` seeds); a seed run more "
           "than once counts once, with its newest completed run (`repeated seeds`); every run, repeats too, "
           "is in report.csv (`used` says which entered the table).", ""]
    return md


def no_completed_run(rows: List[dict]) -> str:
    """What the table says when no run has completed (all running, failed, unreadable, ...): one sentence
    with how many runs are in each state, e.g. "No run has completed yet (2 running); ...". """
    counts: Dict[str, int] = OrderedDict()
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return (f"No run has completed yet ({', '.join(f'{n} {st}' for st, n in counts.items())}); "
            "every run is listed below.")

