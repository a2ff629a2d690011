"""stage=autoencode: train an AE/VAE, select the best epoch on val, report test. Readable top to bottom.

Per epoch: train (Adam, cosine annealing stepped per epoch) on the in-memory uint8 train tensor batched by
a random permutation; evaluate on val; append train/val metrics to metrics.jsonl; save checkpoints/last.pt
(model, optimizer, scheduler, epoch, RNG states, best-so-far, the joint head) and, when the val metric
named by ``autoencode.select_on`` improves (the val objective at full weights by default, or val MSE),
checkpoints/best.pt. The objective (SSE + β·KL, plus the optional joint-head CE, decorrelation penalty and KL
warm-up of ``embclf.models.objectives``; docs/objectives.md) is computed in ``batch_step``. After the last
epoch: test metrics of the final model (``final_test_*``, what the reference study reported) and of the
best-on-val checkpoint (``test_*``), images, summary.json.
Every epoch also goes to the tracker (wandb, ``embclf.tracking``); on a terminal a tqdm bar shows the epoch.

A run dir that already holds last.pt resumes from it (a requeued SLURM job, a re-invoked sweep); a run
dir whose summary says completed for the same config is left as it is. The resume is exact wherever the
previous attempt stopped: records of epochs after the checkpoint are replaced, not duplicated; best.pt is
written before last.pt; on SIGTERM/SIGUSR2 last.pt holds the position inside the epoch (step, running sums,
the batch generator's state at the epoch's start) and the resume continues with the next batch.
"""
from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from .. import data as data_mod
from .. import identity, losses, runs, runtime, tracking
from ..models import build_model, count_parameters
from ..models.objectives import Objective, build_objective

log = logging.getLogger(__name__)

N_RECON = 20  # test images shown above their reconstructions: a fixed, class-balanced set (recon_indices)
RECON_COLS, RECON_PAD = 10, 2  # images/recon_eNNN.png: rows of 10, originals above their reconstructions
RECON_PIXELS = 96  # each image is enlarged (nearest neighbour) to about this many pixels, to be judged by eye
N_SAMPLES = 64  # decoded draws from the prior N(0, I)
N_INTERP_PAIRS, N_INTERP_STEPS = 8, 10  # images/interpolation.png: rows of pairs, decoded points per row
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al., "Importance Weighted Autoencoders" (2016), sec. 5.2
COLLAPSE_FRACTION = 0.1  # fewer active units than this fraction of the latent: flagged as posterior collapse


# per-image quantities summed over an epoch, on the device: objective, SSE, PSNR (dB), KL (nats), the joint
# head's cross-entropy (nats) and correct predictions, and the batch penalty R (counted once per image)
SUMS = ("loss", "sse", "psnr", "kl", "ce", "joint_head_accuracy", "decorrelation")


def batch_step(model, x: torch.Tensor, beta, precision: str = "fp32", y: Optional[torch.Tensor] = None,
               objective: Optional[Objective] = None):
    """Forward pass and objective of one batch; the one place the squared error is computed.

    The objective per image is ``SSE + beta * KL + gamma * CE + lambda * R`` (``embclf.models.objectives``;
    KL only for a VAE, the last two only when ``objective`` turns them on), which is ``losses.vae_loss`` /
    ``losses.ae_loss`` without them; SSE, MSE (= SSE / values per image) and PSNR (``losses.psnr_from_sse``)
    all derive from one squared error. The forward pass runs under ``runtime.autocast`` (bf16 when
    ``precision == "bf16"``); the loss and the sums are computed in fp32.

    Args:
        model: ``Autoencoder`` (in train mode a VAE samples z; in eval mode it decodes mu).
        x: float32 [B, 3, S, S], pixels in [0, 1], on the model's device.
        beta: KL weight, a float or a 0-dim tensor (a tensor changes per epoch without recompiling a
            ``torch.compile``d step). y: int64 [B] labels, needed when ``objective.needs_labels``.
        objective: the extra terms (None: none).
    Returns:
        (loss: fp32 scalar, mean objective per image, differentiable;
         sums: fp32 [7] detached, the batch's sums of the ``SUMS`` quantities (KL 0 for an AE; CE, correct
         predictions and R 0 when off);
         mu: [B, latent] detached).
    """
    with runtime.autocast(x.device, precision):
        out = model(x)
    x_hat = out["x_hat"].float()
    sse = losses.sse_per_image(x_hat, x)
    if model.variational:
        kl = losses.kl_normal(out["mu"].float(), out["logvar"].float())
        per_image = sse + beta * kl
    else:
        kl = torch.zeros_like(sse)
        per_image = sse
    zero = torch.zeros_like(sse)
    ce, correct, r = zero, zero, zero.sum()
    if objective is not None:
        extra, ce, correct, r = objective.terms(out["mu"].float(), y)
        per_image = per_image + extra
    loss = per_image.mean()
    d_sse = sse.detach()
    sums = torch.stack([per_image.detach().sum(), d_sse.sum(), losses.psnr_from_sse(d_sse, x[0].numel()).sum(),
                        kl.detach().sum(), ce.sum(), correct.sum(), r * len(x)])
    return loss, sums, out["mu"].detach()


def train_epoch(step, model, opt, images: torch.Tensor, batch_size: int, generator: torch.Generator,
                fmt: torch.memory_format = torch.contiguous_format, on_step=None,
                labels: Optional[torch.Tensor] = None, position: Optional[dict] = None) -> torch.Tensor:
    """One pass over ``images`` (uint8 [N, 3, S, S] on the training device) in the random order drawn from
    ``generator``: forward (``step``, i.e. ``batch_step`` or its compiled form), backward, optimizer step.
    With ``labels`` (int64 [N], same device) the step is called as ``step(x, y)`` with the batch's labels
    (the joint head and the class penalty need them), else as ``step(x)``.

    Never reads a value back to the host: the per-image sums accumulate on the device, so the GPU is never
    stalled inside the epoch, and so does the divergence check (the first step whose loss is not finite).
    ``on_step(batch_images)`` runs after every optimizer step (signals, progress bar).

    ``position`` (optional dict) makes the epoch resumable mid-way: on entry ``{"step": k, "sums": fp32 [len(SUMS) + 1]}``
    (from a mid-epoch checkpoint) skips the first k batches and continues the sums -- ``generator`` must then
    hold its state from the start of the epoch, so the same permutation is drawn; during the epoch it is kept
    current (``step``: batches done; ``sums`` fp32 [len(SUMS)] and ``first_bad`` [] the live device tensors), so a
    signal handler in ``on_step`` can checkpoint the exact position (``epoch_position``).
    Returns:
        fp32 [8] on the device: sums over the epoch's images of the ``SUMS`` quantities (objective, SSE, PSNR
        (dB), KL (nats), CE (nats), correct predictions, R), then the 1-based number of the first step with a
        non-finite loss (0: none).
    """
    model.train()
    dev = images.device
    sums = torch.zeros(len(SUMS), device=dev)
    step_no = torch.zeros((), device=dev)
    first_bad = torch.zeros((), device=dev)
    start = int(position.get("step", 0)) if position else 0
    if start:  # resuming mid-epoch: the sums of the batches done before the checkpoint
        saved = position["sums"].to(dev)
        sums.copy_(saved[:len(SUMS)])
        first_bad.copy_(saved[-1])
        step_no.fill_(start)
    for i, idx in enumerate(data_mod.batches(len(images), batch_size, dev, shuffle=True, generator=generator)):
        if i < start:
            continue  # trained before the mid-epoch checkpoint (the permutation is drawn all the same)
        x = data_mod.to_float(images[idx]).contiguous(memory_format=fmt)
        loss, s, _ = step(x) if labels is None else step(x, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums += s
        step_no += 1
        first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss.detach()), step_no, first_bad)
        if position is not None:
            position.update(step=i + 1, sums=sums, first_bad=first_bad)
        if on_step is not None:
            on_step(len(idx))
    return torch.cat([sums, first_bad.view(1)])


class Diverged(runtime.EmbclfError):
    """The training loss became NaN or infinite. ``reason`` is "diverged" (recorded in summary.json)."""

    reason = "diverged"


def _check_finite(epoch: int, first_bad: int, train_m: Dict[str, float], val_m: Dict[str, float], lr: float,
                  last: Path) -> None:
    """Raise ``Diverged`` (naming epoch, step, the learning rate and the last finite checkpoint) when this
    epoch's loss or metrics are not finite; nothing of the epoch is then recorded or checkpointed."""
    bad = [f"{split} {k}" for split, m in (("train", train_m), ("val", val_m)) for k, v in m.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if not first_bad and not bad:
        return
    where = f"step {first_bad}" if first_bad else f"the end of the epoch ({', '.join(bad[:3])})"
    kept = (f"the last finite checkpoint, {last} (epoch {epoch - 1}), is kept" if last.is_file() and epoch > 1
            else "no epoch finished with finite values, so no checkpoint was kept")
    raise Diverged(f"non-finite loss at epoch {epoch}, {where} (autoencode.lr={lr:g}): the training diverged "
                   f"and was stopped; {kept}. Lower autoencode.lr (or model.beta for a VAE) and start a new run.")


def _means(sums: list, n: int, values_per_image: int, variational: bool,
           objective: Optional[Objective] = None) -> Dict[str, float]:
    """Per-image means of the ``SUMS``, plus mse; the terms a run does not have are left out."""
    m = dict(zip(SUMS, (v / n for v in sums)))
    m["mse"] = m["sse"] / values_per_image
    if not variational:
        m.pop("kl")
    if objective is None or objective.head is None:
        m.pop("ce"), m.pop("joint_head_accuracy")
    if objective is None or not objective.decorrelation_weight:
        m.pop("decorrelation")
    return m


@torch.no_grad()
def evaluate(step, model, split: data_mod.Split, batch_size: int,
             fmt: torch.memory_format = torch.contiguous_format, objective: Optional[Objective] = None) -> Dict[str, float]:
    """Deterministic metrics on a split whose images are on the model's device (a VAE decodes mu).

    Sums stay on the device and are read once at the end. Returns floats: loss (objective per image, at the
    weights ``step`` applies), mse (per pixel), sse (per image), psnr (dB, mean of per-image), for a VAE kl
    (nats/sample) and active_units (latent dims whose Var_x[mu] > 0.01, Burda et al. 2016), and with an
    ``objective`` whose terms are on: ce (nats/image) and joint_head_accuracy (the joint head's), decorrelation
    (R, over batches of ``batch_size``). With an objective that needs labels, ``step`` is called as
    ``step(x, y)``.
    """
    with_labels = objective is not None and objective.needs_labels
    model.eval()
    device = split.images.device
    sums = torch.zeros(len(SUMS), device=device)
    mus = []
    for idx in data_mod.batches(len(split), batch_size, device, shuffle=False):
        x = data_mod.to_float(split.images[idx]).contiguous(memory_format=fmt)
        _, s, mu = step(x, split.labels[idx]) if with_labels else step(x)
        sums += s
        if model.variational:
            mus.append(mu.float())
    if model.variational:
        active = (torch.cat(mus).var(0) > ACTIVE_UNIT_THRESHOLD).sum().float().view(1)
        sums = torch.cat([sums, active])
    host = sums.tolist()  # the one read-back of this evaluation
    m = _means(host[:len(SUMS)], len(split), split.images[0].numel(), model.variational, objective)
    if model.variational:
        m["active_units"] = int(host[-1])
    return m


def recon_indices(labels: torch.Tensor, n: int = N_RECON) -> torch.Tensor:
    """Indices (int64 [m], m <= n) of a fixed, class-balanced set of test images for reconstruction grids.

    With C <= n classes, n // C images of every class; with more classes, one image of each of n classes
    spread evenly over the class indices. Within a class the images are a fixed random draw (seed 0), and the
    order is round-robin (one image per class, then the next round), so the first row of a grid shows
    different classes. The same test split gives the same images in every run, so runs compare side by side.
    The test split is ordered by class, which is why the first n images would all be airplanes.
    """
    labels = labels.detach().cpu()
    classes = torch.unique(labels)
    if len(classes) == 0 or n < 1:
        return torch.zeros(0, dtype=torch.long)
    if len(classes) > n:
        classes, per = classes[torch.linspace(0, len(classes) - 1, n).round().long()], 1
    else:
        per = n // len(classes)
    g = torch.Generator().manual_seed(0)
    picks = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per]])
    return torch.stack([p[j] for j in range(per) for p in picks if j < len(p)])


def _enlarge(x: torch.Tensor) -> torch.Tensor:
    """float [B, C, S, S] -> [B, C, k*S, k*S] by nearest neighbour, k = RECON_PIXELS // S (at least 1)."""
    k = max(1, RECON_PIXELS // x.shape[-1])
    return torch.nn.functional.interpolate(x, scale_factor=k, mode="nearest") if k > 1 else x


@torch.no_grad()
def evaluate_per_image(model, split: data_mod.Split, batch_size: int, precision: str = "fp32",
                       fmt: torch.memory_format = torch.contiguous_format) -> Dict[str, torch.Tensor]:
    """The per-image form of ``evaluate``: the same eval-mode forward pass (a VAE decodes mu) and the same
    formulas (``losses.sse_per_image``, ``losses.psnr_from_sse``, ``losses.kl_normal``), one value per image,
    so their means are ``evaluate``'s mse, psnr and kl (used by ``python -m embclf.evaluate``).

    Args:
        split: images uint8 [N, 3, S, S] on the model's device.
    Returns:
        {"mse": per-pixel MSE, "psnr": dB, and for a VAE "kl": nats}, each float32 [N] on the CPU.
    """
    model.eval()
    device = split.images.device
    out: Dict[str, list] = {"mse": [], "psnr": []}
    if model.variational:
        out["kl"] = []
    values = split.images[0].numel()
    for idx in data_mod.batches(len(split), batch_size, device, shuffle=False):
        x = data_mod.to_float(split.images[idx]).contiguous(memory_format=fmt)
        with runtime.autocast(x.device, precision):
            o = model(x)
        sse = losses.sse_per_image(o["x_hat"].float(), x)
        out["mse"].append(sse / values)
        out["psnr"].append(losses.psnr_from_sse(sse, values))
        if model.variational:
            out["kl"].append(losses.kl_normal(o["mu"].float(), o["logvar"].float()))
    return {k: torch.cat(v).cpu() for k, v in out.items()}


@torch.no_grad()
def save_images(model, test: data_mod.Split, device, run_dir: Path, epoch: int) -> Dict[str, Path]:
    """images/recon_eNNN.png (a fixed, class-balanced set of test images, ``recon_indices``: rows of 10 originals,
    each above the row of their reconstructions, enlarged to ~96 pixels) and images/samples_eNNN.png (z ~ N(0, I)).

    Returns {"recon": path, "samples": path}."""
    model.eval()
    idx = recon_indices(test.labels)
    cols = min(RECON_COLS, len(idx))
    idx = idx[:len(idx) - len(idx) % cols]  # whole rows only
    x = data_mod.to_float(test.images[idx.to(test.images.device)].to(device))
    x_hat = model(x, sample=False)["x_hat"].float()
    img_dir = run_dir / "images"
    img_dir.mkdir(exist_ok=True)
    rows = torch.cat([torch.cat([x[i:i + cols], x_hat[i:i + cols]]) for i in range(0, len(x), cols)])
    save_image(make_grid(_enlarge(rows.cpu()), nrow=cols, padding=RECON_PAD, pad_value=1.0),
               img_dir / f"recon_e{epoch:03d}.png")
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
    x = data_mod.to_float(test.images[pick.to(test.images.device)].to(device))  # a no-op when on the device
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
    """Every RNG's state as tensors and plain values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "python": [version, list(internal), gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    """Restore ``_rng_state()``'s output (CPU tensors, as ``runs.load_checkpoint`` returns them).

    A checkpoint written on a GPU and resumed on a CPU-only machine (or on fewer GPUs) restores the CPU
    generators and the CUDA generators that exist, and says so."""
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = s.get("cuda")
    if cuda:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < len(cuda):
            log.warning("the checkpoint holds the RNG states of %d CUDA device(s), %d are usable here: the "
                        "others are not restored (random draws on the GPU differ from an uninterrupted run)",
                        len(cuda), n)
        for i, st in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(st, i)


def is_better(val_m: Dict[str, float], best: float, select_on: str) -> bool:
    """Whether this epoch's val metrics beat the best so far on ``autoencode.select_on``.

    ``loss``: the val objective (SSE + β·KL + γ·CE + λ·R per image at the *full* weights, whatever the KL
    warm-up gave the epoch's training, so every epoch is scored by the same function); ``mse``: val MSE alone,
    which for a VAE can pick an epoch whose KL is enormous. Strictly lower wins, so ties keep the earlier epoch.
    Raises ``KeyError`` for an unknown metric name."""
    return val_m[select_on] < best


def restore_training_state(ck: dict, model, opt, sched, generator: torch.Generator) -> dict:
    """Continue from a ``last.pt`` read by ``runs.load_checkpoint`` (all tensors on the CPU), whatever device
    the model and optimizer live on: ``load_state_dict`` copies weights into the device's parameters and the
    optimizer casts its state to each parameter's device, while RNG states stay CPU tensors. Returns the
    saved loop state {"epoch", "best_val_mse", "best_epoch"}."""
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    _set_rng_state(ck["rng"])
    generator.set_state(ck["batch_rng"])
    return dict(ck["state"])


def run(cfg, run_dir: Path, overrides: List[str]) -> Path:
    """Train the autoencoder described by ``cfg`` into ``run_dir``; returns ``run_dir``.

    Raises ``runtime.EmbclfError`` / ``data.DataError`` for bad input (after recording status failed).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prior = runs.read_summary(run_dir)
    ident = identity.identity(cfg, "autoencode")
    # another experiment in this run dir is refused here, whatever files it holds; the same one completed is done
    if runs.open_run_dir(run_dir, ident, "autoencode") == "completed":
        log.info("%s already completed (the same experiment); nothing to do", run_dir)
        return run_dir
    ac = cfg.autoencode
    if int(cfg.latent) < 1:
        raise runtime.EmbclfError(f"latent={cfg.latent} must be a positive integer (e.g. latent=64).")
    if int(ac.epochs) < 1:
        raise runtime.EmbclfError(f"autoencode.epochs={ac.epochs} must be at least 1.")
    if int(cfg.model.kl_warmup_epochs) < 0:
        raise runtime.EmbclfError(f"model.kl_warmup_epochs={cfg.model.kl_warmup_epochs} must be >= 0 "
                                  "(0 = the full model.beta from the first epoch).")
    try:  # the objective's weights, checked before anything is written (the head is rebuilt below)
        build_objective(cfg.model, int(cfg.latent), 2)
    except ValueError as e:
        raise runtime.EmbclfError(f"{e}.") from None
    last = run_dir / "checkpoints" / "last.pt"
    # the same experiment (open_run_dir said so) continues from its last checkpoint
    resume = runs.load_checkpoint(last, ("model", "optimizer", "scheduler", "rng", "batch_rng", "state", "config"),
                                  "resume") if last.is_file() else None
    summary = runs.base_summary(cfg, "autoencode", overrides)
    env = runtime.setup(cfg)
    device = env["device"]
    precision = runtime.precision(cfg)
    fmt = runtime.memory_format(device)
    ds = data_mod.load(cfg.data)
    if resume is not None:  # the same experiment on the same images only
        runs.refuse_changed_data(run_dir, prior, ds.fingerprint)
    # airbench-style: every split lives on the training device as uint8; batches are index lookups there
    train, val, test = (s.to(device) for s in (ds.train, ds.val, ds.test))
    model = build_model(cfg.model, int(cfg.latent), int(cfg.data.image_size)).to(device, memory_format=fmt)
    # the joint head (model.ce_weight) and the decorrelation penalty; the head trains with the model's optimizer
    objective = build_objective(cfg.model, int(cfg.latent), len(ds.classes))
    head = objective.head.to(device) if objective.head is not None else None
    need_labels = objective.needs_labels
    beta = float(cfg.model.beta)
    warmup = int(cfg.model.kl_warmup_epochs)
    # KL weights as device tensors: the epoch's beta (warm-up) for training; the full beta for val and test, so
    # the val objective of every epoch is the same function and select_on=loss compares like with like
    beta_train = torch.tensor(beta, device=device)
    beta_full = torch.tensor(beta, device=device)
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    # model.weight_decay (the reference study's 1e-4 for the plain AE) overrides autoencode.weight_decay
    wd = float(ac.weight_decay if cfg.model.get("weight_decay") is None else cfg.model.weight_decay)
    opt = runtime.adam(params, device, float(ac.lr), wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(ac.epochs))

    def core(x, y, b):
        return batch_step(model, x, b, precision, y, objective)

    core = runtime.maybe_compile(core, bool(cfg.compile))  # one compiled step per job, train and eval

    def step(x, y=None):  # training: this epoch's beta
        return core(x, y, beta_train)

    def eval_step(x, y=None):  # val/test: the full beta
        return core(x, y, beta_full)

    select_on = str(getattr(ac.select_on, "value", ac.select_on))
    log.info("model %s, latent %d, %d parameters", cfg.model.name, cfg.latent, count_parameters(model))
    # bad input has failed by now; only from here on does the run dir hold a config and a summary
    runs.remove_stale_temporaries(run_dir)  # of a write killed with SIGKILL
    runs.start_attempt(summary, prior, resume["state"]["epoch"] if resume is not None else None)
    runs.write_config(run_dir, cfg, ident, "autoencode")
    summary.update(device=str(device), device_name=env["name"], device_fallback=env["fallback"],
                   precision=precision, compile=bool(cfg.compile), tf32=env["tf32"], weight_decay=wd,
                   cudnn_benchmark=env["cudnn_benchmark"], channels_last=fmt == torch.channels_last,
                   parameters=count_parameters(model), data_fingerprint=ds.fingerprint,
                   n_train=len(train), n_val=len(val), n_test=len(test),
                   provenance=tracking.provenance(cfg, ds.fingerprint, env["name"], files=ds.files))
    runs.write_json_atomic(run_dir / runs.SUMMARY, summary)
    tracker = tracking.start(cfg, run_dir, "autoencode")  # wandb (or nothing); closed by finish below
    runs.fault_point("startup")

    ckpt_dir = last.parent
    g = torch.Generator().manual_seed(int(cfg.seed))  # batch order; saved in checkpoints for exact resumes
    # best_val: the lowest val `select_on` metric so far (best_val_mse: that epoch's val MSE)
    state = {"epoch": 0, "best_val_mse": math.inf, "best_epoch": 0, "best_val": math.inf}
    position = None  # where a mid-epoch checkpoint stopped: {"epoch", "step", "sums", "batch_rng"}
    if resume is not None:
        state = restore_training_state(resume, model, opt, sched, g)
        position = resume.get("epoch_position")
        if head is not None:  # saved beside the model by checkpoint() below
            head.load_state_dict(resume["joint_head"])
        del resume
        log.info("resuming from %s at epoch %d%s", last, state["epoch"],
                 f", step {position['step']} of epoch {position['epoch']}" if position else "")
    # epochs after the checkpoint are redone: their records (written before a kill reached the checkpoint)
    # are replaced, not duplicated; with no checkpoint at all, everything is redone
    runs.truncate_metrics(run_dir, state["epoch"])

    def checkpoint(path: Path, **extra) -> None:
        runs.save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "rng": _rng_state(), "batch_rng": g.get_state(), "state": dict(state),
                          "config": runs.resolved(cfg),
                          **({"joint_head": head.state_dict()} if head is not None else {}), **extra}, path)

    live: dict = {}  # the running epoch's position, kept current by train_epoch

    def checkpoint_on_signal() -> None:
        """last.pt at the exact point reached: inside an epoch, with the step, the running sums and the batch
        generator's state at the epoch's start (the permutation), so a resume continues with the next batch."""
        if live.get("epoch") == state["epoch"] + 1 and live.get("step"):
            sums = torch.cat([live["sums"], live["first_bad"].view(1)]).cpu()
            checkpoint(last, epoch_position={"epoch": live["epoch"], "step": int(live["step"]), "sums": sums,
                                             "batch_rng": live["batch_rng"]})
        else:
            checkpoint(last)

    image_epochs = set(int(e) for e in ac.image_epochs) | {int(ac.epochs)}
    values_per_image = train.images[0].numel()
    # On SIGUSR2/SIGTERM (SLURM time limit, preemption) save last.pt at the next optimizer step, with the
    # position inside the epoch, then hand on to submitit's requeue handler: a resume continues from there.
    with runs.CheckpointOnSignal(checkpoint_on_signal) as signals:
        for epoch in range(state["epoch"] + 1, int(ac.epochs) + 1):
            t0 = time.time()
            lr = opt.param_groups[0]["lr"]
            bar = tracking.progress(len(train), f"epoch {epoch}/{ac.epochs}")  # only on a terminal
            live.clear()
            if position is not None and int(position["epoch"]) == epoch:  # continue a mid-epoch checkpoint
                g.set_state(position["batch_rng"])
                live.update(step=int(position["step"]), sums=position["sums"])
                bar.update(min(len(train), int(position["step"]) * int(ac.batch_size)))
            position = None
            live.update(epoch=epoch, batch_rng=g.get_state())  # the state that draws this epoch's permutation

            def on_step(n_images: int) -> None:
                runs.fault_point("autoencode.step")
                signals.poll()  # a pending SIGUSR2/SIGTERM: save a consistent state, then hand on
                if not bar.disable:
                    bar.update(n_images)

            beta_e = losses.kl_weight(epoch, beta, warmup)  # KL warm-up: the same value for the whole epoch
            beta_train.fill_(beta_e)
            sums = train_epoch(step, model, opt, train.images, int(ac.batch_size), g, fmt, on_step,
                               labels=train.labels if need_labels else None, position=live).tolist()
            train_m = _means(sums[:len(SUMS)], len(train), values_per_image, model.variational,
                             objective)  # one sync per epoch
            if model.variational:
                train_m["beta"] = beta_e
            bar.close()
            sched.step()
            seconds = time.time() - t0
            val_m = evaluate(eval_step, model, val, int(ac.eval_batch_size), fmt, objective)
            if model.variational:
                val_m["beta"] = beta  # the val objective always uses the full beta (comparable across epochs)
            _check_finite(epoch, int(sums[-1]), train_m, val_m, lr, last)
            runs.append_metrics(run_dir, {"epoch": epoch, "split": "train", **train_m, "lr": lr, "seconds": seconds,
                                          "images_per_second": len(train) / seconds})
            runs.append_metrics(run_dir, {"epoch": epoch, "split": "val", **val_m, "lr": lr})
            tracker.log_epoch(epoch, train={**train_m, "seconds": seconds, "images_per_second": len(train) / seconds},
                              val=val_m, lr=lr)
            log.info("epoch %d/%d  train mse %.5f psnr %.2f dB | val mse %.5f psnr %.2f dB%s%s | %.1fs (%.0f img/s)",
                     epoch, ac.epochs, train_m["mse"], train_m["psnr"], val_m["mse"], val_m["psnr"],
                     f" kl {val_m['kl']:.2f} (train beta {beta_e:g})" if "kl" in val_m else "",
                     f" joint head acc {val_m['joint_head_accuracy']:.3f}" if head is not None else "",
                     seconds, len(train) / seconds)
            runs.fault_point("autoencode.metrics")
            if epoch in image_epochs:  # before last.pt: a kill after it must not lose this epoch's images
                tracker.log_images(epoch, **save_images(model, test, device, run_dir, epoch))
            live.clear()
            # best.pt before last.pt: a kill between the two redoes the epoch, which rewrites the same best.pt
            state["epoch"] = epoch
            if is_better(val_m, state.get("best_val", math.inf), select_on):
                state.update(best_val=val_m[select_on], best_val_mse=val_m["mse"], best_epoch=epoch)
                checkpoint(ckpt_dir / "best.pt", val=val_m)
                runs.fault_point("autoencode.best")
            checkpoint(last)
            runs.touch_attempt(summary)
            runs.write_json_atomic(run_dir / runs.SUMMARY, summary)  # compute_seconds so far
            signals.poll()

        # still inside the handler: a signal during the test evaluation must not leave "running" behind
        final = evaluate(eval_step, model, test, int(ac.eval_batch_size), fmt, objective)
        runs.append_metrics(run_dir, {"epoch": int(ac.epochs), "split": "test", **final})
        runs.fault_point("autoencode.test")
        best_ck = runs.load_checkpoint(ckpt_dir / "best.pt", ("model", "val") + (("joint_head",) if head else ()),
                                       "best checkpoint")
        model.load_state_dict(best_ck["model"])
        if head is not None:
            head.load_state_dict(best_ck["joint_head"])
        best = evaluate(eval_step, model, test, int(ac.eval_batch_size), fmt, objective)
        tracker.log_images(int(ac.epochs), interpolation=save_interpolation(model, test, device, run_dir))  # best-on-val
        summary.update({f"test_{k}": v for k, v in best.items()})
        summary.update({f"final_test_{k}": v for k, v in final.items()})
        summary.update({f"val_{k}": v for k, v in best_ck["val"].items()})
        # from the records, so a resumed run counts the epochs of every attempt
        trained = [r for r in runs.read_metrics(run_dir) if r.get("split") == "train" and r.get("seconds")]
        train_seconds = sum(r["seconds"] for r in trained)
        if train_seconds:
            summary.update(train_seconds=train_seconds, train_images_per_second=len(trained) * len(train) / train_seconds)
        if model.variational:  # posterior collapse: most latent dims carry no information about the input
            collapsed = best["active_units"] < COLLAPSE_FRACTION * int(cfg.latent)
            summary["posterior_collapse"] = collapsed
            if collapsed:
                log.warning("posterior collapse: %d of %d latent dims are active (< %d%%); the embeddings carry little "
                            "information. Lower model.beta.", best["active_units"], int(cfg.latent),
                            round(100 * COLLAPSE_FRACTION))
        runs.fault_point("autoencode.summary")
        summary.update(status="completed", best_epoch=state["best_epoch"], select_on=select_on, end_time=time.time())
        summary["wall_seconds"] = summary["end_time"] - summary["start_time"]  # first start to end, gaps included
        runs.touch_attempt(summary, summary["end_time"])
        runs.write_json_atomic(run_dir / runs.SUMMARY, summary)
        if not ac.get("keep_last", True):  # completed: last.pt is only needed to resume, best.pt is the result
            last.unlink(missing_ok=True)
        tracker.finish(summary)
        log.info("test (best epoch %d): mse %.5f psnr %.2f dB%s", state["best_epoch"], best["mse"], best["psnr"],
                 f" kl {best['kl']:.2f} active units {best['active_units']}" if "kl" in best else "")
    return run_dir
