"""Layer-wise probes (``classify.layers``): which of the encoder's stages carries the class information.

A classify run embeds its images once with the frozen encoder (eval mode, no gradient) and, beside the code
(mu), keeps each requested stage's feature map average-pooled to ``POOL`` x ``POOL`` and flattened
(``Autoencoder.encode_layers``: one forward pass gives every layer). Each layer gets the run's own head
(``head=``, with ``classify.lr_grid`` chosen on val as for the code), so the columns differ only in what they
read. DIM's conv-feature column (Hjelm et al., ICLR 2019, Table 1) makes the same comparison.

Layer names: ``code`` and the encoder's ``stage_names`` (conv AE/VAE: ``conv1`` .. ``convN``, one per conv block;
ResNet-18: ``stem``, ``layer1`` .. ``layer4``). ``classify.layers``: ``code`` (the default: the code only),
``all`` (the code and every stage) or a list of names, e.g. ``[code,conv2]``. Feature sizes at ``POOL`` = 2:
channels x 4 (conv: 128, 256, 512, 1024, 1024; ResNet: 256, 256, 512, 1024, 2048).

Nothing here reads a run dir or writes files; ``stage=classify`` caches the features (``layer_embeddings.pt``).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from omegaconf import OmegaConf

from . import data as data_mod
from . import engine, runtime
from .heads import is_trainable

CODE = "code"
ALL = "all"
POOL = 2  # every stage's map is average-pooled to POOL x POOL before it is flattened


def stage_names(model_cfg) -> List[str]:
    """The probe-able stages of the encoder a ``model`` config node (or plain dict) builds, in forward order."""
    get = model_cfg.get
    arch = str(getattr(get("arch"), "value", get("arch") or "conv"))
    if arch == "resnet":
        return ["stem", "layer1", "layer2", "layer3", "layer4"]
    return [f"conv{i + 1}" for i in range(len(get("channels")))]


def resolve(spec, model_cfg) -> List[str]:
    """The layer names ``classify.layers`` asks for, ``code`` first, then the stages in forward order.

    Args:
        spec: ``"code"``, ``"all"`` or a list of names. model_cfg: the encoder's ``model`` node (its stages).
    Raises:
        runtime.EmbclfError: a name the encoder does not have (the error lists the valid ones).
    """
    valid = [CODE, *stage_names(model_cfg)]
    if isinstance(spec, str):
        spec = valid if spec == ALL else [spec]
    names = [str(n) for n in (OmegaConf.to_container(spec) if OmegaConf.is_list(spec) else spec)]
    bad = [n for n in names if n not in valid]
    if bad:
        raise runtime.EmbclfError(
            f"classify.layers={','.join(names)}: this encoder has no layer {', '.join(bad)}. Its layers are "
            f"{', '.join(valid)}; use classify.layers=all for every one, or a list such as "
            f"classify.layers=[code,{valid[min(2, len(valid) - 1)]}].")
    return [n for n in valid if n in names]



def canonical(spec, model_cfg):
    """``classify.layers`` as a run's identity holds it: the layers probed, ``code`` first, then the stages in
    forward order, each once (``code``, ``[code]`` and ``[code,code]`` are one experiment; ``all`` is the list of
    every layer of this encoder). A spec ``resolve`` refuses is returned as written: the classify stage refuses
    it with the valid names."""
    try:
        return [CODE] + [n for n in resolve(spec, model_cfg) if n != CODE]
    except (runtime.EmbclfError, TypeError, ValueError):
        return spec

@torch.no_grad()
def embed(model, split: data_mod.Split, device, batch_size: int, names: Sequence[str],
          precision: str = "fp32") -> Dict[str, torch.Tensor]:
    """``engine.embed`` for several layers: {name: float32 [N, D] on the CPU} from one eval-mode forward pass per
    batch (``Autoencoder.encode_layers``). ``code`` equals ``engine.embed``'s output bit for bit (same batches,
    same operations)."""
    model.eval()
    device = torch.device(device)
    images = split.images.to(device)
    fmt = runtime.memory_format(device)
    out: Dict[str, list] = {n: [] for n in names}
    for i in range(0, len(images), batch_size):
        x = data_mod.to_float(images[i:i + batch_size]).contiguous(memory_format=fmt)
        with runtime.autocast(device, precision):
            feats = model.encode_layers(x, names, POOL)
        for n in names:
            out[n].append(feats[n].float())
    return {n: torch.cat(v).cpu() for n, v in out.items()}


def probe(head_cfg, cc, z: Dict[str, torch.Tensor], y: Dict[str, torch.Tensor], n_classes: int,
          seed: int) -> Dict[str, float]:
    """The run's head fitted on one layer's features as on the code: a trainable head (mlp, linear) with its
    learning rate chosen on val from ``classify.lr_grid`` and its best-on-val epoch kept (``engine.select_lr``,
    ``engine.train_head``), a knn/logreg head fitted once (``engine.fit_probe``).

    Args:
        z: {"train", "val", "test"} float32 [N, D] on the device; y: the labels, int64 [N].
    Returns:
        {"val_accuracy", "test_accuracy"} (fractions in [0, 1]).
    """
    if is_trainable(head_cfg.name):
        lr = engine.select_lr(head_cfg, cc, z, y, n_classes, seed)[0]
        head, fit = engine.train_head(head_cfg, cc, z, y, n_classes, seed, lr)
    else:
        head, fit = engine.fit_probe(head_cfg, cc, z, y, n_classes, seed)
    test_m, _ = engine.eval_head(head, z["test"], y["test"], 4096)
    return {"val_accuracy": fit["val_accuracy"], "test_accuracy": test_m["accuracy"]}
