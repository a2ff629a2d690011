"""The decoded-image cache follows the files it is decoded from: an edit, a replacement, a move between class
folders or a re-pointed symlink is decoded again, never served from the cache; an unchanged tree is. Real JPEGs
copied from the CIFAR-10 tree into tmp_path; the CIFAR pickles torchvision reads are made in tmp_path too."""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageOps

from embclf import data, runs
from embclf.config import DataConfig, Source

CLASSES = ("airplane", "cat")


def _tree(root: Path, cifar: Path, offset: int = 0) -> Path:
    """An ImageFolder tree of real CIFAR-10 JPEGs: 8 train and 4 test images of two classes (starting at the
    ``offset``-th file, so two trees of different offsets hold different images under the same names)."""
    for split, n in (("train", 8), ("test", 4)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for k, src in enumerate(sorted((cifar / split / c).iterdir())[offset:offset + n]):
                shutil.copyfile(src, root / split / c / f"{k:02d}.jpg")
    return root


def _cfg(tmp_path, root, **kw):
    cfg = OmegaConf.structured(DataConfig)
    cfg.source, cfg.root, cfg.val_size = Source.folder, str(root), 4
    cfg.cache_dir = str(tmp_path / "cache")
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def _by_path(ds) -> dict:
    """{file: (uint8 [3, 32, 32], label)} over train, val and test."""
    out = {}
    for s in (ds.train, ds.val, ds.test):
        for p, x, y in zip(s.paths, s.images, s.labels.tolist()):
            out[p] = (x, y)
    return out


def _pixels(path) -> torch.Tensor:
    return data.read_image(str(path), 32)


def _caches(tmp_path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.pt")}


def test_unchanged_tree_is_served_from_the_cache(tmp_path, cifar_root, caplog):
    cfg = _cfg(tmp_path, _tree(tmp_path / "tree", cifar_root))
    first = data.load(cfg)
    written = _caches(tmp_path)
    assert len(written) == 3  # train, val, test
    with caplog.at_level(logging.INFO, logger="embclf.data"):
        again = data.load(cfg)
    assert _caches(tmp_path) == written  # read, not rewritten
    assert "decoding" not in caplog.text and caplog.text.count("from the cache") == 3
    assert torch.equal(again.train.images, first.train.images) and again.train.paths == first.train.paths
    assert (again.fingerprint, again.files) == (first.fingerprint, first.files)


def _edit_quantization_table(path: Path) -> None:
    """Change the JPEG's first quantization value in place: other pixels, the same size; then set the mtime
    back, as ``cp -p`` or ``touch -r`` would. Only the ctime tells the edit."""
    st = path.stat()
    blob = bytearray(path.read_bytes())
    dqt = blob.index(b"\xff\xdb")  # DQT marker, 2 length bytes, Pq/Tq, then the 64 values (8-bit)
    blob[dqt + 5] = blob[dqt + 5] + 7 if blob[dqt + 5] < 200 else blob[dqt + 5] - 7
    with open(path, "r+b") as f:  # in place: same file, same inode
        f.write(blob)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("how", ["mirror", "same_size_and_mtime"])
def test_a_file_edited_in_place_is_decoded_again(tmp_path, cifar_root, how):
    root = _tree(tmp_path / "tree", cifar_root)
    cfg = _cfg(tmp_path, root)
    before = data.load(cfg)
    f = root / "train" / "cat" / "03.jpg"
    old = _pixels(f)
    if how == "mirror":
        ImageOps.mirror(Image.open(f)).save(f, quality=95)  # same name, new pixels
    else:
        _edit_quantization_table(f)
    new = _pixels(f)
    assert not torch.equal(new, old)
    after = data.load(cfg)
    assert torch.equal(_by_path(after)[str(f)][0], new)
    assert after.files != before.files and after.fingerprint != before.fingerprint
    assert len(_caches(tmp_path)) == 3  # the stale cache files were replaced, not kept beside the new ones


def test_a_subset_keeps_its_cache_when_a_file_it_does_not_read_changes_not_when_one_is_added(tmp_path, cifar_root,
                                                                                             caplog):
    """The listing stats only the files a subset decodes (no lstat of all 60,000 CIFAR files per run), and it
    names every file of the split: an edit elsewhere changes no pixel and is served from the cache; an added
    file may change the subset drawn, so its split is decoded again; an edit of a file read is decoded again."""
    root = _tree(tmp_path / "tree", cifar_root)
    cfg = _cfg(tmp_path, root, train_size=8, test_size=4)
    before = data.load(cfg)
    read = set(_by_path(before))
    unread = next(p for p in sorted((root / "train" / "cat").iterdir()) if str(p) not in read)
    _edit_quantization_table(unread)
    with caplog.at_level(logging.INFO, logger="embclf.data"):
        same = data.load(cfg)
    assert "decoding" not in caplog.text and caplog.text.count("from the cache") == 3, caplog.text
    assert (same.files, same.fingerprint) == (before.files, before.fingerprint)
    f = Path(next(p for p in sorted(read) if "/train/" in p))
    _edit_quantization_table(f)
    edited = data.load(cfg)
    assert edited.files != before.files and torch.equal(_by_path(edited)[str(f)][0], _pixels(f))
    shutil.copyfile(sorted((cifar_root / "train" / "cat").iterdir())[50], root / "train" / "cat" / "99.jpg")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="embclf.data"):
        added = data.load(cfg)
    # train and val are decoded again; test/ did not change, so its cache is read
    assert added.files != edited.files and caplog.text.count("decoding") == 2, caplog.text
    assert caplog.text.count("from the cache") == 1 and "test split from the cache" in caplog.text, caplog.text


def test_a_replaced_file_is_decoded_again(tmp_path, cifar_root):
    root = _tree(tmp_path / "tree", cifar_root)
    cfg = _cfg(tmp_path, root)
    before = data.load(cfg)
    f = root / "test" / "airplane" / "01.jpg"
    other = tmp_path / "other.jpg"
    shutil.copy2(sorted((cifar_root / "test" / "airplane").iterdir())[50], other)  # keeps the source's mtime
    os.replace(other, f)  # as rsync or a "save as" replaces a file
    after = data.load(cfg)
    assert torch.equal(_by_path(after)[str(f)][0], _pixels(f))
    assert not torch.equal(_by_path(after)[str(f)][0], _by_path(before)[str(f)][0])
    assert after.files != before.files and after.fingerprint != before.fingerprint


def test_files_moved_between_class_folders_are_decoded_again(tmp_path, cifar_root):
    root = _tree(tmp_path / "tree", cifar_root)
    cfg = _cfg(tmp_path, root)
    before = data.load(cfg)
    # two mislabelled images put right: the same names and counts per class, so the same subset indices
    a, c = root / "train" / "airplane" / "05.jpg", root / "train" / "cat" / "05.jpg"
    plane, cat = _pixels(a), _pixels(c)
    os.rename(a, tmp_path / "swap.jpg")
    os.rename(c, a)
    os.rename(tmp_path / "swap.jpg", c)
    after = _by_path(data.load(cfg))
    assert torch.equal(after[str(a)][0], cat) and after[str(a)][1] == CLASSES.index("airplane")
    assert torch.equal(after[str(c)][0], plane) and after[str(c)][1] == CLASSES.index("cat")
    # one image moved to the other class: listed under its new folder, with that folder's label
    moved = root / "train" / "cat" / "moved.jpg"
    os.rename(root / "train" / "airplane" / "06.jpg", moved)
    after = _by_path(data.load(cfg))
    assert str(root / "train" / "airplane" / "06.jpg") not in after and after[str(moved)][1] == CLASSES.index("cat")
    assert torch.equal(after[str(moved)][0], _pixels(moved)) and len(after) == len(_by_path(before))


def _repoint(link: Path, target: Path) -> None:
    tmp = link.with_name(link.name + ".new")
    tmp.symlink_to(target)
    os.replace(tmp, link)  # atomic re-pointing, as `ln -sfn` does


def test_a_repointed_symlinked_root_is_decoded_again(tmp_path, cifar_root):
    v1, v2 = _tree(tmp_path / "v1", cifar_root), _tree(tmp_path / "v2", cifar_root, offset=20)
    root = tmp_path / "current"
    root.symlink_to(v1)
    cfg = _cfg(tmp_path, root)
    before = data.load(cfg)
    _repoint(root, v2)
    after = data.load(cfg)
    f = root / "train" / "cat" / "00.jpg"
    assert torch.equal(_by_path(after)[str(f)][0], _pixels(v2 / "train" / "cat" / "00.jpg"))
    assert not torch.equal(_by_path(before)[str(f)][0], _by_path(after)[str(f)][0])
    assert after.files != before.files and after.fingerprint != before.fingerprint
    _repoint(root, v1)
    assert data.load(cfg).fingerprint == before.fingerprint  # the same pixels again


@pytest.mark.parametrize("what", ["class folder", "file"])
def test_a_repointed_symlinked_class_folder_or_file_is_decoded_again(tmp_path, cifar_root, what):
    v1, v2 = _tree(tmp_path / "v1", cifar_root), _tree(tmp_path / "v2", cifar_root, offset=20)
    root = _tree(tmp_path / "tree", cifar_root, offset=40)
    if what == "class folder":
        link, old, new = root / "train" / "cat", v1 / "train" / "cat", v2 / "train" / "cat"
        shutil.rmtree(link)
    else:
        link, old, new = root / "test" / "cat" / "02.jpg", v1 / "test" / "cat" / "02.jpg", v2 / "test" / "cat" / "02.jpg"
        link.unlink()
    link.symlink_to(old)
    cfg = _cfg(tmp_path, root)
    before = data.load(cfg)
    _repoint(link, new)
    after = data.load(cfg)
    f = link / "00.jpg" if what == "class folder" else link
    assert torch.equal(_by_path(after)[str(f)][0], _pixels(new if what == "file" else new / "00.jpg"))
    assert after.files != before.files and after.fingerprint != before.fingerprint


def test_files_fingerprint_describes_the_files_and_is_recorded_in_provenance(tmp_path, cifar_root):
    from hydra import compose, initialize_config_dir

    from embclf import provenance
    from embclf.config import conf_dir

    root = _tree(tmp_path / "tree", cifar_root)
    cfg = _cfg(tmp_path, root)
    before = data.load(cfg)
    os.utime(root / "train" / "cat" / "00.jpg")  # touched: the files changed, their pixels did not
    after = data.load(cfg)
    assert after.files != before.files and after.fingerprint == before.fingerprint
    assert len(after.files) == 40 and int(after.files, 16) >= 0
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        full = compose("config", overrides=["data=folder", f"data.root={root}"])
    p = provenance.provenance(full, after.fingerprint, "cpu", files=after.files)["data"]
    assert p["fingerprint"] == after.fingerprint and p["files_fingerprint"] == after.files
    assert p["root_resolved"] == str(root.resolve())


# --- torchvision's CIFAR sources: the listing names every file torchvision reads ---------------------------

def _cifar_pickles(root: Path, source: str, seed: int) -> None:
    """CIFAR batch files in torchvision's format (random pixels) under ``root``: 2 images of every class in
    each batch file."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if source == "cifar10" else datasets.CIFAR100
    k = 10 if source == "cifar10" else 100
    label_key, names_key = ("labels", "label_names") if source == "cifar10" else ("fine_labels", "fine_label_names")
    folder = root / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, _ in cls.train_list + cls.test_list:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (2 * k, 3072), dtype=np.uint8),
                         label_key: [i % k for i in range(2 * k)]}, f)
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({names_key: [f"c{i}" for i in range(k)]}, f)


@pytest.mark.parametrize("source", ["cifar10", "cifar100"])
def test_cifar_cache_follows_the_files_torchvision_reads(tmp_path, monkeypatch, source):
    from torchvision import datasets
    from torchvision.datasets import cifar

    cls = datasets.CIFAR10 if source == "cifar10" else datasets.CIFAR100
    # the pickles made here cannot match torchvision's MD5s of the real archive: skip only that check
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    root = tmp_path / "cifar"
    _cifar_pickles(root, source, seed=0)
    cfg = _cfg(tmp_path, root, source=Source(source), val_size=0.5, download=False)
    opened = []

    def audit(event, args):  # every file the load opens, as Python's own audit event reports it
        if event == "open" and opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(args[0])))

    sys.addaudithook(audit)
    try:
        before = data.load(cfg)
        read = {p for p in opened if p.startswith(str(root.resolve()))}
    finally:
        opened = None  # an audit hook cannot be removed: switch it off
    listed = {str((root / cls.base_folder / n).resolve())
              for n in [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]}
    assert read and read <= listed
    _cifar_pickles(root, source, seed=1)  # the same files with other pixels
    after = data.load(cfg)
    expected = cls(str(root), train=False).data  # HWC uint8, all of test/
    assert torch.equal(after.test.images, torch.from_numpy(expected).permute(0, 3, 1, 2))
    assert after.files != before.files and after.fingerprint != before.fingerprint


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_a_cache_dir_that_cannot_be_written_warns_once_and_the_data_loads(tmp_path, cifar_root, caplog,
                                                                          small_tmpfs, how):
    """data.cache_dir on a full or read-only file system (real tmpfs): the cache is a speed-up, so the data
    loads as without it, one warning names data.cache_dir, and no temporary file is left to keep the disk full
    (torch reports the failed write as RuntimeError, not OSError)."""
    root = _tree(tmp_path / "tree", cifar_root)
    cache = small_tmpfs(64 << 10, ro=how == "read-only")
    if how == "full":  # full to the last byte, as a disk filled by other jobs
        with open(cache / "fill", "wb") as f:
            f.write(b"x" * shutil.disk_usage(cache).free)
    runs._cache_warned.clear()
    cfg = _cfg(tmp_path, root, cache_dir=str(cache))
    with caplog.at_level(logging.WARNING, logger="embclf"):
        ds = data.load(cfg)
    warned = [r.getMessage() for r in caplog.records if "could not write the data cache" in r.getMessage()]
    assert len(warned) == 1 and "data.cache_dir" in warned[0], caplog.text
    assert ("disk is full" if how == "full" else "read-only") in warned[0]
    assert [p.name for p in cache.iterdir()] == (["fill"] if how == "full" else [])  # nothing left behind
    fresh = data.load(_cfg(tmp_path / "other", root))  # the same images, decoded with a working cache
    assert torch.equal(ds.train.images, fresh.train.images) and ds.test.paths == fresh.test.paths
