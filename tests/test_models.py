"""Shapes of every model for several latents, VAE behaviour, and the documented parameter counts."""
import pytest
import torch
from hydra import compose, initialize_config_dir

from embclf.config import conf_dir
from embclf.models import build_model, count_parameters

# Also in docs/configuration.md ("Models"); printed by `python -m embclf.models`.
PARAMS = {("ae", 64): 2486403, ("vae", 64): 2748611, ("resnet", 64): 15437635, ("resnet_vae", 64): 15961987}


def _model_cfg(name):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=[f"model={name}"]).model


@pytest.mark.parametrize("name", ["ae", "vae", "resnet", "resnet_vae"])
@pytest.mark.parametrize("latent", [1, 32, 256])
def test_shapes(name, latent):
    torch.manual_seed(0)
    m = build_model(_model_cfg(name), latent).eval()
    x = torch.rand(3, 3, 32, 32)
    out = m(x)
    assert out["x_hat"].shape == x.shape and out["x_hat"].dtype == torch.float32
    assert 0.0 <= out["x_hat"].min() and out["x_hat"].max() <= 1.0
    assert out["mu"].shape == (3, latent) and out["z"].shape == (3, latent)
    assert (out["logvar"] is not None) == name.endswith("vae")
    assert m.sample(5).shape == (5, 3, 32, 32)


@pytest.mark.slow
def test_vae_samples_in_training_and_uses_mu_in_eval():
    torch.manual_seed(0)
    m = build_model(_model_cfg("vae"), 16)
    x = torch.rand(4, 3, 32, 32)
    m.train()
    a, b = m(x)["z"], m(x)["z"]
    assert not torch.allclose(a, b)  # reparameterization draws fresh noise
    m.eval()
    o1, o2 = m(x), m(x)
    assert torch.equal(o1["z"], o1["mu"]) and torch.equal(o1["x_hat"], o2["x_hat"])


@pytest.mark.parametrize("name,latent", sorted(PARAMS))
def test_parameter_counts(name, latent):
    assert count_parameters(build_model(_model_cfg(name), latent)) == PARAMS[(name, latent)]


def test_bad_latent_raises():
    with pytest.raises(ValueError, match="latent"):
        build_model(_model_cfg("ae"), 0)


def test_vae_logvar_is_clamped_to_the_documented_range():
    from hydra import compose, initialize_config_dir

    from embclf.config import conf_dir
    from embclf.models import autoencoder as ae_mod

    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        m = build_model(compose("config", overrides=["model=vae"]).model, 8)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        m.fc_logvar.bias.fill_(1e4)
        assert m.encode(x)[1].max().item() == ae_mod.LOGVAR_MAX == 20.0
        m.fc_logvar.bias.fill_(-1e4)
        assert m.encode(x)[1].min().item() == ae_mod.LOGVAR_MIN == -30.0
        m.fc_logvar.bias.zero_()
        lv = m.encode(x)[1]
        assert (lv > -30).all() and (lv < 20).all()  # a healthy model is untouched
