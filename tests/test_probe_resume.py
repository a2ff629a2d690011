"""Exact resume with the linear probe on (``autoencode.probe_every=1``): a run killed at any instant, and one stopped
by SIGTERM mid-epoch, end with exactly the metrics.jsonl (``probe_accuracy`` included) and the weights of an
uninterrupted run. The pattern of tests/test_resume.py (``resume_harness.py`` forks the real entrypoint once per
attempt, killed at ``EMBCLF_KILL_AT`` points); the probe draws no random numbers, so nothing of it is saved."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import embclf_env
from resume_harness import run_spec
from test_resume import _small_tree

TIMING = {"seconds", "images_per_second"}
# a small VAE (its reparameterization draws from the global RNG, which a probe must not disturb), 16 px, 270
# training images in batches of 50: 6 steps per epoch; the probe after every epoch on 100 train images
ARGS = ["stage=autoencode", "model=vae", "latent=4", "data=folder", "data.train_size=300", "data.test_size=100",
        "data.image_size=16", "model.channels=[8,16]", "model.strides=[2,2]", "autoencode.batch_size=50",
        "autoencode.image_epochs=[]", "autoencode.epochs=3", "autoencode.probe_every=1",
        "autoencode.probe_size=100", "logger=none", "threads=1"]
KILLS = [
    "autoencode.metrics",   # epoch 1 recorded (its probe too), no checkpoint yet: the redo replaces it
    "autoencode.step:9",    # mid-epoch 2, after last.pt of epoch 1
    "autoencode.metrics:2",  # resumed at epoch 2: epoch 3's records (and probe) written, its checkpoint not
    "autoencode.test",      # during the final test evaluation
]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, cifar_root):
    """ARGS uninterrupted ("ref"), killed at each of KILLS ("kill"), SIGTERM at step 3 of epoch 2 ("term")."""
    tmp = tmp_path_factory.mktemp("probe_resume")
    tree = _small_tree(tmp / "data")
    args = [*ARGS, f"data.root={tree}", f"data.cache_dir={tmp / 'cache'}"]
    runs = {"ref": tmp / "ref", "kill": tmp / "kill", "term": tmp / "term"}
    spec = {"args": args, "runs": {
        "ref": {"run_dir": str(runs["ref"])},
        "kill": {"run_dir": str(runs["kill"]), "kills": KILLS},
        "term": {"run_dir": str(runs["term"]), "kills": ["autoencode.step:9:TERM"]},
    }}
    attempts = run_spec(tmp, spec, embclf_env(tmp))
    return {"runs": runs, "attempts": attempts, "tmp": tmp}


def _records(run_dir: Path) -> list:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _same_weights(a: Path, b: Path) -> bool:
    sa = torch.load(a / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)["model"]
    sb = torch.load(b / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kill", "term"])
def test_resume_with_probes_is_exact(resumed, name):
    attempts = resumed["attempts"][name]
    log = (resumed["tmp"] / f"{name}.attempts.log").read_text()
    assert attempts[-1]["exit"] == 0, log[-3000:]
    if name == "kill":
        assert [a["kill_at"] for a in attempts] == [*KILLS, None], attempts
        assert all(a["signal"] == "SIGKILL" for a in attempts[:-1]), attempts
    ref, got = resumed["runs"]["ref"], resumed["runs"][name]
    want = _records(ref)
    assert [r["epoch"] for r in want if "probe_accuracy" in r] == [1, 2, 3]
    assert _records(got) == want, "metrics.jsonl (probe_accuracy included) differs from the uninterrupted run's"
    assert _same_weights(ref, got)
    s = json.loads((got / "summary.json").read_text())
    assert s["status"] == "completed" and s["attempts"] > 1
