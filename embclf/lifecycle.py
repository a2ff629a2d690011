"""One run dir's life, the same for every command that writes one (the stages, the debug modes):

    run = RunDir(run_dir, cfg, "autoencode", overrides, ident)
    if run.completed():             # the same experiment finished here: nothing to do
        return run.path             # (another experiment here: EmbclfError, nothing changed)
    ... check the input, load the data (nothing written yet) ...
    run.start(resumed_from=epoch, device=...)  # config.yaml, summary.json "running", attempt recorded
    ... train, run.save() after each epoch (compute_seconds so far) ...
    run.complete(test_accuracy=...)           # summary.json "completed", end_time, wall_seconds

The job around it (``embclf.__main__``) holds the job dir (``hold``: the lock and the signal handlers) and, on
any exception, records the failure or the interruption (``record_failure``). Built over ``embclf.runs``
(layout, atomic writes, the attempt bookkeeping) and ``embclf.locks``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Iterator, List, Optional

from . import locks, runs

log = logging.getLogger(__name__)


class RunDir:
    """A run dir of one stage and one experiment (``ident``, ``embclf.identity``), from open to completion.

    Attributes: ``path``; ``prior`` (the summary.json a previous attempt left, or None); ``summary`` (this
    attempt's, from ``runs.base_summary``; add fields to it freely, ``save`` writes it)."""

    def __init__(self, run_dir: Path, cfg, stage: str, overrides: List[str], ident: dict):
        self.path = Path(run_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self.cfg, self.stage, self.ident = cfg, stage, ident
        self.prior = runs.read_summary(self.path)
        self.summary = runs.base_summary(cfg, stage, overrides)

    def completed(self) -> bool:
        """True (and logged) when this experiment completed here already. Raises ``EmbclfError`` naming the
        keys that differ when the run dir holds another experiment (``runs.open_run_dir``); nothing is changed."""
        if runs.open_run_dir(self.path, self.ident, self.stage) == "completed":
            log.info("%s already completed (the same experiment); nothing to do", self.path)
            return True
        return False

    def refuse_changed_data(self, fingerprint: str) -> None:
        """Before a resume: raise ``EmbclfError`` when the unfinished run was started on other images."""
        runs.refuse_changed_data(self.path, self.prior, fingerprint)

    def start(self, resumed_from: Optional[int] = None, **fields) -> None:
        """Accept the run: bad input has failed by now. Removes temporaries a SIGKILL left, records the attempt
        (``runs.start_attempt``; ``resumed_from``: the checkpoint's epoch), writes config.yaml and summary.json
        (status "running", plus ``fields``)."""
        runs.remove_stale_temporaries(self.path)
        runs.start_attempt(self.summary, self.prior, resumed_from)
        runs.write_config(self.path, self.cfg, self.ident, self.stage)
        self.save(**fields)

    def save(self, **fields) -> None:
        """Add ``fields`` to the summary and write it (the attempt extended to now: compute_seconds so far)."""
        self.summary.update(fields)
        runs.touch_attempt(self.summary)
        runs.write_json_atomic(self.path / runs.SUMMARY, self.summary)

    def complete(self, status: str = "completed", **fields) -> dict:
        """Write the final summary: ``fields``, ``status`` (``debug=overfit`` passes "failed" for a check that
        failed), ``end_time``, ``wall_seconds`` (first start to end, gaps included). Returns the summary."""
        s = self.summary
        s.update(fields)
        s.update(status=status, end_time=time.time())
        s["wall_seconds"] = s["end_time"] - s["start_time"]
        runs.touch_attempt(s, s["end_time"])
        runs.write_json_atomic(self.path / runs.SUMMARY, s)
        return s


@contextlib.contextmanager
def hold(job_dir: Path) -> Iterator[None]:
    """For a whole job: the job dir's lock (``locks.hold``: ``InUseError`` when another live process holds it)
    and the signal handlers that turn SIGTERM/SIGUSR2/SIGINT into an exception (``runs.stop_on_signals``), so a
    signal anywhere in the job (data loading, embedding, fits, plots) is recorded "interrupted"."""
    with runs.stop_on_signals(), locks.hold(job_dir):
        yield


def record_failure(run_dir: Path, exc: BaseException, base: Optional[dict] = None) -> None:
    """Record that the run in ``run_dir`` ended with ``exc``: status "interrupted" for a signal or a requeue
    (``SystemExit``, ``KeyboardInterrupt``: it resumes from last.pt), else "failed", with the error and the
    exception's ``reason`` (e.g. "diverged"); a completed run is left as it is (``runs.mark_failed``).

    ``base``: a summary to write first when the run dir has none (bad input in a sweep job: the launcher's
    table and the report still see who failed and why). A write that fails (the disk is still full) is logged:
    the original error is what matters."""
    stopped = isinstance(exc, (SystemExit, KeyboardInterrupt))
    try:
        if base is not None and not (run_dir / runs.SUMMARY).is_file():
            runs.write_json_atomic(run_dir / runs.SUMMARY, base)
        if (run_dir / runs.SUMMARY).is_file():
            runs.mark_failed(run_dir, f"{type(exc).__name__}: {exc}", "interrupted" if stopped else "failed",
                             reason=getattr(exc, "reason", None))
    except runs.WriteError as w:
        log.error("could not record the failure in %s: %s", run_dir, w)
