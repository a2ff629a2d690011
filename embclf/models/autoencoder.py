"""Autoencoder and VAE around any encoder trunk / decoder pair.

The trunk's feature map is flattened and mapped linearly to the latent (AE: z; VAE: mu and log sigma^2);
the decoder starts from a linear map of z back to the feature map. Models never read the config: see
``embclf.models.build_model`` for the config -> constructor translation.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F


LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # the range of log sigma^2 (see Autoencoder.encode)


class Autoencoder(nn.Module):
    """(Variational) autoencoder.

    Args:
        encoder: trunk, float [B, 3, S, S] -> float [B, C, s, s]; must expose ``out_channels``.
        decoder: float [B, C, s, s] -> float [B, 3, S, S] in [0, 1].
        latent: latent size (positive int).
        feature_size: s, the trunk's output side in pixels.
        variational: if True, encode gives (mu, logvar) and training samples z by reparameterization
            (Kingma & Welling 2014); otherwise logvar is None and z = mu.
    ``latent`` >= 1 (``build_model`` checks it against the gate, ``validation.VALUE_RULES``).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent: int, feature_size: int,
                 variational: bool = False):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.latent, self.variational = latent, variational
        self.feature_shape = (encoder.out_channels, feature_size, feature_size)
        n = encoder.out_channels * feature_size * feature_size
        self.fc_mu = nn.Linear(n, latent)
        self.fc_logvar = nn.Linear(n, latent) if variational else None
        self.fc_dec = nn.Sequential(nn.Linear(latent, n), nn.ReLU(inplace=True))

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """float [B, 3, S, S] in [0, 1] -> (mu float [B, latent], logvar float [B, latent] or None).

        log sigma^2 is clamped to [LOGVAR_MIN, LOGVAR_MAX] = [-30, 20] (sigma^2 from 1e-13 to 4.9e8), as in
        the latent-diffusion VAE (Rombach et al. 2022, ``DiagonalGaussianDistribution``): exp() of an
        unbounded log-variance overflows to inf in fp32/bf16 when training diverges, and the KL then
        becomes NaN; inside the range the clamp never acts on a healthy model."""
        h = self.encoder(x).flatten(1)
        if not self.variational:
            return self.fc_mu(h), None
        return self.fc_mu(h), self.fc_logvar(h).clamp(LOGVAR_MIN, LOGVAR_MAX)

    def encode_layers(self, x: torch.Tensor, names: Sequence[str], pool: int = 2) -> Dict[str, torch.Tensor]:
        """Features of the trunk's stages and the code from one forward pass (``classify.layers``, embclf/layers.py).

        Args:
            x: float [B, 3, S, S] in [0, 1]. names: among ``"code"`` and the encoder's ``stage_names``.
            pool: each named stage's map [B, C, h, w] is average-pooled to [B, C, pool, pool]
                (``adaptive_avg_pool2d``) and flattened, C * pool^2 values per image.
        Returns:
            {name: float [B, D]} for each of ``names``: ``"code"`` is mu (exactly ``encode(x)[0]``: the same
            operations), a stage ``[B, C * pool * pool]``.
        """
        out: Dict[str, torch.Tensor] = {}
        h = x
        for name, stage in zip(self.encoder.stage_names, self.encoder.stages()):
            h = stage(h)
            if name in names:
                out[name] = F.adaptive_avg_pool2d(h, pool).flatten(1)
        if "code" in names:
            out["code"] = self.fc_mu(h.flatten(1))
        return out

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I): float [B, latent]."""
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """float [B, latent] -> float [B, 3, S, S] in [0, 1]."""
        return self.decoder(self.fc_dec(z).view(-1, *self.feature_shape))

    def forward(self, x: torch.Tensor, sample: Optional[bool] = None) -> Dict[str, torch.Tensor]:
        """Encode and decode. ``sample`` (default: ``self.training``) draws z for a VAE; otherwise z = mu,
        so val/test reconstructions are deterministic. Returns dict x_hat, z, mu, logvar (None for an AE)."""
        mu, logvar = self.encode(x)
        sample = self.training if sample is None else sample
        z = self.reparameterize(mu, logvar) if (self.variational and sample) else mu
        return {"x_hat": self.decode(z), "z": z, "mu": mu, "logvar": logvar}

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Decode n draws z ~ N(0, I): float [n, 3, S, S] in [0, 1]."""
        dev = self.fc_mu.weight.device
        z = torch.randn(n, self.latent, generator=generator, device="cpu").to(dev)
        return self.decode(z)
