"""Aggregate: one row per configuration, mean ± sample std over distinct seeds (pandas groupby)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterable, List, Optional

import numpy as np
import pandas as pd

from .rows import NUMERIC, PROBE_PREFIX, probe_names


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


def _mean_std(col: pd.Series):
    """(mean, sample std) of a group's non-missing values; std None for one value; None for no value."""
    v = col.dropna()
    if v.empty:
        return None
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def aggregate(rows: List[dict]) -> List[dict]:
    """One row per configuration (``config_id``; rows without one group by label and stage) over completed,
    used runs: numbers as (mean, sample std) over distinct seeds, ``n`` the number of seeds. A seed that ran
    more than once counts once (its newest run, see ``rows._mark_used``), and ``repeats`` says so, e.g.
    "seed 0 ×2 (newest used)". Runs that did not complete are left out (listed separately).

    Per-class accuracy is the mean over the seeds that have the class (seeds on different class sets)."""
    done = [r for r in rows if r["status"] == "completed"]
    if not done:
        return []
    probes = [PROBE_PREFIX + p for p in probe_names(rows)]
    nums = NUMERIC + probes
    df = pd.DataFrame({
        "group": [str(r.get("config_id") or r["label"]) for r in done],
        "stage": [r["stage"] for r in done],
        "seed": pd.Series([r["seed"] for r in done], dtype=object),  # ints stay ints, None stays None
        "used": [bool(r.get("used", True)) for r in done],
        "i": range(len(done)),  # the row itself, for the fields taken from a group's first row
        # None (not measured) is NaN, missing like a diverged run's NaN: the mean is over the values there are
        **{k: np.array([_value(r, k) for r in done], dtype=float) for k in nums},
    })
    # a seed that ran more than once: how many runs the unused ones add, per (configuration, seed)
    dups = df[~df["used"]].groupby(["group", "stage", "seed"], sort=False, dropna=False).size()
    used = df[df["used"]]
    out = []
    for (_, stage), g in used.groupby(["group", "stage"], sort=False, dropna=False):
        first = done[int(g["i"].iloc[0])]
        a = {"label": first["label"], "model": first["model"], "latent": first["latent"], "stage": stage,
             "n": len(set(g["seed"].tolist())), "seed": ",".join(str(s) for s in g["seed"].tolist()), "status": "completed",
             "epochs": first["epochs"], "config_id": first.get("config_id"), "head": first.get("head"),
             "varying": first.get("varying", [])}
        key = g["group"].iloc[0]
        reps = [f"seed {s} ×{dups[(key, stage, s)] + 1}" for s in g["seed"].tolist() if (key, stage, s) in dups.index]
        a["repeats"] = ", ".join(reps) + " (newest used)" if reps else ""
        a.update({k: _mean_std(g[k]) for k in nums})
        pcs = [done[i]["per_class_accuracy"] for i in g["i"] if isinstance(done[i].get("per_class_accuracy"), dict)]
        a["per_class_accuracy"] = _per_class_mean(pcs)
        out.append(a)
    return out


def _per_class_mean(pcs: List[dict]) -> Optional[Dict[str, float]]:
    """Each class's mean accuracy over the per-class dicts that have a finite number for it (first-seen class
    order); None when there are none."""
    if not pcs:
        return None
    m = pd.DataFrame.from_records([{str(c): v for c, v in p.items()} for p in pcs])
    m = m.apply(pd.to_numeric, errors="coerce").replace([np.inf, -np.inf], np.nan)
    means = m.mean(skipna=True)
    return {c: float(means[c]) for c in class_names({"per_class_accuracy": p} for p in pcs) if not np.isnan(means[c])}
