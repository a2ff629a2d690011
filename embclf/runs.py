"""A run is a directory. This module owns its layout, atomic writes, checkpoints and lookups.

Layout of one run dir (one stage of one job)::

    config.yaml        fully resolved config (what lookups compare)
    .hydra/            as Hydra writes it (overrides.yaml keeps the full overrides)
    embclf.log         the job's log
    metrics.jsonl      one JSON object per epoch and split
    summary.json       status + headline numbers (see README "Output layout")
    checkpoints/       last.pt (every epoch), best.pt (best on val)
    images/            PNGs
    embeddings.pt      classify only: float32 [N, latent] per split, with labels
    eval/<name>/       python -m embclf.evaluate: per_sample.csv, summary.json (no "stage" key), worst.png
    export/            python -m embclf.embed: embeddings_<split>.<npz|csv|pt>

Every file is written to a temporary name and renamed into place, so a killed job never leaves a
half-written checkpoint or summary behind, and data already written is never truncated.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import signal
import zipfile
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from .runtime import EmbclfError

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per call: a signal handler may save while another save of the same file is in progress
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{time.monotonic_ns()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    _atomic(path, lambda t: torch.save(obj, t))


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


def read_json(path: Path) -> Optional[dict]:
    """Parsed JSON file, or None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_summary(run_dir: Path) -> Optional[dict]:
    """The run dir's ``summary.json`` as a dict, or None if there is none (yet)."""
    return read_json(Path(run_dir) / SUMMARY)


def append_metrics(run_dir: Path, record: Dict[str, Any]) -> None:
    """Append one JSON line to ``metrics.jsonl`` (one write call; flushed and fsynced)."""
    line = json.dumps(json_safe(record), allow_nan=False) + "\n"  # NaN/inf -> null: valid JSON
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: Path) -> List[dict]:
    """All records of ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    out = []
    try:
        lines = (Path(run_dir) / METRICS).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def truncate_metrics(run_dir: Path, after_epoch: int) -> None:
    """Drop records of epochs > ``after_epoch`` (written after the checkpoint a resume starts from) and
    test records (recomputed at the end of every attempt)."""
    keep = [r for r in read_metrics(run_dir) if int(r.get("epoch", 0)) <= after_epoch and r.get("split") != "test"]
    _atomic(Path(run_dir) / METRICS, lambda t: t.write_text("".join(json.dumps(r) + "\n" for r in keep)))


def resolved(cfg: DictConfig) -> dict:
    """The config as plain values: interpolations resolved, enums as strings, no ``hydra`` node.

    The ``debug`` node appears only in a debug run (``debug=fast|overfit``): a normal run's config is what it
    was before debug modes existed, so earlier runs still resume, are still found and still count as done."""
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    c.pop("hydra", None)
    c.pop("defaults", None)
    if debug_mode(c) == "none":
        c.pop("debug", None)
    return c


def debug_mode(cfg) -> str:
    """``debug.name`` of a config (DictConfig or plain dict): ``fast``, ``overfit`` or ``none`` (also for
    configs written before debug modes existed)."""
    d = cfg.get("debug") if hasattr(cfg, "get") else None
    name = d.get("name") if hasattr(d, "get") else None
    return str(name or "none")


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    """Write the resolved config as ``config.yaml`` (atomically)."""
    text = OmegaConf.to_yaml(OmegaConf.create(resolved(cfg)))
    _atomic(Path(run_dir) / CONFIG, lambda t: t.write_text(text))


def read_config(run_dir: Path) -> Optional[dict]:
    """The run dir's resolved ``config.yaml`` as a dict, or None."""
    p = Path(run_dir) / CONFIG
    if not p.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(p))


# how a run executes, not what it computes (compile and TF32 change speed, not the experiment; precision
# does change the numbers, so it is not here)
VOLATILE_KEYS = ("threads", "device", "output_dir", "logger", "compile", "tf32")


def is_completed(run_dir: Path, cfg: DictConfig) -> bool:
    """True if ``run_dir`` holds a completed run of the same config (ignoring threads, device, output_dir,
    logger): re-invoking a finished job then does nothing instead of training again."""
    s = read_summary(run_dir)
    old = read_config(run_dir)
    if not s or s.get("status") != "completed" or old is None:
        return False
    new = resolved(cfg)
    return all(old.get(k) == new.get(k) for k in set(old) | set(new) if k not in VOLATILE_KEYS)


def slurm_job_id() -> Optional[str]:
    """This process's SLURM job id as squeue/scontrol/sacct read it unambiguously, or None outside SLURM.

    An array task is named ``<array id>_<task id>``: its own ``SLURM_JOB_ID`` equals the array's id for
    task 0, and ``scontrol requeue <that id>`` or ``scancel`` would then act on the whole array.
    """
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def config_differences(old: dict, cfg: DictConfig) -> List[str]:
    """Top-level/nested keys whose values differ between a stored resolved config and ``cfg``, ignoring
    how the run executes (``VOLATILE_KEYS``) and ``stage`` (stage=all stores its sub-stage)."""
    new = resolved(cfg)
    diffs = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if not prefix and k in VOLATILE_KEYS + ("stage",):
                    continue
                walk(a.get(k), b.get(k), f"{prefix}{k}.")
        elif a != b:
            diffs.append(prefix.rstrip("."))

    walk(old, new, "")
    return diffs


def base_summary(cfg: DictConfig, stage: str, overrides: List[str]) -> Dict[str, Any]:
    """Fields every ``summary.json`` carries, filled at the start of a run (status "running")."""
    return {
        "status": "running",
        "stage": stage,
        "model": cfg.model.name,
        "latent": int(cfg.latent),
        "seed": int(cfg.seed),
        "data": getattr(cfg.data.source, "value", cfg.data.source),
        "epochs": int(cfg[stage].epochs),
        "overrides": list(overrides),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": slurm_job_id(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "start_time": time.time(),
        # a debug run says so in its summary, so no reader takes it for a result (embclf/debug.py)
        **({"debug": debug_mode(cfg)} if debug_mode(cfg) != "none" else {}),
    }


def mark_failed(run_dir: Path, error: str, status: str = "failed", reason: Optional[str] = None) -> None:
    """Record a failure in ``summary.json`` unless the run already completed.

    Used by the stages on an exception and by launchers for a job killed from outside. ``status`` is
    "failed", or "interrupted" for a run stopped by a signal or a requeue (it resumes from last.pt).
    Keeps every other field already written (and never touches checkpoints or metrics). ``reason``
    (e.g. "diverged") is stored as ``reason`` beside the error message.
    """
    run_dir = Path(run_dir)
    s = read_summary(run_dir) or {}
    if s.get("status") == "completed":
        return
    s.update(status=status, error=str(error)[-4000:], end_time=time.time())
    if reason:
        s["reason"] = reason  # e.g. "diverged"
    if "start_time" in s:
        s["wall_seconds"] = s["end_time"] - s["start_time"]
    write_json_atomic(run_dir / SUMMARY, s)


# --- finding runs ---------------------------------------------------------------------------------

def iter_run_dirs(root: Path) -> Iterator[Path]:
    """Every directory under ``root`` (inclusive) holding a ``summary.json``."""
    root = Path(root)
    if (root / SUMMARY).is_file():
        yield root
    if root.is_dir():
        for p in sorted(root.rglob(SUMMARY)):
            if p.parent != root and ".submitit" not in p.parts:
                yield p.parent


def encoder_identity(cfg) -> dict:
    """What makes two autoencode runs the same: data, model, latent, seed, precision, ``autoencode.*`` and the
    debug mode (runs written before ``precision`` existed were fp32, before ``debug`` none)."""
    c = cfg if isinstance(cfg, dict) else resolved(cfg)
    data = {k: v for k, v in c["data"].items() if k not in ("cache_dir", "download")}
    # debug: a debug autoencoder only ever serves a classifier of the same debug mode, never a real one
    return {"data": data, "model": c["model"], "latent": c["latent"], "seed": c["seed"],
            "precision": c.get("precision", "fp32"), "autoencode": c["autoencode"], "debug": debug_mode(c)}


def find_encoder_run(cfg: DictConfig, output_dir: Path) -> Optional[Path]:
    """Newest completed autoencode run under ``output_dir`` whose identity equals ``cfg``'s, or None."""
    want = encoder_identity(cfg)
    best, best_t = None, -1.0
    for d in iter_run_dirs(output_dir):
        s = read_summary(d)
        if not s or s.get("stage") != "autoencode" or s.get("status") != "completed":
            continue
        c = read_config(d)
        if c is None or encoder_identity(c) != want:
            continue
        t = float(s.get("end_time") or 0)
        if t > best_t:
            best, best_t = d, t
    return best


# --- signals --------------------------------------------------------------------------------------

class CheckpointOnSignal:
    """Context manager: on SIGUSR2/SIGTERM, save at the next safe point, then run the previous handler.

    submitit installs its own SIGUSR2 handler to requeue a job near its time limit (and ignores SIGTERM);
    we must save first and then hand on to it rather than replace it. The handler itself only records
    the signal: saving inside it could catch the optimizer between two parameter updates (on the CPU,
    Adam updates parameters in a Python loop). The training loop calls ``poll()`` after every optimizer
    step and epoch, where the state is consistent; ``poll`` saves, then calls the old handler (for the
    default action it raises ``SystemExit(128 + signum)`` so the stage records "interrupted").
    On exit the old handlers are restored.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self, save: Callable[[], None]):
        self.save = save
        self.old: Dict[int, Any] = {}
        self.pending: Optional[tuple] = None

    def _handler(self, signum, frame):
        log.warning("received signal %d: saving checkpoint at the next step", signum)
        self.pending = (signum, frame)

    def poll(self) -> None:
        """If a signal arrived: save, then hand on to the previously installed handler."""
        if self.pending is None:
            return
        signum, frame = self.pending
        self.pending = None
        try:
            self.save()
        except Exception:  # saving must not stop the requeue
            log.exception("checkpoint on signal failed")
        old = self.old.get(signum)
        if callable(old):
            old(signum, frame)
        elif old in (signal.SIG_DFL, None):
            raise SystemExit(128 + signum)

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self.old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: no handlers possible
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        if exc[0] is None:
            self.poll()  # a signal during the last steps is still handed on
        return False
