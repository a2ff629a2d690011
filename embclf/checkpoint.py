"""The checkpoint format: named keys, RNG states, save/load over ``runs``' atomic writes.

Every checkpoint is a dict of tensors and plain values (read back with ``weights_only=True`` by
``runs.load_checkpoint``, always onto the CPU) and always holds ``config`` (the run's resolved config).

- autoencode ``last.pt``: ``AE_LAST`` keys (model, optimizer, scheduler, rng, batch_rng, state {"epoch",
  "best_val_mse", "best_epoch", "best_val"}, config), ``joint_head`` when the objective has one, and after a
  signal mid-epoch ``epoch_position`` {"epoch", "step", "sums", "batch_rng"}; ``best.pt``: the same plus
  ``val`` (the epoch's val metrics).
- classify ``last.pt``: ``HEAD_LAST`` keys (head, optimizer, scheduler, rng, batch_rng, state {"epoch",
  "best_acc", "best_epoch"}, epoch, config); ``best.pt``: head, epoch, val, config.
- ``debug=overfit`` writes best.pt/last.pt with model (or head), config, val, state.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import runs

log = logging.getLogger(__name__)

AE_LAST = ("model", "optimizer", "scheduler", "rng", "batch_rng", "state", "config")
HEAD_LAST = ("head", "optimizer", "scheduler", "rng", "batch_rng", "state", "config")

save = runs.save_atomic  # torch.save to a temp file, renamed into place: a kill mid-write keeps the old file
load = runs.load_checkpoint  # onto the CPU, weights_only=True, one paragraph naming the file on bad content


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "python": [version, list(internal), gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    """Restore ``rng_state()``'s output (CPU tensors, as ``runs.load_checkpoint`` returns them).

    A checkpoint written on a GPU and resumed on a CPU-only machine (or on fewer GPUs) restores the CPU
    generators and the CUDA generators that exist, and says so."""
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = s.get("cuda")
    if cuda:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < len(cuda):
            log.warning("the checkpoint holds the RNG states of %d CUDA device(s), %d are usable here: the "
                        "others are not restored (random draws on the GPU differ from an uninterrupted run)",
                        len(cuda), n)
        for i, st in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(st, i)


def restore_training_state(ck: dict, model, opt, sched, generator: torch.Generator) -> dict:
    """Continue from a ``last.pt`` read by ``runs.load_checkpoint`` (all tensors on the CPU), whatever device
    the model and optimizer live on: ``load_state_dict`` copies weights into the device's parameters and the
    optimizer casts its state to each parameter's device, while RNG states stay CPU tensors. Returns the
    saved loop state {"epoch", "best_val_mse", "best_epoch"}."""
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    set_rng_state(ck["rng"])
    generator.set_state(ck["batch_rng"])
    return dict(ck["state"])



def autoencoder(model, opt, sched, generator: torch.Generator, state: dict, config: dict,
                head: Optional[torch.nn.Module] = None, **extra) -> dict:
    """An autoencode checkpoint (``AE_LAST`` keys, ``joint_head`` when ``head`` is given, then ``extra``, e.g.
    ``val=`` for best.pt or ``epoch_position=`` mid-epoch). ``config``: ``runs.resolved(cfg)``."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": rng_state(), "batch_rng": generator.get_state(), "state": dict(state), "config": config,
            **({"joint_head": head.state_dict()} if head is not None else {}), **extra}


def head_last(head, opt, sched, generator: torch.Generator, state: dict, config: dict) -> dict:
    """A classify ``last.pt`` (``HEAD_LAST`` keys plus ``epoch``): everything ``engine.train_head`` resumes from."""
    return {"head": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": rng_state(), "batch_rng": generator.get_state(), "state": dict(state),
            "epoch": state["epoch"], "config": config}


def head_resume(path: Path) -> Optional[dict]:
    """A classify ``last.pt`` to resume from, or None (no file; or one written by an older embclf without the
    training state, which is said in a warning: the head is then trained again from the start)."""
    if not Path(path).is_file():
        return None
    ck = load(path, ("head", "config"), "resume")
    if not set(HEAD_LAST) <= set(ck):
        log.warning("%s was written by an older embclf without the state to resume from: the head is trained "
                    "again from the start", path)
        return None
    return ck
