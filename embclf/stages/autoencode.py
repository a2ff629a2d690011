"""stage=autoencode: train an AE/VAE, select the best epoch on val, report test. Readable top to bottom.

Per epoch: train (Adam, cosine annealing stepped per epoch) on the in-memory uint8 train tensor batched by
a random permutation; evaluate on val; append train/val metrics to metrics.jsonl; save checkpoints/last.pt
(model, optimizer, scheduler, epoch, RNG states, best-so-far, the joint head) and, when the val metric
named by ``autoencode.select_on`` improves (the val objective at full weights by default, or val MSE),
checkpoints/best.pt. The objective (SSE + β·KL, plus the optional joint-head CE, decorrelation penalty and KL
warm-up of ``embclf.models.objectives``; docs/objectives.md) is computed in ``engine.batch_step``. After the last
epoch: test metrics of the final model (``final_test_*``, what the reference study reported) and of the
best-on-val checkpoint (``test_*``), images, summary.json.
Every epoch also goes to the tracker (wandb, ``embclf.tracking``); on a terminal a tqdm bar shows the epoch.

A run dir that already holds last.pt resumes from it (a requeued SLURM job, a re-invoked sweep); a run
dir whose summary says completed for the same config is left as it is. The resume is exact wherever the
previous attempt stopped: records of epochs after the checkpoint are replaced, not duplicated; best.pt is
written before last.pt; on SIGTERM/SIGUSR2 last.pt holds the position inside the epoch (step, running sums,
the batch generator's state at the epoch's start) and the resume continues with the next batch.

A recipe (torchtune's sense): setup, loop, result. The steps are ``embclf.engine``'s, the checkpoint format
``embclf.checkpoint``'s, the images ``embclf.images``' and the run dir's start and end ``embclf.lifecycle``'s;
nothing imports this module but the entrypoint.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import List

import torch

from .. import (checkpoint, engine, faults, identity, images, lifecycle, losses, probe, provenance, runs, runtime,
               tracking)
from .. import data as data_mod
from ..lifecycle import RunDir
from ..models import build_model, count_parameters
from ..models.objectives import build_objective

log = logging.getLogger(__name__)

COLLAPSE_FRACTION = 0.1  # fewer active units than this fraction of the latent: flagged as posterior collapse


def run(cfg, run_dir: Path, overrides: List[str]) -> Path:
    """Train the autoencoder described by ``cfg`` into ``run_dir``; returns ``run_dir``.

    Raises ``runtime.EmbclfError`` / ``data.DataError`` for bad input (after recording status failed).
    """
    # --- setup: every check before anything is written -------------------------------------------------
    run = RunDir(run_dir, cfg, "autoencode", overrides, identity.identity(cfg, "autoencode"))
    run_dir = run.path
    # another experiment in this run dir is refused here, whatever files it holds; the same one completed is done
    if run.completed():
        return run_dir
    ac = cfg.autoencode
    if cfg.latent < 1:
        raise runtime.EmbclfError(f"latent={cfg.latent} must be a positive integer (e.g. latent=64).")
    if ac.epochs < 0:
        raise runtime.EmbclfError(f"autoencode.epochs={ac.epochs} must be >= 0 (0 = the random-init control: no "
                                  "training, the seed's initial weights evaluated and saved).")
    if cfg.model.kl_warmup_epochs < 0:
        raise runtime.EmbclfError(f"model.kl_warmup_epochs={cfg.model.kl_warmup_epochs} must be >= 0 "
                                  "(0 = the full model.beta from the first epoch).")
    try:  # the objective's weights, checked before anything is written (the head is rebuilt below)
        build_objective(cfg.model, cfg.latent, 2)
    except ValueError as e:
        raise runtime.EmbclfError(f"{e}.") from None
    last = run_dir / "checkpoints" / "last.pt"
    # the same experiment (open_run_dir said so) continues from its last checkpoint
    resume = checkpoint.load(last, checkpoint.AE_LAST, "resume") if last.is_file() else None
    env = runtime.setup(cfg)
    device = env["device"]
    precision = runtime.precision(cfg)
    fmt = runtime.memory_format(device)
    ds = data_mod.load(cfg.data)
    if resume is not None:  # the same experiment on the same images only
        run.refuse_changed_data(ds.fingerprint)
    # airbench-style: every split lives on the training device as uint8; batches are index lookups there
    train, val, test = (s.to(device) for s in (ds.train, ds.val, ds.test))
    model = build_model(cfg.model, cfg.latent, cfg.data.image_size).to(device, memory_format=fmt)
    # the joint head (model.ce_weight) and the decorrelation penalty; the head trains with the model's optimizer
    objective = build_objective(cfg.model, cfg.latent, len(ds.classes))
    head = objective.head.to(device) if objective.head is not None else None
    need_labels = objective.needs_labels
    beta = cfg.model.beta
    warmup = cfg.model.kl_warmup_epochs
    # KL weights as device tensors: the epoch's beta (warm-up) for training; the full beta for val and test, so
    # the val objective of every epoch is the same function and select_on=loss compares like with like
    beta_train = torch.tensor(beta, device=device)
    beta_full = torch.tensor(beta, device=device)
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    # model.weight_decay (the reference study's 1e-4 for the plain AE) overrides autoencode.weight_decay
    wd = float(ac.weight_decay if cfg.model.get("weight_decay") is None else cfg.model.weight_decay)
    opt = runtime.adam(params, device, ac.lr, wd)
    # T_max >= 1: with autoencode.epochs=0 the schedule is never stepped (it is only saved in the checkpoints)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, ac.epochs))

    def core(x, y, b):
        return engine.batch_step(model, x, b, precision, y, objective)

    core = runtime.maybe_compile(core, cfg.compile, cfg.compile_mode)  # one compiled step per job, train and eval

    def step(x, y=None):  # training: this epoch's beta
        return core(x, y, beta_train)

    def eval_step(x, y=None):  # val/test: the full beta
        return core(x, y, beta_full)

    select_on = str(getattr(ac.select_on, "value", ac.select_on))
    log.info("model %s, latent %d, %d parameters", cfg.model.name, cfg.latent, count_parameters(model))
    # bad input has failed by now; only from here on does the run dir hold a config and a summary
    run.start(resume["state"]["epoch"] if resume is not None else None,
              device=str(device), device_name=env["name"], device_fallback=env["fallback"],
              precision=precision, compile=cfg.compile, compile_mode=cfg.compile_mode if cfg.compile else None,
              deterministic=env["deterministic"], tf32=env["tf32"], weight_decay=wd,
              cudnn_benchmark=env["cudnn_benchmark"], channels_last=fmt == torch.channels_last,
              parameters=count_parameters(model), data_fingerprint=ds.fingerprint,
              n_train=len(train), n_val=len(val), n_test=len(test),
              provenance=provenance.provenance(cfg, ds.fingerprint, env["name"], files=ds.files))
    tracker = tracking.start(cfg, run_dir, "autoencode")  # wandb (or nothing); closed by finish below
    faults.fault_point("startup")

    # --- the loop: train, validate, record, checkpoint ---------------------------------------------------
    ckpt_dir = last.parent
    g = torch.Generator().manual_seed(cfg.seed)  # batch order; saved in checkpoints for exact resumes
    # best_val: the lowest val `select_on` metric so far (best_val_mse: that epoch's val MSE)
    state = {"epoch": 0, "best_val_mse": math.inf, "best_epoch": 0, "best_val": math.inf}
    position = None  # where a mid-epoch checkpoint stopped: {"epoch", "step", "sums", "batch_rng"}
    if resume is not None:
        state = checkpoint.restore_training_state(resume, model, opt, sched, g)
        position = resume.get("epoch_position")
        if head is not None:  # saved beside the model by checkpoint() below
            head.load_state_dict(resume["joint_head"])
        del resume
        log.info("resuming from %s at epoch %d%s", last, state["epoch"],
                 f", step {position['step']} of epoch {position['epoch']}" if position else "")
    # epochs after the checkpoint are redone: their records (written before a kill reached the checkpoint)
    # are replaced, not duplicated; with no checkpoint at all, everything is redone
    # (autoencode.epochs=0 redoes its epoch-0 record whatever the checkpoint says: -1 drops it)
    runs.truncate_metrics(run_dir, state["epoch"] if ac.epochs else -1)

    def save(path: Path, **extra) -> None:
        checkpoint.save(checkpoint.autoencoder(model, opt, sched, g, state, runs.resolved(cfg), head, **extra), path)

    live: dict = {}  # the running epoch's position, kept current by train_epoch

    def checkpoint_on_signal() -> None:
        """last.pt at the exact point reached: inside an epoch, with the step, the running sums and the batch
        generator's state at the epoch's start (the permutation), so a resume continues with the next batch."""
        if live.get("epoch") == state["epoch"] + 1 and live.get("step"):
            sums = torch.cat([live["sums"], live["first_bad"].view(1)]).cpu()
            save(last, epoch_position={"epoch": live["epoch"], "step": int(live["step"]), "sums": sums,
                                             "batch_rng": live["batch_rng"]})
        else:
            save(last)

    image_epochs = set(ac.image_epochs) | {ac.epochs}
    # linear probe (autoencode.probe_every, embclf/probe.py): a fixed class-balanced train subset, no RNG drawn
    probe_every = ac.probe_every
    probe_idx = probe.balanced_subset(train.labels, ac.probe_size, cfg.seed) if probe_every else None
    values_per_image = train.images[0].numel()
    # On SIGUSR2/SIGTERM (SLURM time limit, preemption) save last.pt at the next optimizer step, with the
    # position inside the epoch, then hand on to submitit's requeue handler: a resume continues from there.
    with lifecycle.CheckpointOnSignal(checkpoint_on_signal) as signals:
        for epoch in range(state["epoch"] + 1, ac.epochs + 1):
            t0 = time.time()
            lr = opt.param_groups[0]["lr"]
            bar = tracking.progress(len(train), f"epoch {epoch}/{ac.epochs}")  # only on a terminal
            live.clear()
            if position is not None and int(position["epoch"]) == epoch:  # continue a mid-epoch checkpoint
                g.set_state(position["batch_rng"])
                live.update(step=int(position["step"]), sums=position["sums"])
                bar.update(min(len(train), int(position["step"]) * ac.batch_size))
            position = None
            live.update(epoch=epoch, batch_rng=g.get_state())  # the state that draws this epoch's permutation

            def on_step(n_images: int) -> None:
                faults.fault_point("autoencode.step")
                signals.poll()  # a pending SIGUSR2/SIGTERM: save a consistent state, then hand on
                if not bar.disable:
                    bar.update(n_images)

            beta_e = losses.kl_weight(epoch, beta, warmup)  # KL warm-up: the same value for the whole epoch
            beta_train.fill_(beta_e)
            sums = engine.train_epoch(step, model, opt, train.images, ac.batch_size, g, fmt, on_step,
                               labels=train.labels if need_labels else None, position=live).tolist()
            train_m = engine.means(sums[:len(engine.SUMS)], len(train), values_per_image, model.variational,
                             objective)  # one sync per epoch
            if model.variational:
                train_m["beta"] = beta_e
            bar.close()
            sched.step()
            seconds = time.time() - t0
            val_m = engine.evaluate(eval_step, model, val, ac.eval_batch_size, fmt, objective)
            if model.variational:
                val_m["beta"] = beta  # the val objective always uses the full beta (comparable across epochs)
            engine.check_finite(epoch, int(sums[-1]), train_m, val_m, lr, last)
            probe_m = {}  # measurements only: kept out of val_m (best.pt, the summary's val_*)
            if probe_every and (epoch % probe_every == 0 or epoch == ac.epochs):
                probe_m = probe.linear_probe(model, train, probe_idx, val, len(ds.classes), ac.eval_batch_size,
                                             precision, fmt)
                log.info("epoch %d/%d  linear probe: val accuracy %.3f (%d train images, lambda %g)", epoch,
                         ac.epochs, probe_m["probe_accuracy"], len(probe_idx), probe_m["probe_lambda"])
            runs.append_metrics(run_dir, {"epoch": epoch, "split": "train", **train_m, "lr": lr, "seconds": seconds,
                                          "images_per_second": len(train) / seconds})
            runs.append_metrics(run_dir, {"epoch": epoch, "split": "val", **val_m, **probe_m, "lr": lr})
            tracker.log_epoch(epoch, train={**train_m, "seconds": seconds, "images_per_second": len(train) / seconds},
                              val={**val_m, **probe_m}, lr=lr)
            log.info("epoch %d/%d  train mse %.5f psnr %.2f dB | val mse %.5f psnr %.2f dB%s%s | %.1fs (%.0f img/s)",
                     epoch, ac.epochs, train_m["mse"], train_m["psnr"], val_m["mse"], val_m["psnr"],
                     f" kl {val_m['kl']:.2f} (train beta {beta_e:g})" if "kl" in val_m else "",
                     f" joint head acc {val_m['joint_head_accuracy']:.3f}" if head is not None else "",
                     seconds, len(train) / seconds)
            faults.fault_point("autoencode.metrics")
            if epoch in image_epochs:  # before last.pt: a kill after it must not lose this epoch's images
                tracker.log_images(epoch, **images.save_images(model, test, device, run_dir, epoch, train))
            live.clear()
            # best.pt before last.pt: a kill between the two redoes the epoch, which rewrites the same best.pt
            state["epoch"] = epoch
            if engine.is_better(val_m, state.get("best_val", math.inf), select_on):
                state.update(best_val=val_m[select_on], best_val_mse=val_m["mse"], best_epoch=epoch)
                save(ckpt_dir / "best.pt", val=val_m)
                faults.fault_point("autoencode.best")
            save(last)
            run.save()  # compute_seconds so far
            signals.poll()

        if ac.epochs == 0:  # the random-init control: the seed's initial weights are both best.pt and last.pt
            _random_init(model, val, train, test, ds, run_dir, ac, beta, eval_step, fmt, precision, device,
                         objective, tracker, probe_idx, save, ckpt_dir, last)
        # --- the result: test metrics of the last and the best-on-val model --------------------------------
        # still inside the handler: a signal during the test evaluation must not leave "running" behind
        final = engine.evaluate(eval_step, model, test, ac.eval_batch_size, fmt, objective)
        runs.append_metrics(run_dir, {"epoch": ac.epochs, "split": "test", **final})
        faults.fault_point("autoencode.test")
        best_ck = checkpoint.load(ckpt_dir / "best.pt", ("model", "val") + (("joint_head",) if head else ()),
                                  "best checkpoint")
        model.load_state_dict(best_ck["model"])
        if head is not None:
            head.load_state_dict(best_ck["joint_head"])
        best = engine.evaluate(eval_step, model, test, ac.eval_batch_size, fmt, objective)
        tracker.log_images(ac.epochs, interpolation=images.save_interpolation(model, test, device, run_dir))  # best-on-val
        run.summary.update({f"test_{k}": v for k, v in best.items()})
        run.summary.update({f"final_test_{k}": v for k, v in final.items()})
        run.summary.update({f"val_{k}": v for k, v in best_ck["val"].items()})
        # from the records, so a resumed run counts the epochs of every attempt
        trained = [r for r in runs.read_metrics(run_dir) if r.get("split") == "train" and r.get("seconds")]
        train_seconds = sum(r["seconds"] for r in trained)
        if train_seconds:
            run.summary.update(train_seconds=train_seconds, train_images_per_second=len(trained) * len(train) / train_seconds)
        if model.variational:  # posterior collapse: most latent dims carry no information about the input
            collapsed = best["active_units"] < COLLAPSE_FRACTION * cfg.latent
            run.summary["posterior_collapse"] = collapsed
            if collapsed and ac.epochs == 0:  # an untrained encoder's mu and log-variance start near 0
                log.info("random init: %d of %d latent dims active (the untrained encoder's KL is near 0)",
                         best["active_units"], cfg.latent)
            elif collapsed:
                log.warning("posterior collapse: %d of %d latent dims are active (< %d%%); the embeddings carry little "
                            "information. Lower model.beta.", best["active_units"], cfg.latent,
                            round(100 * COLLAPSE_FRACTION))
        faults.fault_point("autoencode.summary")
        run.complete(best_epoch=state["best_epoch"], select_on=select_on)
        if not ac.get("keep_last", True):  # completed: last.pt is only needed to resume, best.pt is the result
            last.unlink(missing_ok=True)
        tracker.finish(run.summary)
        log.info("test (best epoch %d): mse %.5f psnr %.2f dB%s", state["best_epoch"], best["mse"], best["psnr"],
                 f" kl {best['kl']:.2f} active units {best['active_units']}" if "kl" in best else "")
    return run_dir


def _random_init(model, val, train, test, ds, run_dir: Path, ac, beta: float, eval_step, fmt, precision, device,
                 objective, tracker, probe_idx, save, ckpt_dir: Path, last: Path) -> None:
    """``autoencode.epochs=0``: record the untrained model as epoch 0 and save it as best.pt and last.pt.

    The weights are the seed's initialisation exactly (``torch.manual_seed(seed)`` in ``runtime.setup``, then
    ``build_model``; BatchNorm running statistics at their initial mean 0, variance 1): no optimizer step, no
    forward pass in training mode. One val record at epoch 0 (with ``probe_accuracy`` when
    ``autoencode.probe_every`` is on), reconstructions of epoch 0, then the caller's test evaluation proceeds
    as after a trained last epoch. Idempotent: a resume of an interrupted epochs=0 run redoes it unchanged."""
    val_m = engine.evaluate(eval_step, model, val, ac.eval_batch_size, fmt, objective)
    if model.variational:
        val_m["beta"] = beta  # the full beta, as every trained epoch's val record
    probe_m = {}
    if ac.probe_every:
        probe_m = probe.linear_probe(model, train, probe_idx, val, len(ds.classes), ac.eval_batch_size, precision, fmt)
    runs.append_metrics(run_dir, {"epoch": 0, "split": "val", **val_m, **probe_m})
    tracker.log_epoch(0, val={**val_m, **probe_m})
    tracker.log_images(0, **images.save_images(model, test, device, run_dir, 0, train))
    save(ckpt_dir / "best.pt", val=val_m)
    save(last)
    log.info("autoencode.epochs=0: the seed's initial weights (no training) | val mse %.5f psnr %.2f dB",
             val_m["mse"], val_m["psnr"])
