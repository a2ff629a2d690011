"""Debug modes, the ``debug`` config group (``conf/debug/{none,fast,overfit}.yaml``; schema ``config.DebugConfig``).

- ``debug=fast``: every stage runs 1 epoch of a few batches on a tiny class-stratified subset
  (``debug.train_size`` / ``debug.test_size`` images at most, batches of ``debug.batch_size``) and writes all
  its outputs (checkpoints, images, summary, embeddings): a smoke test of the whole pipeline in seconds.
- ``debug=overfit``: the autoencoder trains on one fixed batch (``debug.batch_size`` training images, a
  fixed random draw) until its eval-mode PSNR on that batch exceeds ``debug.target_psnr`` (25 dB), at most
  ``debug.steps`` optimizer steps; then the head trains on that batch's embeddings until its accuracy on it
  is 1.0. A model that cannot fit one batch has a bug (the "overfit a single batch" check of Karpathy,
  "A Recipe for Training Neural Networks", 2019). A check that fails ends the job with status failed,
  reason "overfit".

Both compose like any group (``python -m embclf -m model=ae,vae debug=overfit``). A debug run is never taken
for a result: it warns loudly at its start and end, its ``summary.json`` says ``"debug": "fast"`` (or
``"overfit"``), its ``config.yaml`` holds the ``debug`` node (``runs.resolved`` drops it for normal runs),
The run identity (``embclf.identity``) includes the mode (so a real classifier never finds a debug encoder, and a debug
classifier finds the debug one), and the report lists it as ``debug=fast``, apart from completed runs.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import open_dict
from torchvision.utils import make_grid, save_image

from . import artefacts, checkpoint, engine, identity, losses, runs, runtime, tracking
from . import data as data_mod
from .heads import build_head
from .lifecycle import RunDir
from .models import build_model, count_parameters

log = logging.getLogger("embclf")

MODES = ("none", "fast", "overfit")


def mode(cfg) -> str:
    """The config's debug mode: ``none``, ``fast`` or ``overfit``. Raises ``EmbclfError`` for another name."""
    name = runs.debug_mode(cfg)
    if name not in MODES:
        raise runtime.EmbclfError(f"debug={name} is unknown; use debug=fast or debug=overfit (or leave debug out).")
    return name


def _at_most(value, cap: int) -> int:
    return int(cap) if value is None else min(int(value), int(cap))


def apply(cfg) -> str:
    """Shrink ``cfg`` in place for its debug mode (called by the entrypoint before any stage); returns the mode.

    fast: ``data.train_size``/``data.test_size`` at most ``debug.train_size``/``debug.test_size``, 1 epoch
    per stage, batches of ``debug.batch_size``, images after epoch 1. overfit: the data sizes only (the batch
    is drawn from the training images). The shrunk values are what config.yaml records, so a re-run of the
    same command finds the run completed. Logs the warning banner.
    """
    m = mode(cfg)
    if m == "none":
        return m
    d = cfg.debug
    with open_dict(cfg):
        cfg.data.train_size = _at_most(cfg.data.train_size, d.train_size)
        cfg.data.test_size = _at_most(cfg.data.test_size, d.test_size)
        if m == "fast":
            cfg.autoencode.epochs = cfg.classify.epochs = 1
            cfg.autoencode.batch_size = cfg.classify.batch_size = d.batch_size
            cfg.autoencode.image_epochs = [1]
    warn(cfg)
    return m


def warn(cfg) -> None:
    """The loud warning every debug run logs at its start and end (a no-op for normal runs)."""
    m = runs.debug_mode(cfg)
    if m == "none":
        return
    what = ("1 epoch of a few batches on a tiny subset" if m == "fast"
            else f"training on one fixed batch of {cfg.debug.batch_size} images")
    bar = "!" * 100
    log.warning("%s\nDEBUG RUN (debug=%s): %s. Its numbers are NOT results: summary.json says \"debug\": \"%s\", "
                "encoder lookups and the report keep it apart.\n%s", bar, m, what, m, bar)


def fixed_batch(split: data_mod.Split, n: int, seed: int) -> data_mod.Split:
    """The overfit batch: ``n`` images of ``split`` (all if fewer) drawn at random with ``seed`` (so several
    classes are in it), the same on every run. Returns a ``Split`` on the split's device."""
    pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(int(seed)))[:int(n)]
    paths = [split.paths[int(i)] for i in pick] if split.paths is not None else None
    pick = pick.to(split.images.device)
    return data_mod.Split(split.images[pick], split.labels[pick], paths)


def _check_sizes(cfg) -> None:
    d = cfg.debug
    for key in ("batch_size", "steps", "eval_every"):
        if int(d[key]) < 1:
            raise runtime.EmbclfError(f"debug.{key}={d[key]} must be at least 1.")


def _finish(run: RunDir, passed: bool, failure: str, tracker) -> None:
    """Write the overfit run's final summary; raise ``EmbclfError`` (status failed, reason overfit) if it failed."""
    summary = run.complete("completed" if passed else "failed", overfit_passed=passed,
                           **({} if passed else {"reason": "overfit", "error": failure}))
    tracker.finish(summary, exit_code=0 if passed else 1)
    if not passed:
        raise runtime.EmbclfError(failure)


def overfit_autoencoder(cfg, run_dir: Path, overrides: List[str]) -> Path:
    """``debug=overfit`` for ``stage=autoencode``: train the model on one fixed batch (Adam with
    ``autoencode.lr``, the stage's own ``batch_step``), evaluating the batch in eval mode (a VAE decodes mu,
    the stage's ``evaluate``) every ``debug.eval_every`` steps, until its PSNR exceeds ``debug.target_psnr``.

    Writes config.yaml, metrics.jsonl (one ``"split": "overfit"`` record per evaluation, with its ``step``),
    checkpoints/best.pt and last.pt (the final weights; a classifier can use them), images/overfit.png (the
    batch above its reconstructions) and summary.json (``overfit_psnr`` dB, ``overfit_mse``, ``overfit_steps``,
    ``overfit_passed``). Returns ``run_dir``. Raises ``EmbclfError`` when the target is not reached.
    """
    run = RunDir(run_dir, cfg, "autoencode", overrides, identity.identity(cfg, "autoencode"))
    run_dir = run.path
    if run.completed():
        return run_dir
    _check_sizes(cfg)
    d = cfg.debug
    env = runtime.setup(cfg)
    device = env["device"]
    precision = runtime.precision(cfg)
    ds = data_mod.load(cfg.data)
    batch = fixed_batch(ds.train, d.batch_size, cfg.seed).to(device)
    model = build_model(cfg.model, cfg.latent, cfg.data.image_size).to(device)
    beta = cfg.model.beta
    opt = runtime.adam(model.parameters(), device, cfg.autoencode.lr, cfg.autoencode.weight_decay)
    run.start(device=str(device), device_name=env["name"], parameters=count_parameters(model),
              data_fingerprint=ds.fingerprint, overfit_batch=len(batch), overfit_target_psnr=d.target_psnr)
    tracker = tracking.start(cfg, run_dir, "autoencode")

    def step_fn(x):
        return engine.batch_step(model, x, beta, precision)

    x = data_mod.to_float(batch.images)
    target, every, steps = d.target_psnr, d.eval_every, d.steps
    m, step, passed = {}, 0, False
    for step in range(1, steps + 1):
        model.train()
        loss, _, _ = step_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            m = engine.evaluate(step_fn, model, batch, len(batch))
            runs.append_metrics(run_dir, {"step": step, "split": "overfit", **m})
            tracker.log_epoch(step, lr=cfg.autoencode.lr, overfit=m)
            log.info("overfit step %d/%d: PSNR %.2f dB on the batch (target %.1f dB), mse %.5f", step, steps,
                     m["psnr"], target, m["mse"])
            passed = m["psnr"] > target
            if passed or not math.isfinite(m["psnr"]):
                break
    ckpt = {"model": model.state_dict(), "config": runs.resolved(cfg), "val": m,
            "state": {"epoch": step, "best_epoch": step}}
    checkpoint.save(ckpt, run_dir / "checkpoints" / "best.pt")
    checkpoint.save(ckpt, run_dir / "checkpoints" / "last.pt")
    model.eval()
    with torch.no_grad():
        x_hat = model(x[:16], sample=False)["x_hat"].float()
    (run_dir / "images").mkdir(exist_ok=True)
    save_image(make_grid(torch.cat([x[:16], x_hat]).cpu(), nrow=len(x_hat), padding=1), run_dir / "images" / "overfit.png")
    run.summary.update(overfit_steps=step, overfit_psnr=m.get("psnr"), overfit_mse=m.get("mse"), best_epoch=step,
                       **({"overfit_kl": m["kl"]} if "kl" in m else {}))
    _finish(run, passed,
            f"debug=overfit: model={cfg.model.name} latent={cfg.latent} did not fit one batch of {len(batch)} images: "
            f"PSNR {m.get('psnr', float('nan')):.2f} dB after {step} steps, target > {target:g} dB "
            f"(debug.target_psnr). A model that cannot fit one batch has a bug, or needs another autoencode.lr or "
            f"more debug.steps.", tracker)
    return run_dir


def overfit_head(cfg, run_dir: Path, overrides: List[str], encoder: Optional[Path] = None) -> Path:
    """``debug=overfit`` for ``stage=classify``: embed the fixed batch with the encoder (``encoder``, else the
    stage's own lookup, which finds the ``debug=overfit`` autoencoder of the same settings, or
    ``classify.encoder``) and train the head on those embeddings (cross-entropy, Adam with ``classify.lr``)
    until its accuracy on them is 1.0, at most ``debug.steps`` steps. A head with a ``fit`` method (fitted
    probes) is fitted once instead.

    Writes config.yaml, metrics.jsonl, checkpoints/best.pt and last.pt (the head) and summary.json
    (``overfit_accuracy``, ``overfit_steps``, ``overfit_passed``, ``encoder_run``). Returns ``run_dir``.
    Raises ``EmbclfError`` when the accuracy stays below 1.0 or no encoder is found.
    """
    ident = identity.identity(cfg, "classify", encoder=runs.read_config(encoder) if encoder else None)
    run = RunDir(run_dir, cfg, "classify", overrides, ident)
    run_dir = run.path
    if run.completed():
        return run_dir
    _check_sizes(cfg)
    d = cfg.debug
    ckpt_path = (Path(encoder) / "checkpoints" / "best.pt") if encoder else artefacts.resolve_encoder(cfg)
    ck = checkpoint.load(ckpt_path, ("model", "config"), "encoder checkpoint")
    runs.check_image_size(ck["config"], cfg.data.image_size, ckpt_path)
    env = runtime.setup(cfg)
    device = env["device"]
    ds = data_mod.load(cfg.data)
    batch = fixed_batch(ds.train, d.batch_size, cfg.seed)
    enc_cfg = ck["config"]
    model = artefacts.build_autoencoder(ck, device)
    z = engine.embed(model, batch, device, 1000, enc_cfg.get("precision", "fp32")).to(device)
    y = batch.labels.to(device)
    run.start(**runs.reference_fields(run_dir, cfg.output_dir, encoder_run=ckpt_path.parent.parent,
                                      encoder_checkpoint=ckpt_path),
              model=enc_cfg["model"]["name"], latent=int(enc_cfg["latent"]), head=cfg.head.name,
              device=str(device), device_name=env["name"], overfit_batch=len(batch), classes=ds.classes)
    tracker = tracking.start(cfg, run_dir, "classify", encoder_cfg=enc_cfg)

    torch.manual_seed(cfg.seed)
    head = build_head(cfg.head, z.shape[1], len(ds.classes))
    m, step = {}, 0
    if hasattr(head, "fit"):  # a fitted probe: one fit on the batch, no steps
        head.fit(z, y, z, y)
        m, _ = engine.eval_head(head, z, y, 4096)
    else:
        head = head.to(device)
        if hasattr(head, "fit_standardizer"):
            head.fit_standardizer(z)
        opt = runtime.adam(head.parameters(), device, cfg.classify.lr, cfg.classify.weight_decay)
        every, steps = d.eval_every, d.steps
        for step in range(1, steps + 1):
            head.train()
            loss = losses.cross_entropy(head(z), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % every == 0 or step == steps:
                m, _ = engine.eval_head(head, z, y, 4096)
                runs.append_metrics(run_dir, {"step": step, "split": "overfit", **m})
                tracker.log_epoch(step, lr=cfg.classify.lr, overfit=m)
                log.info("overfit step %d/%d: accuracy %.4f on the batch, cross-entropy %.4f", step, steps,
                         m["accuracy"], m["loss"])
                if m["accuracy"] >= 1.0:
                    break
    if isinstance(head, torch.nn.Module):
        ckpt = {"head": head.state_dict(), "epoch": step, "val": m, "config": runs.resolved(cfg)}
        checkpoint.save(ckpt, run_dir / "checkpoints" / "best.pt")
        checkpoint.save(ckpt, run_dir / "checkpoints" / "last.pt")
    passed = m.get("accuracy", 0.0) >= 1.0
    run.summary.update(overfit_steps=step, overfit_accuracy=m.get("accuracy"), overfit_loss=m.get("loss"),
                       best_epoch=step)
    _finish(run, passed,
            f"debug=overfit: head={cfg.head.name} reached accuracy {m.get('accuracy', 0.0):.4f} < 1.0 on one batch of "
            f"{len(batch)} embeddings after {step} steps. A head that cannot fit one batch has a bug, or needs another "
            "classify.lr or more debug.steps.", tracker)
    return run_dir
