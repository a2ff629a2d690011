"""The one validation gate: each key's valid range (``VALUE_RULES``), the rules across keys (``CROSS_RULES``), and
``problems(cfg)``, which the entrypoint, the launcher (every job of a sweep, before anything starts) and
``embclf.evaluate`` run on the whole composed config. Library functions called directly (tests, notebooks) apply
the same rules through ``check_value`` / ``check_group`` / ``check_model``. A new key touches one schema field in
``embclf/config.py`` and at most one rule here.
"""
from __future__ import annotations

import math
import re
from dataclasses import is_dataclass
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf

from .config import Config

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
# torch.compile's modes (``torch._inductor.list_mode_options``); the first is torch's default
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    "compile_mode": (lambda v: str(v) in COMPILE_MODES,
                     f"one of {', '.join(COMPILE_MODES)}, used with compile=true (e.g. compile=true "
                     "compile_mode=reduce-overhead: CUDA graphs)"),
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
    "model.input_noise": (_non_negative_real, "a noise standard deviation >= 0 on pixels in [0, 1] (e.g. 0.1; 0 = off)"),
    "model.mask_ratio": (lambda v: math.isfinite(v) and 0 <= v < 1,
                         "a fraction of masked patches in [0, 1) (e.g. 0.25; 0 = off)"),
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
    "autoencode.epochs": (_non_negative, ">= 0 (0 = the random-init control: the seed's initial weights, untrained)"),
    # BatchNorm in training mode normalises over the batch: one image has no batch statistics
    "autoencode.batch_size": (lambda v: v >= 2, "at least 2 (BatchNorm normalises over the batch's images)"),
    "autoencode.eval_batch_size": (_positive, "at least 1"),
    "autoencode.lr": (_positive_real, "a learning rate > 0 (e.g. 1e-3)"),
    "autoencode.weight_decay": (_non_negative_real, ">= 0"),
    "autoencode.image_epochs": (_all_positive, "a list of epoch numbers >= 1"),
    "autoencode.probe_every": (_non_negative, "a number of epochs >= 0 (0 = no probe; N = every N epochs and the last)"),
    "autoencode.probe_size": (lambda v: v >= 2, "at least 2 train images (split evenly over the classes, at least "
                                                "one each; e.g. autoencode.probe_size=1000)"),
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
    "classify.layers": (lambda v: (isinstance(v, str) and v.strip() != "") or
                        (OmegaConf.is_list(v) or isinstance(v, list)) and len(v) >= 1
                        and all(isinstance(n, str) and n.strip() for n in v),
                        "code (the latent code only), all (the code and every encoder stage) or a list of layer "
                        "names (e.g. classify.layers=[code,conv2]; embclf/layers.py lists them)"),
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


def _compile_mode_vs_compile(cfg: Any) -> Optional[str]:
    mode, on = _get(cfg, "compile_mode"), _get(cfg, "compile")
    if mode in (_ABSENT, "default") or on is _ABSENT or on:
        return None
    return (f"compile_mode={mode} is invalid with compile=false: the mode is torch.compile's, so it applies to a "
            f"compiled step only; add compile=true (or leave compile_mode out).")


# ranges that depend on other keys: each returns a message or None (it skips keys the config lacks)
CROSS_RULES = (_image_size_vs_model, _channels_vs_strides, _val_count_vs_train_size, _compile_mode_vs_compile)
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
