"""The reference study's small convolutional encoder and its mirrored decoder.

Encoder: 3x3 convs + BatchNorm + ReLU, channels 3->32->64->128->256->256, strides 2,1,2,1,2, so a
32x32 image becomes a [256, 4, 4] feature map (4096 values) that a linear layer maps to the latent.
Decoder: the same layers in reverse with transposed convs; the last layer has no BatchNorm and ends in a
sigmoid so pixels land in [0, 1].
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _block(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class ConvEncoder(nn.Module):
    """Conv trunk: float [B, 3, S, S] in [0, 1] -> float [B, channels[-1], S/prod(strides), ...].

    ``channels`` and ``strides``: one stride per conv layer (the gate, ``validation.CROSS_RULES``, checks a config;
    ``zip(strict=True)`` raises ``ValueError`` for a direct call with lengths that differ).
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128, 256, 256),
                 strides: Sequence[int] = (2, 1, 2, 1, 2), in_channels: int = 3):
        super().__init__()
        layers, c_in = [], in_channels
        for c_out, s in zip(channels, strides, strict=True):
            layers.append(_block(nn.Conv2d(c_in, c_out, 3, stride=s, padding=1, bias=False), c_out))
            c_in = c_out
        self.net = nn.Sequential(*layers)
        self.out_channels = c_in
        self.downsample = 1
        for s in strides:
            self.downsample *= s
        # the stages classify.layers can probe (embclf/layers.py): each conv block's output, conv1 the first
        self.stage_names = [f"conv{i + 1}" for i in range(len(layers))]

    def stages(self) -> list:
        """The trunk as its stages in order (``stage_names``): applied one after the other they are ``forward``."""
        return list(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """Mirror of ``ConvEncoder``: float [B, channels[-1], s, s] -> float [B, 3, s*prod(strides), ...] in [0, 1]."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128, 256, 256),
                 strides: Sequence[int] = (2, 1, 2, 1, 2), out_channels: int = 3):
        super().__init__()
        rev_c = list(channels)[::-1] + [out_channels]  # 256, 256, 128, 64, 32, 3
        rev_s = list(strides)[::-1]
        layers = []
        for i, s in enumerate(rev_s):
            c_in, c_out = rev_c[i], rev_c[i + 1]
            # output_padding=1 makes a stride-2 transposed conv exactly double the size
            conv = nn.ConvTranspose2d(c_in, c_out, 3, stride=s, padding=1, output_padding=s - 1,
                                      bias=(i == len(rev_s) - 1))
            layers.append(conv if i == len(rev_s) - 1 else _block(conv, c_out))
        layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)
