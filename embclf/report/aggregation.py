"""Aggregate: one row per configuration, mean ± sample std over distinct seeds (pandas groupby)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterable, List, Optional

import numpy as np
import pandas as pd

from .rows import NUMERIC, PROBE_PREFIX, _num, probe_names


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


def aggregate(rows: List[dict]) -> List[dict]:
    """One row per configuration (``config_id``; rows without one group by label and stage) over completed,
    used runs: numbers as (mean, sample std) over distinct seeds, ``n`` the number of seeds. A seed that ran
    more than once counts once (its newest run, see ``rows._mark_used``), and ``repeats`` says so, e.g.
    "seed 0 ×2 (newest used)". Runs that did not complete are left out (listed separately).

    Missing numbers (None, NaN of a diverged run) are left out of a mean; std is None for one value. Per-class
    accuracy is each class's mean over the seeds that have it (seeds on different class sets)."""
    done = [r for r in rows if r["status"] == "completed"]
    if not done:
        return []
    nums = NUMERIC + [PROBE_PREFIX + p for p in probe_names(rows)]
    keys = pd.DataFrame({"group": [str(r.get("config_id") or r["label"]) for r in done],
                         "stage": [r["stage"] for r in done],
                         "seed": pd.Series([r["seed"] for r in done], dtype=object),  # ints stay ints
                         "used": [bool(r.get("used", True)) for r in done]})
    # a seed that ran more than once: how many runs the unused ones add, per (configuration, seed)
    dups = keys[~keys["used"]].groupby(["group", "stage", "seed"], sort=False, dropna=False).size()
    used = keys["used"].to_numpy()
    keys = keys[used].reset_index(drop=True)
    kept = [r for r, u in zip(done, used) if u]
    values = pd.DataFrame({k: np.array([_value(r, k) for r in kept], dtype=float) for k in nums})
    by = [keys["group"], keys["stage"]]
    grouped = values.groupby(by, sort=False, dropna=False)
    # as dicts once: a DataFrame lookup per cell costs ~0.5 ms, thousands of them at a few hundred configurations
    mean, std, count = (f.to_dict("index") for f in (grouped.mean(), grouped.std(ddof=1), grouped.count()))
    pcs = pd.DataFrame.from_records([{str(c): _num(v) for c, v in r["per_class_accuracy"].items()}
                                     if isinstance(r.get("per_class_accuracy"), dict) else {} for r in kept],
                                    index=range(len(kept)))
    pc_mean = (pcs.astype(float).groupby(by, sort=False, dropna=False).mean().to_dict("index")
               if len(pcs.columns) else {})
    out = []
    for (group, stage), idx in keys.groupby(["group", "stage"], sort=False, dropna=False).groups.items():
        members = [kept[i] for i in idx]
        first = members[0]
        seeds = [r["seed"] for r in members]
        a = {"label": first["label"], "model": first["model"], "latent": first["latent"], "stage": stage,
             "n": len(set(seeds)), "seed": ",".join(str(s) for s in seeds), "status": "completed",
             "epochs": first["epochs"], "config_id": first.get("config_id"), "head": first.get("head"),
             "varying": first.get("varying", [])}
        reps = [f"seed {s} ×{dups[(group, stage, s)] + 1}" for s in seeds if (group, stage, s) in dups.index]
        a["repeats"] = ", ".join(reps) + " (newest used)" if reps else ""
        m, sd, n = mean[(group, stage)], std[(group, stage)], count[(group, stage)]
        for k in nums:
            a[k] = None if n[k] == 0 else (float(m[k]), float(sd[k]) if n[k] > 1 else None)
        have = [r["per_class_accuracy"] for r in members if isinstance(r.get("per_class_accuracy"), dict)]
        pc = pc_mean.get((group, stage), {})
        a["per_class_accuracy"] = None if not have else {
            c: float(pc[c]) for c in class_names({"per_class_accuracy": p} for p in have) if not np.isnan(pc[c])}
        out.append(a)
    return out
