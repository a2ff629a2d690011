"""Structured-config schemas for embclf, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is validated against one of these dataclasses, so a wrong type or an
unknown key fails at composition time with an error naming the key (e.g. ``latent=abc`` ->
"Value 'abc' of type 'str' could not be converted to Integer ... full_key: latent").

One group per module: ``data`` -> ``embclf/data.py``, ``model`` -> ``embclf/models/``, ``head`` ->
``embclf/heads.py``, ``stage`` -> ``embclf/stages/``, ``logger`` -> ``embclf/tracking.py``, ``debug`` ->
``embclf/debug.py``. Nothing else lives here.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

CONF_DIR_NAME = "conf"


def conf_dir() -> str:
    """Absolute path of the Hydra config directory.

    Installed wheels carry the configs as ``embclf/conf``; an editable install or a source checkout
    uses ``conf/`` at the repository root. Raises ``FileNotFoundError`` naming both places when
    neither exists (a broken install).
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / CONF_DIR_NAME, here.parent / CONF_DIR_NAME):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"embclf cannot find its Hydra configs: neither {here / CONF_DIR_NAME} nor "
        f"{here.parent / CONF_DIR_NAME} holds config.yaml. Reinstall the package "
        "(`pip install .` ships them inside embclf/conf)."
    )


class Stage(Enum):
    """What one job does: train an autoencoder, a classifier on its embeddings, or both in turn."""

    autoencode = "autoencode"
    classify = "classify"
    all = "all"


class Source(Enum):
    """Where images come from: torchvision's downloaders or any local ImageFolder tree."""

    cifar10 = "cifar10"
    cifar100 = "cifar100"
    folder = "folder"


class Arch(Enum):
    """Encoder/decoder family: the reference study's small conv net or a ResNet-18."""

    conv = "conv"
    resnet = "resnet"


@dataclass
class DataConfig:
    """``data`` group: where images come from and how much of them is used."""

    source: Source = Source.cifar10
    root: Optional[str] = "~/.cache/embclf/datasets/cifar10"  # data=folder: required
    train_size: Optional[int] = None  # null = all; int = class-stratified subset (fixed seed)
    test_size: Optional[int] = None
    val_size: float = 0.1  # in (0,1): fraction of the (subsetted) train split; >= 1: a count
    image_size: int = 32
    download: bool = True  # torchvision sources only
    cache_dir: Optional[str] = None  # null = ~/.cache/embclf/data (never inside data.root)
    subset_seed: int = 0


@dataclass
class ModelConfig:
    """``model`` group: architecture family and whether it is variational."""

    name: str = MISSING  # ae | vae | resnet | resnet_vae
    arch: Arch = Arch.conv
    variational: bool = False
    beta: float = 0.1  # KL weight (VAE only), on SSE summed over pixels per image
    channels: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 256])
    strides: List[int] = field(default_factory=lambda: [2, 1, 2, 1, 2])


@dataclass
class HeadConfig:
    """``head`` group: the classifier trained on frozen embeddings."""

    name: str = "mlp"
    hidden: List[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.0


@dataclass
class AutoencodeConfig:
    """Settings of ``stage=autoencode`` (defaults from the reference study)."""

    epochs: int = 80
    batch_size: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    image_epochs: List[int] = field(default_factory=lambda: [1, 10, 40])  # plus the last epoch
    eval_batch_size: int = 1000


@dataclass
class ClassifyConfig:
    """Settings of ``stage=classify`` (defaults from the reference study)."""

    epochs: int = 50
    batch_size: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    encoder: Optional[str] = None  # null = find the matching autoencode run; else run dir or .pt path


class Precision(Enum):
    """``precision``: ``fp32`` (default) or ``bf16`` autocast for the forward pass (CUDA and CPU); losses,
    metric sums, optimizer state and checkpoints stay fp32."""

    fp32 = "fp32"
    bf16 = "bf16"


class WandbMode(Enum):
    """``logger.wandb.mode``. ``auto``: ``WANDB_MODE`` if set, else online when logged in (``WANDB_API_KEY`` or a
    netrc entry) and the server answers within 2 s, else offline. It never prompts and never waits on a time-out."""

    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class WandbConfig:
    """``logger.wandb``: one wandb run per stage run, its files inside the run dir (``<run dir>/wandb``)."""

    mode: WandbMode = WandbMode.auto
    project: str = "embclf"
    entity: Optional[str] = None  # null = the logged-in user's default entity
    tags: List[str] = field(default_factory=list)  # added to the automatic model/latent/data tags
    table_rows: int = 2000  # test embeddings logged as a wandb.Table at the end of classify (0 = none)


@dataclass
class LoggerConfig:
    """``logger`` group: ``wandb`` (default) or ``none`` (never imports wandb). Local artifacts are always written."""

    name: str = "wandb"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # 2-D scatter plots of the test embeddings written by classify (images/<name>.png); umap needs umap-learn
    projections: List[str] = field(default_factory=lambda: ["pca", "tsne", "umap"])
    projection_points: int = 1000  # random test subset projected (t-SNE/UMAP cost grows with it)


@dataclass
class DebugConfig:
    """``debug`` group (``embclf/debug.py``): ``none`` (default), ``fast`` or ``overfit``.

    ``fast``: every stage runs 1 epoch of a few batches on a tiny class-stratified subset and writes all its
    outputs. ``overfit``: the model (and then the head) trains on one fixed batch until it fits it. A debug run
    is marked (``"debug"`` in summary.json, a warning) and is never taken for a result: encoder lookups and
    the report keep it apart. Each key says which mode reads it.
    """

    name: str = "none"  # none | fast | overfit
    train_size: int = 256  # fast, overfit: data.train_size (at most; val is held out of it as usual)
    test_size: int = 100  # fast, overfit: data.test_size (at most)
    batch_size: int = 32  # fast: both stages' batch size (a few batches per epoch); overfit: images in the batch
    steps: int = 500  # overfit: optimizer steps at most
    eval_every: int = 25  # overfit: steps between evaluations of the batch (eval mode)
    target_psnr: float = 25.0  # overfit: the autoencoder passes when its PSNR on the batch exceeds this (dB)


@dataclass
class Config:
    """Top-level config. Key names are an interface: scripts and docs depend on them."""

    defaults: List[Any] = field(default_factory=lambda: [])
    stage: Stage = Stage.autoencode
    latent: int = 64
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None  # null = torch default (honours OMP_NUM_THREADS)
    precision: Precision = Precision.fp32  # bf16: autocast forward passes (embclf/runtime.py)
    compile: bool = False  # torch.compile the model's training/eval step, once per job
    tf32: bool = True  # CUDA only: TF32 matmuls and convolutions (recorded in the summary)
    output_dir: str = "outputs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    autoencode: AutoencodeConfig = field(default_factory=AutoencodeConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


MAX_NAME = 120
# identity keys lead the name, so a sweep's varying keys stay readable even when the rest is cut
NAME_FIRST = ("model", "latent", "stage", "seed", "head", "data", "experiment")
# full paths make names long and unreadable: they appear by their last component (data.root=cifar10);
# the full values stay in .hydra/overrides.yaml and config.yaml. output_dir is already the parent.
NAME_BASENAME = ("classify.encoder", "data.root", "data.cache_dir")
NAME_EXCLUDE = ("output_dir",)


def _basename(override: str) -> str:
    key, _, value = override.partition("=")
    return f"{key}={os.path.basename(value.strip(chr(39) + chr(34)).rstrip('/')) or value}"


def safe_name(overrides: Any) -> str:
    """One flat, filesystem-safe directory name from a job's overrides (``hydra.overrides.task``).

    Accepts the override list (or one string). Identity keys (model, latent, stage, seed, ...) come first,
    paths appear by their last component, ``hydra.*`` and ``output_dir`` are left out; ``/`` and other unsafe characters become ``_``; a name longer
    than 120 characters is cut and suffixed with 8 hex digits of the SHA-1 of all overrides, so distinct
    jobs stay distinct. No overrides gives ``run``. E.g. ``['latent=64', 'model=vae']`` -> ``model=vae,latent=64``.
    """
    items = [overrides] if isinstance(overrides, str) else [str(o) for o in overrides]
    items = [o for o in items if o and o.split("=", 1)[0].lstrip("+~") not in NAME_EXCLUDE
             and not o.lstrip("+~").startswith("hydra.")]
    items = [_basename(o) if o.split("=", 1)[0].lstrip("+~") in NAME_BASENAME else o for o in items]
    rank = {k: i for i, k in enumerate(NAME_FIRST)}
    items.sort(key=lambda o: (rank.get(o.split("=", 1)[0], len(rank)), o))
    full = ",".join(items)
    name = re.sub(r"[^A-Za-z0-9=,._+\-]", "_", full).strip("._") or "run"
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(full.encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9]}-{digest}"
    return name


_SWEEP_TOKEN = os.urandom(3).hex()


def sweep_token() -> str:
    """Random 6-hex token, fixed per process, that makes two invocations' dirs distinct.

    Timestamps alone collide when two sweeps start in the same second (e.g. on a cluster).
    """
    return _SWEEP_TOKEN


def register() -> None:
    """Register the schemas and resolvers. Idempotent; called on import of ``embclf``."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    OmegaConf.register_new_resolver("embclf_safe", safe_name, replace=True)
    OmegaConf.register_new_resolver("embclf_token", sweep_token, use_cache=True, replace=True)
