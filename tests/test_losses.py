"""Known-value tests of the metric conventions (docs/configuration.md: "Metrics")."""
import math

import pytest
import torch

from embclf import losses


def test_mse_sse_known_values():
    x = torch.zeros(2, 3, 4, 4)
    x_hat = torch.zeros(2, 3, 4, 4)
    x_hat[0] += 0.5  # every pixel off by 0.5 -> per-pixel MSE 0.25, SSE 0.25 * 48 = 12
    assert losses.sse_per_image(x_hat, x).tolist() == [12.0, 0.0]
    assert losses.mse_per_image(x_hat, x).tolist() == [0.25, 0.0]
    assert losses.ae_loss(x_hat, x).item() == 6.0


def test_psnr_known_values():
    x = torch.zeros(3, 3, 8, 8)
    x_hat = x.clone()
    x_hat[0] += 0.1  # MSE 0.01 -> 20 dB
    x_hat[1] += 1.0  # MSE 1 -> 0 dB
    p = losses.psnr_per_image(x_hat, x)
    assert p[0].item() == pytest.approx(20.0, abs=1e-4)
    assert p[1].item() == pytest.approx(0.0, abs=1e-6)
    assert p[2].item() == pytest.approx(100.0)  # perfect: capped by the 1e-10 MSE floor
    # mean of per-image PSNR differs from PSNR of the mean MSE: the documented convention is the former
    assert p[:2].mean().item() == pytest.approx(10.0, abs=1e-4)
    assert 10 * math.log10(1 / 0.505) != pytest.approx(10.0)


def test_kl_known_values():
    mu = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0], [0.0, math.log(2.0)]])
    kl = losses.kl_normal(mu, logvar)
    assert kl[0].item() == pytest.approx(0.0)  # N(0, I) to itself
    # dim 1: 0.5 * mu^2 = 0.5; dim 2: 0.5 * (2 - 1 - ln 2)
    assert kl[1].item() == pytest.approx(0.5 + 0.5 * (1 - math.log(2.0)), rel=1e-6)
    # agrees with torch.distributions' closed form
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(2, 2), torch.ones(2, 2))
    assert torch.allclose(kl, torch.distributions.kl_divergence(q, p).sum(1))
    assert losses.kl_per_dim(mu, logvar).sum().item() == pytest.approx(kl.mean().item())


def test_vae_loss_weights_kl_by_beta():
    x = torch.zeros(1, 3, 2, 2)
    mu, logvar = torch.ones(1, 4), torch.zeros(1, 4)  # KL = 0.5 * 4 = 2 nats
    assert losses.vae_loss(x + 0.5, x, mu, logvar, beta=0.1).item() == pytest.approx(12 * 0.25 + 0.2)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        losses.sse_per_image(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 8, 8))


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert losses.accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
