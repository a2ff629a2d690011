"""Finding runs and the references between them: every run dir under a folder, the completed autoencode run a
classify run needs (by identity), and relocatable references (a classify run's ``encoder_run`` /
``encoder_checkpoint``, recorded relative to the run so a copied or moved sweep still finds its own files).
Plain files only: no torch, so the report can use it cheaply.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

from omegaconf import DictConfig

from . import identity
from .runs import SUMMARY, read_summary, stored_identity
from .errors import EmbclfError

log = logging.getLogger(__name__)


# --- finding runs ---------------------------------------------------------------------------------

def iter_run_dirs(root: Path) -> Iterator[Path]:
    """Every directory under ``root`` (inclusive) holding a ``summary.json``."""
    root = Path(root)
    if (root / SUMMARY).is_file():
        yield root
    if root.is_dir():
        for p in sorted(root.rglob(SUMMARY)):
            # not submitit's files, and not a run's evaluations (RUN_DIR/eval/<name>/summary.json: not runs)
            if p.parent != root and ".submitit" not in p.parts and p.parent.parent.name != "eval":
                yield p.parent


def find_encoder_run(cfg: DictConfig, output_dir: Path) -> Optional[Path]:
    """Newest completed autoencode run under ``output_dir`` whose identity equals ``cfg``'s autoencode
    identity (``identity.identity``), or None."""
    want = identity.identity(cfg, "autoencode")
    best, best_t = None, -1.0
    for d in iter_run_dirs(output_dir):
        s = read_summary(d)
        if not s or s.get("stage") != "autoencode" or s.get("status") != "completed":
            continue
        try:
            if stored_identity(d, "autoencode") != want:
                continue
        except EmbclfError:
            continue
        t = float(s.get("end_time") or 0)
        if t > best_t:
            best, best_t = d, t
    return best


# --- references between runs: relocatable results --------------------------------------------------------
#
# A classify run names the encoder it was trained on (summary.json ``encoder_run``, ``encoder_checkpoint``).
# An absolute path there would tie a copied or moved sweep to its original place: the copy would read the
# original's encoder (or find it gone). So a reference inside the tree that travels with the run is recorded
# relative to the run dir, and read against the run dir's current location (``recorded_path``).

def sweep_dir_of(run_dir: Path) -> Optional[Path]:
    """The sweep dir holding ``run_dir``: the nearest of it and its three parents with Hydra's
    ``multirun.yaml`` (as the report finds it), or None for a single run."""
    run_dir = Path(run_dir)
    for p in [run_dir, *run_dir.parents][:4]:
        if (p / "multirun.yaml").is_file():
            return p
    return None


def own_tree(run_dir: Path) -> Path:
    """The directory a copy of ``run_dir`` must at least include to be self-contained: its sweep dir, or for a
    single run its job dir (a ``stage=all`` job's dir for its ``classify/`` run, else the run dir itself)."""
    run_dir = Path(run_dir)
    sweep = sweep_dir_of(run_dir)
    if sweep is not None:
        return sweep
    if run_dir.name == "classify" and (run_dir.parent / "autoencode").is_dir():
        return run_dir.parent
    return run_dir


def _reference(run_dir: Path, target: Path, output_dir: Optional[Path]) -> Tuple[str, Optional[str]]:
    """(what to record for ``target``, its absolute fallback or None): the rule of ``reference_fields``."""
    run_dir, target = Path(run_dir).resolve(), Path(target).resolve()
    own = own_tree(run_dir).resolve()
    out = Path(output_dir).expanduser().resolve() if output_dir else None
    inside = target.is_relative_to(own)
    same_output = out is not None and run_dir.is_relative_to(out) and target.is_relative_to(out)
    if not (inside or same_output):  # elsewhere on this machine: only the absolute path can find it
        return str(target), None
    return Path(os.path.relpath(target, run_dir)).as_posix(), None if inside else str(target)


def reference_fields(run_dir: Path, output_dir: Optional[Path], **targets: Path) -> Dict[str, str]:
    """Summary fields recording other runs' paths (``encoder_run=..., encoder_checkpoint=...``) so that the
    results stay valid when their tree is copied or moved.

    - ``key``: the target relative to ``run_dir`` (a POSIX path such as ``../autoencode`` or
      ``../model=ae,latent=8,stage=autoencode``) when it lies in the run's own tree (``own_tree``: the sweep
      dir; a single run's job dir) or, like the run, under ``output_dir``; otherwise its absolute path.
    - ``key_absolute``: the absolute path, only for a relative target outside the run's own tree (e.g. an
      encoder in an earlier sweep of the same output dir): ``recorded_path`` falls back to it when the run's
      sweep was copied without that other sweep. A target inside the own tree has no absolute path recorded, so
      a copy never reads the original's files.
    """
    fields: Dict[str, str] = {}
    for key, target in targets.items():
        fields[key], fallback = _reference(run_dir, target, output_dir)
        if fallback is not None:
            fields[f"{key}_absolute"] = fallback
    return fields


def recorded_path(run_dir: Path, summary: dict, key: str) -> Optional[Path]:
    """The path a run's summary records under ``key`` (``encoder_run``, ``encoder_checkpoint``), as it is now.

    A relative record is resolved against ``run_dir``'s current location (wherever the tree was copied or
    moved). Only when nothing exists there is ``key_absolute`` used (a target outside the copied tree; a
    warning says so). An absolute record (a target outside the output tree, or a summary written before
    references were relative) is returned as it is. Returns None when ``key`` is not recorded; the returned
    path may not exist (callers say the target is gone)."""
    rec, fallback = summary.get(key), summary.get(f"{key}_absolute")
    if not rec:
        return Path(fallback) if fallback else None
    p = Path(rec)
    if p.is_absolute():
        return p
    here = (Path(run_dir).resolve() / p).resolve()
    if here.exists() or not fallback or not Path(fallback).exists():
        return here
    log.warning("%s: %s is not at %s relative to this run (%s); reading it from where it was recorded, %s",
                run_dir, key, rec, here, fallback)
    return Path(fallback)


def encoder_run_of(run_dir: Path, summary: dict) -> Optional[Path]:
    """The run dir of the encoder a classify run (``run_dir``, its ``summary``) was trained on, or None when
    its summary names none (``recorded_path`` of ``encoder_run``)."""
    return recorded_path(run_dir, summary, "encoder_run")


def encoder_checkpoint_of(run_dir: Path, summary: dict) -> Optional[Path]:
    """The encoder checkpoint a classify run was trained on: its ``encoder_checkpoint`` (``recorded_path``),
    else ``checkpoints/best.pt`` of its ``encoder_run``; None when neither is recorded."""
    p = recorded_path(run_dir, summary, "encoder_checkpoint")
    if p is None:
        run = encoder_run_of(run_dir, summary)
        p = run / "checkpoints" / "best.pt" if run is not None else None
    return p
