"""``python -m embclf.evaluate RUN_DIR [key=value ...]``: re-evaluate a finished run, one row per image.

RUN_DIR is an autoencode or a classify run dir (of a ``stage=all`` job: ``JOB/autoencode`` or ``JOB/classify``).
Keys of its own:

- ``checkpoint=best|last`` (default best): ``checkpoints/best.pt`` (best on val) or ``last.pt`` (last epoch).
  A classify run always embeds with the encoder checkpoint it was trained on.
- ``split=test|train|val`` (default test).
- ``name=NAME``: the evaluation's folder name (default ``<split>-<checkpoint>``, plus the overrides that
  change the data, e.g. ``test-best-data=folder,data.root=pets``).
- ``out=DIR``: write the evaluation to ``DIR/<name>/`` instead of ``RUN_DIR/eval/<name>/`` (a read-only run dir:
  an archive, a colleague's results).

Every other ``key=value`` is applied to the run's saved ``config.yaml`` as Hydra applies overrides: parsed by
Hydra's override parser; a group option (``data=folder``) is composed from ``conf/`` with Hydra's compose API
and replaces the run's node (its keys start from that option's defaults); dotted keys (``data.root=PATH``,
``data.test_size=500``, ``device=cpu``, ``threads=1``, ``autoencode.eval_batch_size=500``) are then set,
typed by the schema (``embclf/config.py``). So an autoencoder trained on CIFAR-10 is evaluated on any
ImageFolder tree with ``data=folder data.root=PATH``. The architecture is the checkpoint's: ``model``,
``latent``, ``head``, ``stage``, ``debug`` and ``experiment`` are refused.

Writes ``RUN_DIR/eval/<name>/`` (atomically: a temp folder renamed into place; an existing evaluation is
never overwritten: a default name gets ``-2``, ``-3``... and an explicit ``name=`` that exists is refused):

- ``per_sample.csv``: one row per image: index (in the split), path (image folders; empty for torchvision
  sources), label, class; autoencode: mse (per pixel), psnr (dB), kl (nats, VAE); classify: predicted,
  predicted_class, probability (of the prediction: softmax of a trained head's logits), correct (0/1).
- ``summary.json``: the means under the stage's own names: autoencode ``loss`` (the run's own objective:
  SSE + β·KL plus, for a run trained with them, the joint head's ``ce``/``joint_head_accuracy`` and the
  ``decorrelation`` penalty), ``mse``, ``sse``, ``psnr``, ``kl`` and ``active_units`` (VAE), computed by
  ``engine.evaluate``; classify ``accuracy``, ``loss`` (cross-entropy, nats), ``per_class_accuracy``,
  ``confusion_matrix`` (rows: true class), computed by ``engine.eval_head``; plus what was evaluated (run dir,
  checkpoint and its epoch, split, data, overrides; for a classify run ``encoder_checkpoint``, the encoder file
  read), the run's own numbers for the same split and checkpoint when the data is the run's (``run_metrics``),
  and the images of ``worst.png`` (``worst``). It is also printed.
- ``worst.png``: autoencode: the 16 worst-reconstructed images (highest MSE), each above its reconstruction,
  with its class, PSNR and MSE under it; classify: the 16 most confidently misclassified images, most confident
  first, with the true and predicted class and the probability (``worst`` in summary.json names them).

On the same split, checkpoint and data as the run, the means equal the run's own ``test_*``/``val_*``
(best) or ``final_test_*`` (last) numbers (same functions) to ``runtime.agreement_tolerance`` (1e-5 on CPU, fp32).
Exit status 2 with a one-paragraph message for bad input; nothing is written then.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from . import data as data_mod
from . import engine, identity, images, runs, runtime
from .artefacts import encoder_checkpoint, load_autoencoder, load_head, load_objective
from .config import Config, conf_dir
from .validation import problems
from .data import DataError
from .runtime import EmbclfError

log = logging.getLogger("embclf.evaluate")

N_WORST = 16
SPLITS = ("test", "train", "val")
CHECKPOINTS = ("best", "last")
# keys that would change what the checkpoint is, not how or on what it is evaluated
FIXED_KEYS = ("model", "latent", "head", "stage", "debug", "experiment")


# --- shared with embclf.embed: command line, run dir, config, checkpoints ------------------------------------

def parse_args(argv: Sequence[str], own: Dict[str, Optional[Tuple[str, ...]]], prog: str):
    """Split ``RUN_DIR key=value ...`` into the run dir, the values of this command's own keys (``own``: key ->
    allowed values, or None for any) and the config overrides (Hydra ``Override`` objects, in order).

    Raises ``EmbclfError`` for a missing run dir, a malformed override or a value not allowed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    argv = list(argv)
    if not argv or argv[0].startswith("-"):
        raise EmbclfError(f"usage: python -m {prog} RUN_DIR [key=value ...] (the run dir comes first).")
    try:
        parsed = OverridesParser.create().parse_overrides(argv[1:])
    except OverrideParseException as e:
        raise EmbclfError(f"cannot parse the overrides {' '.join(argv[1:])}: {str(e).splitlines()[0]}. Quote a value "
                          "that holds = or , for Hydra, e.g. out=\"'/path/model=vae,latent=8/z.npz'\".") from None
    values, config_overrides = {}, []
    for o in parsed:
        if o.is_sweep_override() or o.is_delete() or o.is_add() or o.is_force_add():
            raise EmbclfError(f"{o.input_line}: give one value per key as key=value (no sweeps, +, ++ or ~).")
        if o.key_or_group in own:
            allowed = own[o.key_or_group]
            v = str(o.value())
            if allowed is not None and v not in allowed:
                raise EmbclfError(f"{o.input_line}: {o.key_or_group} must be one of {', '.join(allowed)}.")
            values[o.key_or_group] = v
        else:
            config_overrides.append(o)
    return Path(argv[0]).expanduser(), values, config_overrides


def run_stage(run_dir: Path) -> Tuple[str, dict]:
    """The stage (``autoencode`` or ``classify``) and summary of a run dir. Raises ``EmbclfError`` when the
    path is not a run dir (naming the sub-dirs of a ``stage=all`` job)."""
    if not run_dir.is_dir():
        raise EmbclfError(f"{run_dir} does not exist. The first argument is a run dir (one holding summary.json, "
                          "config.yaml and checkpoints/), then key=value overrides; quote it if the shell splits it.")
    s = runs.read_summary(run_dir)
    if s is None:
        subs = [p.name for p in (run_dir / "autoencode", run_dir / "classify") if (p / runs.SUMMARY).is_file()]
        hint = (f"it is a stage=all job dir: pass {' or '.join(str(run_dir / n) for n in subs)}" if subs
                else "pass a run dir (one holding summary.json, config.yaml and checkpoints/)")
        raise EmbclfError(f"{run_dir} holds no {runs.SUMMARY}: {hint}.")
    stage = s.get("stage")
    if stage not in ("autoencode", "classify"):
        raise EmbclfError(f"{run_dir}/{runs.SUMMARY} is not an autoencode or classify run's (stage {stage!r}).")
    if s.get("status") != "completed":
        log.warning("%s has status %s (not completed): evaluating the checkpoint it holds", run_dir, s.get("status"))
    return stage, s


def _groups() -> List[str]:
    return sorted(p.name for p in Path(conf_dir()).iterdir() if p.is_dir())


def _compose_group(group: str, option: str) -> DictConfig:
    """The ``group`` node Hydra composes for ``group=option`` (the option's file over the schema's defaults)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base=None, job_name="embclf_evaluate"):
            composed = compose("config", overrides=[f"{group}={option}"])
    except HydraException as e:
        options = sorted(p.stem for p in (Path(conf_dir()) / group).glob("*.yaml"))
        raise EmbclfError(f"{group}={option}: {str(e).splitlines()[0]} (options: {', '.join(options)}).") from None
    return composed[group]


def run_config(run_dir: Path, overrides) -> DictConfig:
    """The run's saved ``config.yaml`` with ``overrides`` (Hydra ``Override`` objects) applied, typed by the
    schema. Group options first (composed by Hydra), then dotted keys, as Hydra orders them. A relative
    ``data.root`` is made absolute (relative to the current directory), as the entrypoint does.

    Raises ``EmbclfError`` naming the override for a fixed key, an unknown key or a wrong type."""
    from omegaconf.errors import OmegaConfBaseException

    saved = runs.read_config(run_dir)
    if saved is None:
        raise EmbclfError(f"{run_dir} has no {runs.CONFIG}: it is not a complete run dir.")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), saved)
    except OmegaConfBaseException as e:
        raise EmbclfError(f"{run_dir / runs.CONFIG} does not fit this version's schema: {str(e).splitlines()[0]}") from None
    groups = _groups()
    ordered = [o for o in overrides if o.key_or_group in groups] + \
              [o for o in overrides if o.key_or_group not in groups]
    for o in ordered:
        key = o.key_or_group
        if key.split(".")[0] in FIXED_KEYS:
            raise EmbclfError(f"{o.input_line}: {key.split('.')[0]} is fixed by the run's checkpoint; evaluation "
                              "changes only what it runs on (data=..., data.*, split=, checkpoint=, device, threads).")
        try:
            if key in groups:
                cfg[key] = _compose_group(key, o.get_value_element_as_str())
            else:
                OmegaConf.update(cfg, key, o.value(), merge=True)
        except OmegaConfBaseException as e:
            raise EmbclfError(f"{o.input_line}: {str(e).splitlines()[0]}") from None
    cfg.data.root = identity.normalise_path(cfg.data.root, os.getcwd())
    bad = problems(cfg)  # the ranges a run's own config must satisfy (validation.VALUE_RULES), before any work
    if bad:
        raise EmbclfError(f"the run's config with {' '.join(o.input_line for o in overrides) or 'no overrides'} is "
                          "invalid, nothing was computed: " + " ".join(bad))
    return cfg


def check_writable(path: Path, what: str, fix: str = "Copy the run dir somewhere writable, or write elsewhere.") -> None:
    """Refuse, before any work, a file or folder ``path`` that could not be created: its nearest existing ancestor
    is not a folder, or is not writable (a read-only file system, no permission). ``what`` names the argument,
    ``fix`` says how to write elsewhere (the command's ``out=``).

    Raises ``EmbclfError``."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise EmbclfError(f"{what}: cannot create {path}: {parent} is a file, not a folder. Choose another place.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EmbclfError(f"{what}: cannot create {path}: {parent} is not writable (read-only, or no permission); "
                          f"nothing was computed. {fix}")


def check_name(name: str) -> None:
    """Refuse an evaluation ``name=`` that is not one plain folder name (it is created under ``RUN_DIR/eval/``).
    Raises ``EmbclfError``."""
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or os.sep in name or "\0" in name \
            or len(name.encode()) > 200:
        raise EmbclfError(f"name={name}: the evaluation's name is one folder name under RUN_DIR/eval/ (no '/', not "
                          "empty, not starting with '.', at most 200 bytes), e.g. name=pets-test.")


def _check_head_source(run_dir: Path, which: str, cfg) -> None:
    """Before any work: the classify run holds what ``load_head`` reads (a trained head's ``checkpoints/<which>.pt``;
    a fitted probe's checkpoint or ``embeddings.pt`` to refit on). Raises ``EmbclfError``."""
    from .heads import is_trainable

    ck = run_dir / "checkpoints" / f"{which}.pt"
    if ck.is_file():
        return
    if is_trainable(cfg.head.name):
        have = sorted(p.stem for p in (run_dir / "checkpoints").glob("*.pt"))
        raise EmbclfError(f"checkpoint={which}: {ck} does not exist (the run holds "
                          f"{', '.join(f'checkpoint={h}' for h in have) or 'no checkpoint'}); choose one it has.")
    if not (run_dir / "embeddings.pt").is_file():
        raise EmbclfError(f"checkpoint={which}: {run_dir} holds neither {ck} nor embeddings.pt, from which its "
                          f"head={cfg.head.name} is refitted; it cannot be re-evaluated.")


# --- classify heads: the one place that turns a classify run dir into a predictor --------------------------

def class_probabilities(head, scores: torch.Tensor) -> torch.Tensor:
    """Class probabilities float [N, K] from a head's scores: softmax of a trained head's logits; a fitted
    probe's scores (votes, probabilities) normalised to sum to 1, as ``engine.eval_head`` treats them."""
    if getattr(head, "trainable", True):
        return torch.softmax(scores.float(), dim=1)
    return scores.float() / scores.float().sum(1, keepdim=True).clamp_min(1e-12)


# --- the two evaluations -------------------------------------------------------------------------------------

def _base_rows(split: data_mod.Split, classes: List[str]) -> List[dict]:
    labels = split.labels.tolist()
    paths = split.paths or [""] * len(labels)
    return [{"index": i, "path": paths[i], "label": y, "class": classes[y] if 0 <= y < len(classes) else ""}
            for i, y in enumerate(labels)]


def evaluate_autoencode(run_dir: Path, cfg, which: str, split_name: str, device: torch.device):
    """Autoencoder metrics on one split: (means, per-image rows, worst.png bytes, worst list, ds).

    The means are ``engine.evaluate`` of the checkpoint under the run's own objective (``artefacts.load_objective``:
    SSE + β·KL plus the joint head's CE and the decorrelation penalty the run trained with, the head's weights
    from the checkpoint), so they are the numbers the stage reports; the rows come from its per-image form
    ``evaluate_per_image``. On images whose class count is not the run's, the class terms cannot be computed:
    the loss is then SSE + β·KL, and a warning says so."""
    ck_path = run_dir / "checkpoints" / f"{which}.pt"
    model, ck = load_autoencoder(ck_path, device, cfg.data.image_size, f"checkpoint={which}")
    ds = data_mod.load(cfg.data)
    objective = load_objective(ck, len(ds.classes), device)
    if objective.needs_labels and objective.n_classes != len(ds.classes):
        log.warning("the run's objective has class terms (model.ce_weight / model.decorrelation=class) for its %d "
                    "classes; these images have %d: the loss is SSE + beta*KL only, without them",
                    objective.n_classes, len(ds.classes))
        objective = None
    split = ds.split(split_name)
    on_dev = split.to(device)
    fmt = runtime.memory_format(device)
    precision = runtime.precision(cfg)
    beta = float(ck["config"]["model"].get("beta", 0.1))
    bs = cfg.autoencode.eval_batch_size
    means = engine.evaluate(lambda x, y=None: engine.batch_step(model, x, beta, precision, y, objective), model,
                            on_dev, bs, fmt, objective)
    per = engine.evaluate_per_image(model, on_dev, bs, precision, fmt)
    rows = _base_rows(split, ds.classes)
    for k, v in per.items():
        for r, x in zip(rows, v.tolist()):
            r[k] = x
    worst = torch.sort(per["mse"], descending=True, stable=True).indices[:N_WORST]
    x = data_mod.to_float(split.images[worst].to(device))
    with torch.no_grad():
        x_hat = model(x, sample=False)["x_hat"].float()
    worst_list = [{k: rows[int(i)][k] for k in ("index", "path", "class", "mse", "psnr")} for i in worst]
    figure = images.worst_png(x, [f"{w['class']}\nPSNR {w['psnr']:.1f} dB\nMSE {w['mse']:.4f}" for w in worst_list],
                       f"the {len(worst_list)} worst-reconstructed {split_name} images (highest MSE), each above "
                       "its reconstruction", x_hat)
    means["checkpoint_epoch"] = int(ck.get("state", {}).get("epoch", 0)) or None
    return means, rows, figure, worst_list, ds


def evaluate_classify(run_dir: Path, cfg, which: str, split_name: str, device: torch.device, run_summary: dict):
    """Head metrics on one split: (means, per-image rows, worst.png bytes, worst list, ds). The split is
    embedded by ``engine.embed`` with the run's encoder; accuracy and cross-entropy are ``engine.eval_head``;
    per-class accuracy and the confusion matrix as the stage computes them."""
    from sklearn.metrics import confusion_matrix

    enc_path = encoder_checkpoint(run_dir, run_summary)
    log.info("encoder: %s", enc_path)
    encoder, enc_ck = load_autoencoder(enc_path, device, cfg.data.image_size, "encoder checkpoint")
    ds = data_mod.load(cfg.data)
    classes = list(run_summary.get("classes") or ds.classes)
    if len(ds.classes) != len(classes):
        raise EmbclfError(f"data: these images have {len(ds.classes)} classes, the head was trained on {len(classes)} "
                          f"({', '.join(classes[:5])}...); a classify run is evaluated on data with its classes.")
    if list(ds.classes) != classes:
        log.warning("the data's class names %s differ from the run's %s: labels are matched by index",
                    ds.classes[:5], classes[:5])
    split = ds.split(split_name)
    z = engine.embed(encoder, split, device, 1000, enc_ck["config"].get("precision", "fp32")).to(device)
    y = split.labels.to(device)
    head, epoch = load_head(run_dir, which, cfg, z.shape[1], len(classes), device)
    m, scores = engine.eval_head(head, z, y, 4096)
    proba = class_probabilities(head, scores)
    conf, pred = proba.max(1)
    true_np, pred_np = y.cpu().numpy(), pred.cpu().numpy()
    cm = confusion_matrix(true_np, pred_np, labels=list(range(len(classes))))
    per_class = {c: float(cm[i, i] / max(1, cm[i].sum())) for i, c in enumerate(classes)}
    rows = _base_rows(split, classes)
    for r, p, c in zip(rows, pred.tolist(), conf.tolist()):
        r.update(predicted=p, predicted_class=classes[p], probability=c, correct=int(p == r["label"]))
    wrong = (pred != y).nonzero().flatten().cpu()
    worst = wrong[torch.sort(conf.cpu()[wrong], descending=True, stable=True).indices][:N_WORST]
    worst_list = [{k: rows[int(i)][k] for k in ("index", "path", "class", "predicted_class", "probability")}
                  for i in worst]
    figure = images.worst_png(data_mod.to_float(split.images[worst]),
                       [f"true {w['class']}\npredicted {w['predicted_class']}\np = {w['probability']:.2f}"
                        for w in worst_list],
                       f"the {len(worst_list)} most confidently misclassified {split_name} images, most confident first")
    means = {"accuracy": m["accuracy"], "loss": m["loss"], "per_class_accuracy": per_class,
             "confusion_matrix": cm.tolist(), "classes": classes, "head": cfg.head.name, "checkpoint_epoch": epoch,
             # the encoder file read (where the run is now: a copied sweep reads its own copy)
             "encoder_checkpoint": str(enc_path.resolve())}
    return means, rows, figure, worst_list, ds


# the run's own numbers that an evaluation on its data must reproduce: (stage, split, checkpoint) -> summary prefix
RUN_METRICS = {("autoencode", "test", "best"): "test_", ("autoencode", "test", "last"): "final_test_",
               ("autoencode", "val", "best"): "val_", ("classify", "test", "best"): "test_",
               ("classify", "test", "last"): "final_test_", ("classify", "val", "best"): "val_"}


def run_metrics(stage: str, split: str, which: str, run_summary: dict, means: dict) -> Optional[dict]:
    """The run summary's own values of ``means``' metrics for this split and checkpoint, or None."""
    prefix = RUN_METRICS.get((stage, split, which))
    if prefix is None:
        return None
    keys = ("mse", "psnr", "kl", "loss", "sse", "ce", "joint_head_accuracy", "decorrelation") if stage == "autoencode" else ("accuracy",)
    out = {k: run_summary[prefix + k] for k in keys if prefix + k in run_summary and k in means}
    return out or None


# --- writing -----------------------------------------------------------------------------------------------

def write_new_dir(parent: Path, name: str, explicit: bool, files: Dict[str, bytes]) -> Path:
    """Write ``files`` (file name -> bytes) into a new folder ``parent/name`` atomically: into a hidden temp
    folder, renamed into place. An existing folder is never touched: with ``explicit`` it is an error, else
    the name gets ``-2``, ``-3``... Returns the folder. Raises ``EmbclfError`` (explicit name taken)."""
    parent.mkdir(parents=True, exist_ok=True)
    if explicit and (parent / name).exists():
        raise EmbclfError(f"name={name}: {parent / name} exists; an earlier evaluation is never overwritten. Choose "
                          "another name= (or leave name out for a new one).")
    tmp = parent / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for fname, blob in files.items():
            (tmp / fname).write_bytes(blob)
        k = 1
        while True:
            final = parent / (name if k == 1 else f"{name}-{k}")
            if not final.exists():
                try:
                    os.rename(tmp, final)  # fails if another process created it meanwhile
                    return final
                except OSError:
                    if explicit:
                        raise EmbclfError(f"name={name}: {final} was created meanwhile; choose another name=.") from None
            elif explicit:
                raise EmbclfError(f"name={name}: {final} exists; choose another name=.")
            k += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def csv_bytes(rows: List[dict]) -> bytes:
    """Rows (dicts with the same keys) as CSV text; floats as Python writes them (float32 values exactly)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["index"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def _json_bytes(obj) -> bytes:
    """``obj`` as ``runs.write_json_atomic`` writes it (indented, strict JSON, non-finite floats as null)."""
    return (json.dumps(runs.json_safe(obj), indent=2, default=str, allow_nan=False) + "\n").encode()


def evaluate_run(argv: Sequence[str]) -> Tuple[Path, dict]:
    """Run one evaluation (see the module docstring). Returns (the eval folder, its summary).

    Raises ``EmbclfError`` / ``DataError`` for bad input, before anything is written."""
    run_dir, own, overrides = parse_args(argv, {"checkpoint": CHECKPOINTS, "split": SPLITS, "name": None,
                                                "out": None}, "embclf.evaluate")
    stage, run_summary = run_stage(run_dir)
    which, split = own.get("checkpoint", "best"), own.get("split", "test")
    # out=DIR: evaluations go to DIR/<name>/ instead of RUN_DIR/eval/<name>/ (a read-only or someone else's run)
    parent = Path(os.path.expanduser(own["out"])).absolute() if own.get("out") else run_dir / "eval"
    # every argument is checked before any work (the checks are made again when writing)
    if "name" in own:
        check_name(own["name"])
        if (parent / own["name"]).exists():
            raise EmbclfError(f"name={own['name']}: {parent / own['name']} exists; an earlier evaluation "
                              "is never overwritten. Choose another name= (or leave name out for a new one).")
    check_writable(parent / own.get("name", f"{split}-{which}"), f"out={own['out']}" if own.get("out") else
                   "the evaluation folder", "Write the evaluation elsewhere with out=DIR (it goes to DIR/<name>/), "
                   "e.g. out=/tmp/evals.")
    cfg = run_config(run_dir, overrides)
    if stage == "autoencode":
        ck = run_dir / "checkpoints" / f"{which}.pt"
        if not ck.is_file():
            have = sorted(p.stem for p in (run_dir / "checkpoints").glob("*.pt"))
            raise EmbclfError(f"checkpoint={which}: {ck} does not exist (the run holds "
                              f"{', '.join(f'checkpoint={h}' for h in have) or 'no checkpoint'}); choose one it has.")
    else:
        _check_head_source(run_dir, which, cfg)
        encoder_checkpoint(run_dir, run_summary)
    env = runtime.setup(cfg)
    device = env["device"]
    if stage == "autoencode":
        means, rows, figure, worst, ds = evaluate_autoencode(run_dir, cfg, which, split, device)
    else:
        means, rows, figure, worst, ds = evaluate_classify(run_dir, cfg, which, split, device, run_summary)
    lines = [o.input_line for o in overrides]
    # the run identity's rule (embclf/identity.py): paths normalised, how-to-run keys (cache, download) not part
    same_data = identity.data_identity(cfg) == identity.data_identity(runs.read_config(run_dir) or {})
    summary = {"run_dir": str(run_dir.resolve()), "run_stage": stage, "checkpoint": which, "split": split,
               "n": len(rows), "overrides": lines, "model": run_summary.get("model"),
               "latent": run_summary.get("latent"), "data": runs.resolved(cfg)["data"],
               "data_fingerprint": ds.fingerprint, "same_data_as_run": same_data, "device": str(device),
               "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **({"debug": run_summary["debug"]} if run_summary.get("debug") else {}), **means}
    ref = run_metrics(stage, split, which, run_summary, means) if same_data else None
    if ref is not None:
        summary["run_metrics"] = ref
        r = run_summary  # bf16, compile and a GPU loosen the 1e-5 two processes agree to on the CPU:
        tol = runtime.agreement_tolerance("cuda" if "cuda" in f"{device}{r.get('device')}" else "cpu", str(r.get(
            "precision")), bool(r.get("compile")), bool(cfg.get("deterministic") and r.get("deterministic")))
        off = [k for k, v in ref.items() if isinstance(v, (int, float)) and abs(means[k] - v) > tol * max(1.0, abs(v))]
        if off:
            log.warning("the run's own %s differ from this evaluation's (%s): was the run dir changed, or the data "
                        "cache rebuilt?", ", ".join(off), ", ".join(f"{k} {means[k]:.6g} vs {ref[k]:.6g}" for k in off))
    summary["worst"] = worst
    shown = identity.readable([o.input_line for o in overrides])  # the overrides that change what was computed
    name = own.get("name") or f"{split}-{which}" + (f"-{shown}" if shown else "")
    out = write_new_dir(parent, name, "name" in own,
                        {"per_sample.csv": csv_bytes(rows), "summary.json": _json_bytes(summary),
                         "worst.png": figure})
    return out, summary


def format_summary(out: Path, s: dict) -> str:
    """The printed summary: what was evaluated, the means, where the files are."""
    head = (f"{s['run_stage']} run {s['run_dir']}\n  checkpoint {s['checkpoint']} (epoch {s.get('checkpoint_epoch')}), "
            f"split {s['split']}: {s['n']} images" + (f", overrides {' '.join(s['overrides'])}" if s["overrides"] else ""))
    if s.get("encoder_checkpoint"):
        head += f"\n  encoder {s['encoder_checkpoint']}"
    if s.get("debug"):
        head += f"\n  DEBUG RUN (debug={s['debug']}): not a result"
    if s["run_stage"] == "autoencode":
        m = [f"mse {s['mse']:.6f}", f"psnr {s['psnr']:.3f} dB"] + \
            ([f"kl {s['kl']:.3f} nats", f"active units {s['active_units']}"] if "kl" in s else [])
    else:
        m = [f"accuracy {s['accuracy']:.4f}", f"cross-entropy {s['loss']:.4f} nats"]
        m.append("per class " + ", ".join(f"{c} {a:.3f}" for c, a in s["per_class_accuracy"].items()))
    ref = s.get("run_metrics")
    lines = [head, "  " + ", ".join(m)]
    if ref:
        lines.append("  the run's own: " + ", ".join(f"{k} {v:.6g}" for k, v in ref.items()))
    lines.append(f"wrote {out}/ per_sample.csv, summary.json, worst.png")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point. Returns the exit status (0, or 2 with a one-paragraph message on bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        out, summary = evaluate_run(argv)
    except (EmbclfError, DataError) as e:
        print(f"embclf.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(out, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
