"""stage=autoencode: train an AE/VAE, select the best epoch on val, report test. Readable top to bottom.

Per epoch: train (Adam, cosine annealing stepped per epoch) on the in-memory uint8 train tensor batched by
a random permutation; evaluate on val; append train/val metrics to metrics.jsonl; save checkpoints/last.pt
(model, optimizer, scheduler, epoch, RNG states, best-so-far) and, when val MSE improves,
checkpoints/best.pt. After the last epoch: test metrics of the final model (``final_test_*``, what the
reference study reported) and of the best-on-val checkpoint (``test_*``), images, summary.json.
Every epoch also goes to the tracker (wandb, ``embclf.tracking``); on a terminal a tqdm bar shows the epoch.

A run dir that already holds last.pt resumes from it (a requeued SLURM job, a re-invoked sweep); a run
dir whose summary says completed for the same config is left as it is.
"""
from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from .. import data as data_mod
from .. import losses, runs, runtime, tracking
from ..models import build_model, count_parameters

log = logging.getLogger(__name__)

N_RECON = 16  # test images shown above their reconstructions
N_SAMPLES = 64  # decoded draws from the prior N(0, I)
N_INTERP_PAIRS, N_INTERP_STEPS = 8, 10  # images/interpolation.png: rows of pairs, decoded points per row
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al., "Importance Weighted Autoencoders" (2016), sec. 5.2


@torch.no_grad()
def evaluate(model, split: data_mod.Split, device, batch_size: int, beta: float) -> Dict[str, float]:
    """Deterministic metrics on a split (VAE decodes the posterior mean mu).

    Returns loss (objective per image), mse (per pixel), sse (per image), psnr (dB, mean of per-image),
    and for a VAE kl (nats/sample) and active_units (dims whose Var_x[mu] > 0.01).
    """
    model.eval()
    tot = {"sse": 0.0, "mse": 0.0, "psnr": 0.0, "kl": 0.0}
    mus = []
    for idx in data_mod.batches(len(split), batch_size, device, shuffle=False):
        x = data_mod.to_float(split.images[idx.to(split.images.device)].to(device, non_blocking=True))
        out = model(x, sample=False)
        tot["sse"] += losses.sse_per_image(out["x_hat"], x).sum().item()
        tot["mse"] += losses.mse_per_image(out["x_hat"], x).sum().item()
        tot["psnr"] += losses.psnr_per_image(out["x_hat"], x).sum().item()
        if model.variational:
            tot["kl"] += losses.kl_normal(out["mu"], out["logvar"]).sum().item()
            mus.append(out["mu"].float().cpu())
    n = len(split)
    m = {k: v / n for k, v in tot.items()}
    if model.variational:
        m["loss"] = m["sse"] + beta * m["kl"]
        m["active_units"] = int((torch.cat(mus).var(0) > ACTIVE_UNIT_THRESHOLD).sum())
    else:
        m.pop("kl")
        m["loss"] = m["sse"]
    return m


@torch.no_grad()
def save_images(model, test: data_mod.Split, device, run_dir: Path, epoch: int) -> Dict[str, Path]:
    """images/recon_eNNN.png (test images above reconstructions) and images/samples_eNNN.png (z ~ N(0, I)).

    Returns {"recon": path, "samples": path}."""
    model.eval()
    x = data_mod.to_float(test.images[:N_RECON].to(device))
    x_hat = model(x, sample=False)["x_hat"]
    img_dir = run_dir / "images"
    img_dir.mkdir(exist_ok=True)
    save_image(make_grid(torch.cat([x, x_hat]).cpu(), nrow=len(x), padding=1), img_dir / f"recon_e{epoch:03d}.png")
    g = torch.Generator().manual_seed(0)  # the same z at every epoch: samples are comparable over training
    save_image(make_grid(model.sample(N_SAMPLES, generator=g).cpu(), nrow=8, padding=1),
               img_dir / f"samples_e{epoch:03d}.png")
    return {"recon": img_dir / f"recon_e{epoch:03d}.png", "samples": img_dir / f"samples_e{epoch:03d}.png"}


@torch.no_grad()
def save_interpolation(model, test: data_mod.Split, device, run_dir: Path) -> Path:
    """images/interpolation.png: one row per pair of test images (i, j): image i, the decoded points of the
    straight line (1 - t) z_i + t z_j for 10 values of t in [0, 1] (z = mu for a VAE), image j.

    The pairs are a fixed random draw (seed 0), so rows usually join different classes (the test split is
    ordered by class) and every run of a sweep shows the same pairs."""
    model.eval()
    n = min(N_INTERP_PAIRS, len(test) // 2)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:2 * n]
    x = data_mod.to_float(test.images[pick.to(test.images.device)].to(device))
    z = model.encode(x)[0]
    t = torch.linspace(0, 1, N_INTERP_STEPS, device=device).view(1, -1, 1)
    line = (1 - t) * z[:n, None] + t * z[n:, None]  # [n, steps, latent]
    decoded = model.decode(line.flatten(0, 1)).view(n, N_INTERP_STEPS, *x.shape[1:])
    rows = torch.cat([x[:n, None], decoded, x[n:, None]], dim=1).flatten(0, 1)
    path = run_dir / "images" / "interpolation.png"
    path.parent.mkdir(exist_ok=True)
    save_image(make_grid(rows.cpu(), nrow=N_INTERP_STEPS + 2, padding=1), path)
    return path


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def run(cfg, run_dir: Path, overrides: List[str]) -> Path:
    """Train the autoencoder described by ``cfg`` into ``run_dir``; returns ``run_dir``.

    Raises ``runtime.EmbclfError`` / ``data.DataError`` for bad input (after recording status failed).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prior = runs.read_summary(run_dir)
    if runs.is_completed(run_dir, cfg):
        log.info("%s already completed with this config; nothing to do", run_dir)
        return run_dir
    ac = cfg.autoencode
    if int(cfg.latent) < 1:
        raise runtime.EmbclfError(f"latent={cfg.latent} must be a positive integer (e.g. latent=64).")
    if int(ac.epochs) < 1:
        raise runtime.EmbclfError(f"autoencode.epochs={ac.epochs} must be at least 1.")
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file():  # resuming: only the same computation may continue in this run dir
        diffs = runs.config_differences(torch.load(last, map_location="cpu", weights_only=False)["config"], cfg)
        if diffs:
            raise runtime.EmbclfError(
                f"run dir {run_dir} holds a run with a different config (differs in: {', '.join(diffs)}); "
                "resuming it would mix two experiments. Use the original settings to resume it, or a new run dir "
                "(leave hydra.run.dir / hydra.sweep.dir at their defaults).")
    summary = runs.base_summary(cfg, "autoencode", overrides)
    env = runtime.setup(cfg)
    device = env["device"]
    ds = data_mod.load(cfg.data)
    # airbench-style: the whole split lives on the training device; batches are index lookups
    train_x, val, test = ds.train.images.to(device), ds.val, ds.test
    model = build_model(cfg.model, int(cfg.latent), int(cfg.data.image_size)).to(device)
    beta = float(cfg.model.beta)
    opt = torch.optim.Adam(model.parameters(), lr=ac.lr, weight_decay=ac.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(ac.epochs))
    log.info("model %s, latent %d, %d parameters", cfg.model.name, cfg.latent, count_parameters(model))
    # bad input has failed by now; only from here on does the run dir hold a config and a summary
    if prior and prior.get("start_time"):  # resumed: the clock started with the first attempt
        summary["start_time"] = prior["start_time"]
    runs.write_config(run_dir, cfg)
    summary.update(device=str(device), device_name=env["name"], device_fallback=env["fallback"],
                   parameters=count_parameters(model), data_fingerprint=ds.fingerprint,
                   n_train=len(ds.train), n_val=len(val), n_test=len(test),
                   provenance=tracking.provenance(cfg, ds.fingerprint, env["name"]))
    runs.write_json_atomic(run_dir / runs.SUMMARY, summary)
    tracker = tracking.start(cfg, run_dir, "autoencode")  # wandb (or nothing); closed by finish below

    ckpt_dir = last.parent
    g = torch.Generator().manual_seed(int(cfg.seed))  # batch order; saved in checkpoints for exact resumes
    state = {"epoch": 0, "best_val_mse": math.inf, "best_epoch": 0}
    if last.is_file():
        ck = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        g.set_state(ck["batch_rng"])
        state = ck["state"]
        runs.truncate_metrics(run_dir, state["epoch"])  # epochs after the checkpoint are redone
        log.info("resuming from %s at epoch %d", last, state["epoch"])
        summary["resumed_from_epoch"] = state["epoch"]

    def checkpoint(path: Path, **extra) -> None:
        runs.save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "rng": _rng_state(), "batch_rng": g.get_state(), "state": dict(state),
                          "config": runs.resolved(cfg), **extra}, path)

    image_epochs = set(int(e) for e in ac.image_epochs) | {int(ac.epochs)}
    # On SIGUSR2/SIGTERM (SLURM time limit, preemption) save the current weights as last.pt with the
    # last *completed* epoch at the next optimizer step, then hand on to submitit's requeue handler:
    # a resume redoes this epoch from the partly trained weights.
    with runs.CheckpointOnSignal(lambda: checkpoint(last)) as signals:
        for epoch in range(state["epoch"] + 1, int(ac.epochs) + 1):
            t0 = time.time()
            model.train()
            tot = {"loss": 0.0, "sse": 0.0, "mse": 0.0, "psnr": 0.0, "kl": 0.0}
            lr = opt.param_groups[0]["lr"]
            bar = tracking.progress(len(train_x), f"epoch {epoch}/{ac.epochs}")  # only on a terminal
            for idx in data_mod.batches(len(train_x), int(ac.batch_size), device, shuffle=True, generator=g):
                x = data_mod.to_float(train_x[idx])
                out = model(x)
                loss = (losses.vae_loss(out["x_hat"], x, out["mu"], out["logvar"], beta) if model.variational
                        else losses.ae_loss(out["x_hat"], x))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                signals.poll()  # a pending SIGUSR2/SIGTERM: save a consistent state, then hand on
                with torch.no_grad():
                    b = len(idx)
                    tot["loss"] += loss.item() * b
                    tot["sse"] += losses.sse_per_image(out["x_hat"], x).sum().item()
                    tot["mse"] += losses.mse_per_image(out["x_hat"], x).sum().item()
                    tot["psnr"] += losses.psnr_per_image(out["x_hat"], x).sum().item()
                    if model.variational:
                        tot["kl"] += losses.kl_normal(out["mu"], out["logvar"]).sum().item()
                if not bar.disable:
                    bar.update(b)
                    bar.set_postfix(loss=f"{tot['loss'] / bar.n:.4g}", refresh=False)  # running mean per image
            bar.close()
            if not model.variational:
                tot.pop("kl")
            sched.step()
            seconds = time.time() - t0
            train_m = {k: v / len(train_x) for k, v in tot.items()}
            val_m = evaluate(model, val, device, int(ac.eval_batch_size), beta)
            runs.append_metrics(run_dir, {"epoch": epoch, "split": "train", **train_m, "lr": lr, "seconds": seconds,
                                          "images_per_second": len(train_x) / seconds})
            runs.append_metrics(run_dir, {"epoch": epoch, "split": "val", **val_m, "lr": lr})
            tracker.log_epoch(epoch, train={**train_m, "seconds": seconds, "images_per_second": len(train_x) / seconds},
                              val=val_m, lr=lr)
            log.info("epoch %d/%d  train mse %.5f psnr %.2f dB | val mse %.5f psnr %.2f dB%s | %.1fs (%.0f img/s)",
                     epoch, ac.epochs, train_m["mse"], train_m["psnr"], val_m["mse"], val_m["psnr"],
                     f" kl {val_m['kl']:.2f}" if "kl" in val_m else "", seconds, len(train_x) / seconds)
            state["epoch"] = epoch
            if val_m["mse"] < state["best_val_mse"]:
                state.update(best_val_mse=val_m["mse"], best_epoch=epoch)
                checkpoint(ckpt_dir / "best.pt", val=val_m)
            checkpoint(last)
            signals.poll()
            if epoch in image_epochs:
                tracker.log_images(epoch, **save_images(model, test, device, run_dir, epoch))

        # still inside the handler: a signal during the test evaluation must not leave "running" behind
        final = evaluate(model, test, device, int(ac.eval_batch_size), beta)
        runs.append_metrics(run_dir, {"epoch": int(ac.epochs), "split": "test", **final})
        best_ck = torch.load(ckpt_dir / "best.pt", map_location=device, weights_only=False)
        model.load_state_dict(best_ck["model"])
        best = evaluate(model, test, device, int(ac.eval_batch_size), beta)
        tracker.log_images(int(ac.epochs), interpolation=save_interpolation(model, test, device, run_dir))  # best-on-val
        summary.update({f"test_{k}": v for k, v in best.items()})
        summary.update({f"final_test_{k}": v for k, v in final.items()})
        summary.update({f"val_{k}": v for k, v in best_ck["val"].items()})
        summary.update(status="completed", best_epoch=state["best_epoch"], end_time=time.time())
        summary["wall_seconds"] = summary["end_time"] - summary["start_time"]
        runs.write_json_atomic(run_dir / runs.SUMMARY, summary)
        tracker.finish(summary)
        log.info("test (best epoch %d): mse %.5f psnr %.2f dB%s", state["best_epoch"], best["mse"], best["psnr"],
                 f" kl {best['kl']:.2f} active units {best['active_units']}" if "kl" in best else "")
    return run_dir
