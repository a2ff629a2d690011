"""Test-only fault injection (``EMBCLF_KILL_AT``): the resume, signal and lock tests kill or fail a real run at
named points; ``EMBCLF_SLOW_AT`` makes a point wait, so that the launcher and SLURM tests can kill a job mid-training
without a model large enough to keep a CPU busy for as long. Unset (always, outside tests) a point costs two dict
lookups."""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Dict

log = logging.getLogger(__name__)

KILL_AT_ENV = "EMBCLF_KILL_AT"
SLOW_AT_ENV = "EMBCLF_SLOW_AT"
_fault_counts: Dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test-only fault injection: when ``EMBCLF_KILL_AT=NAME[:N[:SIGNAL]]`` names this point, the process sends
    itself SIGNAL (default SIGKILL, e.g. ``TERM``) the N-th time (default 1) it reaches it; SIGNAL ``raise``
    raises a RuntimeError there instead (an ordinary failure), ``oom`` a ``torch.OutOfMemoryError`` (CUDA out of
    memory).

    The resume tests use it to kill a run at exact places and check that restarting the same command ends with
    the metrics of an uninterrupted run. Points: ``startup`` (run dir and summary written, nothing trained),
    ``autoencode.step`` (after an optimizer step), ``<stage>.metrics`` (an epoch's metrics appended, its
    checkpoints not yet written), ``<stage>.best`` (best.pt written, last.pt not), ``checkpoint`` (a checkpoint
    file written under its temporary name, not yet renamed into place), ``<stage>.test`` (during the final test
    evaluation), ``<stage>.summary`` (just before the completed summary is written); ``<stage>`` is
    ``autoencode`` or ``classify``. Also ``data.load`` (the data decoded, before a stage accepts the run dir) and
    the classify stage's phases: ``classify.embed`` (embeddings computed, not saved), ``classify.lr_search`` (after
    each head of the learning-rate search), ``classify.probe_fit`` (a k-NN/logistic-regression fit),
    ``classify.probes`` (after each extra probe), ``classify.plots`` (the result written, figures not yet).

    ``EMBCLF_SLOW_AT=NAME:SECONDS`` makes the process sleep SECONDS every time it reaches point NAME (e.g.
    ``autoencode.step:1``: an epoch of one batch takes a second): a run that stays mid-training for as long as a test
    needs, without the CPU time a larger model would spend (the test's other runs get that core). Unset (always,
    outside tests) the two variables cost two dict lookups.
    """
    slow = os.environ.get(SLOW_AT_ENV)
    if slow:
        point, _, seconds = slow.partition(":")
        if point == name:
            time.sleep(float(seconds))
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    n, _, sig = rest.partition(":")
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(n or 1):
        if sig.lower() == "raise":  # an ordinary failure (an exception) at that point, e.g. after wandb started
            raise RuntimeError(f"{KILL_AT_ENV}={spec}: injected failure at {name}")
        if sig.lower() == "oom":  # CUDA running out of memory there, as the caching allocator raises it
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory. {KILL_AT_ENV}={spec}: injected at {name}")
        signum = signal.Signals["SIG" + sig.upper().removeprefix("SIG")] if sig else signal.SIGKILL
        log.warning("%s=%s: sending %s to myself", KILL_AT_ENV, spec, signum.name)
        os.kill(os.getpid(), signum)
