"""``autoencode.epochs=0``, the random-init control: the run dir of a normal autoencode run (checkpoints, test
reconstruction numbers, embeddings, status completed) whose weights are the seed's initialisation exactly, and a
classify stage on it like on any encoder."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import MINI, run_embclf
from embclf import validation
from embclf.config import Config
from embclf.models import build_model


def test_gate_accepts_zero_epochs_and_refuses_negative():
    cfg = OmegaConf.structured(Config)
    cfg.autoencode.epochs = 0
    assert not [p for p in validation.problems(cfg) if "autoencode.epochs" in p]
    cfg.autoencode.epochs = -1
    assert any(p.startswith("autoencode.epochs=-1 is invalid") for p in validation.problems(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vae"])
def test_zero_epochs_is_the_seeds_initialisation(tmp_path, cifar_root, model):
    run_dir = tmp_path / "run"
    # seed 3 (not the default): the weights must follow the seed; a small conv net keeps it to seconds
    args = [f"model={model}", "latent=4", "seed=3", "stage=all", *MINI, "autoencode.epochs=0", "data.image_size=16",
            "model.channels=[8,16]", "model.strides=[2,2]", "autoencode.probe_every=1", "autoencode.probe_size=100",
            "logger=none", "threads=1", f"hydra.run.dir={run_dir}"]
    run_embclf(args, tmp_path)
    ae = run_dir / "autoencode"
    s = json.loads((ae / "summary.json").read_text())
    assert s["status"] == "completed" and s["epochs"] == 0 and s["best_epoch"] == 0
    for k in ("test_mse", "test_psnr", "test_kl", "final_test_psnr"):
        assert isinstance(s[k], float), k
    # PSNR = 10 log10(1 / MSE) per image, averaged over images: at least the pooled MSE's value (Jensen)
    assert s["test_psnr"] >= 10 * torch.log10(torch.tensor(1 / s["test_mse"])).item() - 1e-6
    cfg = OmegaConf.load(ae / "config.yaml")
    torch.manual_seed(3)
    fresh = build_model(cfg.model, cfg.latent, cfg.data.image_size).state_dict()
    for name in ("best.pt", "last.pt"):
        saved = torch.load(ae / "checkpoints" / name, map_location="cpu", weights_only=True)["model"]
        assert saved.keys() == fresh.keys()
        for k, v in fresh.items():
            assert torch.equal(saved[k], v), f"{name}: {k} differs from the seed's initialisation"
    records = [json.loads(line) for line in (ae / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in records] == [(0, "val"), (0, "test")]
    assert 0.0 <= records[0]["probe_accuracy"] <= 1.0
    assert (ae / "images" / "recon_e000.png").is_file()
    c = json.loads((run_dir / "classify" / "summary.json").read_text())
    assert c["status"] == "completed" and 0.0 <= c["test_accuracy"] <= 1.0
    # the same command again: completed, nothing redone (the weights stay those of the seed)
    before = (ae / "checkpoints" / "best.pt").stat().st_mtime_ns
    run_embclf(args, tmp_path)
    assert (ae / "checkpoints" / "best.pt").stat().st_mtime_ns == before
    # an attempt interrupted after last.pt (best.pt lost, status interrupted): the resume redoes epoch 0 once
    (ae / "checkpoints" / "best.pt").unlink()
    summary = json.loads((ae / "summary.json").read_text())
    (ae / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    run_embclf([a.replace("stage=all", "stage=autoencode") for a in args[:-1]] + [f"hydra.run.dir={ae}"], tmp_path)
    again = [json.loads(line) for line in (ae / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in again] == [(0, "val"), (0, "test")]
    assert again[0]["psnr"] == records[0]["psnr"]
    saved = torch.load(ae / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in fresh.items())


def test_medium_preset_composes_the_quick_study_larger():
    from hydra import compose, initialize_config_dir

    from embclf.config import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", overrides=["experiment=medium"], return_hydra_config=True)
        quick = compose("config", overrides=["experiment=quick"], return_hydra_config=True)
    assert (cfg.data.train_size, cfg.data.test_size, cfg.autoencode.epochs) == (10000, 2000, 12)
    assert list(cfg.autoencode.image_epochs) == [1, 6]
    assert dict(cfg.hydra.sweeper.params) == dict(quick.hydra.sweeper.params)
    # the rest is the quick preset's (batch 50, probes each epoch, 100 classifier epochs); precision stays fp32
    assert (cfg.autoencode.batch_size, cfg.autoencode.probe_every, cfg.classify.epochs) == (50, 1, 100)
    assert str(getattr(cfg.precision, "value", cfg.precision)) == "fp32"
