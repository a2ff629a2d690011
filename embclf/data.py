"""Data path: decode each split once into a uint8 tensor [N, 3, S, S], keep it in memory, batch by index.

Sources (``data.source``): torchvision's CIFAR10 / CIFAR100 (downloaded into ``data.root`` when online, under
a file lock so the jobs of a sweep download once) or any ImageFolder tree (``<root>/train/<class>/*``,
``<root>/test/<class>/*``; what it may hold and how each image mode is decoded: ``docs/data.md``).
Decoded splits are cached as ``.pt`` files under ``data.cache_dir`` (default ``~/.cache/embclf/data``, never
inside ``data.root``, which may be read-only), keyed on a listing of the files they are decoded from (each
file's path, resolved path, size, mtime and ctime: ``file_listing``; for an image folder, of the files decoded
plus every file's path and label: ``image_folder.split_listing``) and the decode rules, so an edited, replaced,
added, removed, moved or re-pointed file is decoded again, never served from the cache. Subsets are class-stratified
(scikit-learn's ``train_test_split``) with a fixed seed, so the same config always sees the same images; the
validation split is held out of train the same way. There are no per-sample Python transforms in the
training loop: the stages index these tensors. Reading an ImageFolder tree's files: ``embclf/image_folder.py``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from . import faults, runs
from .validation import check_group
from .image_folder import file_listing, folder_split, folder_tree, read_image, to_rgb
from .runtime import DataError

# data.DataError, data.read_image, data.to_rgb: the names callers use (they live beside their code)
__all__ = ["DataError", "Dataset", "Split", "batches", "cache_dir", "download_once", "file_listing", "load",
           "read_image", "to_float", "to_rgb"]

log = logging.getLogger(__name__)


@dataclass
class Split:
    """One split in memory: ``images`` uint8 [N, 3, S, S] (pixels 0..255), ``labels`` int64 [N], and for
    image folders ``paths``, each image's file (None for torchvision sources, which have no files)."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: Optional[List[str]] = None

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "Split":
        """This split with images and labels on ``device`` (``Tensor.to`` copies nothing when already there)."""
        return Split(self.images.to(device), self.labels.to(device), self.paths)


@dataclass
class Dataset:
    """train / val / test splits and the class names (index = label).

    ``fingerprint`` describes the pixels (comparable across machines and copies of the data); ``files``
    describes the source files as they were read (their paths, sizes and times: it changes with any edit of a
    file read, any file added, removed or moved, or a re-pointed symlink, and differs between two copies of the
    same data)."""

    train: Split
    val: Split
    test: Split
    classes: List[str]
    fingerprint: str  # sha1 over the decoded pixels and labels of all three splits
    files: str = ""  # sha1 over the listings of the files train, val and test are decoded from

    def split(self, name: str) -> Split:
        return getattr(self, name)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32 [B, 3, S, S] in [0, 1] (on the tensor's device)."""
    return images.float().div_(255.0)


def _source(cfg) -> str:
    return getattr(cfg.source, "value", cfg.source)


def cache_dir(cfg) -> Path:
    """``data.cache_dir`` or ``~/.cache/embclf/data`` (honours ``XDG_CACHE_HOME``)."""
    if cfg.cache_dir:
        return Path(os.path.expanduser(cfg.cache_dir))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "embclf" / "data"


# --- raw sources: each returns (targets int64 [N], decode(indices) -> uint8 [n,3,S,S], classes, paths or None,
# files: the ``file_listing`` of the files the split is read from, or for an image folder a function of the
# indices decoded, ``image_folder.split_listing``) --

DOWNLOAD_LOCK = ".embclf-download.lock"


def download_once(root: Path, present, fetch) -> None:
    """Run ``fetch()`` unless ``present()``, holding an exclusive file lock ``root/.embclf-download.lock``.

    The jobs of a sweep start together with the same fresh ``data.root``; torchvision has no lock, so each
    would download and extract the same archive into the same folder and corrupt it. Under the lock, the
    first job downloads and the others wait, then find the files present. The lock is an OS lock (the
    ``filelock`` package): a killed holder releases it, so it can never go stale.

    Raises ``DataError`` when ``root`` cannot be created.
    """
    from filelock import FileLock, Timeout

    # the highest folder this call creates: removed again when the fetch leaves nothing but our lock in it
    # (offline, a failed run must not leave a new empty data.root behind)
    created = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.root={root}: cannot create it to download into ({e}); set data.root to a "
                        "writable directory.") from e
    lock = FileLock(str(root / DOWNLOAD_LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another job is downloading into %s; waiting for it (lock %s)", root, lock.lock_file)
        lock.acquire()
    try:
        if not present():
            fetch()
    finally:
        lock.release()
        if created is not None:
            _remove_if_only_lock(created, root)


def _remove_if_only_lock(top: Path, root: Path) -> None:
    """Remove ``top`` (created by :func:`download_once` above ``root``) when all it holds is the download lock:
    nothing was fetched. Anything else in it (a partial archive, another job's files) is left alone."""
    entries = [p for p in top.rglob("*")]
    if any(p.is_file() and p != root / DOWNLOAD_LOCK for p in entries):
        return
    (root / DOWNLOAD_LOCK).unlink(missing_ok=True)
    for d in sorted((p for p in [top, *entries] if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:  # another job created something meanwhile: keep it
            return


def _corrupt_files(cls, root: Path) -> List[Path]:
    """Files of a torchvision CIFAR source under ``root`` whose MD5 does not match: the archive itself, or
    the extracted folder (listed once) when one of its files is wrong."""
    from torchvision.datasets.utils import check_integrity

    bad = []
    archive = root / cls.filename
    if archive.is_file() and not check_integrity(str(archive), cls.tgz_md5):
        bad.append(archive)
    folder = root / cls.base_folder
    for name, md5 in cls.train_list + cls.test_list + [(cls.meta["filename"], cls.meta["md5"])]:
        if (folder / name).is_file() and not check_integrity(str(folder / name), md5):
            bad.append(folder)
            break
    return bad


def _torchvision_split(cfg, train: bool):
    from torchvision import datasets

    src = _source(cfg)
    cls = datasets.CIFAR10 if src == "cifar10" else datasets.CIFAR100
    root = Path(os.path.expanduser(cfg.root))

    def present():
        try:
            return cls(str(root), train=train, download=False)
        except RuntimeError:  # "Dataset not found or corrupted"
            return None

    def fetch():
        # torchvision's urllib download has no time-out; bound it so an offline machine fails in seconds
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)
        try:
            cls(str(root), train=train, download=True)
        except Exception as e:  # noqa: BLE001 -- URLError, socket.timeout, OSError, "File not found or corrupted": could not fetch
            log.warning("data=%s: download into %s failed (%s: %s)", src, root, type(e).__name__, e)
        finally:
            socket.setdefaulttimeout(old)

    ds = present()
    if ds is None and cfg.download:
        download_once(root, lambda: present() is not None, fetch)
        ds = present()
    if ds is None:
        corrupt = _corrupt_files(cls, root)
        if corrupt:
            again = "it is then downloaded again" if cfg.download else \
                "with data.download=true and network access it is downloaded again"
            raise DataError(
                f"data={src}: checksum mismatch, delete {' and '.join(str(p) for p in corrupt)} and run again "
                f"(a download that was cut off, or one written by two jobs at once); {again}.")
        folder = cls.base_folder
        files = ", ".join(n for n, _ in cls.train_list + cls.test_list)
        raise DataError(
            f"data={src}: the {src.upper()} files are not in data.root={root} (expected "
            f"{root / folder}/ with {files}) and could not be downloaded"
            f"{'' if cfg.download else ' (data.download=false)'}. Either run once with network access, "
            f"set data.root to a directory that holds {folder}/, or use a local ImageFolder copy with "
            f"data=folder data.root=PATH (PATH/train/<class>/*.jpg and PATH/test/<class>/*.jpg)."
        )
    # the files torchvision's CIFAR10/CIFAR100 read for this split: its batches and the class names
    names = [n for n, _ in (cls.train_list if train else cls.test_list)] + [cls.meta["filename"]]
    files = file_listing((str(root / cls.base_folder / n), 0) for n in names)
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    targets = torch.as_tensor(ds.targets, dtype=torch.int64)
    size = cfg.image_size
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                                 antialias=True).round().clamp(0, 255).to(torch.uint8)
    return (targets, (lambda idx: (images[torch.as_tensor(idx, dtype=torch.long)], None)), list(ds.classes), None,
            files)


def _typed(v) -> str:
    """A config number as the user wrote it: 0.1 stays 0.1, a count 10.0 reads 10."""
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _stratified(targets: np.ndarray, k: Optional[int], seed: int, key: str, typed: str, role: str, rest: str,
                pool: str, name_class, suggest, pool_key: str = ""):
    """Indices (kept, rest) of a class-stratified draw of ``k`` items out of ``len(targets)``; all if k is None.

    ``key``/``typed``: the config key and the value the user wrote (quoted in errors); ``role``/``rest``:
    what the drawn and the remaining images are ("validation"/"training"); ``pool``: what the
    ``len(targets)`` images are; ``name_class(i)``: class i by name (and folder); ``suggest(k, lo, hi)``:
    a working setting of ``key`` (as "key=value ...") for a draw of lo..hi items; ``pool_key``: the key whose
    value made the pool (``data.train_size`` for the val draw from a subset), advised when the pool is too small.

    Raises ``DataError`` when no class-stratified draw exists: fewer drawn (or remaining) images than
    classes, or a class with a single image (scikit-learn's ``train_test_split`` needs two per class).
    """
    n = len(targets)
    if k is None or k == n:
        return np.arange(n), np.arange(0)
    counts = np.bincount(targets)
    c = int((counts > 0).sum())
    single = np.flatnonzero(counts == 1)
    if n < 2 * c and 0 < k < n:
        raise DataError(
            f"{key}={typed}: the {n} {pool} cannot be split into {role} and {rest} images with at least one image of "
            f"each of the {c} classes on both sides (that needs at least {2 * c} images)"
            f"{f'; use {pool_key}={2 * c} or more' if pool_key else ''}.")
    if len(single):
        names = ", ".join(name_class(int(i)) for i in single[:5])
        raise DataError(
            f"{key}={typed}: class {names} {'has' if len(single) == 1 else 'have'} a single image among the {n} {pool}, "
            f"and a class-stratified draw of {role} images needs at least 2 images of every class. "
            f"{f'Use a larger {pool_key}, or add' if pool_key else 'Add'} images of that class, or remove its folder.")
    if k >= n:
        raise DataError(f"{key}={typed}: there are only {n} {pool}; use {suggest(k, c, n - c)}.")
    if k < c or n - k < c:
        what = f"gives {k} {role} images" if k < c else f"leaves {n - k} {rest} images"
        raise DataError(
            f"{key}={typed} {what} for {c} classes (of the {n} {pool}), and a class-stratified draw needs at least "
            f"one image of every class on both sides; use {suggest(k, c, n - c)}.")
    keep, rest_idx = train_test_split(np.arange(n), train_size=k, stratify=targets, random_state=seed)
    return np.sort(keep), np.sort(rest_idx)


def _decode_rules(cfg) -> list:
    """What, besides the files, decides the decoded pixels: the decoder's rules and the library that decodes."""
    if _source(cfg) == "folder":
        import PIL

        # v2: 16-bit, transparency and EXIF orientation decode differently than before; skipped files are not in
        # it. Pillow (and the libjpeg/libpng it bundles) may decode or resize a file differently across versions.
        return ["decode-v2", f"Pillow-{PIL.__version__}"]
    # torchvision's arrays are the pixels; only a resize (data.image_size other than 32) computes new ones
    return ["resize-bilinear-antialias", f"torch-{torch.__version__}"]


def _cached_decode(cfg, split: str, idx: np.ndarray, decode, targets: torch.Tensor,
                   paths: Optional[List[str]] = None, files: str = "") -> Split:
    """Decode ``idx`` once and cache it under ``cache_dir(cfg)``; a later load of the same files loads the .pt.

    The cache file is named after what selects the images (source, root, split, image size, indices,
    ``data.skip_corrupt``) and after what they are decoded from: ``files`` (the listing of the files ``idx`` is
    decoded from, ``file_listing`` or ``image_folder.split_listing``) and the decode rules. A cache file of the same
    selection but other files or rules is stale: it is never read, and is deleted when the new one is written. ``decode(idx)`` returns (uint8 images, keep) where keep is None or a
    bool mask of the decoded indices (``data.skip_corrupt``: unreadable images are left out). ``paths``: every
    file of the source split (image folders), of which the split keeps those of ``idx`` (and of ``keep``)."""
    picked = [paths[int(i)] for i in idx] if paths is not None else None
    selection = [_source(cfg), os.path.abspath(os.path.expanduser(cfg.root)), split, cfg.image_size,
                 hashlib.sha1(idx.tobytes()).hexdigest()]
    if _source(cfg) == "folder" and getattr(cfg, "skip_corrupt", False):
        selection.append("skip_corrupt")
    content = json.dumps([files, *_decode_rules(cfg)])
    stem = f"{_source(cfg)}-{split}-{hashlib.sha1(json.dumps(selection).encode()).hexdigest()[:16]}"
    path = cache_dir(cfg) / f"{stem}-{hashlib.sha1(content.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("content") == content:  # the full key, in case two keys share the name's 16 hex digits
                log.info("data: %s images of %s split from the cache %s (its files unchanged)", len(blob["labels"]),
                         split, path)
                return Split(blob["images"], blob["labels"], blob.get("paths", picked))
            log.warning("ignoring data cache %s: made from other files or decode rules", path)
        except Exception as e:  # noqa: BLE001 -- a truncated cache file is rebuilt, never trusted
            log.warning("ignoring unreadable data cache %s (%s)", path, e)
    images, keep = decode(idx)
    labels = targets[torch.as_tensor(idx, dtype=torch.long)].clone()
    if keep is not None:
        labels = labels[keep]
        if picked is not None:
            picked = [p for p, k in zip(picked, keep.tolist()) if k]
    # optional: a full or read-only cache dir warns once and the run goes on with the decoded images
    if runs.write_cache({"images": images, "labels": labels, "content": content,
                         **({"paths": picked} if picked is not None else {})}, path, "data cache",
                        "Point data.cache_dir at a writable directory with space to keep decoded images."):
        # the same selection decoded from files since changed: never read again, so reclaim its space (a job
        # still reading it has it open or fails to and decodes instead: ``torch.load`` errors are caught above)
        for old in path.parent.glob(f"{stem}-*.pt"):
            if old != path:
                try:
                    old.unlink()
                    log.info("deleted stale data cache %s (its files or decode rules changed)", old)
                except OSError:
                    pass
    return Split(images, labels, picked)


def load(cfg) -> Dataset:
    """Load the ``data`` config into memory: stratified subsets, a val split held out of train.

    Raises:
        DataError: a value the gate refuses (``validation.VALUE_RULES`` for ``data.*``), missing or unreadable files,
            sizes these images cannot meet (message names the key and the fix).
    """
    check_group(cfg, "data", DataError)  # the entrypoint checked the whole config; this is for direct callers
    source = _source(cfg)
    if source in ("cifar10", "cifar100"):
        raw = {s: _torchvision_split(cfg, s == "train") for s in ("train", "test")}
        where = {s: (lambda i, s=s: repr(raw[s][2][i])) for s in ("train", "test")}
    elif source == "folder":
        tree = folder_tree(cfg)
        raw = {s: folder_split(cfg, tree, s == "train", cache_dir(cfg)) for s in ("train", "test")}
        where = {s: (lambda i, s=s: f"{tree['classes'][i]!r} ({tree['dir'][s] / tree['classes'][i]})")
                 for s in ("train", "test")}
    else:  # the schema's enum has no other value
        raise AssertionError(source)
    seed = cfg.subset_seed
    tr_targets, tr_decode, classes, tr_paths, tr_files = raw["train"]
    te_targets, te_decode, _, te_paths, te_files = raw["test"]

    def count(key, n):  # a working count for data.train_size / data.test_size
        return lambda k, lo, hi: f"{key}={lo} or more" if k < lo else f"{key}={hi} or less (or null for all {n})"

    train_idx, _ = _stratified(tr_targets.numpy(), cfg.train_size, seed, "data.train_size", _typed(cfg.train_size),
                               "training", "unused", "training images", where["train"],
                               count("data.train_size", len(tr_targets)))
    test_idx, _ = _stratified(te_targets.numpy(), cfg.test_size, seed, "data.test_size", _typed(cfg.test_size),
                              "test", "unused", "test images", where["test"], count("data.test_size", len(te_targets)))
    # val is held out of the (subsetted) train split: model selection never looks at test
    v = cfg.val_size  # a fraction in (0, 1) or a whole count (validation.VALUE_RULES)
    n_train = len(train_idx)
    n_val = round(v * n_train) if v < 1 else int(v)

    def val_fix(k, lo, hi):
        if v >= 1:
            return f"data.val_size={lo} or more" if k < lo else f"data.val_size={hi} or less"
        # the smallest (or largest) fraction whose count lands in lo..hi: a multiple of 0.05 if one works
        fracs = [f / 100 for f in range(5, 100, 5) if lo <= round(f / 100 * n_train) <= hi] or \
            [f / 100 for f in range(1, 100) if lo <= round(f / 100 * n_train) <= hi]
        frac = (f"data.val_size={fracs[0]}" if k < lo else f"data.val_size={fracs[-1]}") if fracs else None
        count_ = f"data.val_size={lo}" if k < lo else f"data.val_size={hi}"
        return f"{frac} or a count such as {count_}" if frac else f"a count such as {count_}"

    pool = "training images" + (f" of data.train_size={_typed(cfg.train_size)}" if cfg.train_size is not None else "")
    val_pos, rest = _stratified(tr_targets.numpy()[train_idx], n_val, seed + 1, "data.val_size", _typed(cfg.val_size),
                                "validation", "training", pool, where["train"], val_fix,
                                "data.train_size" if cfg.train_size is not None else "")
    val_idx, train_idx = train_idx[val_pos], train_idx[rest]
    # what each split is decoded from; an image folder's listing stats only the files of the subset drawn
    listed = [files(idx) if callable(files) else files
              for files, idx in ((tr_files, train_idx), (tr_files, val_idx), (te_files, test_idx))]
    train = _cached_decode(cfg, "train", train_idx, tr_decode, tr_targets, tr_paths, listed[0])
    val = _cached_decode(cfg, "train", val_idx, tr_decode, tr_targets, tr_paths, listed[1])
    test = _cached_decode(cfg, "test", test_idx, te_decode, te_targets, te_paths, listed[2])
    for name, s, files_of in (("train", train, "train"), ("val", val, "train"), ("test", test, "test")):
        if not len(s):  # every image of it was skipped as unreadable (data.skip_corrupt=true)
            where = tree["dir"][files_of] if source == "folder" else f"data.root={cfg.root}"
            raise DataError(f"data: the {name} split holds no readable image (all of its images in {where} were "
                            "skipped as unreadable, data.skip_corrupt=true); a run needs images in every split. "
                            "Replace the unreadable files (the log names the first one).")
    h = hashlib.sha1()
    for s in (train, val, test):
        h.update(s.images.numpy())  # the buffer itself: no 150 MB copy for CIFAR-10
        h.update(s.labels.numpy())
    log.info("data %s: train %d, val %d, test %d images, %d classes", source, len(train), len(val), len(test), len(classes))
    files = hashlib.sha1("\n".join(listed).encode()).hexdigest()
    faults.fault_point("data.load")
    return Dataset(train, val, test, classes, h.hexdigest(), files)


def batches(n: int, batch_size: int, device, shuffle: bool, generator: Optional[torch.Generator] = None):
    """Yield index tensors (int64, on ``device``) covering range(n) in batches; a random permutation if shuffle.

    Training batches (``shuffle=True``) never have a single image: a size-1 tail is merged into the batch
    before it (one batch of ``batch_size + 1``), because BatchNorm in training mode cannot normalise one value
    per channel (the conv trunk's last BatchNorm sees a 1x1 feature map at ``data.image_size=8``, and the batch
    is then its only statistic). Every image is still seen once per epoch. Evaluation (``shuffle=False``)
    cuts batches as given: BatchNorm then uses its running statistics.
    """
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(device)
    starts = list(range(0, n, batch_size))
    if shuffle and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for j, i in enumerate(starts):
        yield order[i:starts[j + 1] if j + 1 < len(starts) else n]
