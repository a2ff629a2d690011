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
   {head name: {"val_accuracy", "test_accuracy", ...}} (the main head included). ``classify.layers`` fits the
   same head on pooled features of the encoder's stages too (``embclf.layers``; cached in layer_embeddings.pt,
   from the same forward pass): summary ``test_accuracy_by_layer`` / ``val_accuracy_by_layer`` {layer: accuracy}.
5. Write the result (summary.json, status "completed") first; only then the optional extras: project the
   test embeddings to 2-D (images/pca.png, tsne.png, umap.png; ``embclf.report.projections``) and log them, a table of
   test embeddings and the confusion matrix to the tracker (wandb, ``embclf.tracking``). A failure of an
   extra is a warning and never loses the result.

A recipe: the steps are ``embclf.engine``'s, the encoder lookup and loading ``embclf.artefacts``', the
checkpoints ``embclf.checkpoint``'s, the run dir's start and end ``embclf.lifecycle``'s.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from .. import (artefacts, checkpoint, engine, faults, identity, layers, lifecycle, provenance, references, runs, runtime,
               tracking)
from .. import data as data_mod
from ..report import projections as plots
from ..heads import build_head, check_dropout, check_names, is_trainable
from ..lifecycle import RunDir

log = logging.getLogger(__name__)


def _optional(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` for an optional extra run after the result is written (a figure, a projection,
    tracker logging): an exception is one warning naming ``what``, never a failed run. Returns fn's value or None."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- any failure of an extra; the result is already on disk
        log.warning("%s failed after the result was written (%s: %s); skipped, the run stays completed", what,
                    type(e).__name__, e)
        return None


def check_settings(cfg) -> None:
    """Fail early (before anything is written) on bad ``head`` / ``classify`` settings, naming the key.

    Raises ``runtime.EmbclfError``."""
    cc = cfg.classify
    check_names([cfg.head.name], "head.name")
    check_names(list(cc.probes), "classify.probes")
    if cc.patience is not None and cc.patience < 1:
        raise runtime.EmbclfError(f"classify.patience={cc.patience} must be at least 1 (epochs without a better val "
                                  "accuracy before stopping), or null to train all classify.epochs.")
    if any(float(lr) <= 0 for lr in cc.lr_grid) or cc.lr <= 0:
        raise runtime.EmbclfError(f"classify.lr={cc.lr} / classify.lr_grid={list(cc.lr_grid)}: learning rates must be positive.")
    for name in {cfg.head.name, *cc.probes}:  # a bad head.k, head.C, head.dropout fails here, naming the key
        if is_trainable(name):
            check_dropout(cfg.head)  # (the layers themselves are built, and fail, in the job)
        else:
            build_head(OmegaConf.merge(cfg.head, {"name": name}), 2, 2)


def _probe_extras(fit: dict) -> dict:
    """What a ``probes`` entry records beside val/test accuracy: the settings chosen on val."""
    return {k: v for k, v in fit.items() if k in ("best_epoch", "lr", "C", "k")}


def _head_settings(head_cfg, cc) -> dict:
    """What the summary records of the head's training (trainable heads) or settings (the others)."""
    if is_trainable(head_cfg.name):
        return {"dropout": head_cfg.dropout, "weight_decay": cc.weight_decay,
                "patience": cc.patience, "lr_grid": [float(x) for x in cc.lr_grid], "epochs": cc.epochs,
                **({"hidden": list(head_cfg.hidden)} if head_cfg.name == "mlp" else {})}
    if head_cfg.name == "knn":
        return {"k": head_cfg.k, "temperature": head_cfg.temperature}
    return {"C": [float(c) for c in head_cfg.C], "max_iter": head_cfg.max_iter}



def run(cfg, run_dir: Path, overrides: List[str], encoder: Optional[Path] = None) -> Path:
    """Train ``cfg.head`` on the embeddings of the matching (or given) encoder into ``run_dir``.

    Raises ``runtime.EmbclfError`` (no encoder) or ``data.DataError`` (bad data config).
    """
    from sklearn.metrics import confusion_matrix

    # --- setup: every check before anything is written -------------------------------------------------
    # the identity holds the encoder's: stage=all's own (its config.yaml), the lookup's (cfg's own autoencode
    # identity) or classify.encoder's (the config stored there); another experiment in this run dir is refused
    ident = identity.identity(cfg, "classify", encoder=runs.read_config(encoder) if encoder else None)
    run = RunDir(run_dir, cfg, "classify", overrides, ident)
    run_dir, summary = run.path, run.summary
    if run.completed():
        return run_dir
    cc = cfg.classify
    if cc.epochs < 1:
        raise runtime.EmbclfError(f"classify.epochs={cc.epochs} must be at least 1.")
    check_settings(cfg)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.pt"
    resume = checkpoint.head_resume(last)
    ckpt_path = (Path(encoder) / "checkpoints" / "best.pt") if encoder else artefacts.resolve_encoder(cfg)
    encoder_run = ckpt_path.parent.parent
    log.info("encoder: %s", ckpt_path)
    # read onto the CPU (weights_only: a checkpoint is data, never code); a file of another kind fails here
    ck = checkpoint.load(ckpt_path, ("model", "config", "state"),
                         "classify.encoder" if cfg.classify.encoder else "encoder checkpoint")
    runs.check_image_size(ck["config"], cfg.data.image_size, ckpt_path)  # before the data is decoded
    extra = [n for n in layers.resolve(cc.layers, ck["config"]["model"]) if n != layers.CODE]  # stages to probe
    ds = data_mod.load(cfg.data)
    if resume is not None:  # a head's training continues on the same images only
        run.refuse_changed_data(ds.fingerprint)
    # bad input has failed by now; only from here on does the run dir hold a config and a summary
    run.start(resume["state"]["epoch"] if resume is not None else None)

    env = runtime.setup(cfg)
    device = env["device"]
    enc_cfg = ck["config"]
    if (enc_cfg["model"]["name"], int(enc_cfg["latent"])) != (cfg.model.name, cfg.latent):
        named = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in ("model", "latent")]
        where = f"the command line's {' '.join(named)}" if named else \
            f"the config's defaults (model={cfg.model.name} latent={cfg.latent})"
        log.info("classify.encoder is a model=%s latent=%d encoder; %s are not used (summary.json records the "
                 "encoder's)", enc_cfg["model"]["name"], int(enc_cfg["latent"]), where)
        if named:
            log.warning("classify.encoder decides the model and latent: %s do not apply", " ".join(named))
    model = artefacts.build_autoencoder(ck, device)  # CPU weights, then onto the device; eval mode, frozen
    # relative to this run dir when the encoder travels with it (docs/run-dirs.md, "Relocatable results")
    summary.update(**references.reference_fields(run_dir, cfg.output_dir, encoder_run=encoder_run, encoder_checkpoint=ckpt_path))
    summary.update(encoder_epoch=int(ck["state"]["epoch"]), model=enc_cfg["model"]["name"],
                   latent=int(enc_cfg["latent"]), device=str(device), device_name=env["name"],
                   device_fallback=env["fallback"], deterministic=env["deterministic"], head=cfg.head.name,
                   provenance=provenance.provenance(cfg, ds.fingerprint, env["name"], files=ds.files))

    emb_path = run_dir / "embeddings.pt"
    run.save(data_fingerprint=ds.fingerprint)  # a failure from here on keeps the encoder and provenance
    tracker = tracking.start(cfg, run_dir, "classify", encoder_cfg=enc_cfg)  # wandb (or nothing); closed by finish below
    faults.fault_point("startup")
    prec = enc_cfg.get("precision", "fp32")  # embed as the encoder was trained
    # embeddings.pt is a cache: reused (a resumed job) only when it was computed from this encoder's weights,
    # these images and these rules; anything else recomputes it
    key = {"encoder_sha1": runs.file_sha1(ckpt_path), "data_fingerprint": ds.fingerprint, "precision": prec,
           "mode": "eval, mu"}
    emb = checkpoint.load(emb_path, ("train", "val", "test", "classes"), "embeddings") \
        if emb_path.is_file() else None
    if emb is not None and emb.get("key") != key:
        log.warning("%s was computed from another encoder or other data (%s); computing it again", emb_path,
                    ", ".join(k for k in key if (emb.get("key") or {}).get(k) != key[k]) or "no key recorded")
        emb = None
    splits = ("train", "val", "test")
    # classify.layers: the stages' pooled features, cached beside embeddings.pt under the same rules
    lay_path, lay_key = run_dir / "layer_embeddings.pt", {**key, "layers": extra, "pool": layers.POOL}
    lay = checkpoint.load(lay_path, ("key",), "layer embeddings") if extra and lay_path.is_file() else None
    lay = lay if lay is not None and lay.get("key") == lay_key else None
    if emb is None or (extra and lay is None):
        t0 = time.time()  # one forward pass gives the code and every stage asked for
        feats = {s: layers.embed(model, ds.split(s), device, 1000, [layers.CODE, *extra], prec) for s in splits}
        if emb is None:
            emb = {s: {"z": feats[s][layers.CODE], "labels": ds.split(s).labels.clone()} for s in splits}
            emb["classes"] = ds.classes
            emb["key"] = key
            faults.fault_point("classify.embed")
            # a cache for a resumed job: a full disk fails at the next checkpoint, saying so, not here
            runs.write_cache(emb, emb_path, "embeddings cache", "A resumed run computes the embeddings again.")
        if extra and lay is None:
            lay = {"key": lay_key, **{s: {n: feats[s][n] for n in extra} for s in splits}}
            runs.write_cache(lay, lay_path, "layer embeddings cache", "A resumed run computes them again.")
        del feats
        log.info("embedded %d images in %.1fs", sum(len(emb[s]["z"]) for s in splits), time.time() - t0)
    z = {s: emb[s]["z"].to(device) for s in ("train", "val", "test")}
    y = {s: emb[s]["labels"].to(device) for s in ("train", "val", "test")}
    classes = list(emb["classes"])

    # --- the head: trained epoch by epoch (checkpointed) or fitted once -----------------------------------
    # epochs after the checkpoint are redone, not duplicated (with no checkpoint: everything is redone)
    runs.truncate_metrics(run_dir, int(resume["state"]["epoch"]) if resume is not None else 0)
    n_classes = len(classes)
    if is_trainable(cfg.head.name):
        lr, lr_search = engine.select_lr(cfg.head, cc, z, y, n_classes, cfg.seed)
        cur: dict = {}  # the head's training as far as it got, for save_last (set by on_epoch)

        def save_last() -> None:
            if cur:
                checkpoint.save(checkpoint.head_last(cur["head"], cur["opt"], cur["sched"], cur["g"], cur["state"],
                                                     runs.resolved(cfg)), last)

        def on_epoch(epoch, head, opt, sched, train_m, val_m, lr_now, seconds, improved, g, state):
            runs.append_metrics(run_dir, {"epoch": epoch, "split": "train", **train_m, "lr": lr_now, "seconds": seconds,
                                          "images_per_second": len(z["train"]) / seconds if seconds > 0 else None})
            runs.append_metrics(run_dir, {"epoch": epoch, "split": "val", **val_m, "lr": lr_now})
            tracker.log_epoch(epoch, train=train_m, val=val_m, lr=lr_now)
            log.info("epoch %d/%d  train ce %.4f acc %.4f | val ce %.4f acc %.4f", epoch, cc.epochs,
                     train_m["loss"], train_m["accuracy"], val_m["loss"], val_m["accuracy"])
            faults.fault_point("classify.metrics")
            if improved:  # best.pt before last.pt: a kill between the two redoes this epoch
                checkpoint.save({"head": head.state_dict(), "epoch": epoch, "val": val_m, "config": runs.resolved(cfg)},
                                ckpt_dir / "best.pt")
                faults.fault_point("classify.best")
            cur.update(head=head, opt=opt, sched=sched, g=g, state=state)
            save_last()
            run.save()  # compute_seconds so far
            signals.poll()

        if resume is not None:
            log.info("resuming the head's training from %s at epoch %d", last, resume["state"]["epoch"])
        # SIGUSR2/SIGTERM: last.pt after the current epoch (a head's epoch is short), then hand on (requeue)
        with lifecycle.CheckpointOnSignal(save_last) as signals:
            head, fit = engine.train_head(cfg.head, cc, z, y, n_classes, cfg.seed, lr, on_epoch, resume=resume,
                                   keep_last_epoch=True)
        resume = None
        final_m, _ = engine.eval_head(head, z["test"], y["test"], 4096)
        runs.append_metrics(run_dir, {"epoch": fit["epochs_run"], "split": "test", **final_m})
        faults.fault_point("classify.test")
        best = checkpoint.load(ckpt_dir / "best.pt", ("head", "val"), "best head checkpoint")
        head.load_state_dict(best["head"])
        fit.update(lr=lr, lr_search=lr_search, final_test_accuracy=final_m["accuracy"],
                   val_accuracy=best["val"]["accuracy"])
    else:  # knn, logreg: fitted once on train (logreg's C chosen on val); no epochs
        head, fit = engine.fit_probe(cfg.head, cc, z, y, n_classes, cfg.seed)
        summary["epochs"] = 0
    # --- the result: test accuracy, probes, confusion matrix; then the optional extras ----------------------
    test_m, logits = engine.eval_head(head, z["test"], y["test"], 4096)
    best_acc = fit["val_accuracy"]
    # classify.probes: more heads on the same embeddings; the report shows one column per head
    probes = {cfg.head.name: {"val_accuracy": best_acc, "test_accuracy": test_m["accuracy"], **_probe_extras(fit)}}
    for name in cc.probes:
        if name in probes:
            continue
        t0 = time.time()
        pcfg = OmegaConf.merge(cfg.head, {"name": name})
        p_head, p_fit = (engine.train_head(pcfg, cc, z, y, n_classes, cfg.seed,
                                           engine.select_lr(pcfg, cc, z, y, n_classes, cfg.seed)[0])
                         if is_trainable(name) else engine.fit_probe(pcfg, cc, z, y, n_classes, cfg.seed))
        p_test, _ = engine.eval_head(p_head, z["test"], y["test"], 4096)
        probes[name] = {"val_accuracy": p_fit["val_accuracy"], "test_accuracy": p_test["accuracy"], **_probe_extras(p_fit)}
        log.info("probe %s: val accuracy %.4f, test accuracy %.4f (%.1fs)", name, p_fit["val_accuracy"],
                 p_test["accuracy"], time.time() - t0)
        faults.fault_point("classify.probes")
    # classify.layers: the same head on each stage's features; the code's entry is the main head's result
    by_layer = {layers.CODE: {"val_accuracy": best_acc, "test_accuracy": test_m["accuracy"]}}
    for name in extra:
        by_layer[name] = layers.probe(cfg.head, cc, {s: lay[s][name].to(device) for s in splits}, y, n_classes, cfg.seed)
        log.info("layer %s: val accuracy %.4f, test accuracy %.4f", name, by_layer[name]["val_accuracy"],
                 by_layer[name]["test_accuracy"])
    pred = logits.argmax(1).cpu().numpy()
    true = y["test"].cpu().numpy()
    cm = confusion_matrix(true, pred, labels=list(range(len(classes))))
    per_class = {c: float(cm[i, i] / max(1, cm[i].sum())) for i, c in enumerate(classes)}
    # the result first: nothing optional below (figures, projections, wandb) can lose or hide it
    faults.fault_point("classify.summary")
    run.complete(test_accuracy=test_m["accuracy"], test_loss=test_m["loss"], val_accuracy=best_acc,
                 head_settings=_head_settings(cfg.head, cc), **{k: v for k, v in fit.items() if k != "val_accuracy"},
                 probes=probes, per_class_accuracy=per_class,
                 test_accuracy_by_layer={n: r["test_accuracy"] for n, r in by_layer.items()},
                 val_accuracy_by_layer={n: r["val_accuracy"] for n, r in by_layer.items()},
                 confusion_matrix=cm.tolist(), classes=classes)
    faults.fault_point("classify.plots")
    lc, png = cfg.logger, run_dir / "images" / "confusion.png"
    _optional("images/confusion.png", plots.confusion, cm, classes, png,
              f"{enc_cfg['model']['name']} z{enc_cfg['latent']} {cfg.head.name}: test acc {test_m['accuracy']:.3f}")
    images = _optional("projections", plots.save_projections, emb["test"]["z"].numpy(), true, classes,
                       run_dir / "images", list(lc.projections), lc.projection_points,
                       f"{enc_cfg['model']['name']}-z{enc_cfg['latent']}", seed=cfg.seed) or {}
    _optional("tracker images", tracker.log_images, cc.epochs, confusion=png, **images)
    _optional("tracker embeddings table", tracker.log_embeddings, emb["test"]["z"].numpy(), true, classes,
              lc.wandb.table_rows, seed=cfg.seed)
    _optional("tracker confusion matrix", tracker.log_confusion, true, pred, classes)
    _optional("tracker finish", tracker.finish, summary)
    log.info("head %s: test accuracy %.4f (val %.4f)%s", cfg.head.name, test_m["accuracy"], best_acc,
             f"; best epoch {fit['best_epoch']}, final-epoch test accuracy {fit['final_test_accuracy']:.4f}"
             if "best_epoch" in fit else "")
    return run_dir
