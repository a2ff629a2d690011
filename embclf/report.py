"""``python -m embclf.report PATH [PATH ...] [--out DIR]``: one table and the reference study's figures for sweeps.

PATH is a sweep dir, a run dir, or a whole ``outputs/``; every run dir under it (a dir holding summary.json,
including the ``autoencode/`` and ``classify/`` run dirs of a ``stage=all`` job) is read, never modified, and
nothing is trained. Written into ``--out`` (default: the PATH, or the common parent of several PATHs):

- ``report.md``: what was run (the sweep commands, data and sizes, epochs, heads, which settings differ, where
  the numbers come from), one row per configuration (every setting that differs between runs either
  separates rows or, for settings implied by a group choice such as ``model.variational``, follows it; only
  distinct seeds are averaged, as mean ± std with n = seeds; a seed run twice counts once, its newest run),
  last-epoch numbers where they differ from best-on-val, one test-accuracy column per probe, per-class
  accuracy, the runs that did not complete, and the figures.
- ``report.csv``: every run (repeats too, ``used`` false), every field, one ``cfg:<key>`` column per setting
  that differs and ``probe:<name>`` columns.
- ``figures/``: ``val_psnr.png``, ``val_mse.png``, ``val_accuracy.png``, ``ce.png`` per epoch;
  ``vs_latent.png``; ``prior_samples.png`` and ``reconstructions.png`` (runs side by side, the same test
  images); ``per_class_accuracy.png``.

The table is also printed to the terminal, then the runs that did not complete (failed, interrupted, still
running, or unreadable: a torn or hand-edited summary.json or config.yaml, with why); when no run has
completed yet the table is one sentence saying so.

Results are readable from anywhere: PATH may be read-only (an archive, a colleague's results). Everything
is computed before anything is written, and each file is written atomically, so when the output dir cannot
be written (read-only, full, no permission) the table is still printed, no partial file is left, and one
line on stderr names the file and the reason and says that ``--out DIR`` writes elsewhere.

Exit status: 0 when the table was printed (also when the default output dir, the PATH, could not be
written: the table is the result); 1 when an explicit ``--out DIR`` could not be written (the table is
printed all the same); 2 with a one-paragraph message when a PATH does not exist or holds no run dirs.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import shlex
import socket
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from . import identity, runs

COLUMNS = ["label", "model", "latent", "seed", "stage", "status", "used", "epochs", "test_mse", "test_psnr",
           "test_kl", "active_units", "val_accuracy", "test_accuracy", "final_test_mse", "final_test_psnr",
           "final_test_accuracy", "wall_seconds", "head", "config_id", "run_dir", "classify_dir", "end_time", "error"]
NUMERIC = ["test_mse", "test_psnr", "test_kl", "active_units", "val_accuracy", "test_accuracy", "final_test_mse",
           "final_test_psnr", "final_test_accuracy", "wall_seconds"]
# columns that count things: printed as integers where they are whole (a mean over seeds keeps 1 decimal)
COUNTS = {"active_units"}
FORMATS = {"test_mse": "{:.5f}", "test_psnr": "{:.2f}", "test_kl": "{:.2f}", "active_units": "{:.1f}",
           "val_accuracy": "{:.4f}", "test_accuracy": "{:.4f}", "wall_seconds": "{:.0f}", "final_test_mse": "{:.5f}",
           "final_test_psnr": "{:.2f}", "final_test_accuracy": "{:.4f}"}
HEADERS = {"label": "run", "test_mse": "test MSE", "test_psnr": "test PSNR (dB)", "test_kl": "test KL (nats)",
           "active_units": "active units", "val_accuracy": "val acc", "test_accuracy": "test acc",
           "final_test_mse": "last-epoch test MSE", "final_test_psnr": "last-epoch test PSNR",
           "final_test_accuracy": "last-epoch test acc", "wall_seconds": "wall (s)", "epochs": "epochs",
           "repeats": "repeated seeds"}
PROBE_PREFIX = "probe:"  # row keys "probe:<name>" (test accuracy) and "probe:<name>:val" of classify.probes
# the group whose ``name`` (or ``source``) makes a key's value unsurprising: model.variational follows
# model.name, so it is not spelled out in a label unless it varies within one model
GROUP_NAME = {"model": "model.name", "head": "head.name", "data": "data.source"}


class ReportError(RuntimeError):
    """A PATH that is missing or holds no run dirs; the message says what was searched."""


# --- reading run dirs -----------------------------------------------------------------------------

def _status(s: dict) -> str:
    """The summary's status; a debug run (``debug=fast|overfit``) reads "debug=<mode>", so it is listed apart
    from the results, never in the table. A "running" one is checked, never shown as running when it is dead:
    its process on this host (gone: "interrupted"), its SLURM job (``squeue``, then ``sacct`` for how it
    ended: "killed (out of memory)", "cancelled", "timeout", ...), or, when neither can be asked from here,
    "running? (... cannot check ...)"."""
    st = s.get("status", "unknown")
    if s.get("debug"):
        return f"debug={s['debug']}"
    if st != "running":
        return st
    if s.get("slurm_job_id"):
        return _slurm_status(str(s["slurm_job_id"]))
    if s.get("hostname") == socket.gethostname() and s.get("pid"):
        try:
            os.kill(int(s["pid"]), 0)
        except ProcessLookupError:
            return "interrupted"
        except (PermissionError, OSError, ValueError):
            pass
        return st
    return f"running? (on {s.get('hostname', 'another host')}: cannot check from here)"


# final SLURM states of a job whose summary still says "running": it died without recording it
SLURM_ENDED = {"OUT_OF_MEMORY": "killed (out of memory)", "NODE_FAIL": "killed (node failure)",
               "BOOT_FAIL": "killed (node failure)", "CANCELLED": "cancelled", "TIMEOUT": "timeout",
               "PREEMPTED": "interrupted", "FAILED": "failed", "COMPLETED": "killed"}


def _slurm_status(job_id: str) -> str:
    """What SLURM says of a job whose summary reads "running": still queued/running (squeue), how it ended
    (sacct), or that this host cannot tell (no SLURM client, e.g. a laptop reading a copied sweep dir)."""
    import subprocess

    def ask(cmd):
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=20)
        return out.returncode, out.stdout.strip()

    try:
        rc, live = ask(["squeue", "-h", "-j", job_id, "-o", "%T"])
        if rc == 0 and live:
            return "running" if live.split()[0] == "RUNNING" else f"running ({live.split()[0].lower()})"
        rc, ended = ask(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    except (OSError, subprocess.SubprocessError):
        return f"running? (SLURM job {job_id}: no squeue/sacct here to check)"
    word = ended.split()[0].upper() if rc == 0 and ended else ""
    if word in SLURM_ENDED:
        return SLURM_ENDED[word]
    return f"running? (SLURM job {job_id}: {'sacct says ' + word if word else 'unknown to squeue and sacct'})"


def _epochs_done(run_dir: Path) -> int:
    return max((int(r.get("epoch", 0)) for r in runs.read_metrics(run_dir) if r.get("split") == "train"), default=0)


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def flatten(d, prefix: str = "") -> Dict[str, object]:
    """Nested dicts -> {"a.b.c": value}; lists stay values (compared as a whole)."""
    out: Dict[str, object] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(flatten(v, key + "."))
            else:
                out[key] = v
    return out


def unit_config(ae_cfg: Optional[dict], clf_cfg: Optional[dict]) -> Dict[str, object]:
    """The settings of one row unit (an autoencode run, optionally with a classify run on its encoder): its run
    identity (``embclf.identity``: the identity keys only, paths normalised, keys a run did not store as the run
    used them) as flattened dotted keys, without the seed (rows average over seeds). The encoder's settings come
    from the autoencode run's resolved config, ``head.*`` and ``classify.*`` from the classify run's."""
    out: Dict[str, object] = {}
    if ae_cfg is not None:
        out.update(flatten(identity.identity(ae_cfg, "autoencode")))
    if clf_cfg is not None:
        ci = identity.identity(clf_cfg, "classify", encoder=ae_cfg or clf_cfg)
        ci.pop("encoder", None)  # the encoder's identity is the autoencode part above (or unknown)
        cf = flatten(ci)
        out.update(cf if ae_cfg is None else {k: v for k, v in cf.items() if k.startswith(("head.", "classify."))})
    out.pop("seed", None)
    return out


def preset(run_dir: Optional[Path]) -> Optional[str]:
    """The ``experiment=`` preset a run was composed with, from Hydra's record of it
    (``<run dir>/.hydra/hydra.yaml``: ``hydra.runtime.choices.experiment``), or None: no preset, or no record."""
    if run_dir is None:
        return None
    import yaml  # PyYAML, a dependency of hydra-core and omegaconf

    try:
        with open(Path(run_dir) / ".hydra" / "hydra.yaml") as f:
            choice = yaml.safe_load(f)["hydra"]["runtime"]["choices"].get("experiment")
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None
    return None if choice in (None, "null") else str(choice)


def _implied(configs: Sequence[Dict[str, object]], by: str, k: str) -> bool:
    """Whether setting ``k`` has one value per value of ``by`` across ``configs`` (so ``by`` tells it)."""
    per_choice = defaultdict(set)
    for c in configs:
        per_choice[_key(c.get(by))].add(_key(c.get(k, "<absent>")))
    return all(len(v) == 1 for v in per_choice.values())


def _key(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _short(k: str, v) -> str:
    """A setting's value as a label shows it: lists without spaces, paths by their last component."""
    if v is None:
        return "null"  # as an override would write it
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(k, x) for x in v) + "]"
    role = identity.role_of(k)
    if role is not None and role.path and isinstance(v, str):
        return os.path.basename(v.rstrip("/")) or v
    return str(v)


def collect(paths: Sequence[Path]) -> List[dict]:
    """Rows (dicts with ``COLUMNS`` keys, numbers as float or None) for every run dir under ``paths``.

    A row is one unit: an autoencode run with one classify run trained on its encoder (joined through the
    classify summary's ``encoder_run``), an autoencode run without one, or a classify run whose encoder is
    not under ``paths``. Each row also carries ``config`` (its settings, see ``unit_config``), ``config_id``
    (a hash of them: rows with equal ids are the same configuration), ``varying`` (the settings that differ
    between rows, as "key=value" strings, in ``label``) and ``probes`` (classify.probes results).

    Raises ``ReportError`` when a path does not exist or no run dir is found.
    """
    dirs: Dict[Path, dict] = OrderedDict()
    configs: Dict[Path, Optional[dict]] = {}
    unreadable: Dict[Path, str] = OrderedDict()  # run dir -> why it cannot be reported
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise ReportError(f"{p} does not exist. Pass a sweep dir, a run dir or the output_dir (e.g. outputs/).")
        for d in runs.iter_run_dirs(p):
            s, why = read_summary(d)
            c, why_c = read_config(d)
            if why or why_c:
                unreadable[d.resolve()] = why or why_c
            else:
                dirs[d.resolve()] = s
                configs[d.resolve()] = c
    if not dirs and not unreadable:
        raise ReportError(f"no run dirs (directories with {runs.SUMMARY}) under {', '.join(map(str, paths))}. "
                          "Pass a sweep dir, a run dir or the output_dir (e.g. outputs/).")

    def ae_fields(d: Path, s: dict) -> dict:
        status = _status(s)
        return {"model": s.get("model"), "latent": s.get("latent"), "seed": s.get("seed"),
                "status": status, "epochs": f"{_epochs_done(d)}/{s.get('epochs', '?')}",
                "test_mse": _num(s.get("test_mse")), "test_psnr": _num(s.get("test_psnr")),
                "test_kl": _num(s.get("test_kl")), "active_units": _num(s.get("test_active_units")),
                "final_test_mse": _num(s.get("final_test_mse")), "final_test_psnr": _num(s.get("final_test_psnr")),
                "wall_seconds": _num(s.get("wall_seconds")), "run_dir": str(d), "end_time": _num(s.get("end_time")),
                "n_train": s.get("n_train"), "n_val": s.get("n_val"), "n_test": s.get("n_test"),
                "error": s.get("error") if status != "completed" else None}

    classify_by_encoder = defaultdict(list)
    rows = []
    for d, s in dirs.items():
        if s.get("stage") == "classify":
            enc = runs.encoder_run_of(d, s)  # a relative record: found where the sweep is now, not where it ran
            classify_by_encoder[enc.resolve() if enc is not None else None].append((d, s))
    for d, s in dirs.items():
        if s.get("stage") != "autoencode":
            continue
        base = {**ae_fields(d, s), "stage": "autoencode"}
        ae_cfg = configs[d]
        for cd, cs in classify_by_encoder.pop(d, []) or [(None, None)]:
            row = _join(base, cd, cs)
            row["config"] = unit_config(ae_cfg, configs[cd] if cd else None)
            row["config"]["experiment"] = preset(cd) or preset(d)
            rows.append(row)
    # classify runs whose encoder is not in the report (or unknown): own row, encoder numbers read if possible
    for enc, items in classify_by_encoder.items():
        for cd, cs in items:
            es = dirs.get(enc) if enc in dirs else (read_summary(enc)[0] if enc is not None else None)
            base = {**(ae_fields(enc, es) if es else {"status": "completed", "epochs": "", "run_dir": str(enc or "")}),
                    "stage": "classify"}
            for k in ("model", "latent", "seed"):
                base[k] = cs.get(k, base.get(k))
            base["wall_seconds"] = None  # the encoder's training is not part of this report
            base["error"] = None
            row = _join(base, cd, cs, joined_stage="classify")
            ae_cfg = (configs[enc] if enc in configs else read_config(enc)[0]) if es else None
            row["config"] = unit_config(ae_cfg, configs[cd])
            if ae_cfg is None:  # classify.encoder outside the report: the encoder's model and latent apply
                row["config"].update({"model.name": row["model"], "latent": row["latent"]})
            row["config"]["experiment"] = preset(cd) or preset(enc)
            rows.append(row)
    _identify(rows)
    rows.sort(key=lambda r: (str(r["model"]), r["latent"] if isinstance(r["latent"], int) else -1,
                             r["label"], r["seed"] if isinstance(r["seed"], int) else -1, r.get("end_time") or 0))
    _mark_used(rows)
    # last, so that they change no other row's label
    rows += [_unreadable_row(d, why) for d, why in unreadable.items()]
    return rows


UNREADABLE = "unreadable"  # the status of a run dir whose summary.json or config.yaml cannot be read


def read_summary(run_dir: Path) -> tuple:
    """``(summary, None)`` for a run dir's readable ``summary.json``, else ``(None, why)``: why it cannot be
    reported (unreadable, empty, not valid JSON as after a torn copy or a hand edit, not a JSON object, or no
    ``stage`` of autoencode or classify), as one phrase naming the file."""
    path = Path(run_dir) / runs.SUMMARY
    try:
        text = path.read_text()
    except (OSError, ValueError) as e:  # ValueError: not UTF-8
        return None, f"{runs.SUMMARY} cannot be read ({getattr(e, 'strerror', None) or e})"
    if not text.strip():
        return None, f"{runs.SUMMARY} is empty (a torn copy?)"
    try:
        s = json.loads(text)
    except ValueError as e:
        return None, f"{runs.SUMMARY} is not valid JSON ({e}: a torn copy or a hand edit?)"
    if not isinstance(s, dict):
        return None, f"{runs.SUMMARY} is not a JSON object (it holds a {type(s).__name__})"
    if s.get("stage") not in ("autoencode", "classify"):
        return None, f"{runs.SUMMARY} names no stage (\"stage\": {json.dumps(s.get('stage'))}; autoencode or classify)"
    return s, None


def read_config(run_dir: Path) -> tuple:
    """``(config, None)`` for a run dir's ``config.yaml`` as a dict (None when it has none), else
    ``(None, why)``: it is not valid YAML or not a mapping, so the run's settings are unknown."""
    import yaml

    try:
        c = runs.read_config(run_dir)
    except (OSError, ValueError, yaml.YAMLError) as e:  # omegaconf raises yaml's errors for bad YAML
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"{runs.CONFIG} cannot be read ({first}), so the run's settings are unknown"
    if c is not None and not isinstance(c, dict):
        return None, f"{runs.CONFIG} is not a mapping of settings, so the run's settings are unknown"
    return c, None


def _unreadable_row(d: Path, why: str) -> dict:
    """The row of a run dir that cannot be reported (``read_summary``/``read_config`` say why): listed among the
    runs that did not complete, in report.csv, and named by whatever its config.yaml still tells."""
    c = read_config(d)[0] or {}
    model = (c.get("model") or {}).get("name") if isinstance(c.get("model"), dict) else None
    latent, seed = c.get("latent"), c.get("seed")
    stage = c.get("stage") if c.get("stage") in ("autoencode", "classify") else \
        (d.name if d.name in ("autoencode", "classify") else None)
    row = {k: None for k in COLUMNS}
    row.update(label=f"{model}-z{latent}" if model and latent is not None else "?", model=model, latent=latent,
               seed=seed, stage=stage, status=UNREADABLE, used=False, repeats=0, epochs="", run_dir=str(d),
               error=why, config={}, varying=[], preset_keys=[], probes={}, per_class_accuracy=None)
    return row


def _join(base: dict, cd: Optional[Path], cs: Optional[dict], joined_stage: str = "autoencode+classify") -> dict:
    """``base`` (autoencode fields) joined with a classify run: accuracy, probes, combined status, summed wall
    time; the row's ``end_time`` is the later of the two."""
    row = {**base, "head": None, "classify_dir": None, "val_accuracy": None, "test_accuracy": None,
           "final_test_accuracy": None, "probes": {}, "per_class_accuracy": None}
    if cs is None:
        return row
    cst = _status(cs)
    row.update(stage=joined_stage, head=cs.get("head"), classify_dir=str(cd),
               val_accuracy=_num(cs.get("val_accuracy")), test_accuracy=_num(cs.get("test_accuracy")),
               final_test_accuracy=_num(cs.get("final_test_accuracy")),
               per_class_accuracy=cs.get("per_class_accuracy") if cst == "completed" else None)
    probes = cs.get("probes") if isinstance(cs.get("probes"), dict) else {}
    if set(probes) <= {cs.get("head")}:  # the main head alone: the test acc column already shows it
        probes = {}
    for name, res in probes.items():
        if isinstance(res, dict):
            row["probes"][str(name)] = {"test": _num(res.get("test_accuracy")), "val": _num(res.get("val_accuracy"))}
    ep = f"{_epochs_done(cd)}/{cs.get('epochs', '?')}"
    row["epochs"] = f"{row['epochs']} + {ep}" if row.get("epochs") else ep
    if row["status"] == "completed" and cst != "completed":
        row["status"] = cst if joined_stage == "classify" else f"{cst} (classify)"
        row["error"] = cs.get("error")
    elif row["status"] != "completed":
        row["status"] = f"{row['status']} (autoencode)"
    w = _num(cs.get("wall_seconds"))
    row["wall_seconds"] = (row["wall_seconds"] or 0) + w if w is not None else row["wall_seconds"]
    ends = [t for t in (row.get("end_time"), _num(cs.get("end_time"))) if t is not None]
    row["end_time"] = max(ends) if ends else None
    return row


def varying_keys(configs: Sequence[Dict[str, object]]) -> List[str]:
    """The settings whose values differ between ``configs`` (a key missing from one config differs too)."""
    keys = sorted(set().union(*configs)) if configs else []
    # a key only some rows have (head.* of rows that trained no head) is told apart by the stage column
    return [k for k in keys if len({_key(c[k]) for c in configs if k in c}) > 1]


def _identify(rows: List[dict]) -> None:
    """Set ``config_id``, ``varying`` and ``label`` on every row.

    ``config_id`` hashes every setting of the row (``unit_config``) and its stage, so two rows share it only
    when they are the same configuration (they may differ in seed). ``label`` is ``<model>-z<latent>`` plus
    each setting that differs between rows, except settings that merely follow a group choice already in the
    label (``model.variational`` follows ``model.name``; the settings an ``experiment=`` preset sets follow the
    preset: ``ae-z32 experiment=improved``, not its ten settings). ``preset_keys`` lists the settings a row's
    ``experiment`` stands for."""
    configs = [r["config"] for r in rows]
    vary = varying_keys(configs)
    shown, by_preset = [], []
    for k in vary:
        if k in ("model.name", "latent"):
            continue
        group = GROUP_NAME.get(k.split(".")[0])
        # implied by the group's choice: one value per choice across all rows
        if group and group != k and group in vary and _implied(configs, group, k):
            continue
        if k != "experiment" and "experiment" in vary and _implied(configs, "experiment", k):
            by_preset.append(k)
            continue
        shown.append(k)
    for r in rows:
        c = r["config"]
        r["config_id"] = hashlib.sha1(_key([r["stage"], sorted((k, _key(v)) for k, v in c.items())]).encode()
                                      ).hexdigest()[:8]
        r["varying"] = [f"{k}={_short(k, c.get(k))}" for k in shown if k in c]
        r["preset_keys"] = by_preset
        r["label"] = f"{r['model']}-z{r['latent']}" + ("".join(f" {v}" for v in r["varying"]))


def _mark_used(rows: List[dict]) -> None:
    """``used``: whether a completed row enters the table. A configuration run more than once with the same
    seed uses its newest completed run (latest ``end_time``); the others keep ``used`` false and are counted
    in ``repeats`` of the used one."""
    by = defaultdict(list)
    for r in rows:
        r["used"] = False
        r["repeats"] = 0
        if r["status"] == "completed":
            by[(r["config_id"], r["seed"])].append(r)
    for rs in by.values():
        newest = max(rs, key=lambda r: r.get("end_time") or 0)
        newest["used"] = True
        newest["repeats"] = len(rs) - 1


def probe_names(rows: Iterable[dict]) -> List[str]:
    """Every probe name (``classify.probes``) found in the rows, in first-seen order."""
    names: Dict[str, None] = OrderedDict()
    for r in rows:
        for n in r.get("probes") or {}:
            names[n] = None
    return list(names)


# --- tables ---------------------------------------------------------------------------------------

def aggregate(rows: List[dict]) -> List[dict]:
    """One row per configuration (``config_id``; rows without one group by label and stage) over completed,
    used runs: numbers as (mean, sample std) over distinct seeds, ``n`` the number of seeds. A seed that ran
    more than once counts once (its newest run, see ``_mark_used``), and ``repeats`` says so, e.g.
    "seed 0 ×2 (newest used)". Runs that did not complete are left out (listed separately)."""
    groups: Dict[tuple, List[dict]] = OrderedDict()
    for r in rows:
        if r["status"] == "completed" and r.get("used", True):
            groups.setdefault((r.get("config_id") or r["label"], r["stage"]), []).append(r)
    dup_seeds = defaultdict(int)
    for r in rows:
        if r["status"] == "completed" and not r.get("used", True):
            dup_seeds[(r.get("config_id") or r["label"], r["stage"], r["seed"])] += 1
    probes = probe_names(rows)
    out = []
    for (cid, stage), rs in groups.items():
        a = {"label": rs[0]["label"], "model": rs[0]["model"], "latent": rs[0]["latent"], "stage": stage,
             "n": len({r["seed"] for r in rs}), "seed": ",".join(str(r["seed"]) for r in rs), "status": "completed",
             "epochs": rs[0]["epochs"], "config_id": rs[0].get("config_id"), "head": rs[0].get("head"),
             "varying": rs[0].get("varying", [])}
        reps = [f"seed {r['seed']} ×{dup_seeds[(cid, stage, r['seed'])] + 1}" for r in rs
                if dup_seeds[(cid, stage, r["seed"])]]
        a["repeats"] = ", ".join(reps) + " (newest used)" if reps else ""
        for k in NUMERIC + [PROBE_PREFIX + p for p in probes]:
            vals = [_value(r, k) for r in rs]
            vals = [v for v in vals if v is not None]
            a[k] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None) if vals else None
        pcs = [r["per_class_accuracy"] for r in rs if isinstance(r.get("per_class_accuracy"), dict)]
        # every class any seed has (seeds on different class sets: each class's mean over the seeds that have it)
        a["per_class_accuracy"] = {c: float(np.mean([_num(p[c]) for p in pcs if _num(p.get(c)) is not None]))
                                   for c in class_names({"per_class_accuracy": p} for p in pcs)
                                   if any(_num(p.get(c)) is not None for p in pcs)} if pcs else None
        out.append(a)
    return out


def class_names(rows: Iterable[dict]) -> List[str]:
    """Every class of the rows' ``per_class_accuracy`` in first-seen order: runs on different class sets (other
    data, another ``data.classes``) show every class that occurs, not only the first run's."""
    names: Dict[str, None] = OrderedDict()
    for r in rows:
        for c in r.get("per_class_accuracy") or {}:
            names[str(c)] = None
    return list(names)


def _value(r: dict, k: str) -> Optional[float]:
    if k.startswith(PROBE_PREFIX):
        return ((r.get("probes") or {}).get(k[len(PROBE_PREFIX):]) or {}).get("test")
    return r.get(k)


def _fmt(k: str, v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, tuple):
        mean, std = v
        if std is None:  # one seed: the value itself (active units are a count)
            return _fmt(k, mean)
        if k in COUNTS and std == 0:  # every seed had the same count: the count, not "32.0 ± 0.0"
            return _fmt(k, mean)
        fmt = FORMATS.get(k, "{:.4f}" if k.startswith(PROBE_PREFIX) else "{}")
        return fmt.format(mean) + f" ± {fmt.format(std)}"
    if k in COUNTS and isinstance(v, (int, float)) and float(v).is_integer():
        return str(int(v))
    if k.startswith(PROBE_PREFIX) and isinstance(v, (int, float)):
        return f"{v:.4f}"
    if k in FORMATS and isinstance(v, (int, float)):
        return FORMATS[k].format(v)
    return str(v)


def _header(c: str) -> str:
    if c.startswith(PROBE_PREFIX):
        return f"test acc ({c[len(PROBE_PREFIX):]})"
    return HEADERS.get(c, c)


def markdown_table(rows: List[dict], cols: Sequence[str]) -> str:
    """A GitHub-markdown table of ``rows`` (dicts) over ``cols``; numbers formatted per column. Columns
    that are empty in every row are dropped (e.g. test KL in a sweep without VAEs); "" when nothing is left."""
    cols = [c for c in cols if any(_cell(r, c) not in (None, "") for r in rows)]
    if not rows or not cols:  # nothing to show: no table at all rather than a header of empty cells
        return ""
    head = [_header(c) for c in cols]
    body = [[_fmt(c, _cell(r, c)) for c in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def _cell(r: dict, c: str):
    if c.startswith(PROBE_PREFIX) and not isinstance(r.get(c), tuple):
        return _value(r, c)
    return r.get(c)


def _differs(rows: List[dict], best: str, last: str) -> bool:
    """True when some row's last-epoch number differs from its best-on-val one (then both are shown)."""
    def mean(v):
        return v[0] if isinstance(v, tuple) else v
    return any(mean(r.get(last)) is not None and mean(r.get(best)) is not None
               and abs(mean(r.get(last)) - mean(r.get(best))) > 1e-12 for r in rows)


def write_csv(rows: List[dict], path: Path) -> None:
    """``report.csv``: one row per run unit (repeated seeds too, with ``used`` false), ``COLUMNS`` in order,
    then one column per setting that differs between rows (``cfg:<key>``) and per probe (``probe:<name>`` test
    accuracy, ``probe:<name>:val``); numbers unformatted."""
    vary = sorted({v.split("=", 1)[0] for r in rows for v in r.get("varying", [])}
                  | {k for r in rows for k in r.get("preset_keys", [])})  # a preset's settings too
    probes = probe_names(rows)
    extra = [f"cfg:{k}" for k in vary] + [f"{PROBE_PREFIX}{p}" for p in probes] + [f"{PROBE_PREFIX}{p}:val" for p in probes]
    with _atomic(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + extra, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            rec = {k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS}
            for k in vary:
                v = r.get("config", {}).get(k)
                rec[f"cfg:{k}"] = "" if v is None else _short("", v)
            for p in probes:
                res = (r.get("probes") or {}).get(p) or {}
                rec[f"{PROBE_PREFIX}{p}"] = "" if res.get("test") is None else res["test"]
                rec[f"{PROBE_PREFIX}{p}:val"] = "" if res.get("val") is None else res["val"]
            w.writerow(rec)


# --- figures --------------------------------------------------------------------------------------

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


def _savefig(fig, path: Path, **kw) -> None:
    """``fig.savefig`` as a PNG at 100 dpi, atomically (``_atomic``); closes the figure whatever happens."""
    try:
        with _atomic(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, **kw)
    finally:
        _plt().close(fig)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def _series(run_dir: Optional[str], split: str, key: str):
    if not run_dir:
        return [], []
    pts = sorted((int(m["epoch"]), m[key]) for m in runs.read_metrics(Path(run_dir))
                 if m.get("split") == split and isinstance(m.get(key), (int, float)))
    return [p[0] for p in pts], [p[1] for p in pts]


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


def plot_curves(rows: List[dict], out: Path) -> List[Path]:
    """val_psnr.png, val_mse.png (autoencode), val_accuracy.png and ce.png (classify; train and val panels)
    against epoch (integer ticks): one colour/line style per configuration (the row label), one thin line per
    seed, the legend outside the axes."""
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    labels = list(OrderedDict((r["label"], None) for r in rows))
    sty = styles(labels)
    written = []
    specs = [("val_psnr.png", "run_dir", [("val", "psnr", "val PSNR (dB)")]),
             ("val_mse.png", "run_dir", [("val", "mse", "val MSE (per pixel)")]),
             ("val_accuracy.png", "classify_dir", [("val", "accuracy", "val accuracy")]),
             ("ce.png", "classify_dir", [("train", "loss", "train cross-entropy (nats)"),
                                         ("val", "loss", "val cross-entropy (nats)")])]
    for name, dir_key, panels in specs:
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
        drawn, used = 0, OrderedDict()
        done = set()
        for r in rows:
            d = r.get(dir_key)
            if not d or d in done:  # an encoder shared by several heads is drawn once
                continue
            done.add(d)
            for ax, (split, key, _) in zip(axes[0], panels):
                x, y = _series(d, split, key)
                if x:
                    ax.plot(x, y, lw=1.3, marker="." if len(x) < 20 else None, **sty[r["label"]])
                    drawn += 1
                    used[r["label"]] = None
        if not drawn:
            plt.close(fig)
            continue
        for ax, (_, _, ylabel) in zip(axes[0], panels):
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        handles = [Line2D([], [], lw=1.5, label=lab, **sty[lab]) for lab in used]
        _legend(fig, handles, len(handles))
        fig.tight_layout()
        _savefig(fig, out / name, bbox_inches="tight")
        written.append(out / name)
    return written


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


def _last_image(d: Path, prefix: str) -> Optional[Path]:
    files = sorted((d / "images").glob(f"{prefix}_e*.png"))
    return files[-1] if files else None


def _epoch_of(p: Path) -> str:
    return p.stem.split("_e")[-1].lstrip("0") or "0"


def _strips_figure(strips: List[tuple], title: str, path: Path) -> Path:
    """One image strip per subplot row (label above it), at one screen pixel per image pixel."""
    plt = _plt()
    w = max(s[1].shape[1] for s in strips)
    heights = [s[1].shape[0] / 100 + 0.3 for s in strips]
    fig, axes = plt.subplots(len(strips), 1, figsize=(max(6.0, w / 100), 0.5 + sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (label, strip) in zip(axes[:, 0], strips):
        ax.imshow(strip, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(label, loc="left", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _savefig(fig, path)
    return path


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
    from . import images

    strips = []
    for label, d in _ae_runs(rows):
        s = images.read_samples(d)
        if s is None:
            continue
        strips.append((f"{label} (epoch {s['epoch']}; {s['source']})", images.strip(s["samples"][:8])))
    if not strips:
        return None
    return _strips_figure(strips, "8 decoded samples per run (same draws in every run)", out / "prior_samples.png")


def recon_rows(img: np.ndarray) -> Optional[tuple]:
    """Split a ``recon_eNNN.png`` (``images.save_images``: rows of RECON_COLS originals above
    their reconstructions, RECON_PAD pixels apart) into (originals, reconstructions) of its first row pair;
    None for a grid of another layout (runs written before the layout existed)."""
    from .images import RECON_COLS, RECON_PAD

    h, w = img.shape[:2]
    tile = (w - RECON_PAD) / RECON_COLS - RECON_PAD
    if tile < 1 or not float(tile).is_integer():
        return None
    step = int(tile) + RECON_PAD
    n_rows = (h - RECON_PAD) / step
    if not float(n_rows).is_integer() or n_rows < 2 or int(n_rows) % 2:
        return None
    return img[:step + RECON_PAD], img[step:2 * step + RECON_PAD]


def plot_reconstructions(rows: List[dict], out: Path) -> Optional[Path]:
    """reconstructions.png: the same class-balanced test images (top) and every autoencode run's
    reconstruction of them (one row per run, from its last ``images.read_reconstructions``)."""
    from . import images

    strips = []
    for label, d in _ae_runs(rows):
        r = images.read_reconstructions(d)
        if r is None:
            continue
        n = min(images.RECON_COLS, len(r["originals"]))
        if not strips:
            strips.append(("test images (a fixed class-balanced set, the same in every run)",
                           images.strip(r["originals"][:n])))
        strips.append((f"{label} (epoch {r['epoch']})", images.strip(r["reconstructions"][:n])))
    if not strips:
        return None
    return _strips_figure(strips, "reconstructions of the same test images, one row per run",
                          out / "reconstructions.png")


def plot_per_class(agg: List[dict], out: Path) -> Optional[Path]:
    """per_class_accuracy.png: test accuracy per class (columns: every class of any configuration) for every
    configuration with a classifier (rows; mean over seeds) as a heat map; values printed in the cells up to 20
    classes; a class a configuration's data does not have is a grey cell."""
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
    if len(classes) <= 20:
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


# --- the command ----------------------------------------------------------------------------------

def _sweep_root(run_dir: Path) -> Optional[Path]:
    """The sweep dir holding ``run_dir`` (the nearest parent with multirun.yaml), or None for a single run."""
    for p in [run_dir, *run_dir.parents][:4]:
        if (p / "multirun.yaml").is_file():
            return p
    return None


def commands(rows: List[dict]) -> List[str]:
    """The command line of every sweep (``multirun.yaml``'s task overrides, and those of the earlier sweeps into
    the same sweep dir, ``multirun.NNN.yaml``) or single run (``.hydra/overrides.yaml``) that wrote the rows' run
    dirs, oldest first, each once, as shell-quoted strings."""
    from omegaconf import OmegaConf

    seen: Dict[Path, None] = OrderedDict()
    singles: Dict[Path, None] = OrderedDict()
    for r in rows:
        for d in (r.get("run_dir"), r.get("classify_dir")):
            if not d:
                continue
            d = Path(d)
            root = _sweep_root(d)
            if root is not None:
                seen[root] = None
            else:
                job = d.parent if d.name in ("autoencode", "classify") and (d.parent / ".hydra").is_dir() else d
                singles[job] = None
    from .locks import sweep_record_archives

    out = []
    for root, multi in [(p, True) for p in seen] + [(p, False) for p in singles]:
        # a sweep dir swept into more than once keeps each earlier record as multirun.NNN.yaml (embclf.locks)
        records = [*sweep_record_archives(root), root / "multirun.yaml"] if multi else [root / ".hydra" / "overrides.yaml"]
        for i, path in enumerate(records):
            try:
                task = list(OmegaConf.load(path).hydra.overrides.task) if multi else list(OmegaConf.load(path))
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
           "each run's `.hydra/overrides.yaml`):", "", "```bash",
           *(cmds or ["(unknown: no multirun.yaml or .hydra/overrides.yaml found)"]), "```", ""]
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


def report(paths: Sequence[Path], out: Optional[Path] = None, figures: bool = True) -> Dict[str, object]:
    """Write report.csv, report.md and figures/ for the runs under ``paths`` into ``out``.

    Everything is computed first and written last, each file atomically. Results are readable from anywhere:
    when ``out`` cannot be written (a read-only archive, a colleague's results, a full disk) the writing stops
    at the first failure, leaves no partial file, and ``unwritten`` says which file and why; the rest of the
    result (the table above all) is complete.

    Returns {"rows": per-run rows, "agg": one row per configuration, "table": the markdown table printed (or,
    when no run has completed, one sentence saying so), "not_completed": rows that did not complete (failed,
    running, unreadable, ...), "files": paths written, "out": ``out``, "unwritten": None, or (path, why) of
    the write that failed}. Raises ``ReportError`` (see ``collect``).
    """
    paths = [Path(p) for p in paths]
    rows = collect(paths)
    if out is None:
        out = paths[0] if len(paths) == 1 else Path(os.path.commonpath([p.resolve() for p in paths]))
    out = Path(out)
    agg = aggregate(rows)
    probes = [PROBE_PREFIX + p for p in probe_names(rows)]
    cols = ["label", "stage", "seed", "n", "repeats", "epochs", "test_mse", "test_psnr"]
    cols += ["final_test_psnr"] if _differs(agg, "test_psnr", "final_test_psnr") else []
    cols += ["test_kl", "active_units", "val_accuracy", "test_accuracy"]
    cols += ["final_test_accuracy"] if _differs(agg, "test_accuracy", "final_test_accuracy") else []
    cols += probes + ["wall_seconds"]
    if all(a["n"] == 1 for a in agg):
        cols.remove("n")
    table = markdown_table(agg, cols) if agg else no_completed_run(rows)
    bad = [r for r in rows if r["status"] != "completed"]
    res = {"rows": rows, "agg": agg, "table": table, "not_completed": bad, "files": [], "out": out,
           "unwritten": None}
    try:
        res["files"] = _write(paths, out, rows, agg, table, bad, figures)
    except OSError as e:  # read-only, full, permissions: the table is still the result
        res["unwritten"] = (Path(e.filename) if e.filename else out, e.strerror or str(e))
    return res


def no_completed_run(rows: List[dict]) -> str:
    """What the table says when no run has completed (all running, failed, unreadable, ...): one sentence
    with how many runs are in each state, e.g. "No run has completed yet (2 running); ...". """
    counts: Dict[str, int] = OrderedDict()
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return (f"No run has completed yet ({', '.join(f'{n} {st}' for st, n in counts.items())}); "
            "every run is listed below.")


def _write(paths: List[Path], out: Path, rows: List[dict], agg: List[dict], table: str, bad: List[dict],
           figures: bool) -> List[Path]:
    """report.csv, figures/ and report.md into ``out`` (see ``report``); returns the paths written. Raises
    ``OSError`` (its ``filename`` the file or directory) at the first write that fails."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.csv", out / "report.md"]
    write_csv(rows, files[0])
    figs: List[Path] = []
    if figures:
        fig_dir = out / "figures"
        fig_dir.mkdir(exist_ok=True)
        used = [r for r in rows if r.get("used") or r["status"] not in ("completed", UNREADABLE)]
        figs = plot_curves(used, fig_dir)
        figs += [p for p in (plot_vs_latent(agg, fig_dir), plot_prior_samples(rows, fig_dir),
                             plot_reconstructions(rows, fig_dir), plot_per_class(agg, fig_dir)) if p]
    md = [f"# embclf report: {', '.join(str(p) for p in paths)}", ""] + preamble(rows, agg)
    md += ["## Results", ""]
    if agg:
        md += [f"{len(agg)} configurations from {len(rows)} runs ({sum(r['status'] == 'completed' for r in rows)} "
               "completed). Per-run numbers: report.csv.", ""]
    md += [table, ""]
    pcs = [a for a in agg if a.get("per_class_accuracy")]
    classes = class_names(pcs)
    if pcs and len(classes) <= 20:
        pc_rows = [{"label": a["label"], **{f"pc:{c}": a["per_class_accuracy"].get(c) for c in classes}} for a in pcs]
        FORMATS.update({f"pc:{c}": "{:.2f}" for c in classes})
        HEADERS.update({f"pc:{c}": c for c in classes})
        missing = any(c not in a["per_class_accuracy"] for a in pcs for c in classes)
        md += ["## Test accuracy per class", "", "(best-on-val head, mean over seeds"
               + ("; blank: the class is not in that configuration's data)" if missing else ")"), "",
               markdown_table(pc_rows, ["label"] + [f"pc:{c}" for c in classes]), ""]
    elif pcs:
        md += ["## Test accuracy per class", "", f"{len(classes)} classes: see "
               "figures/per_class_accuracy.png (the numbers are in each classify run's summary.json).", ""]
    if bad:
        md += ["## Not completed", "", markdown_table(
            [{**r, "error": (r.get("error") or "").strip().splitlines()[-1][:160] if r.get("error") else ""} for r in bad],
            ["label", "seed", "stage", "status", "epochs", "error", "run_dir"]), ""]
    if figs:
        md += ["## Figures", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figs] + [""]
    with _atomic(files[1]) as tmp:
        tmp.write_text("\n".join(md))
    return files + figs


HELP_EPILOG = """\
writes (into --out, default: the PATH):
  report.md    what was run (sweep commands, data, epochs, heads, settings that differ), the table,
               per-class accuracy, runs that did not complete, the figures
  report.csv   every run, every field (repeated seeds too: column `used`)
  figures/     val_psnr, val_mse, val_accuracy, ce (per epoch), vs_latent, prior_samples,
               reconstructions, per_class_accuracy (.png)

rows: one per configuration; any setting that differs between runs (model, latent, data.*, autoencode.*,
head, head.*, classify.*, model.* options) separates rows and appears in the row label; only distinct
seeds are averaged (n = seeds); a seed run more than once counts once (its newest completed run).

read-only results (an archive, a colleague's sweep): the table is printed all the same, then one line
saying where the files could not be written; --out DIR writes them elsewhere.

exit status: 0 table printed (also when the PATH itself cannot be written); 1 an explicit --out DIR
could not be written (table printed); 2 a PATH does not exist or holds no run dirs.

examples:
  python -m embclf.report outputs/2026-11-30_10-00-00_3fa9c1          # one sweep
  python -m embclf.report outputs/sweepA outputs/sweepB --out reports/ab   # two sweeps, one table
  python -m embclf.report outputs                                      # everything under outputs/
"""


def main(argv: Optional[Iterable[str]] = None) -> int:
    """CLI entry point (see module docstring). Returns the exit status."""
    ap = argparse.ArgumentParser(
        prog="python -m embclf.report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Summarise finished embclf runs: one row per configuration (mean ± std over distinct seeds), "
                    "the sweep commands, and figures.\nReads every run dir (a dir with summary.json) under each "
                    "PATH; never modifies or trains anything.",
        epilog=HELP_EPILOG)
    ap.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="sweep dir, run dir, or output_dir")
    ap.add_argument("--out", type=Path, default=None, help="where to write report.md/.csv and figures/ "
                    "(default: the PATH, or the common parent of several)")
    ap.add_argument("--no-figures", action="store_true", help="table only (no matplotlib)")
    args = ap.parse_args(None if argv is None else list(argv))
    if args.out is not None and args.out.exists() and not args.out.is_dir():  # before any run dir is read
        print(f"error: --out {args.out} is a file; --out names the folder that receives report.md, report.csv and "
              "figures/ (it is created if missing).", file=sys.stderr)
        return 2
    try:
        res = report(args.paths, args.out, figures=not args.no_figures)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["table"])
    for r in res["not_completed"]:
        why = f": {r['error']}" if r["status"] == UNREADABLE else ""
        print(f"{r['status']}: {r['label']} seed {r['seed']} ({r.get('classify_dir') or r['run_dir']}){why}")
    if res["unwritten"] is not None:
        path, why = res["unwritten"]
        print(f"could not write the report files into {res['out']} ({why}: {path}); the table above is complete. "
              "--out DIR writes report.md, report.csv and figures/ elsewhere.", file=sys.stderr)
        # the table is the result; a write asked for by --out that did not happen is an error
        return 1 if args.out is not None else 0
    print(f"wrote {res['files'][1]} , report.csv and {len(res['files']) - 2} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
