"""ResNet-18 encoder adapted to 32x32 images, and a mirrored upsampling decoder.

Encoder: torchvision's ResNet-18 (BasicBlock, [2, 2, 2, 2]) with the CIFAR stem of He et al. (2016,
sec. 4.2): a 3x3 stride-1 first conv and no max-pool, so 32x32 -> [512, 4, 4] after layer4.
Decoder: four stages mirror layer4..layer1; each doubles the resolution (nearest upsample + 3x3 conv +
BatchNorm + ReLU) except the last, then refines with torchvision's BasicBlock; a 3x3 conv and a
sigmoid give pixels in [0, 1].
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


class ResNetEncoder(nn.Module):
    """float [B, 3, 32, 32] in [0, 1] -> float [B, 512, 4, 4]."""

    out_channels = 512
    downsample = 8
    # the stages classify.layers can probe (embclf/layers.py): the stem's output and each residual stage's
    stage_names = ["stem", "layer1", "layer2", "layer3", "layer4"]

    def __init__(self):
        super().__init__()
        net = ResNet(BasicBlock, [2, 2, 2, 2])
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.layers = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)

    def stages(self) -> list:
        """The trunk as its stages in order (``stage_names``): applied one after the other they are ``forward``."""
        return [self.stem, *self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))


def _up(c_in: int, c_out: int, scale: int) -> nn.Sequential:
    up = [nn.Upsample(scale_factor=scale, mode="nearest")] if scale > 1 else []
    return nn.Sequential(*up, nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), BasicBlock(c_out, c_out))


class ResNetDecoder(nn.Module):
    """float [B, 512, 4, 4] -> float [B, 3, 32, 32] in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            _up(512, 256, 2), _up(256, 128, 2), _up(128, 64, 2), _up(64, 64, 1),
            nn.Conv2d(64, 3, 3, padding=1), nn.Sigmoid(),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)
