"""The training and evaluation steps the stages, debug modes, ``evaluate``, ``embed`` and the benchmarks share.

Autoencoder: ``batch_step`` (forward pass and objective of one batch), ``train_epoch``, ``evaluate`` and its
per-image form ``evaluate_per_image``, ``check_finite`` (divergence), ``is_better`` (best-epoch selection).
Heads on frozen embeddings: ``embed``, ``eval_head``, ``train_head_epoch``, ``train_head``, ``select_lr``,
``fit_probe``. Nothing here reads a run dir or writes files (``embclf.checkpoint``, ``embclf.images`` and
``embclf.lifecycle`` do); nothing imports ``embclf.stages`` (torchtune's rule: nothing imports a recipe).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from . import data as data_mod
from . import faults, losses, runtime
from .checkpoint import set_rng_state
from .heads import build_head
from .models.objectives import Objective

log = logging.getLogger(__name__)

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al., "Importance Weighted Autoencoders" (2016), sec. 5.2

# per-image quantities summed over an epoch, on the device: objective, SSE, PSNR (dB), KL (nats), the joint
# head's cross-entropy (nats) and correct predictions, and the batch penalty R (counted once per image)
SUMS = ("loss", "sse", "psnr", "kl", "ce", "joint_head_accuracy", "decorrelation")


# --- the autoencoder -------------------------------------------------------------------------------------------

def batch_step(model, x: torch.Tensor, beta, precision: str = "fp32", y: Optional[torch.Tensor] = None,
               objective: Optional[Objective] = None):
    """Forward pass and objective of one batch; the one place the squared error is computed.

    The objective per image is ``SSE + beta * KL + gamma * CE + lambda * R`` (``embclf.models.objectives``;
    KL only for a VAE, the last two only when ``objective`` turns them on), which is ``losses.vae_loss`` /
    ``losses.ae_loss`` without them; SSE, MSE (= SSE / values per image) and PSNR (``losses.psnr_from_sse``)
    all derive from one squared error. The forward pass runs under ``runtime.autocast`` (bf16 when
    ``precision == "bf16"``); the loss and the sums are computed in fp32. In train mode an ``objective`` with
    ``model.input_noise`` / ``model.mask_ratio`` on corrupts the encoder's input (``Objective.corrupt``) while
    every term still compares the reconstruction with the clean ``x`` (denoising / masked reconstruction over
    the whole image); in eval mode (val, test, embeddings) the input is never corrupted.

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
    x_in = objective.corrupt(x) if objective is not None and objective.corrupts and model.training else x
    with runtime.autocast(x.device, precision):
        out = model(x_in)
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


def check_finite(epoch: int, first_bad: int, train_m: Dict[str, float], val_m: Dict[str, float], lr: float,
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


def means(sums: list, n: int, values_per_image: int, variational: bool,
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
    mus = None  # fp32 [N, latent]: every batch's mu, copied in (see below)
    for idx in data_mod.batches(len(split), batch_size, device, shuffle=False):
        x = data_mod.to_float(split.images[idx]).contiguous(memory_format=fmt)
        _, s, mu = step(x, split.labels[idx]) if with_labels else step(x)
        # A step compiled with CUDA graphs (compile_mode=reduce-overhead) returns the same static output
        # buffers on every call, overwritten by the next one: nothing here may keep a step's output across
        # steps. ``s`` is added at once; mu is copied into our own tensor (a kept ``mu.float()`` is no copy
        # for fp32 mu: every batch's entry would then be the last batch's, and active_units 0).
        sums += s
        if model.variational:
            if mus is None:
                mus = torch.empty(len(split), mu.shape[1], device=device)
            mus[idx] = mu.float()
    if model.variational:
        active = (mus.var(0) > ACTIVE_UNIT_THRESHOLD).sum().float().view(1)
        sums = torch.cat([sums, active])
    host = sums.tolist()  # the one read-back of this evaluation
    m = means(host[:len(SUMS)], len(split), split.images[0].numel(), model.variational, objective)
    if model.variational:
        m["active_units"] = int(host[-1])
    return m


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


def is_better(val_m: Dict[str, float], best: float, select_on: str) -> bool:
    """Whether this epoch's val metrics beat the best so far on ``autoencode.select_on``.

    ``loss``: the val objective (SSE + β·KL + γ·CE + λ·R per image at the *full* weights, whatever the KL
    warm-up gave the epoch's training, so every epoch is scored by the same function); ``mse``: val MSE alone,
    which for a VAE can pick an epoch whose KL is enormous. Strictly lower wins, so ties keep the earlier epoch.
    Raises ``KeyError`` for an unknown metric name."""
    return val_m[select_on] < best



# --- heads on frozen embeddings ---------------------------------------------------------------------------

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
def eval_head(head, z, y, batch_size: int):
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
    opt = runtime.adam(head.parameters(), device, float(lr), cc.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cc.epochs)
    g = torch.Generator().manual_seed(seed)
    state = {"epoch": 0, "best_acc": -math.inf, "best_epoch": 0}
    if resume is not None:  # continue the head's training exactly where last.pt left it
        head.load_state_dict(resume["head"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
        g.set_state(resume["batch_rng"])
        state = dict(resume["state"])
    best_acc, best_epoch, best_state, epoch = state["best_acc"], state["best_epoch"], None, state["epoch"]
    patience = None if cc.patience is None else cc.patience
    if patience is not None and epoch and epoch - best_epoch >= patience:
        epoch_range = range(0)  # it had stopped early before the interruption
    else:
        epoch_range = range(state["epoch"] + 1, cc.epochs + 1)
    for epoch in epoch_range:
        t0 = time.time()
        lr_now = opt.param_groups[0]["lr"]
        tot_loss, tot_correct = train_head_epoch(head, opt, z["train"], y["train"], cc.batch_size, g).tolist()
        sched.step()
        n = len(z["train"])
        train_m = {"loss": tot_loss / n, "accuracy": tot_correct / n}
        val_m, _ = eval_head(head, z["val"], y["val"], 4096)
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
                  "early_stopped": epoch < cc.epochs, "lr": float(lr)}


def select_lr(head_cfg, cc, z, y, n_classes: int, seed: int):
    """The learning rate for a trainable head: ``classify.lr`` when ``classify.lr_grid`` is empty, else the grid
    entry whose head reaches the best val accuracy (ties: the first). Never looks at test.

    Returns (lr, {lr as text: val accuracy} or None)."""
    if not cc.lr_grid:
        return cc.lr, None
    scores = {}
    for lr in cc.lr_grid:
        scores[f"{float(lr):g}"] = train_head(head_cfg, cc, z, y, n_classes, seed, float(lr))[1]["val_accuracy"]
        faults.fault_point("classify.lr_search")
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
    faults.fault_point("classify.probe_fit")
    val_m, _ = eval_head(head, z["val"], y["val"], 4096)
    return head, {"val_accuracy": val_m["accuracy"], **info}

