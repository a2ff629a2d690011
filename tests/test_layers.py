"""Layer-wise probes (``classify.layers``, embclf/layers.py): each stage's pooled features against a hand
computation, the names the key accepts, and one tiny classify run with every layer beside a plain one on the
same encoder (the code's accuracy is the plain run's; one entry per layer; the cache; the report's columns)."""
from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from embclf import identity, layers, runs, runtime
from embclf.config import conf_dir
from embclf.models import build_model
from embclf.stages import autoencode, classify
from embclf.validation import problems


def _compose(*overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=list(overrides))


def _pool2(h: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling of an even-sided map by hand: the mean of each quadrant, flattened channel-major."""
    b, c, hh, ww = h.shape
    return h.reshape(b, c, 2, hh // 2, 2, ww // 2).mean((3, 5)).flatten(1)


def test_conv_stages_pooled_and_the_code_from_one_pass():
    torch.manual_seed(0)
    cfg = _compose("model=vae", "model.channels=[8,16,32]", "model.strides=[2,1,2]")
    model = build_model(cfg.model, 6, 16).eval()
    x = torch.rand(5, 3, 16, 16)
    seen = []  # every block's output, taken by forward hooks on the trunk's own modules
    hooks = [blk.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone())) for blk in model.encoder.net]
    with torch.no_grad():
        mu = model.encode(x)[0]
        seen.clear()
        feats = model.encode_layers(x, ["code", "conv1", "conv2", "conv3"], pool=2)
    for h in hooks:
        h.remove()
    assert [tuple(s.shape) for s in seen] == [(5, 8, 8, 8), (5, 16, 8, 8), (5, 32, 4, 4)]  # one forward pass
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"conv1": (5, 32), "conv2": (5, 64), "conv3": (5, 128),
                                                              "code": (5, 6)}
    for name, h in zip(("conv1", "conv2", "conv3"), seen):
        torch.testing.assert_close(feats[name], _pool2(h))
    assert torch.equal(feats["code"], mu)  # the code is mu, bit for bit
    assert layers.stage_names(cfg.model) == model.encoder.stage_names == ["conv1", "conv2", "conv3"]
    assert set(model.encode_layers(x, ["conv2"])) == {"conv2"}


def test_resnet_stages():
    torch.manual_seed(0)
    cfg = _compose("model=resnet")
    model = build_model(cfg.model, 8, 32).eval()
    with torch.no_grad():
        feats = model.encode_layers(torch.rand(2, 3, 32, 32), layers.resolve("all", cfg.model), pool=layers.POOL)
    # channels x 2 x 2: stem 64, layer1 64, layer2 128, layer3 256, layer4 512
    assert {k: v.shape[1] for k, v in feats.items()} == {"code": 8, "stem": 256, "layer1": 256, "layer2": 512,
                                                         "layer3": 1024, "layer4": 2048}


def test_layer_names_accepted_and_refused():
    conv = _compose("model=ae").model
    assert layers.resolve("code", conv) == ["code"]
    assert layers.resolve("all", conv) == ["code", "conv1", "conv2", "conv3", "conv4", "conv5"]
    assert layers.resolve(["conv4", "conv2"], conv) == ["conv2", "conv4"]  # forward order; code is always probed
    with pytest.raises(runtime.EmbclfError, match=r"classify.layers=layer2: this encoder has no layer layer2\. "
                                                  r"Its layers are code, conv1, conv2"):
        layers.resolve("layer2", conv)
    assert problems(_compose("classify.layers=all")) == [] and problems(_compose("classify.layers=[code,conv2]")) == []
    bad = problems(_compose("classify.layers=[]"))
    assert len(bad) == 1 and bad[0].startswith("classify.layers=[] is invalid"), bad
    ident = identity.identity(_compose(), "classify")
    assert ident != identity.identity(_compose("classify.layers=all"), "classify")
    old = runs.resolved(_compose())  # a classify run written before the key: the code only
    del old["classify"]["layers"]
    assert identity.identity(old, "classify") == ident


@pytest.mark.parametrize("model, same, other", [
    ("ae", ["code", "[code]", "[code,code]"], "[code,conv2]"),
    ("ae", ["all", "[conv5,conv4,conv3,conv2,conv1,code]", "[code,conv1,conv2,conv3,conv4,conv5,conv1]"], "[conv5]"),
    ("ae", ["[conv2]", "[code,conv2]", "[conv2,code]", "conv2"], "all"),
    ("resnet", ["all", "[layer4,layer3,layer2,layer1,stem]"], "code"),
])
def test_spellings_of_one_set_of_layers_are_one_experiment(model, same, other):
    """classify.layers names the layers probed (the code always): every spelling of one set is one identity
    (one run dir, "already completed" for each), another set another. Its stored form is the ordered list."""
    idents = [identity.identity(_compose(f"model={model}", f"classify.layers={v}"), "classify") for v in same]
    assert all(i == idents[0] for i in idents), [i["classify"]["layers"] for i in idents]
    cfg = _compose(f"model={model}", f"classify.layers={same[0]}")
    want = layers.resolve(cfg.classify.layers, cfg.model)
    canonical = ["code", *[n for n in want if n != "code"]]
    # the code only is left out of the identity (as before the key existed: embclf/config.py ``added``)
    assert idents[0]["classify"].get("layers", ["code"]) == canonical
    assert ("layers" in idents[0]["classify"]) == (canonical != ["code"])
    assert identity.identity(_compose(f"model={model}", f"classify.layers={other}"), "classify") != idents[0]


@pytest.mark.slow
def test_classify_every_layer_beside_a_plain_run(tmp_path, cifar_root):
    threads = torch.get_num_threads()
    common = ("model=ae", "latent=8", "model.channels=[8,16]", "model.strides=[2,2]", "data=folder",
              f"data.root={cifar_root}", "data.train_size=200", "data.test_size=60", "data.image_size=16",
              f"data.cache_dir={tmp_path / 'cache'}", "autoencode.epochs=1", "autoencode.batch_size=50",
              "autoencode.image_epochs=[]", "classify.epochs=3", "logger=none", "logger.projections=[]",
              f"output_dir={tmp_path}", "threads=1")
    try:
        enc = autoencode.run(_compose(*common), tmp_path / "ae", [])
        plain = classify.run(_compose(*common), tmp_path / "plain", [], encoder=enc)
        every = classify.run(_compose(*common, "classify.layers=all"), tmp_path / "all", ["classify.layers=all"],
                             encoder=enc)
        with pytest.raises(runtime.EmbclfError, match="no layer layer3"):
            classify.run(_compose(*common, "classify.layers=[layer3]"), tmp_path / "bad", [], encoder=enc)
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())  # refused before writing
    p, a = runs.read_summary(plain), runs.read_summary(every)
    assert p["test_accuracy_by_layer"] == {"code": p["test_accuracy"]}
    assert list(a["test_accuracy_by_layer"]) == ["code", "conv1", "conv2"] == list(a["val_accuracy_by_layer"])
    assert a["test_accuracy_by_layer"]["code"] == p["test_accuracy"] == a["test_accuracy"]  # the same head, same code
    assert all(0 <= v <= 1 for v in a["test_accuracy_by_layer"].values())
    cache = runs.load_checkpoint(every / "layer_embeddings.pt", ("key", "train", "val", "test"))
    assert {k: tuple(v.shape) for k, v in cache["test"].items()} == {"conv1": (60, 32), "conv2": (60, 64)}
    assert cache["key"]["layers"] == ["conv1", "conv2"] and cache["key"]["pool"] == 2
    assert not (plain / "layer_embeddings.pt").exists()
    # the report: one column per layer, from the summary
    from embclf.report import rows as report_rows

    got = {r["classify_dir"]: r["probes"] for r in report_rows.collect([tmp_path]) if r.get("classify_dir")}
    assert got[str(every)]["layer:conv2"]["test"] == a["test_accuracy_by_layer"]["conv2"]
    assert not any(k.startswith("layer:") for k in got[str(plain)])
    assert json.loads((every / "identity.json").read_text()) != json.loads((plain / "identity.json").read_text())
