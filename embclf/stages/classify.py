"""stage=classify: a head on the frozen embeddings of a trained autoencoder. Readable top to bottom.

1. Find the encoder: ``classify.encoder`` (a run dir or a checkpoint) or else the newest completed
   autoencode run under ``output_dir`` whose data, model, latent, seed and ``autoencode.*`` equal ours.
2. Encode train/val/test once with the frozen encoder in eval mode (a VAE's embedding is its posterior
   mean mu, so embeddings are deterministic) and save them as embeddings.pt.
3. Fit the head (``embclf.heads``). A trainable one (mlp, linear): cross-entropy, Adam with
   ``classify.weight_decay``, cosine annealing per epoch, the best epoch on val accuracy kept, early
   stopping after ``classify.patience`` epochs without improvement, the learning rate optionally chosen
   on val from ``classify.lr_grid``. knn / logreg: fitted once (logreg's C chosen on val).
4. Report test accuracy (best-on-val head: ``test_accuracy``; trainable heads' last epoch:
   ``final_test_accuracy``), per-class accuracy and the confusion matrix (JSON and images/confusion.png).
   ``classify.probes`` fits more heads on the same embeddings: summary ``probes`` =
   {head name: {"val_accuracy", "test_accuracy", ...}} (the main head included).
5. Write the result (summary.json, status "completed") first; only then the optional extras: project the
   test embeddings to 2-D (images/pca.png, tsne.png, umap.png; ``embclf.report.projections``) and log them, a table of
   test embeddings and the confusion matrix to the tracker (wandb, ``embclf.tracking``). A failure of an
   extra is a warning and never loses the result.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

from .. import data as data_mod
from .. import identity, losses, runs, runtime, tracking
from ..report import projections as plots
from ..heads import build_head, check_dropout, check_names, is_trainable
from ..models import build_model
from .autoencode import _rng_state, _set_rng_state

log = logging.getLogger(__name__)


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
    out = Path(str(cfg.output_dir))
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


@torch.no_grad()
def embed(encoder, split: data_mod.Split, device, batch_size: int, precision: str = "fp32") -> torch.Tensor:
    """Embeddings of a split: float32 [N, latent] (mu for a VAE), on the CPU.

    The split's images are moved to ``device`` once; the batches' embeddings stay there and come back to
    the host in one copy at the end (no per-batch sync)."""
    encoder.eval()
    device = torch.device(device)
    images = split.images.to(device)
    fmt = runtime.memory_format(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = data_mod.to_float(images[i:i + batch_size]).contiguous(memory_format=fmt)
        with runtime.autocast(device, precision):
            out.append(encoder.encode(x)[0].float())
    return torch.cat(out).cpu()


@torch.no_grad()
def _eval(head, z, y, batch_size: int):
    """Cross-entropy (nats) and accuracy of ``head`` on embeddings z [N, latent] with labels y [N]; one
    host read. Returns ({"loss", "accuracy"}, scores [N, classes] on z's device). A trainable head's scores
    are logits; for ``knn`` (vote weights) and ``logreg`` (probabilities) the loss is the negative log of
    the normalised scores (floored at 1e-12)."""
    head.eval()
    logits = torch.cat([head(z[i:i + batch_size]) for i in range(0, len(z), batch_size)])
    if getattr(head, "trainable", True):
        ce = losses.cross_entropy(logits, y)
    else:
        p = logits / logits.sum(1, keepdim=True).clamp_min(1e-12)
        ce = -p.gather(1, y.view(-1, 1)).clamp_min(1e-12).log().mean()
    loss, acc = torch.stack([ce, (logits.argmax(1) == y).float().mean()]).tolist()
    return {"loss": loss, "accuracy": acc}, logits


def save_confusion_png(cm, classes: List[str], path: Path, title: str) -> None:
    """Confusion matrix (rows: true class, columns: predicted) as a PNG (``plots.confusion``)."""
    plots.confusion(cm, classes, path, title)


def _optional(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` for an optional extra run after the result is written (a figure, a projection,
    tracker logging): an exception is one warning naming ``what``, never a failed run. Returns fn's value or None."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- any failure of an extra; the result is already on disk
        log.warning("%s failed after the result was written (%s: %s); skipped, the run stays completed", what,
                    type(e).__name__, e)
        return None


def train_head_epoch(head, opt, z: torch.Tensor, y: torch.Tensor, batch_size: int,
                     generator: torch.Generator) -> torch.Tensor:
    """One epoch of cross-entropy training of ``head`` on embeddings z float32 [N, latent] with labels
    y int64 [N] (both on the device), in the random order drawn from ``generator``.

    Returns fp32 [2] on the device: the epoch's summed cross-entropy (nats) and number of correct
    predictions; nothing is read back to the host inside the loop."""
    head.train()
    sums = torch.zeros(2, device=z.device)
    for idx in data_mod.batches(len(z), batch_size, z.device, shuffle=True, generator=generator):
        logits = head(z[idx])
        loss = losses.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            sums += torch.stack([loss.detach() * len(idx), (logits.argmax(1) == y[idx]).sum().float()])
    return sums


def check_settings(cfg) -> None:
    """Fail early (before anything is written) on bad ``head`` / ``classify`` settings, naming the key.

    Raises ``runtime.EmbclfError``."""
    cc = cfg.classify
    check_names([cfg.head.name], "head.name")
    check_names(list(cc.probes), "classify.probes")
    if cc.patience is not None and int(cc.patience) < 1:
        raise runtime.EmbclfError(f"classify.patience={cc.patience} must be at least 1 (epochs without a better val "
                                  "accuracy before stopping), or null to train all classify.epochs.")
    if any(float(lr) <= 0 for lr in cc.lr_grid) or float(cc.lr) <= 0:
        raise runtime.EmbclfError(f"classify.lr={cc.lr} / classify.lr_grid={list(cc.lr_grid)}: learning rates must be positive.")
    for name in {cfg.head.name, *cc.probes}:  # a bad head.k, head.C, head.dropout fails here, naming the key
        if is_trainable(name):
            check_dropout(cfg.head)  # (the layers themselves are built, and fail, in the job)
        else:
            build_head(OmegaConf.merge(cfg.head, {"name": name}), 2, 2)


def train_head(head_cfg, cc, z: Dict[str, torch.Tensor], y: Dict[str, torch.Tensor], n_classes: int, seed: int,
               lr: float, on_epoch=None, resume: Optional[dict] = None, keep_last_epoch: bool = False):
    """Train a fresh ``mlp``/``linear`` head on z["train"] float32 [N, latent] / y["train"] int64 [N] (on the
    device): cross-entropy, Adam (``classify.weight_decay``), cosine annealing per epoch over
    ``classify.epochs``, early stopping after ``classify.patience`` epochs without a better val accuracy.

    ``on_epoch(epoch, head, opt, sched, train_m, val_m, lr, seconds, improved, g, state)`` runs after each epoch
    (the stage's metrics, tracker and checkpoints; ``g`` the batch-order generator, ``state`` {"epoch",
    "best_acc", "best_epoch"}). ``resume`` (a classify ``last.pt``) continues exactly where it stopped: head,
    optimizer, scheduler, RNG states, batch generator and best-so-far. Returns (head holding the best-on-val
    weights, or with ``keep_last_epoch`` the last epoch's (the stage then reads the best from best.pt),
    {"val_accuracy", "best_epoch", "epochs_run", "early_stopped", "lr"})."""
    device = z["train"].device
    torch.manual_seed(seed)
    head = build_head(head_cfg, z["train"].shape[1], n_classes, seed).to(device)
    head.fit_standardizer(z["train"])
    opt = runtime.adam(head.parameters(), device, float(lr), float(cc.weight_decay))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(cc.epochs))
    g = torch.Generator().manual_seed(seed)
    state = {"epoch": 0, "best_acc": -math.inf, "best_epoch": 0}
    if resume is not None:  # continue the head's training exactly where last.pt left it
        head.load_state_dict(resume["head"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        _set_rng_state(resume["rng"])
        g.set_state(resume["batch_rng"])
        state = dict(resume["state"])
    best_acc, best_epoch, best_state, epoch = state["best_acc"], state["best_epoch"], None, state["epoch"]
    patience = None if cc.patience is None else int(cc.patience)
    if patience is not None and epoch and epoch - best_epoch >= patience:
        epoch_range = range(0)  # it had stopped early before the interruption
    else:
        epoch_range = range(state["epoch"] + 1, int(cc.epochs) + 1)
    for epoch in epoch_range:
        t0 = time.time()
        lr_now = opt.param_groups[0]["lr"]
        tot_loss, tot_correct = train_head_epoch(head, opt, z["train"], y["train"], int(cc.batch_size), g).tolist()
        sched.step()
        n = len(z["train"])
        train_m = {"loss": tot_loss / n, "accuracy": tot_correct / n}
        val_m, _ = _eval(head, z["val"], y["val"], 4096)
        improved = val_m["accuracy"] > best_acc
        if improved:
            best_acc, best_epoch = val_m["accuracy"], epoch
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        state.update(epoch=epoch, best_acc=best_acc, best_epoch=best_epoch)
        if on_epoch is not None:
            on_epoch(epoch, head, opt, sched, train_m, val_m, lr_now, time.time() - t0, improved, g, state)
        if patience is not None and epoch - best_epoch >= patience:
            log.info("early stopping at epoch %d: no better val accuracy for %d epochs (classify.patience)", epoch, patience)
            break
    if best_state is not None and not keep_last_epoch:
        head.load_state_dict(best_state)
    epoch = max(epoch, state["epoch"])
    return head, {"val_accuracy": best_acc, "best_epoch": best_epoch, "epochs_run": epoch,
                  "early_stopped": epoch < int(cc.epochs), "lr": float(lr)}


def select_lr(head_cfg, cc, z, y, n_classes: int, seed: int):
    """The learning rate for a trainable head: ``classify.lr`` when ``classify.lr_grid`` is empty, else the grid
    entry whose head reaches the best val accuracy (ties: the first). Never looks at test.

    Returns (lr, {lr as text: val accuracy} or None)."""
    if not cc.lr_grid:
        return float(cc.lr), None
    scores = {}
    for lr in cc.lr_grid:
        scores[f"{float(lr):g}"] = train_head(head_cfg, cc, z, y, n_classes, seed, float(lr))[1]["val_accuracy"]
        runs.fault_point("classify.lr_search")
    best = max(cc.lr_grid, key=lambda lr: scores[f"{float(lr):g}"])
    log.info("head %s: lr %g chosen on val from %s", head_cfg.name, float(best), scores)
    return float(best), scores


def fit_probe(head_cfg, cc, z, y, n_classes: int, seed: int):
    """Fit a non-trainable head (``knn``, ``logreg``) on train (logreg picks C on val). Returns (head,
    {"val_accuracy", plus what the head chose: "k", "temperature" or "C", "val_accuracy_by_C"})."""
    head = build_head(head_cfg, z["train"].shape[1], n_classes, seed)
    if isinstance(head, torch.nn.Module):
        head = head.to(z["train"].device)
    info = head.fit(z["train"], y["train"], z["val"], y["val"])
    runs.fault_point("classify.probe_fit")
    val_m, _ = _eval(head, z["val"], y["val"], 4096)
    return head, {"val_accuracy": val_m["accuracy"], **info}


def _probe_extras(fit: dict) -> dict:
    """What a ``probes`` entry records beside val/test accuracy: the settings chosen on val."""
    return {k: v for k, v in fit.items() if k in ("best_epoch", "lr", "C", "k")}


def _head_settings(head_cfg, cc) -> dict:
    """What the summary records of the head's training (trainable heads) or settings (the others)."""
    if is_trainable(head_cfg.name):
        return {"dropout": float(head_cfg.dropout), "weight_decay": float(cc.weight_decay),
                "patience": cc.patience, "lr_grid": [float(x) for x in cc.lr_grid], "epochs": int(cc.epochs),
                **({"hidden": list(head_cfg.hidden)} if head_cfg.name == "mlp" else {})}
    if head_cfg.name == "knn":
        return {"k": int(head_cfg.k), "temperature": float(head_cfg.temperature)}
    return {"C": [float(c) for c in head_cfg.C], "max_iter": int(head_cfg.max_iter)}


def run(cfg, run_dir: Path, overrides: List[str], encoder: Optional[Path] = None) -> Path:
    """Train ``cfg.head`` on the embeddings of the matching (or given) encoder into ``run_dir``.

    Raises ``runtime.EmbclfError`` (no encoder) or ``data.DataError`` (bad data config).
    """
    from sklearn.metrics import confusion_matrix

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # the identity holds the encoder's: stage=all's own (its config.yaml), the lookup's (cfg's own autoencode
    # identity) or classify.encoder's (the config stored there); another experiment in this run dir is refused
    ident = identity.identity(cfg, "classify", encoder=runs.read_config(encoder) if encoder else None)
    if runs.open_run_dir(run_dir, ident, "classify") == "completed":
        log.info("%s already completed (the same experiment); nothing to do", run_dir)
        return run_dir
    cc = cfg.classify
    if int(cc.epochs) < 1:
        raise runtime.EmbclfError(f"classify.epochs={cc.epochs} must be at least 1.")
    check_settings(cfg)
    prior = runs.read_summary(run_dir)
    summary = runs.base_summary(cfg, "classify", overrides)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.pt"
    resume = runs.load_checkpoint(last, ("head", "config"), "resume") if last.is_file() else None
    if resume is not None and not {"optimizer", "scheduler", "rng", "batch_rng", "state"} <= set(resume):
        log.warning("%s was written by an older embclf without the state to resume from: the head is trained "
                    "again from the start", last)
        resume = None
    ckpt_path = (Path(encoder) / "checkpoints" / "best.pt") if encoder else resolve_encoder(cfg)
    encoder_run = ckpt_path.parent.parent
    log.info("encoder: %s", ckpt_path)
    # read onto the CPU (weights_only: a checkpoint is data, never code); a file of another kind fails here
    ck = runs.load_checkpoint(ckpt_path, ("model", "config", "state"),
                              "classify.encoder" if cfg.classify.encoder else "encoder checkpoint")
    runs.check_image_size(ck["config"], int(cfg.data.image_size), ckpt_path)  # before the data is decoded
    ds = data_mod.load(cfg.data)
    if resume is not None:  # a head's training continues on the same images only
        runs.refuse_changed_data(run_dir, prior, ds.fingerprint)
    # bad input has failed by now; only from here on does the run dir hold a config and a summary
    runs.remove_stale_temporaries(run_dir)  # of a write killed with SIGKILL
    runs.start_attempt(summary, prior, resume["state"]["epoch"] if resume is not None else None)
    runs.write_config(run_dir, cfg, ident, "classify")
    runs.write_json_atomic(run_dir / runs.SUMMARY, summary)

    env = runtime.setup(cfg)
    device = env["device"]
    enc_cfg = ck["config"]
    if (enc_cfg["model"]["name"], int(enc_cfg["latent"])) != (cfg.model.name, int(cfg.latent)):
        named = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in ("model", "latent")]
        where = f"the command line's {' '.join(named)}" if named else \
            f"the config's defaults (model={cfg.model.name} latent={int(cfg.latent)})"
        log.info("classify.encoder is a model=%s latent=%d encoder; %s are not used (summary.json records the "
                 "encoder's)", enc_cfg["model"]["name"], int(enc_cfg["latent"]), where)
        if named:
            log.warning("classify.encoder decides the model and latent: %s do not apply", " ".join(named))
    model = build_model(OmegaConf.create(enc_cfg["model"]), int(enc_cfg["latent"]), int(enc_cfg["data"]["image_size"]))
    model.load_state_dict(ck["model"])  # CPU weights; then onto the device
    model.to(device, memory_format=runtime.memory_format(device)).eval().requires_grad_(False)
    # relative to this run dir when the encoder travels with it (docs/run-dirs.md, "Relocatable results")
    summary.update(**runs.reference_fields(run_dir, cfg.output_dir, encoder_run=encoder_run, encoder_checkpoint=ckpt_path))
    summary.update(encoder_epoch=int(ck["state"]["epoch"]), model=enc_cfg["model"]["name"],
                   latent=int(enc_cfg["latent"]), device=str(device), device_name=env["name"],
                   device_fallback=env["fallback"], head=cfg.head.name,
                   provenance=tracking.provenance(cfg, ds.fingerprint, env["name"], files=ds.files))

    emb_path = run_dir / "embeddings.pt"
    summary["data_fingerprint"] = ds.fingerprint
    runs.write_json_atomic(run_dir / runs.SUMMARY, summary)  # a failure from here on keeps the encoder and provenance
    tracker = tracking.start(cfg, run_dir, "classify", encoder_cfg=enc_cfg)  # wandb (or nothing); closed by finish below
    runs.fault_point("startup")
    prec = enc_cfg.get("precision", "fp32")  # embed as the encoder was trained
    # embeddings.pt is a cache: reused (a resumed job) only when it was computed from this encoder's weights,
    # these images and these rules; anything else recomputes it
    key = {"encoder_sha1": runs.file_sha1(ckpt_path), "data_fingerprint": ds.fingerprint, "precision": prec,
           "mode": "eval, mu"}
    emb = runs.load_checkpoint(emb_path, ("train", "val", "test", "classes"), "embeddings") \
        if emb_path.is_file() else None
    if emb is not None and emb.get("key") != key:
        log.warning("%s was computed from another encoder or other data (%s); computing it again", emb_path,
                    ", ".join(k for k in key if (emb.get("key") or {}).get(k) != key[k]) or "no key recorded")
        emb = None
    if emb is None:
        t0 = time.time()
        emb = {s: {"z": embed(model, ds.split(s), device, 1000, prec), "labels": ds.split(s).labels.clone()}
               for s in ("train", "val", "test")}
        emb["classes"] = ds.classes
        emb["key"] = key
        runs.fault_point("classify.embed")
        # a cache for a resumed job: a full disk fails at the next checkpoint, saying so, not here
        runs.write_cache(emb, emb_path, "embeddings cache", "A resumed run computes the embeddings again.")
        log.info("embedded %d images in %.1fs", sum(len(emb[s]["z"]) for s in ("train", "val", "test")), time.time() - t0)
    z = {s: emb[s]["z"].to(device) for s in ("train", "val", "test")}
    y = {s: emb[s]["labels"].to(device) for s in ("train", "val", "test")}
    classes = list(emb["classes"])

    # epochs after the checkpoint are redone, not duplicated (with no checkpoint: everything is redone)
    runs.truncate_metrics(run_dir, int(resume["state"]["epoch"]) if resume is not None else 0)
    n_classes = len(classes)
    if is_trainable(cfg.head.name):
        lr, lr_search = select_lr(cfg.head, cc, z, y, n_classes, int(cfg.seed))
        cur: dict = {}  # the head's training as far as it got, for save_last (set by on_epoch)

        def save_last() -> None:
            if cur:
                runs.save_atomic({"head": cur["head"].state_dict(), "optimizer": cur["opt"].state_dict(),
                                  "scheduler": cur["sched"].state_dict(), "rng": _rng_state(),
                                  "batch_rng": cur["g"].get_state(), "state": dict(cur["state"]),
                                  "epoch": cur["state"]["epoch"], "config": runs.resolved(cfg)}, last)

        def on_epoch(epoch, head, opt, sched, train_m, val_m, lr_now, seconds, improved, g, state):
            runs.append_metrics(run_dir, {"epoch": epoch, "split": "train", **train_m, "lr": lr_now, "seconds": seconds,
                                          "images_per_second": len(z["train"]) / seconds if seconds > 0 else None})
            runs.append_metrics(run_dir, {"epoch": epoch, "split": "val", **val_m, "lr": lr_now})
            tracker.log_epoch(epoch, train=train_m, val=val_m, lr=lr_now)
            log.info("epoch %d/%d  train ce %.4f acc %.4f | val ce %.4f acc %.4f", epoch, cc.epochs,
                     train_m["loss"], train_m["accuracy"], val_m["loss"], val_m["accuracy"])
            runs.fault_point("classify.metrics")
            if improved:  # best.pt before last.pt: a kill between the two redoes this epoch
                runs.save_atomic({"head": head.state_dict(), "epoch": epoch, "val": val_m, "config": runs.resolved(cfg)},
                                 ckpt_dir / "best.pt")
                runs.fault_point("classify.best")
            cur.update(head=head, opt=opt, sched=sched, g=g, state=state)
            save_last()
            runs.touch_attempt(summary)
            runs.write_json_atomic(run_dir / runs.SUMMARY, summary)  # compute_seconds so far
            signals.poll()

        if resume is not None:
            log.info("resuming the head's training from %s at epoch %d", last, resume["state"]["epoch"])
        # SIGUSR2/SIGTERM: last.pt after the current epoch (a head's epoch is short), then hand on (requeue)
        with runs.CheckpointOnSignal(save_last) as signals:
            head, fit = train_head(cfg.head, cc, z, y, n_classes, int(cfg.seed), lr, on_epoch, resume=resume,
                                   keep_last_epoch=True)
        resume = None
        final_m, _ = _eval(head, z["test"], y["test"], 4096)
        runs.append_metrics(run_dir, {"epoch": fit["epochs_run"], "split": "test", **final_m})
        runs.fault_point("classify.test")
        best = runs.load_checkpoint(ckpt_dir / "best.pt", ("head", "val"), "best head checkpoint")
        head.load_state_dict(best["head"])
        fit.update(lr=lr, lr_search=lr_search, final_test_accuracy=final_m["accuracy"],
                   val_accuracy=best["val"]["accuracy"])
    else:  # knn, logreg: fitted once on train (logreg's C chosen on val); no epochs
        head, fit = fit_probe(cfg.head, cc, z, y, n_classes, int(cfg.seed))
        summary["epochs"] = 0
    test_m, logits = _eval(head, z["test"], y["test"], 4096)
    best_acc = fit["val_accuracy"]
    # classify.probes: more heads on the same embeddings; the report shows one column per head
    probes = {cfg.head.name: {"val_accuracy": best_acc, "test_accuracy": test_m["accuracy"], **_probe_extras(fit)}}
    for name in cc.probes:
        if name in probes:
            continue
        t0 = time.time()
        pcfg = OmegaConf.merge(cfg.head, {"name": name})
        p_head, p_fit = (train_head(pcfg, cc, z, y, n_classes, int(cfg.seed),
                                    select_lr(pcfg, cc, z, y, n_classes, int(cfg.seed))[0])
                         if is_trainable(name) else fit_probe(pcfg, cc, z, y, n_classes, int(cfg.seed)))
        p_test, _ = _eval(p_head, z["test"], y["test"], 4096)
        probes[name] = {"val_accuracy": p_fit["val_accuracy"], "test_accuracy": p_test["accuracy"], **_probe_extras(p_fit)}
        log.info("probe %s: val accuracy %.4f, test accuracy %.4f (%.1fs)", name, p_fit["val_accuracy"],
                 p_test["accuracy"], time.time() - t0)
        runs.fault_point("classify.probes")
    pred = logits.argmax(1).cpu().numpy()
    true = y["test"].cpu().numpy()
    cm = confusion_matrix(true, pred, labels=list(range(len(classes))))
    per_class = {c: float(cm[i, i] / max(1, cm[i].sum())) for i, c in enumerate(classes)}
    # the result first: nothing optional below (figures, projections, wandb) can lose or hide it
    summary.update(status="completed", test_accuracy=test_m["accuracy"], test_loss=test_m["loss"],
                   val_accuracy=best_acc, head_settings=_head_settings(cfg.head, cc),
                   **{k: v for k, v in fit.items() if k not in ("val_accuracy",)},
                   probes=probes, per_class_accuracy=per_class, confusion_matrix=cm.tolist(), classes=classes,
                   end_time=time.time())
    summary["wall_seconds"] = summary["end_time"] - summary["start_time"]  # first start to end, gaps included
    runs.touch_attempt(summary, summary["end_time"])
    runs.fault_point("classify.summary")
    runs.write_json_atomic(run_dir / runs.SUMMARY, summary)
    runs.fault_point("classify.plots")
    lc, png = cfg.logger, run_dir / "images" / "confusion.png"
    _optional("images/confusion.png", save_confusion_png, cm, classes, png,
              f"{enc_cfg['model']['name']} z{enc_cfg['latent']} {cfg.head.name}: test acc {test_m['accuracy']:.3f}")
    images = _optional("projections", plots.save_projections, emb["test"]["z"].numpy(), true, classes,
                       run_dir / "images", list(lc.projections), int(lc.projection_points),
                       f"{enc_cfg['model']['name']}-z{enc_cfg['latent']}", seed=int(cfg.seed)) or {}
    _optional("tracker images", tracker.log_images, int(cc.epochs), confusion=png, **images)
    _optional("tracker embeddings table", tracker.log_embeddings, emb["test"]["z"].numpy(), true, classes,
              int(lc.wandb.table_rows), seed=int(cfg.seed))
    _optional("tracker confusion matrix", tracker.log_confusion, true, pred, classes)
    _optional("tracker finish", tracker.finish, summary)
    log.info("head %s: test accuracy %.4f (val %.4f)%s", cfg.head.name, test_m["accuracy"], best_acc,
             f"; best epoch {fit['best_epoch']}, final-epoch test accuracy {fit['final_test_accuracy']:.4f}"
             if "best_epoch" in fit else "")
    return run_dir
