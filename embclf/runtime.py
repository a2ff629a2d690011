"""Process-level setup shared by the stages: device choice, threads, seeding, user-facing errors, and
every device-dependent choice (TF32, cuDNN autotuning, bf16 autocast, channels-last, fused Adam,
torch.compile).

Each device-dependent function takes the ``torch.device`` and decides by its ``type``, so the CUDA branch
runs in tests on a CPU-only machine with ``torch.device("cuda")`` (constructing one needs no GPU).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Callable

import numpy as np
import torch

from .config import check_value

log = logging.getLogger(__name__)


class EmbclfError(RuntimeError):
    """Bad input or a missing prerequisite. The message is one paragraph that names the key or file and the fix.

    The entrypoint prints it without a traceback and exits with status 2.
    """


class DataError(RuntimeError):
    """A data source is missing, unreadable or misconfigured; the message says how to fix it (``embclf.data``,
    ``embclf.image_folder``). The entrypoint prints it like ``EmbclfError``."""


def setup(cfg) -> dict:
    """Apply ``threads`` and ``seed``, choose the device. Returns {"device": torch.device, "fallback": bool, "name": str}.

    ``device=auto`` picks CUDA when usable, else CPU. When a launcher or SLURM set ``CUDA_VISIBLE_DEVICES``
    but no CUDA device is usable (a CPU-only node, fake GPUs in tests), the job says so once and runs on
    the CPU (``fallback`` True). Raises ``EmbclfError`` for ``device=cuda`` without CUDA, a GPU index this
    machine lacks, or a value the gate refuses (``config.VALUE_RULES["device"]``, for direct callers).
    """
    check_value("device", cfg.device, EmbclfError)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed = cfg.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    want = cfg.device
    cuda = torch.cuda.is_available()
    fallback = False
    if want == "auto":
        dev = torch.device("cuda" if cuda else "cpu")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if not cuda and visible not in (None, "", "-1"):
            fallback = True
            log.warning("CUDA_VISIBLE_DEVICES=%s was given but no CUDA device is usable: falling back to CPU", visible)
    else:  # cpu, cuda or cuda:N (the gate allows nothing else)
        if want.startswith("cuda") and not cuda:
            raise EmbclfError(f"device={want} but torch sees no CUDA device (torch {torch.__version__}). "
                              "Use device=auto or device=cpu.")
        dev = torch.device(want)
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()  # before anything is written: .to(cuda:N) would fail in the stage
            raise EmbclfError(f"device={want}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}; use one "
                              "of them, or device=auto.")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    backends = configure_backends(dev, cfg.tf32)
    if precision(cfg) == "bf16" and dev.type == "cpu" and not cpu_has_fast_bf16():
        log.warning("precision=bf16 on a CPU without native bf16 (%s; no AVX512-BF16/AMX): the convolutions run "
                    "in emulated bf16, ~15-30x slower than fp32 (benchmarks/run.py, row 5). Use precision=fp32 "
                    "on this machine.", torch.backends.cpu.get_cpu_capability())
    log.info("device %s (%s), %d threads, seed %d, precision %s%s", dev, name, torch.get_num_threads(), seed,
             precision(cfg), ", TF32" if backends["tf32"] else "")
    return {"device": dev, "fallback": fallback, "name": name, **backends}


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX); without them bf16
    convolutions are emulated and far slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision(cfg) -> str:
    """``cfg.precision`` as a string (``fp32`` or ``bf16``); configs written before the key existed are fp32."""
    p = cfg.get("precision", "fp32") if hasattr(cfg, "get") else "fp32"
    return str(getattr(p, "value", p) or "fp32")


def configure_backends(device: torch.device, tf32: bool = True) -> dict:
    """Process-wide CUDA settings for training; nothing on other devices.

    On CUDA: TF32 for float32 matmuls (``torch.set_float32_matmul_precision("high")``) and for cuDNN
    convolutions (``torch.backends.cudnn.allow_tf32``) when ``tf32`` -- ~8x the fp32 tensor-core rate on
    Ampere/Hopper with a 10-bit mantissa, the PyTorch default for convolutions since 1.7 -- and
    ``cudnn.benchmark`` (autotunes each conv shape once; our shapes are fixed per job).
    Returns {"tf32": bool, "cudnn_benchmark": bool}: what was applied (both False off CUDA), for summary.json.
    """
    if device.type != "cuda":
        return {"tf32": False, "cudnn_benchmark": False}
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    return {"tf32": tf32, "cudnn_benchmark": True}


def autocast(device: torch.device, precision_name: str):
    """Context manager for forward passes: bf16 autocast on ``device.type`` (CUDA or CPU) when
    ``precision_name == "bf16"``, else a no-op. Parameters, gradients and optimizer state stay fp32
    (mixed precision in the sense of Micikevicius et al. 2018; bf16 needs no loss scaling)."""
    if precision_name == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """``torch.channels_last`` on CUDA (cuDNN's NHWC kernels use tensor cores without transposes), else
    ``torch.contiguous_format`` (NCHW is faster for these convs on the CPU). Apply it to the conv models
    and to each input batch."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def adam(params, device: torch.device, lr: float, weight_decay: float) -> torch.optim.Adam:
    """``torch.optim.Adam`` (Kingma & Ba 2015) with the fused CUDA kernel on CUDA: one kernel for all
    parameters instead of a per-parameter Python loop, and no host sync on the step count. Elsewhere
    PyTorch's default implementation."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=(device.type == "cuda") or None)


def maybe_compile(fn: Callable, enabled: bool) -> Callable:
    """``torch.compile(fn)`` when ``enabled`` (the ``compile`` key), else ``fn``. Compiled once per job: the
    first call traces and compiles (tens of seconds), a batch of another size compiles once more.
    On the CPU, inductor needs a C++ compiler on the PATH."""
    if not enabled:
        return fn
    log.info("compiling the model's step with torch.compile (the first batches take longer)")
    return torch.compile(fn)
