"""The terms of the autoencode objective beyond SSE + β·KL: a joint classification head and a decorrelation
penalty (the ``model`` group's ``ce_weight``, ``decorrelation_weight``, ``decorrelation``; docs/objectives.md),
and the label-free corruptions of the training input (``input_noise``, ``mask_ratio``; docs/research.md).

The objective per image, with μ the encoder's mean (the AE's code z), y the label, h a linear head::

    SSE + β_e·KL + γ·CE(h(μ), y) + λ·R(μ_batch, y_batch)

γ = ``model.ce_weight``, λ = ``model.decorrelation_weight``, β_e the epoch's KL weight
(``losses.kl_weight``: ``model.beta`` after ``model.kl_warmup_epochs``). γ·CE with a head on a VAE's mean is
the "supervised VAE" the reference study proposed (a discriminative term added to the ELBO, as in the
M2-style models of Kingma et al., "Semi-Supervised Learning with Deep Generative Models", NeurIPS 2014, here
with the class predicted from μ rather than generated). R is ``losses.class_decorrelation`` (labels) or
``losses.feature_decorrelation`` (label-free).

The head and the penalty act on μ, not on the sampled z: the probes of ``stage=classify`` read μ
(``Autoencoder.encode``), so μ is what must become linearly separable; a head on z would also learn to
tolerate the sampling noise, which the probes never see. For an AE, z = μ.

Like the models, nothing here reads the config except ``build_objective``, the one config -> object
translation (torchtune's builder style). The head is an ``nn.Linear`` outside the ``Autoencoder``: encoder
checkpoints keep the same ``model`` keys, and the stage saves the head beside them (``joint_head``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import losses
from ..validation import check_group

MASK_PATCH = 4  # side in pixels of the square patches ``model.mask_ratio`` zeroes (8x8 patches on a 32x32 image)


def add_input_noise(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The denoising autoencoder's corruption: ``clamp(x + sigma * eps, 0, 1)``, eps ~ N(0, I) i.i.d. per value.

    Vincent et al., "Extracting and Composing Robust Features with Denoising Autoencoders" (ICML 2008) corrupt
    the input and reconstruct the clean one; additive isotropic Gaussian noise is their sec. 2.3 / Vincent et al.
    (JMLR 2010) variant. The clamp keeps the encoder's input in the pixel range it sees at eval time (it shrinks
    the noise only within ~sigma of 0 and 1). eps is drawn from the global torch RNG of ``x``'s device, which
    checkpoints save and restore (``checkpoint.rng_state``), so an exact resume stays exact.

    Args:
        x: float [B, C, H, W], pixels in [0, 1]. sigma: the noise's standard deviation (>= 0), in pixel units.
    Returns:
        float [B, C, H, W] in [0, 1], a new tensor (``x`` unchanged).
    """
    return (x + sigma * torch.randn_like(x)).clamp_(0.0, 1.0)


def mask_patches(x: torch.Tensor, ratio: float, patch: int = MASK_PATCH) -> torch.Tensor:
    """Masked-input corruption: ``round(ratio * n)`` of each image's n square ``patch`` x ``patch`` patches set to 0
    (every channel), chosen uniformly at random without replacement, independently per image (MAE's per-image
    random masking, He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, sec. 3; here on
    the pixels of a conv autoencoder's input rather than by dropping tokens). A side not divisible by ``patch``
    has smaller patches at its right/bottom edge. Draws from the global torch RNG of ``x``'s device.

    Args:
        x: float [B, C, H, W]. ratio: fraction of patches masked, in [0, 1). patch: patch side in pixels (>= 1).
    Returns:
        float [B, C, H, W]: ``x`` with the masked patches zeroed (a new tensor; ``x`` itself when no patch is masked).
    """
    b, _, h, w = x.shape
    gh, gw = math.ceil(h / patch), math.ceil(w / patch)
    k = round(ratio * gh * gw)
    if k == 0:
        return x
    chosen = torch.rand(b, gh * gw, device=x.device).topk(k, dim=1).indices  # k distinct patches per image
    keep = torch.ones(b, gh * gw, device=x.device, dtype=x.dtype).scatter_(1, chosen, 0.0)
    keep = keep.view(b, 1, gh, gw).repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :h, :w]
    return x * keep


@dataclass
class Objective:
    """The extra terms of one run's objective; all off by default (``Objective()`` is SSE + β·KL).

    Attributes:
        head: linear head latent -> n_classes on μ, or None (ce_weight = 0).
        ce_weight: γ, weight of the head's cross-entropy (nats per image) against the per-image SSE.
        decorrelation_weight: λ, weight of the batch penalty R (in [0, 1], same value for every image).
        decorrelation: "class" (``losses.class_decorrelation``, needs labels) or "feature"
            (``losses.feature_decorrelation``, label-free).
        n_classes: number of classes K (needed by the head and by the class penalty).
        input_noise: sigma of the denoising corruption (``add_input_noise``; 0 = off).
        mask_ratio: fraction of masked patches (``mask_patches``; 0 = off).
    """

    head: Optional[nn.Module] = None
    ce_weight: float = 0.0
    decorrelation_weight: float = 0.0
    decorrelation: str = "class"
    n_classes: int = 0
    input_noise: float = 0.0
    mask_ratio: float = 0.0

    @property
    def corrupts(self) -> bool:
        """True when training inputs are corrupted (``model.input_noise`` or ``model.mask_ratio`` on)."""
        return self.input_noise > 0 or self.mask_ratio > 0

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """The training input: ``x`` (float [B, C, H, W] in [0, 1]) with Gaussian noise added (clamped to [0, 1]),
        then patches masked, each when on; ``x`` itself when both are off. Only ``engine.batch_step`` calls it, and
        only in train mode: the loss compares the reconstruction with the clean ``x``."""
        if self.input_noise > 0:
            x = add_input_noise(x, self.input_noise)
        if self.mask_ratio > 0:
            x = mask_patches(x, self.mask_ratio)
        return x

    @property
    def needs_labels(self) -> bool:
        """True when a term reads the labels (the training loop must then pass them)."""
        return self.head is not None or (self.decorrelation_weight > 0 and self.decorrelation == "class")

    def terms(self, mu: torch.Tensor, y: Optional[torch.Tensor]):
        """The extra terms of a batch.

        Args:
            mu: float32 [B, latent] (differentiable). y: int64 [B] labels, or None when ``needs_labels`` is False.
        Returns:
            (extra per image: float32 [B], γ·CE_i + λ·R, differentiable;
             ce: float32 [B] per-image cross-entropy in nats (zeros without a head);
             correct: float32 [B], 1 where the head's argmax is the label (zeros without a head);
             r: float32 scalar, the penalty R (0 when λ = 0)).
        Raises:
            ValueError: labels needed but ``y`` is None.
        """
        if self.needs_labels and y is None:
            raise ValueError("this objective needs the labels (model.ce_weight > 0 or model.decorrelation=class)")
        zero = mu.new_zeros(len(mu))
        extra, ce, correct = zero, zero, zero
        if self.head is not None:
            logits = self.head(mu)
            ce = nn.functional.cross_entropy(logits, y, reduction="none")
            correct = (logits.detach().argmax(1) == y).float()
            extra = extra + self.ce_weight * ce
        r = mu.new_zeros(())
        if self.decorrelation_weight > 0:
            r = (losses.class_decorrelation(mu, y, self.n_classes) if self.decorrelation == "class"
                 else losses.feature_decorrelation(mu))
            extra = extra + self.decorrelation_weight * r
        return extra, ce.detach(), correct, r.detach()


def build_objective(model_cfg, latent: int, n_classes: int) -> Objective:
    """Build the extra objective terms named by the ``model`` group.

    Args:
        model_cfg: the ``model`` config node (reads ce_weight, decorrelation_weight, decorrelation, and
            input_noise and mask_ratio where it has them: a config stored before they existed has neither).
        latent: the latent size (the head's input). n_classes: the dataset's class count (the head's output).
    Returns:
        ``Objective``; its ``head`` (``nn.Linear(latent, n_classes)``, PyTorch's default init) when ce_weight > 0.
    Raises:
        ValueError: with the gate's message (``validation.VALUE_RULES``, ``model.*``) for a negative weight: the
            entrypoint checked the whole config already; this is for direct callers.
    """
    check_group(model_cfg, "model", ValueError)
    gamma, lam = model_cfg.ce_weight, model_cfg.decorrelation_weight
    kind = getattr(model_cfg.decorrelation, "value", model_cfg.decorrelation)  # the Enum's name: class | feature
    head = nn.Linear(latent, n_classes) if gamma > 0 else None
    return Objective(head=head, ce_weight=gamma, decorrelation_weight=lam, decorrelation=kind, n_classes=n_classes,
                     input_noise=float(model_cfg.get("input_noise", 0.0) or 0.0),
                     mask_ratio=float(model_cfg.get("mask_ratio", 0.0) or 0.0))
