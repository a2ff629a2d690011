"""``embclf.report.load``: the runs under some paths as one pandas DataFrame, one row per run dir, for a notebook."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import List, Union

import pandas as pd

from .. import identity, liveness, references
from .rows import UNREADABLE, flatten, read_config, read_runs

# columns first in every frame (then the identity keys, then the summary's fields)
LEAD = ["run_dir", "stage", "status", "name", "config_id", "encoder_run_dir"]


def _config_id(ident: dict) -> str:
    """8 hex digits of the run's identity without its seed (nor its encoder's seed): runs with equal
    ``config_id`` are the same experiment at different seeds, what a notebook groups by."""
    ident = json.loads(json.dumps(ident))  # a copy, then the seeds out
    ident.pop("seed", None)
    if isinstance(ident.get("encoder"), dict):
        ident["encoder"].pop("seed", None)
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _nullable_ints(df: pd.DataFrame, records: List[dict]) -> pd.DataFrame:
    """``df`` with every column whose values are all integers where present (``encoder.latent``, ``n_train``,
    ``best_epoch``, ...) but missing in some rows as pandas' nullable ``Int64`` (missing: ``pd.NA``) instead of
    the float64 with NaN that pandas makes of them; columns without a missing value keep int64. Booleans are
    not integers here (``git_dirty`` stays a bool/object column)."""
    kinds: dict = {}  # column -> True while every value seen is an int (None / missing do not count)
    for rec in records:
        for k, v in rec.items():
            if v is None or kinds.get(k) is False:
                continue
            kinds[k] = isinstance(v, int) and not isinstance(v, bool)
    for k, is_int in kinds.items():
        if is_int and df[k].isna().any():
            df[k] = pd.array([None if pd.isna(v) else int(v) for v in df[k]], dtype="Int64")
    return df


def load(*paths: Union[str, Path]) -> pd.DataFrame:
    """Every run dir under ``paths`` (sweep dirs, job dirs, run dirs, a whole ``outputs/``) as one row of a
    DataFrame. Nothing is trained or written; only summary.json and config.yaml are read.

    Columns:

    - ``run_dir`` (str, resolved), ``stage`` ("autoencode" | "classify"), ``status`` (the summary's status,
      a "running" one checked with ``embclf.liveness``: "interrupted", "killed (out of memory)", ...;
      "unreadable" for a run dir whose summary.json or config.yaml cannot be read, ``error`` saying why),
      ``name`` (the readable part of the run dir name, ``identity.readable`` of its overrides, e.g.
      ``model=vae,latent=64``), ``config_id`` (8 hex digits of the identity without the seed: equal ids are
      one experiment at different seeds), ``encoder_run_dir`` (a classify run's encoder run dir, else None);
    - every identity key of the run's stage (``embclf.identity.identity``, dotted: ``model.name``, ``latent``,
      ``seed``, ``data.root``, ``autoencode.lr``, ``head.hidden``, ...; a classify run's encoder under
      ``encoder.``: ``encoder.model.name``, ``encoder.latent``, ...);
    - every field of summary.json, nested dicts flattened with dots (``test_psnr``, ``test_accuracy``,
      ``per_class_accuracy.cat``, ``probes.linear.test_accuracy``, ``wall_seconds``, ...); lists (the
      confusion matrix, attempt times) stay one cell. Where a summary field and an identity key share a name
      (``seed``, ``latent``, ``stage``) the values are the run's own, the same. A column of integers
      (``latent``, ``encoder.latent``, ``n_train``, ...) that some rows lack is pandas' nullable ``Int64``
      (missing: ``pd.NA``), not float64 with NaN.

    Units as the summary stores them: MSE per pixel on [0, 1] images, PSNR in dB, KL in nats per image,
    accuracies in [0, 1], times in seconds (``end_time``: unix seconds). ``df.attrs["identity_keys"]`` lists
    the identity columns, so ``df.groupby([k for k in df.attrs["identity_keys"] if k != "seed"])`` groups by
    experiment.

    Raises ``embclf.report.ReportError`` when a path does not exist or holds no run dir.
    """
    dirs, configs, unreadable = read_runs([Path(p) for p in paths])
    records: List[dict] = []
    ident_keys: dict = {}
    for d, s in dirs.items():
        stage, cfg = s["stage"], configs[d]
        enc_dir = references.encoder_run_of(d, s) if stage == "classify" else None
        status = liveness.status_text(s)  # a "running" one checked: asked once per run
        rec = {"run_dir": str(d), "stage": stage, "status": status,
               "name": identity.readable(s.get("overrides") or [], cfg),
               "encoder_run_dir": str(enc_dir.resolve()) if enc_dir is not None else None}
        if cfg is not None:
            enc_cfg = None
            if enc_dir is not None:
                enc_dir = enc_dir.resolve()
                enc_cfg = configs.get(enc_dir) if enc_dir in configs else read_config(enc_dir)[0]
            try:
                ident = identity.identity(cfg, stage, encoder=enc_cfg or cfg)
            except Exception:  # noqa: BLE001 (a config the identity cannot be computed from: the row stays)
                ident = None
            if ident is not None:
                rec["config_id"] = _config_id(ident)
                flat = flatten(identity.with_added(ident, stage))
                ident_keys.update(dict.fromkeys(flat))
                rec.update(flat)
        for k, v in flatten(s).items():
            rec.setdefault(k, v)
        rec["status"] = status  # the checked status, not the recorded one
        records.append(rec)
    for d, why in unreadable.items():
        records.append({"run_dir": str(d), "stage": d.name if d.name in ("autoencode", "classify") else None,
                        "status": UNREADABLE, "error": why})
    df = _nullable_ints(pd.DataFrame.from_records(records), records)
    df = df[[c for c in LEAD if c in df.columns] + [c for c in df.columns if c not in LEAD]]
    df.attrs["identity_keys"] = [k for k in ident_keys if k in df.columns]
    return df

