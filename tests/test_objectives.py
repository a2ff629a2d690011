"""The improved objectives (docs/objectives.md): each term on hand-computed inputs, the KL warm-up schedule,
best-epoch selection, the config keys, and one short end-to-end supervised-VAE run with warm-up."""
import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from embclf import identity, losses, runs
from embclf.config import conf_dir
from embclf.models import build_model
from embclf.models.objectives import Objective, build_objective
from embclf import engine
from embclf.stages import autoencode



def _compose(*overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=list(overrides))


def test_class_decorrelation_known_value():
    # class means m0 = (1, 0), m1 = (0, 1), m2 = (1, 1); class 3 absent (not a pair)
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2])
    r = losses.class_decorrelation(emb, labels, 4)
    # cos^2: (0,1) -> 0, (0,2) -> 1/2, (1,2) -> 1/2; 6 ordered pairs -> (0 + 1/2 + 1/2) * 2 / 6 = 1/3
    assert r.item() == pytest.approx(1 / 3, rel=1e-6)
    r.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    # orthogonal class means: 0; scale-free; one class present: no pairs, 0
    ortho = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    assert losses.class_decorrelation(ortho, torch.tensor([0, 1]), 2).item() == pytest.approx(0.0)
    assert losses.class_decorrelation(emb.detach() * 7, labels, 4).item() == pytest.approx(1 / 3, rel=1e-6)
    assert losses.class_decorrelation(emb.detach(), torch.zeros(4, dtype=torch.long), 4).item() == 0.0


def test_feature_decorrelation_known_value():
    # dims (a, 2a, b) with a and b uncorrelated: rho_01 = 1, the rest 0 -> 2 / (3 * 2) = 1/3
    a = torch.tensor([1.0, -1.0, 1.0, -1.0])
    b = torch.tensor([1.0, 1.0, -1.0, -1.0])
    emb = torch.stack([a, 2 * a, b], 1)
    assert losses.feature_decorrelation(emb).item() == pytest.approx(1 / 3, rel=1e-5)
    assert losses.feature_decorrelation(torch.stack([a, b], 1)).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.feature_decorrelation(torch.stack([a, -3 * a], 1)).item() == pytest.approx(1.0, rel=1e-5)


def test_joint_head_cross_entropy_known_value():
    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    obj = Objective(head=head, ce_weight=2.0, n_classes=2)
    mu = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])  # softmax (3/4, 1/4)
    extra, ce, correct, r = obj.terms(mu, torch.tensor([0, 1]))
    assert ce.tolist() == pytest.approx([math.log(4 / 3), math.log(4.0)], rel=1e-6)
    assert extra.tolist() == pytest.approx([2 * math.log(4 / 3), 2 * math.log(4.0)], rel=1e-6)
    assert correct.tolist() == [1.0, 0.0] and r.item() == 0.0
    with pytest.raises(ValueError, match="labels"):
        obj.terms(mu, None)


def test_batch_step_adds_the_terms_to_the_objective():
    torch.manual_seed(0)
    cfg = _compose("model=vae", "model.ce_weight=0.5", "model.decorrelation_weight=3", "data.image_size=8",
                   "model.channels=[4,8]", "model.strides=[2,2]")
    model = build_model(cfg.model, 4, 8).eval()
    obj = build_objective(cfg.model, 4, 3)
    assert isinstance(obj.head, torch.nn.Linear) and obj.head.out_features == 3 and obj.needs_labels
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, sums, _ = engine.batch_step(model, x, 0.1, "fp32", y, obj)
    out = model(x)
    ce = torch.nn.functional.cross_entropy(obj.head(out["mu"]), y)
    r = losses.class_decorrelation(out["mu"], y, 3)
    want = losses.vae_loss(out["x_hat"], x, out["mu"], out["logvar"], 0.1) + 0.5 * ce + 3 * r
    assert torch.allclose(loss, want, rtol=1e-5)
    assert sums.shape == (len(engine.SUMS),)
    assert torch.allclose(sums[0], want * 6, rtol=1e-5) and torch.allclose(sums[4], ce * 6, rtol=1e-5)
    assert torch.allclose(sums[6], r * 6, rtol=1e-5)
    loss.backward()
    assert obj.head.weight.grad is not None  # the head trains jointly
    # the label-free penalty needs no labels; without any term the objective is the plain one
    ae_cfg = _compose("model=ae", "model.decorrelation_weight=2", "model.decorrelation=feature",
                      "model.channels=[4,8]", "model.strides=[2,2]")
    feat = build_objective(ae_cfg.model, 4, 3)
    assert feat.head is None and not feat.needs_labels
    ae = build_model(ae_cfg.model, 4, 8).eval()
    loss, sums, mu = engine.batch_step(ae, x, 0.1, "fp32", None, feat)
    want = losses.ae_loss(ae(x)["x_hat"], x) + 2 * losses.feature_decorrelation(mu)
    assert torch.allclose(loss, want, rtol=1e-5) and sums[3] == 0 and sums[4] == 0
    plain = build_objective(_compose("model=ae").model, 4, 3)
    assert plain.head is None and not plain.needs_labels and plain.decorrelation_weight == 0


def test_kl_warmup_schedule():
    assert [losses.kl_weight(e, 0.1, 0) for e in (1, 2, 5)] == [0.1, 0.1, 0.1]
    assert [losses.kl_weight(e, 0.1, 1) for e in (1, 2, 3)] == [0.0, 0.1, 0.1]
    assert [losses.kl_weight(e, 1.0, 4) for e in range(1, 7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ValueError):
        losses.kl_weight(0, 0.1, 1)


def test_select_on_picks_the_right_epoch():
    # epoch 2 has the lowest val MSE but an enormous KL: loss picks epoch 3, mse picks epoch 2
    rows = [{"loss": 100.0, "mse": 0.030}, {"loss": 5000.0, "mse": 0.020}, {"loss": 90.0, "mse": 0.025},
            {"loss": 90.0, "mse": 0.026}]  # a tie keeps the earlier epoch

    def pick(select_on):
        best, best_epoch = math.inf, 0
        for epoch, m in enumerate(rows, 1):
            if engine.is_better(m, best, select_on):
                best, best_epoch = m[select_on], epoch
        return best_epoch

    assert pick("loss") == 3 and pick("mse") == 2


def test_config_keys_and_encoder_identity():
    cfg = _compose("model=resnet_vae", "model.ce_weight=1", "model.decorrelation=feature", "model.kl_warmup_epochs=3",
                   "autoencode.select_on=mse")
    assert cfg.model.ce_weight == 1.0 and cfg.autoencode.select_on.value == "mse"
    default = _compose("model=vae")
    assert default.model.ce_weight == 0 and default.autoencode.select_on.value == "loss"
    for bad in ("model.decorrelation=foo", "autoencode.select_on=kl", "model.kl_warmup_epochs=abc"):
        with pytest.raises(ConfigCompositionException) as e:
            _compose(bad)
        assert bad.split("=")[0] in str(e.value.__cause__ or e.value)
    # classify finds the encoder trained with the same objective, never another one
    ident = identity.identity(default, "autoencode")
    assert ident != identity.identity(_compose("model=vae", "model.ce_weight=1"), "autoencode")
    assert ident != identity.identity(_compose("model=vae", "autoencode.select_on=mse"), "autoencode")
    # a run written before these keys existed had no extra terms and chose its best epoch on val MSE
    old = runs.resolved(default)
    for k in runs.MODEL_OBJECTIVE_DEFAULTS:
        del old["model"][k]
    del old["autoencode"]["select_on"]
    assert identity.identity(old, "autoencode") == \
        identity.identity(_compose("model=vae", "autoencode.select_on=mse"), "autoencode")


def _stage_cfg(tmp_path, cifar_root, *overrides):
    """A tiny autoencode config (100 real CIFAR-10 images at 16x16) for in-process runs of the stage."""
    return _compose("data=folder", f"data.root={cifar_root}", "data.train_size=100", "data.test_size=50",
                    "data.image_size=16", f"data.cache_dir={tmp_path / 'cache'}", "autoencode.batch_size=25",
                    "autoencode.image_epochs=[]", "logger=none", f"output_dir={tmp_path / 'out'}", *overrides)


def test_bad_objective_keys_are_refused_before_anything_is_written(tmp_path, cifar_root):
    from embclf import runtime

    for bad, msg in (("model.ce_weight=-1", "model.ce_weight=-1.0 is invalid: it must be a cross-entropy weight >= 0"),
                     ("model.decorrelation_weight=-0.5", "model.decorrelation_weight=-0.5 is invalid: it must be a "
                                                         "weight >= 0"),
                     ("model.kl_warmup_epochs=-2", "model.kl_warmup_epochs=-2 must be >= 0")):
        run_dir = tmp_path / bad
        with pytest.raises(runtime.EmbclfError, match=msg):
            autoencode.run(_stage_cfg(tmp_path, cifar_root, "model=vae", bad), run_dir, [bad])
        assert not any(run_dir.iterdir())


@pytest.mark.slow
def test_supervised_vae_with_warmup_end_to_end(tmp_path, cifar_root):
    """The stage itself, in process: model=vae model.ce_weight=1 model.kl_warmup_epochs=1, 2 epochs."""
    threads = torch.get_num_threads()
    cfg = _stage_cfg(tmp_path, cifar_root, "model=vae", "latent=8", "model.ce_weight=1", "model.kl_warmup_epochs=1",
                     "autoencode.epochs=2", "threads=1")
    try:
        run_dir = autoencode.run(cfg, tmp_path / "run", ["model=vae"])
    finally:
        torch.set_num_threads(threads)
    s = json.loads((run_dir / "summary.json").read_text())
    m = runs.read_metrics(run_dir)
    train = [r for r in m if r["split"] == "train"]
    val = [r for r in m if r["split"] == "val"]
    assert [r["beta"] for r in train] == [0.0, 0.1] and [r["beta"] for r in val] == [0.1, 0.1]
    assert all("ce" in r and 0 <= r["joint_head_accuracy"] <= 1 for r in train + val)
    # the val objective is SSE + full beta * KL + CE, whatever beta the epoch trained with
    for r in val:
        assert r["loss"] == pytest.approx(r["sse"] + 0.1 * r["kl"] + r["ce"], rel=1e-4)
    # epoch 1 trained with beta = 0: its reconstruction can be better, its full-beta objective is worse
    assert s["select_on"] == "loss" and s["best_epoch"] == min(val, key=lambda r: r["loss"])["epoch"]
    assert 0 <= s["test_joint_head_accuracy"] <= 1 and "val_joint_head_accuracy" in s and "test_ce" in s
    best = runs.load_checkpoint(run_dir / "checkpoints" / "best.pt", ("model", "joint_head"))
    assert best["joint_head"]["weight"].shape == (10, 8)
    assert "joint_head" in runs.load_checkpoint(run_dir / "checkpoints" / "last.pt")
