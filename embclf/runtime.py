"""Process-level setup shared by the stages: device choice, threads, seeding, user-facing errors."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


class EmbclfError(RuntimeError):
    """Bad input or a missing prerequisite. The message is one paragraph that names the key or file and the fix.

    The entrypoint prints it without a traceback and exits with status 2.
    """


def setup(cfg) -> dict:
    """Apply ``threads`` and ``seed``, choose the device. Returns {"device": torch.device, "fallback": bool, "name": str}.

    ``device=auto`` picks CUDA when usable, else CPU. When a launcher or SLURM set ``CUDA_VISIBLE_DEVICES``
    but no CUDA device is usable (a CPU-only node, fake GPUs in tests), the job says so once and runs on
    the CPU (``fallback`` True). Raises ``EmbclfError`` for ``device=cuda`` without CUDA or an unknown value.
    """
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    seed = int(cfg.seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    want = str(cfg.device)
    cuda = torch.cuda.is_available()
    fallback = False
    if want == "auto":
        dev = torch.device("cuda" if cuda else "cpu")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if not cuda and visible not in (None, "", "-1"):
            fallback = True
            log.warning("CUDA_VISIBLE_DEVICES=%s was given but no CUDA device is usable: falling back to CPU", visible)
    elif want == "cpu" or want.startswith("cuda"):
        if want.startswith("cuda") and not cuda:
            raise EmbclfError(f"device={want} but torch sees no CUDA device (torch {torch.__version__}). "
                              "Use device=auto or device=cpu.")
        dev = torch.device(want)
    else:
        raise EmbclfError(f"device={want!r} is not a device; use auto, cpu, cuda or cuda:N.")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    log.info("device %s (%s), %d threads, seed %d", dev, name, torch.get_num_threads(), seed)
    return {"device": dev, "fallback": fallback, "name": name}
