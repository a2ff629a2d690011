"""A real sweep with a failing job, shared by test_tracking.py and test_report.py (import the fixture by name).

Two classify jobs in one process (Hydra's basic launcher) on an encoder of the session's tiny sweep: the first
fails after its wandb run started (an injected failure after its first epoch: ``EMBCLF_KILL_AT``), the second
(``head=knn``, no epochs) completes. A fake
``WANDB_API_KEY`` is set so the tests can check it is never written anywhere.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, embclf_env

from embclf import references, runs

SECRET = "embclf-test-secret-" + "0123456789abcdef" * 2  # shaped like a real 40-character key


_made: dict = {}  # each test module that imports the fixture registers its own copy: build the sweep once


@pytest.fixture(scope="session")
def failing_sweep(tiny_sweep, tmp_path_factory):
    """dict: out (output_dir), sweep (the sweep dir), proc (CompletedProcess), encoder (the vae-z8 run dir)."""
    if not _made:
        _made.update(_make(tiny_sweep, tmp_path_factory))
    return _made


def _make(tiny_sweep, tmp_path_factory) -> dict:
    summaries = {d: runs.read_summary(d) for d in references.iter_run_dirs(tiny_sweep["out"])}
    encoder = next(d for d, s in summaries.items() if (s["stage"], s["model"], s["latent"]) == ("autoencode", "vae", 8))
    tmp = tmp_path_factory.mktemp("failing")
    out = tmp / "outputs"
    env = embclf_env(tmp)
    env["WANDB_API_KEY"] = SECRET  # with mode=offline given explicitly: nothing may try to use it online
    # quoted: run dir names contain '=' and ',' which Hydra's override grammar would otherwise split on
    tiny = [a for a in TINY if not a.startswith("classify.epochs=")]
    args = ["-m", "stage=classify", f"classify.encoder='{encoder}'", *tiny, "classify.epochs=2",
            "head=mlp,knn", "logger.wandb.mode=offline", "logger.projections=[pca]", f"output_dir={out}"]
    # the mlp job fails after its first epoch (its wandb run has started); knn trains no epochs and completes
    env["EMBCLF_KILL_AT"] = "classify.metrics:1:raise"
    proc = subprocess.run([sys.executable, "-m", "embclf", *args], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=300)
    sweeps = [p for p in out.iterdir() if p.is_dir()]
    assert len(sweeps) == 1, (proc.stdout[-3000:], proc.stderr[-3000:])
    return {"out": out, "sweep": sweeps[0], "proc": proc, "encoder": encoder}
