"""Hydra's side of the locks (``embclf.locks``): the callback ``HoldOutputDirs`` (conf/config.yaml
``hydra.callbacks.embclf_locks``) holds a run dir or sweep dir before Hydra writes anything there, and the sweep
dir's record of earlier sweeps (``multirun.NNN.yaml``) is kept before Hydra overwrites ``multirun.yaml``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Optional

from .locks import DirLock, acquire
from .errors import EmbclfError

log = logging.getLogger(__name__)

MULTIRUN = "multirun.yaml"


def archive_sweep_record(sweep_dir, new_text: Optional[str] = None) -> Optional[Path]:
    """Keep the record of an earlier sweep into ``sweep_dir`` before Hydra overwrites ``multirun.yaml``.

    Copies ``multirun.yaml`` to ``multirun.NNN.yaml`` (NNN = 001, 002, ...: the names sort in invocation order),
    unless it already equals ``new_text`` (the record about to be written: the same command again, e.g. a resume)
    or the newest archive. Returns the archive's path, or None when nothing needed keeping. Call it while holding
    the sweep dir. Raises ``OSError`` when the copy cannot be written (the old record is then unchanged)."""
    sweep_dir = Path(sweep_dir)
    src = sweep_dir / MULTIRUN
    try:
        text = src.read_text()
    except FileNotFoundError:
        return None
    archives = sweep_record_archives(sweep_dir)
    if text == new_text or (archives and archives[-1].read_text() == text):
        return None
    n = int(archives[-1].name.split(".")[1]) + 1 if archives else 1
    dst = sweep_dir / f"multirun.{n:03d}.yaml"
    tmp = sweep_dir / f".{dst.name}.tmp{os.getpid()}"
    tmp.write_text(text)  # a copy, not a hard link: Hydra rewrites multirun.yaml in place
    os.replace(tmp, dst)
    _archived[str(sweep_dir.absolute())] = dst
    return dst


_archived: Dict[str, Path] = {}  # sweep dir -> the archive this process made of its earlier record


def restore_sweep_record(sweep_dir) -> None:
    """Undo this process's :func:`archive_sweep_record` of ``sweep_dir`` (the sweep was refused before any job
    started, e.g. an invalid override): the earlier record becomes ``multirun.yaml`` again."""
    archive = _archived.pop(str(Path(sweep_dir).absolute()), None)
    if archive is not None and archive.is_file():
        os.replace(archive, Path(sweep_dir) / MULTIRUN)


def sweep_record_archives(sweep_dir) -> list:
    """The earlier sweeps' records (``multirun.NNN.yaml``) in ``sweep_dir``, oldest first."""
    return sorted(p for p in Path(sweep_dir).glob("multirun.*.yaml") if p.name.split(".")[1].isdigit())


def _hold_or_exit(directory, heartbeat: bool, config=None, key: str = "hydra.run.dir") -> DirLock:
    """``acquire(directory)`` for a Hydra callback; on failure one paragraph on stderr and ``SystemExit(2)``.

    The first write of a run is this lock, so an output dir that cannot be written (read-only file system, no
    permission, full) fails here: the paragraph names the key that put the dir there (``output_dir``, or ``key``
    when it is set outside ``output_dir``) and the fix, instead of Hydra's chained traceback later."""
    try:
        return acquire(directory, heartbeat=heartbeat)
    except EmbclfError as e:  # in use, or the lock cannot be written (read-only, full)
        msg = str(e)
        if getattr(e, "kind", None) and config is not None:
            msg = _unwritable_message(Path(directory), e.kind, config, key)
        print(f"embclf: error: {msg}", file=__import__("sys").stderr, flush=True)
        raise SystemExit(2) from None


def _unwritable_message(directory: Path, kind: str, config, key: str) -> str:
    out = config.get("output_dir")
    out = Path(os.path.abspath(os.path.expanduser(str(out)))) if out else None
    under = out is not None and Path(os.path.abspath(directory)).is_relative_to(out)
    named = f"output_dir={config.get('output_dir')}" if under else f"{key}={directory}"
    fix, example = ("output_dir", "output_dir=$HOME/embclf-outputs") if under else \
        (key, f"{key}=$HOME/embclf-outputs/{'sweep' if 'sweep' in key else 'run'}")
    return (f"cannot write the {'sweep' if 'sweep' in key else 'run'} dir {directory}: {kind}. {named} puts it "
            f"there. Nothing was run or written. Set {fix} to a directory you can write that has free space (e.g. "
            f"{example}), or fix the permissions or free space there, and run the command again.")


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover -- Hydra is a dependency; keeps this module importable alone
    Callback = object


class HoldOutputDirs(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): hold a single run's ``hydra.run.dir`` and a sweep's
    ``hydra.sweep.dir`` from before Hydra writes anything there (its ``.hydra.new`` record, the log, a sweep's
    ``multirun.yaml``) to the end. A second process is refused with exit status 2 and changes nothing.

    A sweep dir is held without the heartbeat thread: the local launcher forks its workers only from a process
    without other threads; the launchers refresh it from their polling loops (:func:`refresh`). Each sweep job
    holds its own run dir (the launchers, before Hydra's ``run_job``). A sweep into an existing sweep dir keeps the
    earlier ``multirun.yaml`` (:func:`archive_sweep_record`)."""

    def __init__(self) -> None:
        self.locks: list = []

    def on_run_start(self, config, **kwargs) -> None:
        self.locks.append(_hold_or_exit(str(config.hydra.run.dir), heartbeat=True, config=config))

    def on_multirun_start(self, config, **kwargs) -> None:
        from omegaconf import OmegaConf

        sweep_dir = str(config.hydra.sweep.dir)
        self.locks.append(_hold_or_exit(sweep_dir, heartbeat=False, config=config, key="hydra.sweep.dir"))
        try:
            archive_sweep_record(sweep_dir, OmegaConf.to_yaml(config))
        except OSError as e:
            log.warning("could not keep the earlier sweep record %s/%s: %s", sweep_dir, MULTIRUN, e)

    def _release(self) -> None:
        while self.locks:
            self.locks.pop().release()

    def on_run_end(self, config, **kwargs) -> None:
        self._release()

    def on_multirun_end(self, config, **kwargs) -> None:
        self._release()
