"""Model builders: translate the ``model`` config group and ``latent`` into an ``Autoencoder``.

Parameter counts: `python -m embclf.models` prints them (table in docs/configuration.md, "Models"); pinned by
tests/test_models.py.
"""
from __future__ import annotations

from torch import nn

from .autoencoder import Autoencoder
from .conv import ConvDecoder, ConvEncoder
from .resnet import ResNetDecoder, ResNetEncoder

__all__ = ["Autoencoder", "build_model", "count_parameters"]


def build_model(model_cfg, latent: int, image_size: int = 32) -> Autoencoder:
    """Build the autoencoder named by ``model_cfg`` (the ``model`` group) with ``latent`` dims.

    Raises:
        ValueError: unknown ``model.arch``, non-positive latent, or an image size the trunk does not divide.
    """
    arch = getattr(model_cfg.arch, "value", model_cfg.arch)
    if arch == "conv":
        enc = ConvEncoder(model_cfg.channels, model_cfg.strides)
        dec = ConvDecoder(model_cfg.channels, model_cfg.strides)
    elif arch == "resnet":
        enc, dec = ResNetEncoder(), ResNetDecoder()
        if image_size != 32:
            raise ValueError(f"model.arch=resnet's decoder is built for 32x32 images; data.image_size={image_size}")
    else:
        raise ValueError(f"model.arch={arch!r} is unknown; use conv or resnet")
    if image_size % enc.downsample:
        raise ValueError(f"data.image_size={image_size} is not divisible by the encoder's total stride {enc.downsample}")
    return Autoencoder(enc, dec, latent, image_size // enc.downsample, bool(model_cfg.variational))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
