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
