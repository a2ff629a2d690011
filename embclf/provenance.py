"""Provenance: what a run's result depends on, recorded in its ``summary.json`` (``provenance``): the code
(git commit, dirty or not), the library versions, the command line, the data's fingerprint, the device, and the
CPU's kernels and thread count (runs are bit-identical only on the same CPU kernels, threads and versions).
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional

def _git(*args: str) -> Optional[str]:
    root = Path(__file__).resolve().parent.parent
    try:
        # --no-optional-locks: `git status` would otherwise refresh the index under .git/index.lock in the
        # user's checkout, clashing with their own git commands while jobs run
        out = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


COMMAND_ENV = "EMBCLF_COMMAND"  # the user's command line, set by embclf's launchers for their jobs


def command_line() -> List[str]:
    """The command the user typed: in a sweep job (a submitit worker, whose own argv is submitit's) the
    launcher's argv, which embclf's launchers pass in ``EMBCLF_COMMAND`` (JSON); else this process's argv."""
    try:
        given = json.loads(os.environ.get(COMMAND_ENV, "null"))
    except ValueError:
        given = None
    return [str(a) for a in given] if isinstance(given, list) else list(sys.argv)


def cpu_info() -> Dict[str, Any]:
    """The CPU a run's numbers came from: ``model`` (from /proc/cpuinfo; ``platform.processor()`` elsewhere),
    ``capability`` (the vector ISA PyTorch's CPU kernels use: ``torch.backends.cpu.get_cpu_capability()``, e.g.
    "AVX2" or "AVX512") and ``flags`` (the AVX-512 / bf16 / AMX flags the kernel reports). Two runs of one
    config are bit-identical only with equal ``capability``, thread count and library versions."""
    import torch

    model, flags = platform.processor() or None, []
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), model)
        line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        flags = sorted(f for f in line.split(":", 1)[-1].split()
                       if f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"))
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {"model": model, "capability": capability, "flags": flags}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _last_setup() -> Dict[str, Any]:
    from .runtime import last_setup

    return last_setup()


def numerics_in_effect(setup: Dict[str, Any]) -> Dict[str, Any]:
    """``{"tf32", "bf16"}`` as in effect for a run set up as ``setup`` (``runtime.last_setup()``): ``tf32`` True
    or False on CUDA (False before Ampere even when ``tf32=true``: no TF32 in its tensor cores), "n/a" on the CPU
    (float32 matmuls and convolutions there are plain fp32); ``bf16`` False when the run is fp32, else "native"
    (Ampere or later; a CPU with AVX512-BF16/AMX) or "emulated" (slower than fp32: pre-Ampere GPUs, other CPUs).
    {} before any setup (a process that did not train)."""
    if not setup:
        return {}
    from .runtime import cpu_has_fast_bf16

    gpu = setup.get("gpu")
    on_cuda = getattr(setup.get("device"), "type", None) == "cuda"
    bf16: Any = False
    if setup.get("precision") == "bf16":
        native = gpu["bf16_native"] if on_cuda and gpu else (not on_cuda and cpu_has_fast_bf16())
        bf16 = "native" if native else "emulated"
    return {"tf32": bool(setup.get("tf32")) if on_cuda else "n/a", "bf16": bf16}


def provenance(cfg, fingerprint: Optional[str] = None, device_name: Optional[str] = None,
               files: Optional[str] = None) -> Dict[str, Any]:
    """What produced a run: code (git commit, dirty flag; None outside a git checkout, e.g. a wheel),
    package versions, data (source, root and ``root_resolved``, sizes, ``fingerprint`` = sha1 of the decoded
    pixels and labels, ``files_fingerprint`` = ``files``, ``data.Dataset.files``: sha1 of the listing of the
    source files read, their paths, sizes and times), host, device (``gpu``: ``runtime.cuda_info`` on CUDA, else
    None), precision (``requested``, ``resolved``, ``why``), ``numerics`` (TF32/bf16 as in effect:
    :func:`numerics_in_effect`) and command line. Stored under
    ``provenance`` in summary.json; start/end time are the summary's ``start_time``/``end_time`` (unix seconds)."""
    from . import __version__
    from .runtime import precision_choice

    commit = _git("rev-parse", "HEAD")
    # tracked files only: outputs/ and caches inside the checkout do not make the code dirty
    dirty = None if commit is None else bool(_git("status", "--porcelain", "--untracked-files=no"))
    d = cfg.data
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "embclf_version": __version__,
        "versions": {"python": platform.python_version(), **{k: _version(k) for k in
                     ("torch", "torchvision", "hydra-core", "omegaconf", "wandb", "numpy", "scikit-learn")}},
        "data": {"source": getattr(d.source, "value", d.source), "root": str(Path(os.path.expanduser(str(d.root)))),
                 # where data.root led when the run read it (a symlink such as data/current -> v3 may move on)
                 "root_resolved": os.path.realpath(os.path.expanduser(str(d.root))) if d.root else None,
                 "train_size": d.train_size, "test_size": d.test_size, "val_size": d.val_size,
                 "subset_seed": d.subset_seed, "fingerprint": fingerprint, "files_fingerprint": files},
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        # runs are bit-identical only on the same CPU kernels, thread count and library versions: record them
        "cpu": cpu_info(),
        "threads": _threads(),
        "device_name": device_name,
        # on CUDA: the CUDA/cuDNN/driver versions, the GPU, its compute capability and compute mode (None on the CPU)
        "gpu": _last_setup().get("gpu"),
        # TF32 and bf16 as they were in effect, not as requested (runtime.setup): numerics_in_effect
        "numerics": numerics_in_effect(_last_setup()),
        # precision=auto: what it resolved to on this machine and why (runtime.resolve_precision)
        "precision": precision_choice(cfg),
        "argv": command_line(),
        "start_time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
