"""Losses and metrics as pure functions on tensors; each has known-value tests in tests/test_losses.py.

Conventions (fixed here, documented in docs/configuration.md, "Metrics"):
- Pixels are float tensors in [0, 1], shape [B, C, H, W].
- MSE is reported per pixel (mean over C*H*W and the batch); SSE is the squared error summed over the
  C*H*W values of one image, averaged over the batch (the reference study's reconstruction term).
- PSNR is computed per image with data range 1.0, ``10 * log10(1 / mse_image)`` dB, then averaged over
  images (the mean of per-image PSNR, not the PSNR of the mean MSE, which is lower).
- KL is in nats per sample: summed over latent dims, averaged over the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-10  # keeps PSNR finite for a perfect reconstruction (caps it at 100 dB)


def sse_per_image(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error summed over each image's pixels.

    Args:
        x_hat, x: float [B, C, H, W], pixels in [0, 1].
    Returns:
        float [B]: sum over C*H*W of (x_hat - x)^2.
    Raises:
        ValueError: if the shapes differ.
    """
    if x_hat.shape != x.shape:
        raise ValueError(f"reconstruction shape {tuple(x_hat.shape)} != input shape {tuple(x.shape)}")
    return (x_hat - x).pow(2).flatten(1).sum(1)


def mse_per_image(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error per pixel of each image: float [B] (see ``sse_per_image``)."""
    return sse_per_image(x_hat, x) / x[0].numel()


def psnr_per_image(x_hat: torch.Tensor, x: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image in dB: ``10 log10(data_range^2 / MSE)``.

    Args:
        x_hat, x: float [B, C, H, W] with values in [0, data_range].
    Returns:
        float [B] in dB. A perfect reconstruction gives 100 dB (MSE floored at 1e-10).
    Reference: the standard definition, e.g. ``skimage.metrics.peak_signal_noise_ratio``.
    """
    return psnr_from_sse(sse_per_image(x_hat, x), x[0].numel(), data_range)


def psnr_from_sse(sse: torch.Tensor, values_per_image: int, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of each image from its SSE, so one squared error per batch gives SSE, MSE and PSNR.

    Args:
        sse: float [B], squared error summed over each image's ``values_per_image`` = C*H*W values.
    Returns:
        float [B]: ``10 log10(data_range^2 / max(sse / values_per_image, 1e-10))`` dB.
    """
    return 10.0 * torch.log10(data_range**2 / (sse / values_per_image).clamp_min(EPS))


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample, in nats.

    Args:
        mu, logvar: float [B, latent].
    Returns:
        float [B]: ``-0.5 * sum(1 + logvar - mu^2 - exp(logvar))`` over latent dims.
    Reference: Kingma & Welling, "Auto-Encoding Variational Bayes" (2014), Appendix B.
    """
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(1)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL to N(0, 1) of each latent dim, averaged over the batch: float [latent], nats."""
    return (-0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())).mean(0)


def vae_loss(x_hat, x, mu, logvar, beta: float) -> torch.Tensor:
    """Reference-study VAE objective per batch: mean over images of ``SSE + beta * KL`` (scalar).

    beta weights the KL (nats/sample) against the reconstruction SSE summed over pixels per image,
    as in Higgins et al., "beta-VAE" (2017), with the reference study's beta = 0.1 default.
    """
    return (sse_per_image(x_hat, x) + beta * kl_normal(mu, logvar)).mean()


def ae_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Plain autoencoder objective: mean over images of the per-image SSE (scalar).

    Same scale as the VAE's reconstruction term, so AE and VAE learning rates are comparable.
    """
    return sse_per_image(x_hat, x).mean()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label. logits float [B, K], labels int64 [B]."""
    return (logits.argmax(1) == labels).float().mean().item()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats (scalar). logits float [B, K], labels int64 [B]."""
    return F.cross_entropy(logits, labels)


# --- improved objectives (docs/objectives.md) -----------------------------------------------------------


def kl_weight(epoch: int, beta: float, warmup_epochs: int) -> float:
    """β of one epoch under a linear KL warm-up: ``beta * min(1, (epoch - 1) / warmup_epochs)``.

    Epoch 1 trains with β = 0 (a plain AE with sampled z), epoch ``warmup_epochs + 1`` and later with the full
    β; ``warmup_epochs = 0`` gives the full β from the start. The ramp per epoch is the "warm-up" of Sønderby et
    al., "Ladder Variational Autoencoders" (NeurIPS 2016, sec. 2.3: β increased linearly from 0 to 1 over the
    first N_t epochs); Bowman et al., "Generating Sentences from a Continuous Space" (CoNLL 2016, sec. 3.1)
    introduced the annealing of the KL weight from 0 to defer the KL's pull on the posterior.

    Args:
        epoch: 1-based epoch number. beta: the target KL weight (``model.beta``, >= 0).
        warmup_epochs: ``model.kl_warmup_epochs`` (>= 0).
    Returns:
        float, the KL weight for this epoch (between 0 and ``beta``).
    Raises:
        ValueError: epoch < 1 or warmup_epochs < 0.
    """
    if epoch < 1 or warmup_epochs < 0:
        raise ValueError(f"kl_weight needs epoch >= 1 and warmup_epochs >= 0 (got {epoch}, {warmup_epochs})")
    if warmup_epochs == 0:
        return float(beta)
    return float(beta) * min(1.0, (epoch - 1) / warmup_epochs)


def class_decorrelation(emb: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean squared cosine similarity between the class-mean embeddings of a batch (scalar, in [0, 1]).

    ``R = 1/|P| * sum_{(a, b) in P} cos^2(m_a, m_b)``, where ``m_c`` is the mean of the embeddings of the batch's
    images of class c (not centred) and P the ordered pairs a != b of classes present in the batch (R = 0 with
    fewer than two). R = 0 iff the class means are mutually orthogonal; with K <= latent classes that is
    reachable, and it is scale-free (an AE cannot lower it by shrinking or inflating its codes). Squared cosine
    (the frame potential ``||U U^T - I||_F^2`` of the unit class directions U) pushes *every* pair apart; the mean
    of the plain cosine would only make the unit directions sum to zero, which two coinciding classes can satisfy.
    Source: the inter-class term of the Orthogonal Projection Loss (Ranasinghe et al., ICCV 2021), which pushes
    features of different classes towards orthogonality, here on the class means (K^2 instead of B^2 pairs,
    and less noisy than single images).

    Args:
        emb: float [B, D] (μ of a VAE, z of an AE). labels: int64 [B] in [0, n_classes).
        n_classes: K. Never reads a value back to the host (no sync on a GPU).
    Returns:
        float scalar tensor, differentiable with respect to ``emb``.
    """
    onehot = torch.zeros(len(labels), n_classes, device=emb.device, dtype=emb.dtype)
    onehot.scatter_(1, labels.view(-1, 1), 1.0)
    counts = onehot.sum(0)  # [K]
    means = (onehot.t() @ emb) / counts.clamp_min(1.0).unsqueeze(1)  # [K, D]; absent classes: 0
    unit = F.normalize(means, dim=1, eps=1e-12)
    cos2 = (unit @ unit.t()).pow(2)
    present = (counts > 0).to(emb.dtype)
    pairs = present.unsqueeze(0) * present.unsqueeze(1) * (1.0 - torch.eye(n_classes, device=emb.device, dtype=emb.dtype))
    return (cos2 * pairs).sum() / pairs.sum().clamp_min(1.0)


def feature_decorrelation(emb: torch.Tensor) -> torch.Tensor:
    """Label-free: mean squared off-diagonal Pearson correlation between the embedding's dims over a batch.

    ``R = 1/(D(D-1)) * sum_{i != j} rho_ij^2``, ``rho = diag(C)^-1/2 C diag(C)^-1/2``, C the batch covariance of
    the D dims (scalar in [0, 1]; 0 when every pair of dims is uncorrelated). The redundancy-reduction term of
    Barlow Twins (Zbontar et al., ICML 2021), here on one view (the auto-correlation of the dims rather than the
    cross-correlation of two views); VICReg's covariance term (Bardes et al., ICLR 2022) and DeCov (Cogswell et
    al., ICLR 2016) penalise the covariance instead, which an AE could lower by shrinking its codes; the
    correlation is scale-free. With a batch of B <= D images the batch correlation matrix has rank < D, so R has
    a floor above 0: use batches larger than the latent where possible.

    Args:
        emb: float [B, D], B >= 2. Returns: float scalar tensor, differentiable with respect to ``emb``.
    """
    centred = emb - emb.mean(0, keepdim=True)
    cov = centred.t() @ centred / max(len(emb) - 1, 1)
    std = cov.diagonal().clamp_min(1e-8).sqrt()
    corr = cov / (std.unsqueeze(0) * std.unsqueeze(1))
    d = emb.shape[1]
    off = corr.pow(2).sum() - corr.diagonal().pow(2).sum()
    return off / max(d * (d - 1), 1)
