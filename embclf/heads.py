"""Classifier heads trained on frozen embeddings (the ``head`` config group).

``mlp``: the reference study's MLP, latent -> 128 -> 64 -> classes with ReLU. Inputs are standardized with
the training embeddings' per-dim mean and std (stored as buffers), so AE codes and VAE means of very
different scales train with the same learning rate.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MLPHead(nn.Module):
    """float [B, in_dim] -> logits float [B, n_classes].

    Args:
        in_dim: embedding size (the latent). n_classes: number of classes.
        hidden: widths of the hidden layers (ReLU after each). dropout: after each hidden ReLU.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: Sequence[int] = (128, 64), dropout: float = 0.0):
        super().__init__()
        layers, d = [], in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True)] + ([nn.Dropout(dropout)] if dropout else [])
            d = h
        layers.append(nn.Linear(d, n_classes))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def fit_standardizer(self, z: torch.Tensor) -> None:
        """Set the input mean/std from training embeddings z float [N, in_dim]."""
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0).clamp_min(1e-6))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net((z - self.mean) / self.std)


def build_head(head_cfg, in_dim: int, n_classes: int) -> nn.Module:
    """Build the head named by ``head.name``. Raises ValueError for an unknown name."""
    if head_cfg.name == "mlp":
        return MLPHead(in_dim, n_classes, list(head_cfg.hidden), float(head_cfg.dropout))
    raise ValueError(f"head={head_cfg.name!r} is unknown; available: mlp")
