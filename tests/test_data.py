"""The data path on the real CIFAR-10 subset: stratified subsets, val split, cache, clear errors."""
import time

import pytest
import torch
from omegaconf import OmegaConf

from embclf import data
from embclf.config import DataConfig, Source


def _cfg(tmp_path, **kw):
    cfg = OmegaConf.structured(DataConfig)
    cfg.cache_dir = str(tmp_path / "cache")
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_folder_subset_is_stratified_and_cached(tmp_path, cifar_root):
    cfg = _cfg(tmp_path, source=Source.folder, root=str(cifar_root), train_size=500, test_size=100, val_size=0.2)
    ds = data.load(cfg)
    assert ds.train.images.shape == (400, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert len(ds.val) == 100 and len(ds.test) == 100 and len(ds.classes) == 10
    assert ds.train.labels.bincount().tolist() == [40] * 10  # class-stratified
    assert ds.val.labels.bincount().tolist() == [10] * 10
    assert ds.train.labels.dtype == torch.int64
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3
    again = data.load(cfg)  # from the cache: identical tensors
    assert torch.equal(again.train.images, ds.train.images) and again.fingerprint == ds.fingerprint
    # train and val are disjoint: no val image is also a train image
    tr = {bytes(x.numpy()) for x in ds.train.images}
    assert not any(bytes(x.numpy()) in tr for x in ds.val.images)


def test_val_size_as_count(tmp_path, cifar_root):
    cfg = _cfg(tmp_path, source=Source.folder, root=str(cifar_root), train_size=300, test_size=50, val_size=50)
    ds = data.load(cfg)
    assert len(ds.train) == 250 and len(ds.val) == 50


def test_cifar10_offline_fails_fast_and_clearly(tmp_path):
    t0 = time.time()
    with pytest.raises(data.DataError) as e:
        data.load(_cfg(tmp_path, source=Source.cifar10, root=str(tmp_path / "nowhere")))
    assert time.time() - t0 < 30
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "data_batch_1" in msg and "data=folder" in msg
    assert not (tmp_path / "nowhere").exists()  # nothing half-written: no new data.root with a lock file in it
    (tmp_path / "kept").mkdir()  # a data.root the user made stays, without our lock in it
    with pytest.raises(data.DataError):
        data.load(_cfg(tmp_path, source=Source.cifar10, root=str(tmp_path / "kept" / "a" / "b")))
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_folder_errors_name_the_key(tmp_path):
    with pytest.raises(data.DataError, match="data.root"):
        data.load(_cfg(tmp_path, source=Source.folder, root=str(tmp_path)))


@pytest.mark.parametrize("key,value", [("train_size", 10**7), ("val_size", 0.0), ("test_size", 0)])
def test_impossible_sizes(tmp_path, cifar_root, key, value):
    cfg = _cfg(tmp_path, source=Source.folder, root=str(cifar_root), train_size=200, test_size=50)
    cfg[key] = value
    with pytest.raises(data.DataError, match=f"data.{key}"):
        data.load(cfg)


def test_folder_requires_root():
    from hydra import compose, initialize_config_dir

    from embclf.config import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", overrides=["data=folder"])
    assert cfg.data.root is None  # not the cifar10 default path
    with pytest.raises(data.DataError, match="data=folder needs data.root=PATH"):
        data.load(cfg.data)
