"""Shared fixtures: the real CIFAR-10 subset from ../shared and one tiny real sweep per test session.

The sweep is the product's own command line (`python -m embclf -m ...`) run as a subprocess, so the
tests exercise Hydra composition, the launcher, the run-dir layout and both stages for real.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"

# A few hundred real images and 2 epochs: enough for above-chance probes, seconds per job.
TINY = ["data=folder", f"data.root={CIFAR}", "data.train_size=500", "data.test_size=200",
        "autoencode.epochs=2", "autoencode.batch_size=50", "autoencode.image_epochs=[1]",
        "classify.epochs=30"]

# Smaller still, for tests that check mechanics (layout, resume), not accuracy.
MINI = ["data=folder", f"data.root={CIFAR}", "data.train_size=300", "data.test_size=100",
        "autoencode.batch_size=50", "autoencode.image_epochs=[1]", "classify.epochs=3",
        "logger.projections=[pca]"]


def embclf_env(tmp: Path) -> dict:
    """Environment for subprocess runs: offline wandb, caches inside the test's tmp dir."""
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", XDG_CACHE_HOME=str(tmp / "xdg-cache"),
               HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    env.pop("WANDB_API_KEY", None)
    return env


def run_embclf(args, tmp: Path, check: bool = True, timeout: int = 600, module: str = "embclf"):
    """Run `python -m embclf ARGS` in ``tmp`` and return the CompletedProcess (stdout+stderr as text)."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp, env=embclf_env(tmp),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"embclf {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    if not (CIFAR / "train").is_dir():
        pytest.fail(f"real CIFAR-10 ImageFolder tree not found at {CIFAR} (expected ../shared beside the repo)")
    return CIFAR


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, cifar_root):
    """A 2x2 sweep (model=ae,vae x latent=8,16): autoencode, then classify, as two separate sweeps.

    Returns dict with the tmp dir, the output dir and both processes.
    """
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "outputs"
    common = ["-m", "model=ae,vae", "latent=8,16", *TINY, f"output_dir={out}"]
    ae = run_embclf([*common, "stage=autoencode"], tmp)
    clf = run_embclf([*common, "stage=classify"], tmp)
    return {"tmp": tmp, "out": out, "ae": ae, "clf": clf}


@pytest.fixture
def small_tmpfs(tmp_path):
    """A factory: ``small_tmpfs(size_bytes, ro=False)`` mounts a tmpfs of that size (read-only if ``ro``) and
    returns its path: a real full (or read-only) file system. Unmounted at teardown. Needs root (skipped
    otherwise)."""
    mounted = []

    def mount(size: int, ro: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)
