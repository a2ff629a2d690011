"""Artefacts of a run dir turned back into objects: the encoder checkpoint a classify run uses, an autoencoder
(and its training objective) from a checkpoint, a classify run's head. Written once for the stages, ``debug``,
``evaluate`` and ``embed``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from . import identity, runs, runtime
from .heads import build_head
from .models import build_model
from .models.objectives import Objective, build_objective
from .runtime import EmbclfError


def resolve_encoder(cfg) -> Path:
    """Path of the encoder checkpoint to use (see module docstring).

    Raises ``runtime.EmbclfError`` when the given path holds no checkpoint, or when no matching run exists
    (naming the identity searched and the command that trains it).
    """
    given = cfg.classify.encoder
    if given:
        p = Path(str(given)).expanduser()
        # a .pt file, an autoencode run dir, or a stage=all job dir (its encoder is in autoencode/)
        tried = [p] if not p.is_dir() else [p / "checkpoints" / "best.pt", p / "autoencode" / "checkpoints" / "best.pt"]
        for ck in tried:
            if ck.is_file():
                return ck
        raise runtime.EmbclfError(
            f"classify.encoder={given}: no encoder checkpoint there (looked for {' and '.join(map(str, tried))}). "
            "Point it at a completed autoencode run dir, a stage=all job dir (holding autoencode/), or a "
            "checkpoint .pt file; a run that has not completed has no best.pt yet.")
    out = Path(cfg.output_dir)
    found = runs.find_encoder_run(cfg, out)
    if found is None:
        ident = identity.identity(cfg, "autoencode")
        ident.setdefault("debug", {"name": "none"})
        ae = ident["autoencode"]
        d = ident["data"]
        # every setting that makes the identity, so the printed command really trains the missing encoder
        keys = [f"data={d['source']}"] + [f"data.{k}={_q(v)}" for k, v in d.items() if k != "source"] + \
               [f"autoencode.{k}={_q(v)}" for k, v in ae.items()] + \
               [f"model.{k}={_q(v)}" for k, v in ident["model"].items()
                if k in runs.MODEL_OBJECTIVE_DEFAULTS and v != runs.MODEL_OBJECTIVE_DEFAULTS[k]] + \
               ([f"debug={ident['debug']['name']}"] if ident["debug"]["name"] != "none" else [])
        raise runtime.EmbclfError(
            f"stage=classify found no completed autoencode run under output_dir={out} matching model={ident['model']['name']} "
            f"latent={ident['latent']} seed={ident['seed']} data={d['source']} (root {d['root']}, train_size "
            f"{d['train_size']}, test_size {d['test_size']}, val_size {d['val_size']}) autoencode.epochs={ae['epochs']} "
            f"batch_size={ae['batch_size']} lr={ae['lr']}. Train it first with the same command line and stage=autoencode "
            f"(or run stage=all), e.g. `python -m embclf stage=autoencode model={ident['model']['name']} "
            f"latent={ident['latent']} seed={ident['seed']} {' '.join(keys)} output_dir={out}`, "
            "or pass classify.encoder=PATH (a run dir or checkpoint).")
    return found / "checkpoints" / "best.pt"


def _q(v) -> str:
    """A config value as a Hydra override value (lists without spaces, null for None)."""
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_q(x) for x in v) + "]"
    return str(v)



def build_autoencoder(ck: dict, device: Optional[torch.device] = None):
    """The autoencoder of a checkpoint dict (``runs.load_checkpoint``'s, keys model and config), built from the
    config stored in it, in eval mode and frozen; on ``device`` (in its memory format) or left on the CPU."""
    c = ck["config"]
    model = build_model(OmegaConf.create(c["model"]), int(c["latent"]), int(c["data"]["image_size"]))
    model.load_state_dict(ck["model"])
    if device is not None:
        model.to(device, memory_format=runtime.memory_format(device))
    return model.eval().requires_grad_(False)


def load_autoencoder(path: Path, device: Optional[torch.device], image_size: int, what: str,
                     expect: tuple = ("model", "config")):
    """The autoencoder of a checkpoint written by ``stage=autoencode`` (or ``debug=overfit``): read (``expect``
    keys), its image size checked against ``image_size``, built by ``build_autoencoder``. Returns (model,
    checkpoint dict). Raises ``EmbclfError`` for an unreadable checkpoint or an image size other than the model's."""
    ck = runs.load_checkpoint(path, expect, what)
    runs.check_image_size(ck["config"], image_size, path)
    return build_autoencoder(ck, device), ck


def load_objective(ck: dict, n_classes: int, device: torch.device) -> Objective:
    """The training objective of an autoencode checkpoint: the extra terms of its config's ``model`` node
    (``models.objectives.build_objective``) with the joint head's weights (``joint_head``) loaded, on
    ``device``, in eval mode, as the stage evaluates val and test. ``n_classes``: the head's output size
    when the checkpoint has no head (the class penalty's K).

    Raises ``EmbclfError`` when the model config's objective keys are invalid or the head does not load."""
    head_state = ck.get("joint_head")
    if head_state is not None:
        n_classes = int(head_state["weight"].shape[0])
    c = ck["config"]
    try:
        objective = build_objective(OmegaConf.create(c["model"]), int(c["latent"]), n_classes)
    except ValueError as e:
        raise EmbclfError(f"the checkpoint's config: {e}.") from None
    if objective.head is not None:
        if head_state is None:
            raise EmbclfError("the checkpoint's run trained a joint head (model.ce_weight > 0) but the checkpoint "
                              "holds no joint_head; it was written by an older embclf.")
        objective.head.load_state_dict(head_state)
        objective.head.to(device).eval().requires_grad_(False)
    return objective


def encoder_checkpoint(run_dir: Path, summary: dict) -> Path:
    """The encoder checkpoint a classify run was trained on (its summary's ``encoder_checkpoint``, read by
    ``runs.encoder_checkpoint_of``: a relative record is found at the run dir's current location).

    Raises ``EmbclfError`` when none is recorded or the file is gone."""
    p = runs.encoder_checkpoint_of(run_dir, summary)
    if p is None or not p.is_file():
        rec = summary.get("encoder_checkpoint") or summary.get("encoder_run")
        where = f"{p}, recorded as {rec}" if rec and not Path(rec).is_absolute() else str(p or "not recorded")
        raise EmbclfError(f"{run_dir}: the encoder checkpoint this classify run used ({where}) is gone; it cannot be "
                          "re-evaluated without it. A run's encoder travels with it when the whole sweep dir (or "
                          "output dir) is copied or moved, not the classify run dir alone.")
    return p


def load_head(run_dir: Path, which: str, cfg, in_dim: int, n_classes: int, device: torch.device):
    """The classify run's head, ready to score embeddings float32 [N, in_dim] -> [N, n_classes].

    Built from the run's ``head`` config by ``heads.build_head``. A head with weights (``mlp``, and any
    ``nn.Module`` head the run checkpointed) loads ``checkpoints/<which>.pt`` (its input standardization is
    in the same state dict). A head fitted on the embeddings instead (it has ``fit``, no checkpoint) is
    refitted on the run's own ``embeddings.pt`` train (and val) split, which is deterministic. Every head
    type plugs in here. Returns (head, epoch of the checkpoint or None).

    Raises ``EmbclfError`` when the checkpoint (or embeddings.pt) is missing or unreadable."""
    head = build_head(cfg.head, in_dim, n_classes)
    path = run_dir / "checkpoints" / f"{which}.pt"
    if isinstance(head, torch.nn.Module) and (path.is_file() or not hasattr(head, "fit")):
        ck = runs.load_checkpoint(path, ("head",), f"checkpoint={which}")
        head.load_state_dict(ck["head"])
        return head.to(device).eval(), ck.get("epoch")
    emb = runs.load_checkpoint(run_dir / "embeddings.pt", ("train", "val"), "embeddings")
    if isinstance(head, torch.nn.Module):
        head = head.to(device)
    head.fit(emb["train"]["z"].to(device), emb["train"]["labels"].to(device),
             emb["val"]["z"].to(device), emb["val"]["labels"].to(device))
    return head.eval(), None

