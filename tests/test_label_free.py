"""Label-free objectives (docs/research.md): the denoising autoencoder (``model.input_noise``) and masked-input
reconstruction (``model.mask_ratio``). The corruptions' statistics against their definitions, the batch step
comparing with the clean image, the eval path untouched, the config keys, and an exact resume (SIGKILL and
SIGTERM mid-epoch) with both on."""
from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from embclf import engine, identity, losses, runs
from embclf.config import conf_dir
from embclf.models import build_model
from embclf.models.objectives import MASK_PATCH, Objective, build_objective, mask_patches, add_input_noise
from embclf.validation import problems


def _compose(*overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=list(overrides))


def test_mask_hides_exactly_the_ratio_of_whole_patches_at_random_places():
    torch.manual_seed(0)
    x = torch.rand(2000, 3, 32, 32) + 1.0  # no pixel is 0 before masking
    out = mask_patches(x, 0.25)
    zero = out == 0
    n_patches = (32 // MASK_PATCH) ** 2  # 64
    k = round(0.25 * n_patches)  # 16 patches = 1024 of 3072 values per image
    assert zero.flatten(1).sum(1).eq(k * MASK_PATCH ** 2 * 3).all()
    # whole 4x4 patches, all channels alike; the rest untouched
    blocks = zero[:, 0].reshape(2000, 8, 4, 8, 4).permute(0, 1, 3, 2, 4).reshape(2000, 64, 16)
    assert (blocks.all(2) | ~blocks.any(2)).all()
    assert (zero[:, 0:1] == zero).all()
    assert torch.equal(out[~zero], x[~zero])
    # every patch position masked with probability k / 64 = 0.25: binomial std sqrt(.25 * .75 / 2000) = 0.0097
    freq = blocks.all(2).float().mean(0)
    assert (freq - 0.25).abs().max() < 0.05, freq
    # independent per image: two images share a mask with probability 1 / C(64, 16), i.e. never
    assert len({tuple(b.all(1).nonzero().flatten().tolist()) for b in blocks[:200]}) == 200
    assert mask_patches(x, 0.0) is x and mask_patches(x, 0.007) is x  # round(0.448) = 0 patches


def test_mask_of_a_side_not_divisible_by_the_patch():
    x = torch.ones(500, 1, 10, 10)  # a 3x3 grid of patches: 4, 4 and 2 pixels wide; round(0.5 * 9) = 4 masked
    out = mask_patches(x, 0.5)
    grid = out[:, 0, ::4, ::4] == 0  # the top-left pixel of each patch
    assert grid.flatten(1).sum(1).eq(4).all()
    # masked pixels per image: the chosen patches' areas (16, 8 or 4 pixels), never more than 4 patches' worth
    per_image = (out == 0).flatten(1).sum(1)
    areas = torch.tensor([16, 16, 8, 16, 16, 8, 8, 8, 4])
    want = (grid.flatten(1).float() @ areas.float()).long()
    assert torch.equal(per_image, want)


def test_input_noise_has_the_configured_std_and_stays_in_range():
    torch.manual_seed(0)
    x = torch.full((256, 3, 32, 32), 0.5)  # 786,432 values; the clamp is 5 sigma away
    noisy = add_input_noise(x, 0.1)
    d = noisy - x
    # sample std of 786k normal draws: relative standard error 1 / sqrt(2n) = 0.08 %
    assert d.std().item() == pytest.approx(0.1, rel=0.01)
    assert abs(d.mean().item()) < 0.1 * 5 / math.sqrt(d.numel())
    edge = add_input_noise(torch.zeros(64, 3, 8, 8), 0.3)
    assert edge.min() >= 0 and edge.max() <= 1 and edge.gt(0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert torch.equal(x, torch.full_like(x, 0.5))  # the input is not modified


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = _compose("model=ae", "model.channels=[8,16]", "model.strides=[2,2]")
    return build_model(cfg.model, 4, 16)


def test_batch_step_feeds_the_corrupted_input_and_scores_the_clean_one():
    model = _tiny_model().train()
    x = torch.rand(32, 3, 16, 16)
    obj = Objective(input_noise=0.2, mask_ratio=0.5)
    torch.manual_seed(7)
    _, sums, _ = engine.batch_step(model, x, 0.0, objective=obj)
    # the same draws, by hand: noise, then the mask, into the model; the SSE against the clean x
    torch.manual_seed(7)
    x_in = mask_patches(add_input_noise(x, 0.2), 0.5)
    want = losses.sse_per_image(model(x_in)["x_hat"], x).sum()
    assert sums[1].item() == pytest.approx(want.item(), rel=1e-5)
    torch.manual_seed(7)
    against_noisy = losses.sse_per_image(model(x_in)["x_hat"], x_in).sum()
    assert abs(against_noisy.item() - want.item()) > 1e-3 * want.item()  # the two targets differ measurably


def test_eval_path_is_untouched():
    """Eval mode (val, test, the classify stage's embeddings): the same numbers with and without the keys, and
    not one random number drawn."""
    model = _tiny_model().eval()
    x = torch.rand(16, 3, 16, 16)
    obj = Objective(input_noise=0.5, mask_ratio=0.75)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    loss_a, sums_a, mu_a = engine.batch_step(model, x, 0.0, objective=obj)
    assert torch.equal(torch.get_rng_state(), before)
    loss_b, sums_b, mu_b = engine.batch_step(model, x, 0.0)
    assert torch.equal(sums_a, sums_b) and torch.equal(mu_a, mu_b)
    # the classify stage's embedding of a model trained with the keys: the encoder alone, nothing corrupts it
    split = type("S", (), {"images": (x * 255).to(torch.uint8)})()
    assert torch.equal(engine.embed(model, split, "cpu", 8), engine.embed(model, split, "cpu", 8))


def test_config_keys_validated_and_in_the_identity():
    default = _compose("model=ae")
    assert default.model.input_noise == 0 and default.model.mask_ratio == 0
    assert not build_objective(default.model, 8, 10).corrupts
    on = build_objective(_compose("model=ae", "model.input_noise=0.1", "model.mask_ratio=0.25").model, 8, 10)
    assert (on.input_noise, on.mask_ratio, on.corrupts, on.needs_labels) == (0.1, 0.25, True, False)
    for bad in ("model.input_noise=-0.1", "model.mask_ratio=1.0", "model.mask_ratio=-0.5"):
        msg = problems(_compose("model=ae", bad))
        assert len(msg) == 1 and msg[0].startswith(bad.split("=")[0] + "=") and "invalid" in msg[0], msg
    with pytest.raises(ValueError, match="model.mask_ratio"):
        build_objective(_compose("model=ae", "model.mask_ratio=1.0").model, 8, 10)
    with pytest.raises(ConfigCompositionException):
        _compose("model=ae", "model.input_noise=abc")
    ident = identity.identity(default, "autoencode")
    assert ident != identity.identity(_compose("model=ae", "model.input_noise=0.1"), "autoencode")
    assert ident != identity.identity(_compose("model=ae", "model.mask_ratio=0.25"), "autoencode")
    old = runs.resolved(default)  # a run written before the keys existed: no corruption, the same experiment
    del old["model"]["input_noise"], old["model"]["mask_ratio"]
    assert identity.identity(old, "autoencode") == ident
    assert not build_objective(OmegaConf.create(old["model"]), 8, 10).corrupts  # read back from a checkpoint


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, cifar_root):
    """An AE with both corruptions on, 2 epochs of 6 steps: uninterrupted ("ref"), SIGKILLed mid-epoch 2 and
    in its best.pt write ("kill"), SIGTERMed at step 3 of epoch 2 ("term", resumes from that step)."""
    from conftest import embclf_env
    from resume_harness import run_spec
    from test_resume import _small_tree

    tmp = tmp_path_factory.mktemp("resume_label_free")
    tree = _small_tree(tmp / "data")
    args = ["stage=autoencode", "model=ae", "latent=4", "data=folder", "data.train_size=300", "data.test_size=100",
            "data.image_size=16", "model.channels=[8,16]", "model.strides=[2,2]", "autoencode.batch_size=50",
            "autoencode.image_epochs=[]", "autoencode.epochs=2", "logger=none", "logger.projections=[]", "threads=1",
            "model.input_noise=0.1", "model.mask_ratio=0.25", f"data.root={tree}", f"data.cache_dir={tmp / 'cache'}"]
    runs_ = {"ref": tmp / "ref", "kill": tmp / "kill", "term": tmp / "term"}
    spec = {"args": args, "runs": {
        "ref": {"run_dir": str(runs_["ref"])},
        "kill": {"run_dir": str(runs_["kill"]), "kills": ["autoencode.best", "autoencode.step:9"]},
        "term": {"run_dir": str(runs_["term"]), "kills": ["autoencode.step:9:TERM"]},
    }}
    attempts = run_spec(tmp, spec, embclf_env(tmp))
    return {"runs": runs_, "attempts": attempts, "tmp": tmp}


@pytest.mark.slow
def test_resume_with_corruptions_is_exact(resumed):
    from test_resume import _records, _results

    ref = resumed["runs"]["ref"]
    assert _results(ref)["status"] == "completed"
    for name in ("kill", "term"):
        attempts = resumed["attempts"][name]
        assert attempts[-1]["exit"] == 0, (resumed["tmp"] / f"{name}.attempts.log").read_text()[-3000:]
        assert len(attempts) == (3 if name == "kill" else 2), attempts
        got = resumed["runs"][name]
        assert _records(got) == _records(ref), f"{name}: metrics.jsonl differs from the uninterrupted run's"
        assert _results(got) == _results(ref)
    log = (resumed["tmp"] / "term.attempts.log").read_text()
    assert "step 3 of epoch 2" in log
