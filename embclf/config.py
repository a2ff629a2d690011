"""Structured-config schemas for embclf, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is validated against one of these dataclasses, so a wrong type or an
unknown key fails at composition time with an error naming the key (e.g. ``latent=abc`` ->
"Value 'abc' of type 'str' could not be converted to Integer ... full_key: latent").

One group per module: ``data`` -> ``embclf/data.py``, ``model`` -> ``embclf/models/``, ``head`` ->
``embclf/heads.py``, ``stage`` -> ``embclf/stages/``, ``logger`` -> ``embclf/tracking.py``, ``debug`` ->
``embclf/debug.py``. Here: the schemas (the home of every default; conf/ YAMLs hold only what differs), the
key roles on them (read by ``embclf/identity.py``), and the one validation gate (``VALUE_RULES``,
``CROSS_RULES``, ``problems``). Run-dir naming lives beside it in ``embclf/identity.py``; the command line's
key check in ``embclf/overrides.py``.

Importing this module stores the schema in Hydra's ConfigStore (as ``config_schema``) and registers the
run-dir-name resolvers with OmegaConf: entries in their registries, the documented way; nothing is patched.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR_NAME = "conf"

# --- key roles: what makes two runs the same experiment (docs/run-dirs.md) ---------------------------------
# Every key of the schema has one role, declared here on its field and nowhere else (embclf/identity.py reads
# them): IDENTITY (the default: it changes what a run computes, so two runs that differ in it are two
# experiments) or RUN (how-to-run: threads, device, where outputs and caches go, logging; never part of an
# experiment). A PATH key's value is normalised (~ expanded, absolute, symlinks resolved, no trailing slash)
# before it is stored or compared, so two spellings of one place are one value. A top-level group's STAGES say
# which stage's identity its identity keys belong to (autoencode, classify or both); nested keys inherit it.
RUN = {"role": "run"}
PATH = {"path": True}
RUN_PATH = {"role": "run", "path": True}
BOTH_STAGES = {"stages": ("autoencode", "classify")}


def stages(*names: str, **more: Any) -> dict:
    """Field metadata: the stages whose identity this key (or group) belongs to, plus any other metadata."""
    return {"stages": tuple(names), **more}


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


# ``model.decorrelation``: which penalty ``model.decorrelation_weight`` weights (docs/objectives.md).
# ``class``: squared cosine between the batch's class-mean mu's (needs labels); ``feature``: squared
# off-diagonal correlation between mu's dims over the batch (label-free). Functional API: ``class`` is a keyword.
Decorrelation = Enum("Decorrelation", {"class": "class", "feature": "feature"})


class SelectOn(Enum):
    """``autoencode.select_on``: the val metric that picks the best epoch (checkpoints/best.pt).
    ``loss``: the val objective at the full weights (β after warm-up, γ, λ); ``mse``: val MSE alone."""

    loss = "loss"
    mse = "mse"


class Arch(Enum):
    """Encoder/decoder family: the reference study's small conv net or a ResNet-18."""

    conv = "conv"
    resnet = "resnet"


@dataclass
class DataConfig:
    """``data`` group: where images come from and how much of them is used."""

    source: Source = Source.cifar10
    root: Optional[str] = field(default="~/.cache/embclf/datasets/cifar10", metadata=PATH)  # data=folder: required
    train_size: Optional[int] = None  # null = all; int = class-stratified subset (fixed seed)
    test_size: Optional[int] = None
    val_size: float = 0.1  # in (0,1): fraction of the (subsetted) train split; >= 1: a count
    image_size: int = 32
    download: bool = field(default=True, metadata=RUN)  # torchvision sources only
    cache_dir: Optional[str] = field(default=None, metadata=RUN_PATH)  # null = ~/.cache/embclf/data (never inside data.root)
    subset_seed: int = 0
    skip_corrupt: bool = False  # data=folder: skip (and count) unreadable images instead of failing (docs/data.md)


@dataclass
class ModelConfig:
    """``model`` group: architecture family and whether it is variational."""

    name: str = MISSING  # ae | vae | resnet | resnet_vae
    arch: Arch = Arch.conv
    variational: bool = False
    beta: float = 0.1  # KL weight (VAE only), on SSE summed over pixels per image
    # Adam weight decay of this model's autoencoder training; null = autoencode.weight_decay. The reference
    # study used 1e-4 for the plain conv AE only (conf/model/ae.yaml) and none for the VAE.
    weight_decay: Optional[float] = None
    channels: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 256])
    strides: List[int] = field(default_factory=lambda: [2, 1, 2, 1, 2])
    # objective per image: SSE + beta_e*KL + ce_weight*CE + decorrelation_weight*R (docs/objectives.md)
    ce_weight: float = 0.0  # gamma: CE (nats) of a joint linear head on mu; 0 = off. AE, VAE, ResNet alike
    decorrelation_weight: float = 0.0  # lambda: weight of the batch penalty R in [0, 1]; 0 = off
    decorrelation: Decorrelation = Decorrelation['class']  # class (labels) | feature (label-free)
    kl_warmup_epochs: int = 0  # VAE: beta_e = beta * min(1, (e-1)/kl_warmup_epochs); 0 = full beta from epoch 1


@dataclass
class HeadConfig:
    """``head`` group: the probe on frozen embeddings (``embclf/heads.py``). One schema for every head, so
    ``classify.probes`` can evaluate other heads with the same settings; each key says which heads read it."""

    name: str = "mlp"  # mlp | linear | knn | logreg
    hidden: List[int] = field(default_factory=lambda: [128, 64])  # mlp: hidden widths
    dropout: float = 0.0  # mlp: after each hidden ReLU; linear: on the input
    k: int = 20  # knn: neighbours voting
    temperature: float = 0.07  # knn: votes weighted by exp(cosine / temperature)
    C: List[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])  # logreg: grid of inverse L2 strengths, chosen on val
    max_iter: int = 1000  # logreg: solver iterations


@dataclass
class AutoencodeConfig:
    """Settings of ``stage=autoencode`` (defaults from the reference study)."""

    epochs: int = 80
    batch_size: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    image_epochs: List[int] = field(default_factory=lambda: [1, 10, 40])  # plus the last epoch
    eval_batch_size: int = 1000
    # best epoch: lowest val objective (full weights) | lowest val MSE. Runs written before the key existed chose
    # on val MSE: a stored config without it is read as "mse" (``before``), not as today's default
    select_on: SelectOn = field(default=SelectOn.loss, metadata={"before": "mse"})
    keep_last: bool = field(default=True, metadata=RUN)  # false: delete checkpoints/last.pt once the run completes (best.pt stays)


@dataclass
class ClassifyConfig:
    """Settings of ``stage=classify`` (defaults from the reference study)."""

    epochs: int = 50
    batch_size: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0  # trainable heads (mlp, linear): Adam weight decay
    patience: Optional[int] = None  # early stopping: stop after this many epochs without a better val accuracy; null = off
    lr_grid: List[float] = field(default_factory=list)  # trainable heads: learning rates tried, chosen on val ([] = lr only)
    probes: List[str] = field(default_factory=list)  # more heads fitted on the same cached embeddings, e.g. [linear,knn,logreg]
    # null = find the matching autoencode run; else run dir or .pt path. Its identity is the encoder's own
    # (embclf/identity.py): the same encoder named by two paths is one experiment
    encoder: Optional[str] = field(default=None, metadata=PATH)


class Precision(Enum):
    """``precision``: ``fp32`` (default) or ``bf16`` autocast for the forward pass (CUDA and CPU); losses,
    metric sums, optimizer state and checkpoints stay fp32. ``auto``: bf16 where the device runs it natively
    (CUDA with bf16, a CPU with AVX512-BF16 or AMX), else fp32 (``runtime.resolve_precision``); a run dir
    records the resolved value, and that is its identity."""

    fp32 = "fp32"
    bf16 = "bf16"
    auto = "auto"


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

    defaults: List[Any] = field(default_factory=lambda: [], metadata=RUN)  # Hydra's defaults list
    # which stages a job runs; each stage run dir's identity is that stage's (embclf/identity.py)
    stage: Stage = field(default=Stage.autoencode, metadata={"role": "stage"})
    latent: int = field(default=64, metadata=stages("autoencode"))
    seed: int = field(default=0, metadata=BOTH_STAGES)
    device: str = field(default="auto", metadata=RUN)  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = field(default=None, metadata=RUN)  # null = torch default (honours OMP_NUM_THREADS)
    # bf16: autocast forward passes (embclf/runtime.py); classify embeds at its encoder's precision
    # (runs written before the key existed ran fp32: ``before``, whatever the default becomes)
    precision: Precision = field(default=Precision.fp32, metadata=stages("autoencode", before="fp32"))
    compile: bool = field(default=False, metadata=RUN)  # torch.compile the model's training/eval step, once per job
    tf32: bool = field(default=True, metadata=RUN)  # CUDA only: TF32 matmuls and convolutions (recorded in the summary)
    output_dir: str = field(default="outputs", metadata=RUN_PATH)
    # the value the task function returns (the Optuna sweeper's objective; docs/research.md): a val_* key of the
    # last stage's summary.json, e.g. val_accuracy, probes.knn.val_accuracy, val_psnr; "auto" = val_accuracy for
    # stage=classify|all (maximize), val_loss (the autoencoder's objective per image) for stage=autoencode (minimize)
    objective: str = field(default="auto", metadata=RUN)
    data: DataConfig = field(default_factory=DataConfig, metadata=BOTH_STAGES)
    model: ModelConfig = field(default_factory=ModelConfig, metadata=stages("autoencode"))
    head: HeadConfig = field(default_factory=HeadConfig, metadata=stages("classify"))
    autoencode: AutoencodeConfig = field(default_factory=AutoencodeConfig, metadata=stages("autoencode"))
    classify: ClassifyConfig = field(default_factory=ClassifyConfig, metadata=stages("classify"))
    logger: LoggerConfig = field(default_factory=LoggerConfig, metadata=RUN)
    # a debug run is its own experiment (never a result): its mode and settings are part of its identity
    debug: DebugConfig = field(default_factory=DebugConfig, metadata=BOTH_STAGES)


# --- checks that need the whole composed config ----------------------------------------------------
# The schema types every key, but Hydra's `+key=value` adds keys the schema does not have (a typo such as
# `+autoencode.epoch=1` would sit beside `epochs` and be ignored), and types say nothing about ranges.
# `problems` finds both, so that a single run and every job of a sweep (checked by the launcher before
# anything starts) fail the same way, naming the key.

def _positive(v) -> bool:
    return v >= 1


def _non_negative(v) -> bool:
    return v >= 0


def _all_positive(v) -> bool:
    return all(x >= 1 for x in v)


def _positive_real(v) -> bool:  # > 0 and finite (nan and inf compare badly or blow up later)
    return math.isfinite(v) and v > 0


def _non_negative_real(v) -> bool:
    return math.isfinite(v) and v >= 0


SEED_MAX = 2 ** 32 - 1  # numpy's and scikit-learn's seeds are 32-bit unsigned
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
HEAD_NAMES = ("mlp", "linear", "knn", "logreg")  # embclf/heads.py HEADS (the head group's options)
PROJECTIONS = ("pca", "tsne", "umap")  # embclf/report/projections.py METHODS
LOGGERS = ("wandb", "none")  # conf/logger/*.yaml
DEBUG_MODES = ("none", "fast", "overfit")  # conf/debug/*.yaml


def _names(allowed):
    return lambda v: all(str(x) in allowed for x in v)


# key -> (check, what a valid value is). Keys a config does not have are skipped. Every key of the schema whose
# type allows a value that cannot run is here (enums and booleans are typed by the schema already); ranges that
# depend on other keys are in CROSS_RULES below. They are the only checks of values: library functions called
# directly (heads, objectives, models, data, runtime) apply them through check_value/check_group/check_model.
# A new key touches one schema field and at most one rule.
VALUE_RULES = {
    "latent": (_positive, "a positive integer (e.g. latent=64)"),
    "seed": (lambda v: 0 <= v <= SEED_MAX, f"an integer from 0 to {SEED_MAX} (e.g. seed=0)"),
    "device": (lambda v: DEVICE_PATTERN.fullmatch(str(v)) is not None,
               "auto, cpu, cuda or cuda:N with N a GPU index (e.g. device=cuda:0)"),
    "threads": (lambda v: v is None or v >= 1, "null (torch's default) or at least 1"),
    "output_dir": (lambda v: str(v).strip() != "", "a directory (e.g. output_dir=outputs)"),
    "objective": (lambda v: str(v) == "auto" or str(v).split(".")[-1].startswith("val_"),
                  "auto or a val_* key of the last stage's summary.json (e.g. objective=val_accuracy), so a "
                  "search never selects on test"),
    "data.train_size": (lambda v: v is None or v >= 1, "null (all images) or a positive count"),
    "data.test_size": (lambda v: v is None or v >= 1, "null (all images) or a positive count"),
    "data.val_size": (lambda v: math.isfinite(v) and (0 < v < 1 or (v >= 1 and v == int(v))),
                      "a fraction in (0, 1) or a whole positive count (e.g. 0.1 or 5000)"),
    "data.image_size": (_positive, "a positive number of pixels (e.g. 32)"),
    # the subset is drawn with subset_seed and its val split with subset_seed + 1 (scikit-learn, 32-bit)
    "data.subset_seed": (lambda v: 0 <= v < SEED_MAX, f"an integer from 0 to {SEED_MAX - 1} (e.g. data.subset_seed=0)"),
    "model.beta": (_non_negative_real, "a KL weight >= 0 (e.g. 0.1)"),
    "model.weight_decay": (lambda v: v is None or _non_negative_real(v), "null (autoencode.weight_decay) or >= 0"),
    "model.ce_weight": (_non_negative_real, "a cross-entropy weight >= 0 (0 = no joint head)"),
    "model.decorrelation_weight": (_non_negative_real, "a weight >= 0 (0 = off)"),
    "model.kl_warmup_epochs": (_non_negative, "a number of epochs >= 0 (0 = no warm-up)"),
    "model.channels": (lambda v: len(v) >= 1 and _all_positive(v), "a non-empty list of positive channel counts"),
    "model.strides": (lambda v: len(v) >= 1 and _all_positive(v), "a non-empty list of strides >= 1"),
    "head.name": (lambda v: str(v) in HEAD_NAMES, f"one of {', '.join(HEAD_NAMES)} (e.g. head=mlp)"),
    "head.hidden": (_all_positive, "a list of positive layer widths ([] for none)"),
    "head.dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "head.k": (_positive, "at least 1 (the neighbours voting, e.g. head.k=20)"),
    "head.temperature": (_positive_real, "a positive number (e.g. head.temperature=0.07)"),
    "head.C": (lambda v: len(v) >= 1 and all(_positive_real(c) for c in v),
               "a non-empty list of positive numbers (e.g. head.C=[0.1,1,10])"),
    "head.max_iter": (_positive, "at least 1 (e.g. head.max_iter=1000)"),
    "autoencode.epochs": (_positive, "at least 1"),
    # BatchNorm in training mode normalises over the batch: one image has no batch statistics
    "autoencode.batch_size": (lambda v: v >= 2, "at least 2 (BatchNorm normalises over the batch's images)"),
    "autoencode.eval_batch_size": (_positive, "at least 1"),
    "autoencode.lr": (_positive_real, "a learning rate > 0 (e.g. 1e-3)"),
    "autoencode.weight_decay": (_non_negative_real, ">= 0"),
    "autoencode.image_epochs": (_all_positive, "a list of epoch numbers >= 1"),
    "classify.epochs": (_positive, "at least 1"),
    "classify.batch_size": (_positive, "at least 1"),
    "classify.lr": (_positive_real, "a learning rate > 0 (e.g. 1e-3)"),
    "classify.weight_decay": (_non_negative_real, ">= 0"),
    "classify.patience": (lambda v: v is None or v >= 1,
                          "null (train all classify.epochs) or at least 1 epoch without a better val accuracy"),
    "classify.lr_grid": (lambda v: all(_positive_real(x) for x in v),
                         "a list of positive learning rates (e.g. classify.lr_grid=[1e-4,1e-3]; [] = classify.lr only)"),
    "classify.probes": (_names(HEAD_NAMES), f"a list of head names among {', '.join(HEAD_NAMES)} (e.g. "
                                            "classify.probes=[linear,knn])"),
    "logger.name": (lambda v: str(v) in LOGGERS, "wandb or none (e.g. logger=none)"),
    "logger.projections": (_names(PROJECTIONS), f"a list among {', '.join(PROJECTIONS)} (e.g. "
                                                "logger.projections=[pca]; [] = none)"),
    "logger.projection_points": (lambda v: v >= 2, "at least 2 points"),
    "logger.wandb.table_rows": (_non_negative, ">= 0 (0 = no table)"),
    "debug.name": (lambda v: str(v) in DEBUG_MODES, "none, fast or overfit (e.g. debug=fast)"),
    "debug.train_size": (_positive, "a positive count (e.g. debug.train_size=256)"),
    "debug.test_size": (_positive, "a positive count (e.g. debug.test_size=100)"),
    "debug.batch_size": (lambda v: v >= 2, "at least 2 (BatchNorm normalises over the batch's images)"),
    "debug.steps": (_positive, "at least 1"),
    "debug.eval_every": (_positive, "at least 1"),
    "debug.target_psnr": (lambda v: math.isfinite(v), "a number of dB (e.g. debug.target_psnr=25)"),
}


def _get(cfg: Any, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except Exception:  # noqa: BLE001 -- missing or unresolvable: reported by the missing-keys check or by Hydra
        return _ABSENT


def encoder_stride(model: Any) -> Optional[int]:
    """The total stride of the ``model`` group's encoder (the image side divided by its feature map's side):
    the product of ``model.strides`` for ``arch=conv``, 8 for ``arch=resnet``; None when it cannot be told."""
    arch = str(getattr(model.get("arch"), "value", model.get("arch")))
    if arch == "resnet":
        return 8
    strides = model.get("strides")
    if arch != "conv" or strides is None or not all(isinstance(s, int) and s >= 1 for s in strides):
        return None
    return math.prod(strides)


def _image_size_vs_model(cfg: Any) -> Optional[str]:
    size, model = _get(cfg, "data.image_size"), _get(cfg, "model")
    if not isinstance(size, int) or size < 1 or not isinstance(model, DictConfig):
        return None
    if _get(cfg, "classify.encoder") not in (None, _ABSENT) and \
            str(getattr(_get(cfg, "stage"), "value", _get(cfg, "stage"))) == "classify":
        return None  # the given encoder decides the architecture (checked against its checkpoint instead)
    arch = str(getattr(model.get("arch"), "value", model.get("arch")))
    if arch == "resnet" and size != 32:
        return (f"data.image_size={size} is invalid with model.arch=resnet: its decoder is built for 32x32 images; "
                "use data.image_size=32 (images are resized to it) or model=ae / model=vae.")
    stride = encoder_stride(model)
    if stride and size % stride:
        ok = [m * stride for m in range(1, 9) if m * stride >= 8][:4]
        return (f"data.image_size={size} is invalid for model.strides={_as_override(list(model.strides))}: the encoder halves the "
                f"image {int(math.log2(stride)) if stride & (stride - 1) == 0 else '?'} times (total stride {stride}), "
                f"so the image side must be a multiple of {stride}, e.g. data.image_size={ok[0]} "
                f"({', '.join(map(str, ok))}, ...).")
    return None


def _channels_vs_strides(cfg: Any) -> Optional[str]:
    model = _get(cfg, "model")
    if not isinstance(model, DictConfig) or str(getattr(model.get("arch"), "value", model.get("arch"))) != "conv":
        return None
    ch, st = model.get("channels"), model.get("strides")
    if ch is not None and st is not None and len(ch) != len(st):
        return (f"model.channels={_as_override(list(ch))} and model.strides={_as_override(list(st))} are invalid together: one stride per "
                f"conv layer, so both need the same length (e.g. model.channels=[32,64,128,256,256] "
                "model.strides=[2,1,2,1,2]).")
    return None


def _val_count_vs_train_size(cfg: Any) -> Optional[str]:
    n, v = _get(cfg, "data.train_size"), _get(cfg, "data.val_size")
    if isinstance(n, int) and isinstance(v, (int, float)) and v >= 1 and v >= n:
        return (f"data.val_size={int(v)} is invalid with data.train_size={n}: val is held out of the training "
                f"subset, so it must leave training images; use data.val_size={max(1, n // 10)} or a fraction "
                "such as data.val_size=0.1.")
    return None


# ranges that depend on other keys: each returns a message or None (it skips keys the config lacks)
CROSS_RULES = (_image_size_vs_model, _channels_vs_strides, _val_count_vs_train_size)
_ABSENT = object()


def _as_override(v: Any) -> str:
    """A value as it is written on the command line: [pca,tsn], null, fast (not ['pca', 'tsn'], None)."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_as_override(x) for x in v) + "]"
    return "null" if v is None else str(getattr(v, "value", v))


def problems(cfg: DictConfig) -> List[str]:
    """Every reason why the composed ``cfg`` (with or without its ``hydra`` node) cannot run, one line each.

    Checks values left missing (``???``), keys outside the schema (added with ``+key=``; each names the closest
    valid key), the value ranges of ``VALUE_RULES`` (``latent > 0``, ``epochs >= 1``, ``β >= 0``, ``0 <= seed < 2**32``,
    head and projection names, ...) and, once those hold, the ranges across keys of ``CROSS_RULES``
    (``data.image_size`` a multiple of the encoder's total stride, one stride per conv layer, a val count below
    ``data.train_size``).
    Returns [] for a valid config; never raises for a config Hydra composed.
    """
    out: List[str] = []
    for key in OmegaConf.missing_keys(cfg):
        if not str(key).startswith("hydra."):
            out.append(f"{key} has no value (???): set it on the command line, e.g. {key}=VALUE.")
    from .overrides import unknown_keys  # keys outside the schema: the command line's check lives there too

    unknown_keys(cfg, OmegaConf.structured(Config), "", out)
    for key in VALUE_RULES:
        v = _get(cfg, key)  # missing or unresolvable: reported above or by Hydra
        if v is not _ABSENT:
            out += [m for m in [_breaks(key, v)] if m]
    if not out:  # a range across keys is only meaningful once each key is valid on its own
        out += [m for m in (rule(cfg) for rule in CROSS_RULES) if m]
    return out


def _breaks(key: str, value: Any) -> Optional[str]:
    """The gate's message for ``key=value`` when ``VALUE_RULES[key]`` refuses it, else None."""
    ok, what = VALUE_RULES[key]
    try:
        good = ok(value)
    except TypeError:  # e.g. a string where a number belongs (a plain dict bypassing the schema)
        good = False
    if good:
        return None
    shown = _as_override(OmegaConf.to_container(value) if OmegaConf.is_list(value) else value)
    return f"{key}={shown} is invalid: it must be {what}."


def check_value(key: str, value: Any, error: type = ValueError) -> None:
    """Raise ``error`` with the gate's message (the one ``problems`` gives) when ``value`` breaks
    ``VALUE_RULES[key]``. For library functions called directly (tests, notebooks): the entrypoint, the
    launcher and ``embclf.evaluate`` have run ``problems`` on the whole config already."""
    message = _breaks(key, value)
    if message:
        raise error(message)


def check_group(node: Any, group: str, error: type = ValueError) -> None:
    """``check_value`` for every ``VALUE_RULES`` key of ``group`` (``"data"``, ``"head"``, ``"model"``) that
    ``node`` (that group's node: a DictConfig, a dataclass or a plain dict) has; one ``error`` naming every bad
    key."""
    if not isinstance(node, DictConfig):
        node = OmegaConf.structured(node) if is_dataclass(node) else OmegaConf.create(node)
    prefix = group + "."
    bad = []
    for key in VALUE_RULES:
        if key.startswith(prefix):
            v = _get(node, key[len(prefix):])
            if v is not _ABSENT:
                bad += [m for m in [_breaks(key, v)] if m]
    if bad:
        raise error(" ".join(bad))


def check_model(model: Any, latent: int, image_size: int, error: type = ValueError) -> None:
    """The gate for building a model directly (``embclf.models.build_model``): ``latent``, the ``model``
    group's ranges and the rules across ``model`` and ``data.image_size`` (``CROSS_RULES``). Raises ``error``
    with the gate's messages."""
    check_value("latent", latent, error)
    check_group(model, "model", error)
    cfg = OmegaConf.create({"model": model if isinstance(model, DictConfig) else OmegaConf.create(model),
                            "data": {"image_size": image_size}})
    bad = [m for m in (rule(cfg) for rule in CROSS_RULES) if m]
    if bad:
        raise error(" ".join(bad))


# The schema as Hydra's ConfigStore entry ``config_schema`` (conf/config.yaml's defaults list names it), stored
# when this module is imported: Hydra's documented way for structured configs. It adds an entry, patches nothing.
ConfigStore.instance().store(name="config_schema", node=Config)


def _register_resolvers() -> None:
    """The resolvers of conf/config.yaml's run and sweep dir names (``embclf/identity.py``): ``embclf_name``
    (a job's run dir name), ``embclf_token`` (6 hex digits fixed per process) and ``embclf_output_dir`` (the
    config's ``output_dir``). Registered with OmegaConf beside the schema, so any composition of ``conf/``
    (the entrypoint, the launchers, ``hydra.compose`` in tests or notebooks) resolves them. Idempotent."""
    from .identity import output_dir_resolver, run_name, sweep_token

    OmegaConf.register_new_resolver("embclf_name", run_name, replace=True)
    OmegaConf.register_new_resolver("embclf_token", sweep_token, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("embclf_output_dir", output_dir_resolver, replace=True)


_register_resolvers()
