"""Structured-config schemas for embclf, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is validated against one of these dataclasses, so a wrong type or an
unknown key fails at composition time with an error naming the key (e.g. ``latent=abc`` ->
"Value 'abc' of type 'str' could not be converted to Integer ... full_key: latent").

One group per module: ``data`` -> ``embclf/data.py``, ``model`` -> ``embclf/models/``, ``head`` ->
``embclf/heads.py``, ``stage`` -> ``embclf/stages/``, ``logger`` -> ``embclf/tracking.py``, ``debug`` ->
``embclf/debug.py``. Here: the schemas (the home of every default; conf/ YAMLs hold only what differs), the
key roles on them (read by ``embclf/identity.py``). Beside it: the one validation gate in
``embclf/validation.py`` (``VALUE_RULES``, ``CROSS_RULES``, ``problems``), run-dir naming in
``embclf/identity.py``, the command line's key and value checks in ``embclf/overrides.py``.

Importing this module stores the schema in Hydra's ConfigStore (as ``config_schema``) and registers the
run-dir-name resolvers with OmegaConf: entries in their registries, the documented way; nothing is patched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

CONF_DIR_NAME = "conf"

# --- key roles: what makes two runs the same experiment (docs/run-dirs.md) ---------------------------------
# Every key of the schema has one role, declared here on its field and nowhere else (embclf/identity.py reads
# them): IDENTITY (the default: it changes what a run computes, so two runs that differ in it are two
# experiments) or RUN (how-to-run: threads, device, where outputs and caches go, logging; never part of an
# experiment). A PATH key's value is normalised (~ expanded, absolute, symlinks resolved, no trailing slash)
# before it is stored or compared, so two spellings of one place are one value. A top-level group's STAGES say
# which stage's identity its identity keys belong to (autoencode, classify or both); nested keys inherit it.
# An identity key added after run dirs were written declares ``added``: the value every earlier run computed
# with (its "off" value). At that value the key is left out of the identity, so the earlier runs keep their
# identity and run dir digest (a re-invoked sweep finds them) and a stored identity.json without the key matches;
# any other value is a new experiment. tests/test_identity.py fails when an identity key appears without it.
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
    # label-free corruptions of the training input (models/objectives.py; docs/research.md): the loss still compares
    # the reconstruction with the clean image, val/test/embeddings never see them. Drawn from the global torch RNG
    # (saved in checkpoints), like a VAE's z
    input_noise: float = field(default=0.0, metadata={"added": 0.0})  # denoising AE: sigma of Gaussian noise added to pixels in [0, 1], then clamped to [0, 1]
    mask_ratio: float = field(default=0.0, metadata={"added": 0.0})  # masked input: this fraction of 4x4-pixel patches zeroed per image (rounded); in [0, 1)


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

    epochs: int = 80  # 0 = the random-init control (no training; the seed's initial weights as best.pt and last.pt)
    batch_size: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    image_epochs: List[int] = field(default_factory=lambda: [1, 10, 40])  # plus the last epoch
    eval_batch_size: int = 1000
    # best epoch: lowest val objective (full weights) | lowest val MSE. Runs written before the key existed chose
    # on val MSE: a stored config without it is read as "mse" (``before``), not as today's default
    select_on: SelectOn = field(default=SelectOn.loss, metadata={"before": "mse"})
    keep_last: bool = field(default=True, metadata=RUN)  # false: delete checkpoints/last.pt once the run completes (best.pt stays)
    # linear probe of the code every N epochs and at the last (embclf/probe.py; 0 = off), recorded as probe_accuracy
    # in the val records. RUN: it draws no random numbers and changes no weight (tests/test_probe.py), only
    # adds measurements, like logger.projections
    probe_every: int = field(default=0, metadata=RUN)
    probe_size: int = field(default=1000, metadata=RUN)  # class-balanced train images the probe is fitted on


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
    # layer-wise probes (embclf/layers.py): code (the latent code only) | all (the code and every encoder stage, each
    # average-pooled to 2x2) | a list of layer names, e.g. [code,conv2]; the head= head on each, same settings
    layers: Any = field(default="code", metadata={"added": ["code"]})
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
    # with compile=true: torch.compile's mode; reduce-overhead (and max-autotune) capture the step in CUDA graphs.
    # RUN, like compile: a mode changes kernels and their rounding, not the experiment (docs/performance.md)
    compile_mode: str = field(default="default", metadata=RUN)
    # deterministic algorithms, no cuDNN autotuning, cuBLAS's fixed workspace (docs/performance.md); RUN: the same
    # experiment, computed reproducibly between processes on a GPU (the CPU is reproducible anyway)
    deterministic: bool = field(default=False, metadata=RUN)
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
