"""Probes (embclf/heads.py) in-process on toy embeddings, and one classify run with other heads through the CLI."""
import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from embclf import references
from embclf.config import conf_dir
from embclf.heads import HEADS, KNNProbe
from embclf.runtime import EmbclfError
from embclf import engine
from embclf.stages import classify

from conftest import TINY, run_embclf

N_CLASSES = 4


def _toy(shuffle: bool, seed: int = 0):
    """4 well-separated Gaussian clusters in 16-d (train 400 / val 200 / test 400); labels shuffled on request
    (in every split), so nothing but chance is learnable."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(N_CLASSES, 16, generator=g) * 6
    z, y = {}, {}
    for split, n in (("train", 400), ("val", 200), ("test", 400)):
        labels = torch.arange(n) % N_CLASSES
        z[split] = centers[labels] + torch.randn(n, 16, generator=g)
        y[split] = labels[torch.randperm(n, generator=g)] if shuffle else labels
    return z, y


_BASE = {}


def _base():
    """The composed default config (composed once: Hydra's compose costs ~0.5 s)."""
    if not _BASE:
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            _BASE["cfg"] = compose("config")
    return _BASE["cfg"]


def _cfg(**dotlist):
    """The default config with ``dotlist`` overrides, e.g. _cfg(**{"head.name": "knn"}); each head's options
    as in its conf/head/<name>.yaml (those only set values the schema's defaults also have)."""
    return OmegaConf.merge(_base(), OmegaConf.from_dotlist([f"{k}={v}" for k, v in dotlist.items()]))


def _head_cfg(name):
    cfg = _cfg(**{"head.name": name, "classify.epochs": 10, "classify.patience": 5, "classify.batch_size": 32,
                  "classify.lr": 0.01})
    return cfg.head, cfg.classify


def _fit(name, z, y):
    head_cfg, cc = _head_cfg(name)
    if name in ("mlp", "linear"):
        head, fit = engine.train_head(head_cfg, cc, z, y, N_CLASSES, 0, float(cc.lr))
    else:
        head, fit = engine.fit_probe(head_cfg, cc, z, y, N_CLASSES, 0)
    test, _ = engine.eval_head(head, z["test"], y["test"], 4096)
    return fit, test["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("name", HEADS)
def test_probe_separates_toy_clusters_and_is_at_chance_on_shuffled_labels(name):
    fit, acc = _fit(name, *_toy(shuffle=False))
    assert acc >= 0.98 and fit["val_accuracy"] >= 0.98, (name, fit, acc)
    _, acc = _fit(name, *_toy(shuffle=True))
    assert acc < 0.25 + 0.12, (name, acc)  # chance is 0.25 (400 test points: sd ~0.02)


def test_knn_votes_are_temperature_weighted_cosine():
    # 3 training points; the query is closest (cosine) to the one of class 1, the two of class 0 farther
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    probe = KNNProbe(2, k=3, temperature=0.5)
    probe.fit(bank, torch.tensor([1, 0, 0]))
    q = torch.tensor([[1.0, 0.2]])
    cos = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    w = (cos[0] / 0.5).exp()
    assert torch.allclose(probe(q)[0], torch.stack([w[1] + w[2], w[0]]), atol=1e-6)
    probe.k = 1  # only the nearest votes
    assert probe(q).argmax(1).item() == 1


@pytest.mark.slow
def test_early_stopping_and_lr_grid_choose_on_val():
    z, y = _toy(shuffle=True)  # nothing to learn: val accuracy stops improving early
    head_cfg, cc = _head_cfg("linear")
    cc = OmegaConf.merge(cc, {"epochs": 200, "patience": 3, "lr_grid": [1e-4, 1e-2]})
    _, fit = engine.train_head(head_cfg, cc, z, y, N_CLASSES, 0, 1e-3)
    assert fit["early_stopped"] and fit["epochs_run"] == fit["best_epoch"] + 3 < 200, fit
    lr, scores = engine.select_lr(head_cfg, cc, z, y, N_CLASSES, 0)
    assert set(scores) == {"0.0001", "0.01"} and scores[f"{lr:g}"] == max(scores.values())


@pytest.mark.parametrize("head,key,value", [("knn", "head.k", 0), ("knn", "head.temperature", 0),
                                            ("logreg", "head.C", "[]"), ("mlp", "head.dropout", 1.5),
                                            ("linear", "head.dropout", -0.1), ("mlp", "classify.probes", "[svm]"),
                                            ("mlp", "head.name", "svm"), ("mlp", "classify.patience", 0)])
def test_bad_head_settings_name_their_key(head, key, value):
    classify.check_settings(_cfg(**{"head.name": head}))  # the defaults are fine
    with pytest.raises(EmbclfError, match=key.replace(".", r"\.")):
        classify.check_settings(_cfg(**{"head.name": head, key: value}))


def test_head_schema_type_error_names_the_key():
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        with pytest.raises(ConfigCompositionException) as e:
            compose("config", overrides=["head=knn", "head.k=many"])
    assert "head.k" in str(e.value.__cause__ or e.value)


def test_classify_with_knn_head_and_probes_on_the_sweeps_encoder(tiny_sweep):
    """stage=classify head=knn on the tiny sweep's vae-z16 encoder: no retraining,
    probes on the same cached embeddings; the head is in the run dir name and the summary."""
    summaries = {p.parent: json.loads(p.read_text()) for p in tiny_sweep["out"].rglob("summary.json")}
    encoder = next(d for d, s in summaries.items()  # (eval/*/summary.json of evaluations have no "stage")
                   if (s.get("stage"), s.get("model"), s.get("latent")) == ("autoencode", "vae", 16))
    n_before = len(list(tiny_sweep["out"].rglob("checkpoints/best.pt")))
    # its own output_dir (other tests count the sweep's run dirs); the encoder quoted: its name holds '=' and ','
    out = tiny_sweep["tmp"] / "probes"
    run_embclf(["stage=classify", "head=knn", f"classify.encoder='{encoder}'", "classify.probes=[linear,logreg]",
                *TINY, "logger=none", "logger.projections=[pca]", f"output_dir={out}"], tiny_sweep["tmp"])
    (d,) = [p.parent for p in out.glob("*head=knn*/summary.json")]
    assert "head=knn" in d.name
    s = json.loads((d / "summary.json").read_text())
    assert s["status"] == "completed" and s["head"] == "knn" and s["stage"] == "classify"
    assert s["head_settings"] == {"k": 20, "temperature": 0.07}
    assert set(s["probes"]) == {"knn", "linear", "logreg"}
    for name, p in s["probes"].items():
        assert 0.0 <= p["val_accuracy"] <= 1.0 and 0.0 <= p["test_accuracy"] <= 1.0, (name, p)
    assert s["probes"]["knn"]["test_accuracy"] == s["test_accuracy"] > 0.15  # above chance on real embeddings
    assert references.encoder_run_of(d, s) == encoder.resolve() and (s["model"], s["latent"]) == ("vae", 16)
    assert len(list(tiny_sweep["out"].rglob("checkpoints/best.pt"))) == n_before and \
        not list(out.rglob("checkpoints"))  # nothing retrained, knn has no checkpoint
