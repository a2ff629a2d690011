"""Helpers for the sweep tests (tests/test_launcher_local.py, tests/test_slurm.py); their ``slurm_cluster``
fixture is in conftest.py and calls :func:`start_slurm`.

Everything here is real: the jobs are ``python -m embclf`` on a tiny subset of the real CIFAR-10
ImageFolder tree at ``<repo root>/../shared/data/cifar10``, and the SLURM tests talk to a real
single-node SLURM (munge + slurmctld + slurmd + slurmdbd) started on 127.0.0.1 by
``<repo root>/../shared/tools/local-slurm.sh`` with two fake GPUs.
"""
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR = SHARED / "data" / "cifar10"
SLURM_SCRIPT = Path(os.environ.get("EMBCLF_LOCAL_SLURM", SHARED / "tools" / "local-slurm.sh"))


def cifar_root() -> Path:
    """The real CIFAR-10 ImageFolder tree; fails (never skips) when it is missing."""
    if not (CIFAR / "train").is_dir() or not (CIFAR / "test").is_dir():
        pytest.fail(f"CIFAR-10 ImageFolder tree not found at {CIFAR} (expected train/ and test/ there)")
    return CIFAR


# For a job that must still be training when a test signals, kills or cancels it: each optimizer step waits this
# long (EMBCLF_SLOW_AT, embclf/faults.py). With tiny_args (180 training images, batch 200) an epoch is one step, so
# it lasts ~1.5 s however fast the CPU, and costs the small model's ~0.1 s of CPU instead of the reference model's
# ~2 s that the other test worker now gets.
SLOW_STEPS = {"EMBCLF_SLOW_AT": "autoencode.step:1.5"}


def tiny_args(tmp: Path, train_size: int = 200, epochs: int = 1, small: bool = False) -> List[str]:
    """Overrides for a job of a few seconds on CPU: a tiny real CIFAR-10 subset, 1 epoch. ``small``: a two-layer
    encoder (``conftest.SMALL_MODEL``, ~1/10 of the reference model's compute) for tests where nothing depends on
    how long an epoch takes. Tests that signal or kill a job mid-training use it too, with ``SLOW_STEPS`` in the
    environment."""
    from conftest import SMALL_MODEL  # (here: conftest imports this module's start_slurm)

    return [
        *(SMALL_MODEL if small else []),
        "data=folder",
        f"data.root={cifar_root()}",
        f"data.train_size={train_size}",
        "data.test_size=100",
        f"data.cache_dir={tmp / 'cache'}",
        f"autoencode.epochs={epochs}",
        f"output_dir={tmp / 'out'}",
    ]


def embclf_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for ``python -m embclf``: this checkout first on the path (its embclf package and
    its hydra_plugins/embclf_launcher), no W&B network access, Hydra's compact errors."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["WANDB_MODE"] = "disabled"
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra or {})
    return env


def run_embclf(*args: str, timeout: float = 300, cwd: Optional[Path] = None,
               env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``python -m embclf -m <args>`` (``conftest.run_module``: a sweep gets its own interpreter) with
    ``embclf_env(env)``; returns the CompletedProcess (stdout+stderr in .stdout)."""
    from conftest import run_module

    return run_module("embclf", ["-m", *args], cwd or REPO, embclf_env(env), timeout=timeout, merge_stderr=True)


def run_dirs(sweep_dir: Path) -> List[Path]:
    """The job dirs of a sweep (every direct child holding .hydra/), sorted by name."""
    return sorted(p for p in Path(sweep_dir).iterdir() if (p / ".hydra").is_dir())


def summary(run_dir: Path) -> dict:
    with open(Path(run_dir) / "summary.json") as f:
        return json.load(f)


def overrides_of(run_dir: Path) -> List[str]:
    from omegaconf import OmegaConf

    return list(OmegaConf.load(Path(run_dir) / ".hydra" / "overrides.yaml"))


def assert_no_gpu_shared_while_overlapping(records: List[dict]) -> None:
    """From the jobs' own summary.json records: no two jobs whose [start_time, end_time] intervals
    overlap were given the same CUDA_VISIBLE_DEVICES."""
    for i, a in enumerate(records):
        for b in records[i + 1:]:
            overlap = a["start_time"] < b["end_time"] and b["start_time"] < a["end_time"]
            if overlap:
                assert a["cuda_visible_devices"] != b["cuda_visible_devices"], (
                    f"jobs {a['overrides']} and {b['overrides']} overlapped in time on the same "
                    f"GPU {a['cuda_visible_devices']}"
                )


# ------------------------------------------------------------------------------------------------
# SLURM


def slurm(*args: str, check: bool = True) -> str:
    """Run a SLURM client command (squeue, scontrol, sacct) against the test cluster."""
    out = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}): {out.stdout}")
    return out.stdout


def start_slurm():
    """A generator for the session fixture ``slurm_cluster`` (conftest.py): a real single-node SLURM with 2 fake
    GPUs on 127.0.0.1, started once per test session.

    Starts it with ``LOCAL_SLURM_FAKE_GPUS=2 local-slurm.sh start`` (needs root; installs the Debian
    packages with apt-get when missing) and stops it at the end -- unless it was already running
    before the session, in which case it is left as found.  Yields the SLURM_CONF path, which is also
    exported into os.environ so the launcher's sbatch/squeue/sacct calls find the cluster.
    """
    if not SLURM_SCRIPT.is_file():
        pytest.fail(f"local SLURM script not found at {SLURM_SCRIPT} (set EMBCLF_LOCAL_SLURM)")
    env = dict(os.environ, LOCAL_SLURM_FAKE_GPUS="2")
    # the node's CPU count comes from nproc, which honours OMP_NUM_THREADS: the test session's thread cap
    # (conftest.pytest_configure) would make it a 1-CPU node that runs the 1-CPU jobs one at a time
    for k in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT"):
        env.pop(k, None)
    t0 = time.time()
    out = subprocess.run(
        ["bash", str(SLURM_SCRIPT), "start"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, timeout=600,
    )
    if out.returncode != 0:
        pytest.fail(f"local SLURM did not start ({out.returncode}):\n{out.stderr[-3000:]}")
    m = re.search(r"export SLURM_CONF=(\S+)", out.stdout)
    assert m, f"local-slurm.sh printed no SLURM_CONF: {out.stdout!r}"
    started_here = "already running" not in out.stderr
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = m.group(1)
    print(f"local SLURM up in {time.time() - t0:.1f}s ({'started' if started_here else 'already running'})")
    node = slurm("scontrol", "show", "node")
    if "gpu:2" not in node:
        pytest.fail(
            "the running local SLURM has no fake GPUs (Gres=gpu:2); stop it "
            f"({SLURM_SCRIPT} stop) and run the tests again so they start it with LOCAL_SLURM_FAKE_GPUS=2"
        )
    try:
        yield m.group(1)
    finally:
        if started_here:
            subprocess.run(["bash", str(SLURM_SCRIPT), "stop"], env=env, timeout=300,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
