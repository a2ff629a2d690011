"""A run is a directory. This module owns its layout, atomic writes, checkpoints and lookups.

Layout of one run dir (one stage of one job)::

    config.yaml        fully resolved config (what lookups compare)
    .hydra/            as Hydra writes it (overrides.yaml keeps the full overrides)
    embclf.log         the job's log
    metrics.jsonl      one JSON object per epoch and split
    summary.json       status + headline numbers (see docs/run-dirs.md)
    checkpoints/       last.pt (every epoch), best.pt (best on val)
    images/            PNGs
    embeddings.pt      classify only: float32 [N, latent] per split, with labels
    wandb_run_id       the wandb run's id: every attempt of a resumed run logs to that one run
    eval/<name>/       python -m embclf.evaluate: per_sample.csv, summary.json (no "stage" key), worst.png
    export/            python -m embclf.embed: embeddings_<split>.<npz|csv|pt>

Every file is written to a temporary name and renamed into place, so a killed job never leaves a
half-written checkpoint or summary behind, and data already written is never truncated. A run killed at
any instant and started again with the same command continues from ``checkpoints/last.pt`` and ends with
exactly the metrics of an uninterrupted run (docs/troubleshooting.md, "Resume").
"""
from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from . import faults, identity, liveness
from .errors import EmbclfError

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
# The format of a run dir's own records (summary.json and identity.json carry it as "format"; fields in
# docs/run-dirs.md). A change that this version would misread bumps it; a record without the field is format 1,
# the first. A reader refuses a run dir of a newer format (``check_format``) instead of guessing at it.
FORMAT = 1


class WriteError(EmbclfError):
    """A file of a run could not be written (disk full, file-size limit, permissions); ``reason`` says which.
    The file's previous version, if any, is unchanged and no temporary file is left."""


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file renamed over it: readers see the old or the new file, never a
    partial one. Raises ``WriteError`` naming ``path`` when the write fails (the old file stays)."""
    path = Path(path)
    # unique per call: a signal handler may save while another save of the same file is in progress
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{time.monotonic_ns()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _write_error(path: Path, e: OSError) -> WriteError:
    kind = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EFBIG: "the file-size limit (ulimit -f) is reached", errno.EACCES: "permission denied",
            errno.EROFS: "the file system is read-only"}.get(e.errno, e.strerror or str(e))
    err = WriteError(
        f"cannot write {path}: {kind}. Nothing half-written was left behind and the previous {path.name} (if any) "
        "is unchanged. Free space (or fix the limit/permissions) and run the same command again: the run resumes "
        "from its last checkpoint.")
    err.reason = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "write failed"
    err.kind = kind  # what went wrong, in words ("the disk is full")
    return err


_cache_warned: set = set()


def write_cache(obj: Any, path: Path, what: str, fix: str) -> bool:
    """``torch.save`` an optional cache file (a speed-up, never needed for a result) to ``path`` atomically.

    A cache that cannot be written (full disk, quota, read-only or unwritable directory) is not an error: a
    warning names ``what`` (e.g. "data cache"), the path, the cause and ``fix``, once per ``what`` and directory
    in this process, and False is returned; the caller continues without the cache. No temporary file is left
    and its space is freed (``_torch_save``). Returns True when the file was written."""
    try:
        _atomic(Path(path), lambda t: _torch_save(obj, t))
        return True
    except WriteError as e:
        key = (what, str(Path(path).parent))
        if key not in _cache_warned:
            _cache_warned.add(key)
            log.warning("could not write the %s %s: %s; continuing without it (it only saves time). %s", what, path,
                        getattr(e, "kind", e), fix)
        return False


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``; a failed write is raised as ``OSError`` (ENOSPC, EFBIG or EIO) with the open
    file already closed, so the caller can unlink ``path`` and get its space back."""
    open(path, "wb").close()  # a read-only or unwritable directory fails here with its own errno (EROFS, EACCES)
    try:
        import torch  # here, not at the top: the report and the launcher's planning read run dirs without torch

        torch.save(obj, path)
        return
    except RuntimeError as e:  # torch's zip writer reports a failed write as RuntimeError, not OSError
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
    # Out of the except block, the RuntimeError is gone. Its traceback held torch.save's frame, and with it the
    # zip writer and its open file: had it lived on (raised "from e", or kept by a caller's `except ... as e`),
    # the unlinked temporary file would keep its blocks until the process exits, and a full disk could not even
    # record the failure in summary.json. gc: in case a reference cycle still holds the writer.
    gc.collect()
    try:
        free, written = shutil.disk_usage(path.parent).free, (path.stat().st_size if path.exists() else 0)
    except OSError:
        free, written = None, 0
    # A full disk rarely reads exactly 0 bytes free: the failed write needed a larger block than was left (seen:
    # 16 KiB left after a checkpoint write failed, torch saying only "unexpected pos"). Less than 1 MiB, or less
    # than this file had written before it failed, is a full disk.
    full = free is not None and free < max(FULL_BELOW_BYTES, written)
    raise OSError(errno.ENOSPC if full else errno.EFBIG if _fsize_limited() else errno.EIO, message)


FULL_BELOW_BYTES = 1 << 20  # a write that failed with less than this free was stopped by a full disk


def _fsize_limited() -> bool:
    import resource
    return resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, so the JSON written is valid for
    every reader (Python's json would write bare ``NaN``/``Infinity``, which strict parsers reject)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, strictly valid JSON to ``path`` atomically (temp file + rename); non-finite
    floats become null."""
    text = json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False) + "\n"
    _atomic(path, lambda t: t.write_text(text))


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically, so a kill mid-write keeps the previous checkpoint."""
    def write(tmp: Path) -> None:
        _torch_save(obj, tmp)
        faults.fault_point("checkpoint")  # test-only: a kill while the new file is written but not yet in place

    _atomic(path, write)


def remove_stale_temporaries(run_dir: Path) -> List[Path]:
    """Delete the temporary files (``.NAME.tmp<pid>-<ns>``) that a write killed with SIGKILL left in ``run_dir``,
    its ``checkpoints/`` and ``images/``: those of processes no longer alive on this host. Returns the paths removed."""
    removed = []
    for d in (Path(run_dir), Path(run_dir) / "checkpoints", Path(run_dir) / "images"):
        for t in d.glob(".*.tmp*") if d.is_dir() else ():
            try:
                pid = int(t.name.rsplit(".tmp", 1)[1].split("-", 1)[0])
            except (ValueError, IndexError):
                continue  # not one of ours
            if pid == os.getpid() or liveness.pid_alive(pid):
                continue
            t.unlink(missing_ok=True)
            removed.append(t)
    return removed


def load_checkpoint(path: Path, expect: tuple = (), what: str = "checkpoint") -> dict:
    """Read a checkpoint written by embclf: always onto the CPU, always with ``weights_only=True``.

    Mapping to the CPU first is what makes a GPU run resumable: RNG states must come back as CPU byte
    tensors (``torch.set_rng_state`` and ``Generator.set_state`` accept nothing else), and the caller then
    moves what belongs on the device there (``Module.load_state_dict`` copies into the parameters wherever
    they live; ``Optimizer.load_state_dict`` casts its state to each parameter's device). ``weights_only``
    restricts unpickling to tensors and plain containers, so a crafted file cannot run code.

    Args:
        path: the ``.pt`` file. expect: top-level keys it must hold (e.g. ``("model", "config")``).
        what: how to name the file in errors (e.g. ``"classify.encoder"``).
    Returns:
        the checkpoint dict; every tensor in it is on the CPU.
    Raises:
        EmbclfError: missing, truncated or not a torch file, holds anything but tensors and plain values,
            or lacks an ``expect`` key (one paragraph naming the path and what was expected).
    """
    path = Path(path)
    not_readable = (f"{what}: {path} is not a readable torch checkpoint (truncated, or another kind of file{{}}). "
                    "Point it at a complete checkpoint written by embclf (checkpoints/best.pt of a run).")
    if not path.is_file():
        raise EmbclfError(f"{what}: {path} does not exist or is not a file.")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise EmbclfError(not_readable.format(""))
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: code or an unknown object inside
        said = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln] or ["unsupported content"]
        raise EmbclfError(
            f"{what}: {path} holds objects other than tensors and plain values ({said[0][:200]}), so it was not "
            "loaded: unpickling it could run code. embclf checkpoints hold only tensors and plain values; use one "
            "written by embclf (checkpoints/best.pt of an autoencode run).") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise EmbclfError(not_readable.format(f": {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")) \
            from None
    missing = [k for k in expect if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise EmbclfError(f"{what}: {path} is a torch file but not the expected checkpoint (missing "
                          f"{', '.join(missing)}; expected keys {', '.join(expect)}).")
    return ck


def check_image_size(encoder_config: dict, image_size: int, path: Path) -> int:
    """The one check that images of ``data.image_size`` = ``image_size`` fit the encoder of the checkpoint at ``path``
    (whose stored config is ``encoder_config``): an encoder embeds images of the size it was trained on only (its
    linear layer after the trunk has that size's feature map). Used by ``stage=classify``, ``debug=overfit``,
    ``embclf.evaluate`` and ``embclf.embed`` before any data is loaded. Returns the trained image size.

    Raises ``EmbclfError`` naming the key, the checkpoint and the size to use."""
    trained = encoder_config["data"]["image_size"]
    if int(image_size) != trained:
        raise EmbclfError(f"data.image_size={image_size}: the model in {path} was trained on {trained}-pixel images; "
                          f"leave data.image_size at {trained} (images are resized to it).")
    return trained


def file_sha1(path: Path) -> str:
    """SHA-1 (hex) of a file's bytes, read in 1 MiB blocks: what a cache derived from that file is keyed on."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> Optional[dict]:
    """Parsed JSON file, or None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def check_format(record: Any, path: Path) -> None:
    """Raise ``EmbclfError`` when ``record`` (a parsed summary.json or identity.json, at ``path``) was written in
    a format newer than this version's ``FORMAT``: its fields may mean something this version does not know, so
    resuming, skipping or extending that run dir on a guess could corrupt it. Nothing is changed."""
    fmt = record.get("format", 1) if isinstance(record, dict) else 1
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise EmbclfError(
            f"{path} was written by a newer embclf (run dir format {fmt!r}; this version, {_version()}, reads format "
            f"{FORMAT} and older), so this version cannot tell what the run dir holds and leaves it alone. Run this "
            "command with the embclf version that wrote it (upgrade: pip install -U embclf, or pull the repository), "
            "or write into a new run dir (leave hydra.run.dir / hydra.sweep.dir at their defaults).")


def _version() -> str:
    from . import __version__

    return __version__


def read_summary(run_dir: Path) -> Optional[dict]:
    """The run dir's ``summary.json`` as a dict, or None if there is none (yet)."""
    return read_json(Path(run_dir) / SUMMARY)


def append_metrics(run_dir: Path, record: Dict[str, Any]) -> None:
    """Append one JSON line to ``metrics.jsonl`` (one write call; flushed and fsynced)."""
    line = (json.dumps(json_safe(record), allow_nan=False) + "\n").encode()  # NaN/inf -> null: valid JSON
    path = Path(run_dir) / METRICS
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise _write_error(path, e) from e
    # unbuffered: a buffered file would retry a failed write when closed and raise a bare OSError from there
    size = os.fstat(fd).st_size
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as e:  # disk full: cut the partial line, so the file stays valid JSON lines
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise _write_error(path, e) from e
    finally:
        os.close(fd)


def read_metrics(run_dir: Path) -> List[dict]:
    """All records of ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    out = []
    try:
        lines = (Path(run_dir) / METRICS).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):  # a hand edit's stray value is not a record
            out.append(rec)
    return out


def truncate_metrics(run_dir: Path, after_epoch: int) -> None:
    """Drop records of epochs > ``after_epoch`` (written after the checkpoint a resume starts from: a kill
    between an epoch's metrics and its checkpoint), test records (recomputed at the end of every attempt) and a
    torn last line. Called at the start of every attempt, ``after_epoch=0`` when no checkpoint exists, so a
    redone epoch replaces its records instead of duplicating them."""
    if not (Path(run_dir) / METRICS).exists():
        return
    keep = [r for r in read_metrics(run_dir) if int(r.get("epoch", 0)) <= after_epoch and r.get("split") != "test"]
    _atomic(Path(run_dir) / METRICS, lambda t: t.write_text("".join(json.dumps(r) + "\n" for r in keep)))


def resolved(cfg: DictConfig) -> dict:
    """The config as plain values: interpolations resolved, enums as strings, no ``hydra`` node; the ``debug``
    node only in a debug run (``debug=fast|overfit``). See ``identity.plain``."""
    return identity.plain(cfg)


debug_mode = identity.debug_mode


def write_config(run_dir: Path, cfg: DictConfig, ident: dict, stage: str) -> None:
    """Accept ``run_dir`` for a run of identity ``ident``: write ``identity.json`` (what later lookups compare,
    see ``open_run_dir``) and the resolved config as ``config.yaml``, both atomically. A stage calls it once bad
    input has failed and the run dir is accepted, so Hydra's pending record of this job becomes the run dir's
    ``.hydra/`` here (``promote_hydra_record``)."""
    write_json_atomic(Path(run_dir) / identity.IDENTITY_FILE,
                      {"format": FORMAT, "stage": stage, "digest": identity.digest(ident), "identity": ident})
    text = OmegaConf.to_yaml(OmegaConf.create(resolved(cfg)))
    _atomic(Path(run_dir) / CONFIG, lambda t: t.write_text(text))
    for d in (Path(run_dir), Path(run_dir).parent):  # the job dir, or stage=all's job dir above a stage run dir
        promote_hydra_record(d)


# Hydra writes its record of a job (config, hydra config, overrides) before the task function runs; embclf has
# it written to .hydra.new (hydra.output_subdir in conf/config.yaml) and makes it .hydra only once a stage has
# accepted the run dir, so a refused re-run (another config in that dir, bad input) leaves the dir as it was.
PENDING_HYDRA = ".hydra.new"


def promote_hydra_record(job_dir: Path) -> None:
    """Replace ``job_dir/.hydra`` by ``job_dir/.hydra.new`` if there is one (else nothing)."""
    job_dir = Path(job_dir)
    pending = job_dir / PENDING_HYDRA
    if not pending.is_dir():
        return
    old = job_dir / ".hydra.old"
    shutil.rmtree(old, ignore_errors=True)
    if (job_dir / ".hydra").exists():
        os.replace(job_dir / ".hydra", old)
    os.replace(pending, job_dir / ".hydra")
    shutil.rmtree(old, ignore_errors=True)


def read_config(run_dir: Path) -> Optional[dict]:
    """The run dir's resolved ``config.yaml`` as a dict, or None."""
    p = Path(run_dir) / CONFIG
    if not p.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(p))


def stored_identity(run_dir: Path, stage: str) -> Optional[dict]:
    """The identity of the ``stage`` run that ``run_dir`` holds, or None when it holds none (empty, or only the
    record of a job that failed on bad input before it was accepted).

    Read from ``identity.json`` (written when the run was accepted, before anything else), else computed from
    its ``config.yaml`` (a classify run's encoder from the config of its ``encoder_run``), else from the config
    stored in ``checkpoints/last.pt``: whatever files the run left, one identity is found."""
    run_dir = Path(run_dir)
    rec = read_json(run_dir / identity.IDENTITY_FILE)
    check_format(rec, run_dir / identity.IDENTITY_FILE)
    check_format(read_summary(run_dir), run_dir / SUMMARY)
    if isinstance(rec, dict) and isinstance(rec.get("identity"), dict):
        return identity.stored(rec["identity"], stage)
    c = read_config(run_dir)
    if c is None and (run_dir / "checkpoints" / "last.pt").is_file():
        c = load_checkpoint(run_dir / "checkpoints" / "last.pt", ("config",), "resume")["config"]
    if c is None:
        return None
    enc = None
    if stage == "classify":
        s = read_summary(run_dir) or {}
        from .references import encoder_run_of  # references builds on this module

        er = encoder_run_of(run_dir, s)
        enc = (read_config(er) if er is not None else None) or c
    return identity.identity(c, stage, encoder=enc)


def open_run_dir(run_dir: Path, ident: dict, stage: str) -> str:
    """Decide what a ``stage`` run of identity ``ident`` does in ``run_dir``: ``"start"`` (it holds no run),
    ``"completed"`` (it holds this experiment, completed: nothing to do) or ``"resume"`` (this experiment,
    unfinished: continue from ``checkpoints/last.pt`` if there is one).

    Raises ``EmbclfError`` naming the keys that differ when it holds another experiment, completed or not,
    whatever files it holds, or when its records are of a newer format (``check_format``); nothing in the run
    dir is changed then."""
    old = stored_identity(run_dir, stage)
    if old is None:
        return "start"
    diffs = identity.differences(old, ident)
    completed = (read_summary(run_dir) or {}).get("status") == "completed"
    if diffs:
        held = "a completed run" if completed else "an unfinished run"
        why = ("it is kept as it is" if completed else
               "resuming it would mix two experiments. Use the original settings to resume it")
        raise EmbclfError(
            f"run dir {run_dir} holds {held} of another experiment (differs in: {', '.join(diffs)}); {why}, or "
            "run this one in a new run dir (leave hydra.run.dir / hydra.sweep.dir at their defaults). Nothing "
            "in it was changed.")
    return "completed" if completed else "resume"


def refuse_changed_data(run_dir: Path, prior: Optional[dict], fingerprint: str) -> None:
    """Raise ``EmbclfError`` when an unfinished run about to resume was started on other images: its summary's
    ``data_fingerprint`` (SHA-1 of the decoded pixels and labels) differs from ``fingerprint``, the images the
    config selects now. Resuming would train one model on two datasets. Nothing is changed in ``run_dir``."""
    old = (prior or {}).get("data_fingerprint")
    if old and old != fingerprint:
        raise EmbclfError(
            f"run dir {run_dir} holds an unfinished run started on other images: the files under data.root changed "
            f"since (data fingerprint {old[:12]}... then, {fingerprint[:12]}... now), so resuming it would train one "
            "model on two datasets. Restore the files to resume it, or run in a new run dir (leave hydra.run.dir / "
            "hydra.sweep.dir at their defaults). Nothing in it was changed.")


def completed_in(run_dir: Path, ident: dict, stage: str) -> bool:
    """True when ``run_dir`` holds a completed ``stage`` run of identity ``ident`` (the launchers' "already
    completed?": re-invoking a finished job then does nothing)."""
    s = read_summary(run_dir)
    if not s or s.get("status") != "completed":
        return False
    try:
        return stored_identity(run_dir, stage) == ident
    except EmbclfError:  # an unreadable record: not known to be done, so the stage decides (and says why)
        return False


# the objective's options in the model group and their "off" values (classify's hint prints the ones that are on)
MODEL_OBJECTIVE_DEFAULTS = {"ce_weight": 0.0, "decorrelation_weight": 0.0, "decorrelation": "class", "kl_warmup_epochs": 0,
                            "input_noise": 0.0, "mask_ratio": 0.0}
