"""Model builders: translate the ``model`` config group and ``latent`` into an ``Autoencoder``.

Parameter counts: `python -m embclf.models` prints them (table in docs/configuration.md, "Models"); pinned by
tests/test_models.py.
"""
from __future__ import annotations

from torch import nn

from ..validation import check_model

from .autoencoder import Autoencoder
from .conv import ConvDecoder, ConvEncoder
from .resnet import ResNetDecoder, ResNetEncoder

__all__ = ["Autoencoder", "build_model", "count_parameters"]


def build_model(model_cfg, latent: int, image_size: int = 32) -> Autoencoder:
    """Build the autoencoder named by ``model_cfg`` (the ``model`` group) with ``latent`` dims for square images
    of ``image_size`` pixels.

    Raises:
        ValueError: with the gate's message (``validation.check_model``: ``latent``, the ``model.*`` ranges, and
            ``data.image_size`` against the architecture) -- the entrypoint checked the whole config already;
            this is for direct callers and for encoders read back from a run dir.
    """
    check_model(model_cfg, latent, image_size, ValueError)
    if getattr(model_cfg.arch, "value", model_cfg.arch) == "resnet":
        enc, dec = ResNetEncoder(), ResNetDecoder()
    else:  # conv, the schema's only other arch
        enc = ConvEncoder(model_cfg.channels, model_cfg.strides)
        dec = ConvDecoder(model_cfg.channels, model_cfg.strides)
    return Autoencoder(enc, dec, latent, image_size // enc.downsample, model_cfg.variational)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
