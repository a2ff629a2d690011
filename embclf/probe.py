"""Linear probes during autoencoding (``autoencode.probe_every``): how linearly readable the code is, epoch by epoch.

At a probe epoch the stage embeds a fixed class-balanced subset of train (``autoencode.probe_size`` images,
``balanced_subset``) and the whole val split with the current encoder (eval mode, no grad; mu for a VAE), fits a
ridge regression of one-hot labels on the standardised codes in closed form and records its val accuracy as
``probe_accuracy``. Everything stays on the training device and is read back once per probe (``linear_probe``):
no optimizer, no per-step host sync, no randomness.

Why ridge on one-hot targets (a least-squares classifier, ESL §4.2) rather than logistic regression: its
solution is one linear solve, W = (XᵀX + λI)⁻¹ XᵀY (Hoerl & Kennard 1970; Hastie, Tibshirani & Friedman,
"The Elements of Statistical Learning", 2nd ed., eq. 3.44), with an unpenalised intercept (centred X and Y).
Its leave-one-out predictions are closed form too, ŷ₍₋ᵢ₎ = (ŷᵢ − Hᵢᵢ yᵢ) / (1 − Hᵢᵢ) with H the hat matrix
(ESL §7.10.1, eq. 7.52; exact for a linear smoother), so λ is chosen from the fixed grid ``ALPHAS`` by
leave-one-out accuracy on the train subset: val is never used to choose, so ``probe_accuracy`` is an honest
val estimate. The probe draws no random numbers (the subset comes from its own generator seeded with the run's
seed), so it changes no trained weight: ``probe_every`` only adds measurements (tests/test_probe.py).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from . import data as data_mod
from . import runtime

# λ = α·n for α in ALPHAS: with standardised features each diagonal entry of XᵀX is n, so α is the penalty
# relative to the data term whatever the subset size. Chosen per probe by leave-one-out accuracy on train.
ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def balanced_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices of a class-balanced subset of ``labels`` (int64 [N], any device): ``size // C`` images of each of
    the C classes present (at least 1; fewer where a class has fewer), drawn with a ``torch.Generator`` of its
    own seeded with ``seed``, so no global or training RNG is consumed. Returns int64 [M] sorted, on
    ``labels``' device (the same subset every epoch)."""
    g = torch.Generator().manual_seed(int(seed))
    y = labels.cpu()
    classes = torch.unique(y)
    per_class = max(1, int(size) // len(classes))
    picks = []
    for c in classes.tolist():
        idx = torch.nonzero(y == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks).sort().values.to(labels.device)


@torch.no_grad()
def encode(model, images: torch.Tensor, batch_size: int, precision: str = "fp32",
           fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Codes of uint8 images [N, 3, S, S] (on the model's device) in eval mode: float32 [N, latent] (mu for a
    VAE), left on the device (no host copy, unlike ``engine.embed``)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = data_mod.to_float(images[i:i + batch_size]).contiguous(memory_format=fmt)
        with runtime.autocast(x.device, precision):
            out.append(model.encode(x)[0].float())
    return torch.cat(out)


@torch.no_grad()
def ridge_probe(z_train: torch.Tensor, y_train: torch.Tensor, z_val: torch.Tensor, y_val: torch.Tensor,
                n_classes: int, alphas: Sequence[float] = ALPHAS) -> Dict[str, torch.Tensor]:
    """Fit ridge regression of one-hot labels on standardised codes, λ chosen by leave-one-out accuracy.

    Args:
        z_train: float [n, d] codes; y_train: int64 [n] labels in [0, n_classes).
        z_val: float [m, d]; y_val: int64 [m]. All on one device.
        alphas: the grid; λ = α·n. Ties go to the first (smallest) α.
    Returns (0-dim tensors on the device, nothing read back): ``accuracy`` (val, fraction in [0, 1]),
    ``loo_accuracy`` (train subset, leave-one-out, at the chosen λ), ``lambda`` (the chosen λ).
    Computed in float64 (d×d systems; the cost is the n×d products). Features are standardised with the
    train subset's mean and std (a constant feature gets std 1).
    """
    dt = torch.float64
    x = z_train.to(dt)
    n = len(x)
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    xs = (x - mean) / std  # centred: the intercept is unpenalised and equals the targets' mean
    y1 = torch.nn.functional.one_hot(y_train, n_classes).to(dt)
    ybar = y1.mean(0)
    lam = torch.tensor([float(a) * n for a in alphas], dtype=dt, device=x.device)
    eye = torch.eye(xs.shape[1], dtype=dt, device=x.device)
    a = xs.T @ xs + lam.view(-1, 1, 1) * eye  # [L, d, d]
    m = torch.linalg.solve(a, xs.T.expand(len(lam), -1, -1))  # (XᵀX + λI)⁻¹ Xᵀ: [L, d, n]
    w = m @ (y1 - ybar)  # [L, d, C]
    fit = xs @ w + ybar  # in-sample predictions [L, n, C]
    h = 1.0 / n + (xs.unsqueeze(0) * m.transpose(1, 2)).sum(-1)  # hat diagonal with the intercept [L, n]
    loo = (fit - h.unsqueeze(-1) * y1) / (1 - h).clamp_min(1e-12).unsqueeze(-1)
    loo_acc = (loo.argmax(-1) == y_train).to(dt).mean(-1)  # [L]
    best = torch.argmax(loo_acc)  # the first maximum: the smallest α among ties
    pred = ((z_val.to(dt) - mean) / std) @ w[best] + ybar
    return {"accuracy": (pred.argmax(-1) == y_val).to(dt).mean(), "loo_accuracy": loo_acc[best],
            "lambda": lam[best]}


def linear_probe(model, train: data_mod.Split, subset: torch.Tensor, val: data_mod.Split, n_classes: int,
                 batch_size: int, precision: str = "fp32",
                 fmt: torch.memory_format = torch.contiguous_format) -> Dict[str, float]:
    """The probe of one epoch: embed ``train.images[subset]`` and ``val`` with ``model`` (``encode``), fit
    ``ridge_probe``, read the result back once. Returns floats {"probe_accuracy" (val), "probe_loo_accuracy"
    (train subset), "probe_lambda"}; leaves the model in eval mode (the next training epoch sets train mode)."""
    r = ridge_probe(encode(model, train.images[subset], batch_size, precision, fmt), train.labels[subset],
                    encode(model, val.images, batch_size, precision, fmt), val.labels, n_classes)
    acc, loo, lam = torch.stack([r["accuracy"], r["loo_accuracy"], r["lambda"]]).tolist()  # the one host read
    return {"probe_accuracy": acc, "probe_loo_accuracy": loo, "probe_lambda": lam}
