"""Data path: decode each split once into a uint8 tensor [N, 3, S, S], keep it in memory, batch by index.

Sources (``data.source``): torchvision's CIFAR10 / CIFAR100 (download into ``data.root`` when online) or any
ImageFolder tree (``<root>/train/<class>/*``, ``<root>/test/<class>/*``). Decoded splits are cached as
``.pt`` files under ``data.cache_dir`` (default ``~/.cache/embclf/data``, never inside ``data.root``, which
may be read-only). Subsets are class-stratified (scikit-learn's ``train_test_split``) with a fixed seed, so
the same config always sees the same images; the validation split is held out of train the same way.
There are no per-sample Python transforms in the training loop: the stages index these tensors.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from sklearn.model_selection import train_test_split

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A data source is missing, unreadable or misconfigured; the message says how to fix it."""


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
    """train / val / test splits and the class names (index = label)."""

    train: Split
    val: Split
    test: Split
    classes: List[str]
    fingerprint: str  # sha1 over the decoded pixels and labels of all three splits

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
        return Path(os.path.expanduser(str(cfg.cache_dir)))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "embclf" / "data"


# --- raw sources: each returns (targets int64 [N], decode(indices) -> uint8 [n,3,S,S], classes, paths or None) --

def _torchvision_split(cfg, train: bool):
    from torchvision import datasets

    src = _source(cfg)
    cls = datasets.CIFAR10 if src == "cifar10" else datasets.CIFAR100
    root = Path(os.path.expanduser(str(cfg.root)))
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:
        ds = None
    if ds is None and cfg.download:
        # torchvision's urllib download has no time-out; bound it so an offline machine fails in seconds
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as e:  # URLError, socket.timeout, OSError: all mean "could not fetch"
            log.debug("download failed: %r", e)
            ds = None
        finally:
            socket.setdefaulttimeout(old)
    if ds is None:
        folder = cls.base_folder
        files = ", ".join(n for n, _ in cls.train_list + cls.test_list)
        raise DataError(
            f"data={src}: the {src.upper()} files are not in data.root={root} (expected "
            f"{root / folder}/ with {files}) and could not be downloaded"
            f"{'' if cfg.download else ' (data.download=false)'}. Either run once with network access, "
            f"set data.root to a directory that holds {folder}/, or use a local ImageFolder copy with "
            f"data=folder data.root=PATH (PATH/train/<class>/*.jpg and PATH/test/<class>/*.jpg)."
        )
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    targets = torch.as_tensor(ds.targets, dtype=torch.int64)
    size = int(cfg.image_size)
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                                 antialias=True).round().clamp(0, 255).to(torch.uint8)
    return targets, (lambda idx: images[torch.as_tensor(idx, dtype=torch.long)]), list(ds.classes), None


def _folder_split(cfg, train: bool):
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    if cfg.root in (None, "", "???"):
        raise DataError("data=folder needs data.root=PATH, a directory with train/<class>/* and test/<class>/* "
                        "(e.g. data.root=../shared/data/cifar10).")
    root = Path(os.path.expanduser(str(cfg.root))) / ("train" if train else "test")
    if not root.is_dir():
        raise DataError(
            f"data.root={cfg.root}: no '{root.name}/' folder at {root}. data=folder expects an ImageFolder "
            f"tree PATH/train/<class>/*.jpg and PATH/test/<class>/*.jpg; set data.root to its top directory."
        )
    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"data.root={cfg.root}: {root} is not an ImageFolder tree ({e}).") from e
    size = int(cfg.image_size)

    def decode_one(path: str) -> torch.Tensor:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BICUBIC)
                return pil_to_tensor(im)
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e}. Remove or replace the file.") from e

    def decode(idx) -> torch.Tensor:
        paths = [folder.samples[int(i)][0] for i in idx]
        workers = _decode_workers()
        log.info("decoding %d images of %s with %d thread(s); cached for later runs under %s", len(paths), root,
                 workers, cache_dir(cfg))
        out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
        # Pillow releases the GIL while it decodes, so threads use every core (CIFAR-10's 60,000 JPEGs take
        # ~14 s on one core); map keeps the order, and the first failure is raised with its path
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for k, img in enumerate(pool.map(decode_one, paths, chunksize=256)):
                out[k] = img
        return out

    return torch.as_tensor(folder.targets, dtype=torch.int64), decode, list(folder.classes), \
        [p for p, _ in folder.samples]


def _decode_workers() -> int:
    """Threads for decoding an image folder: every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _stratified(targets: np.ndarray, k: Optional[int], seed: int, what: str):
    """Indices (kept, rest) of a class-stratified draw of ``k`` items out of ``len(targets)``; all if k is None."""
    n = len(targets)
    if k is None or k == n:
        return np.arange(n), np.arange(0)
    if not 0 < k < n:
        raise DataError(f"{what}={k} must be between 1 and the {n} images available"
                        f"{'' if what == 'data.val_size' else ' (or null for all)'}.")
    try:
        keep, rest = train_test_split(np.arange(n), train_size=k, stratify=targets, random_state=seed)
    except ValueError as e:  # e.g. fewer items than classes
        raise DataError(f"{what}={k}: cannot draw a class-stratified subset ({e}); use a larger value.") from e
    return np.sort(keep), np.sort(rest)


def _cached_decode(cfg, split: str, idx: np.ndarray, decode, targets: torch.Tensor,
                   paths: Optional[List[str]] = None) -> Split:
    """Decode ``idx`` once and cache it; a later run with the same source, root, size and indices loads the .pt.
    ``paths``: every file of the source split (image folders), of which the split keeps those of ``idx``."""
    picked = [paths[int(i)] for i in idx] if paths is not None else None
    key = json.dumps([_source(cfg), os.path.abspath(os.path.expanduser(str(cfg.root))), split,
                      int(cfg.image_size), hashlib.sha1(idx.tobytes()).hexdigest()])
    path = cache_dir(cfg) / f"{_source(cfg)}-{split}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return Split(blob["images"], blob["labels"], picked)
        except Exception as e:  # a truncated cache file is rebuilt, never trusted
            log.warning("ignoring unreadable data cache %s (%s)", path, e)
    images = decode(idx)
    labels = targets[torch.as_tensor(idx, dtype=torch.long)].clone()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": images, "labels": labels}, tmp)
        os.replace(tmp, path)  # atomic: concurrent jobs never see a half-written cache
    except OSError as e:
        log.warning("could not write data cache %s (%s); continuing without it", path, e)
    return Split(images, labels, picked)


def load(cfg) -> Dataset:
    """Load the ``data`` config into memory: stratified subsets, a val split held out of train.

    Raises:
        DataError: missing or unreadable files, impossible sizes (message names the key and the fix).
    """
    source = _source(cfg)
    if source in ("cifar10", "cifar100"):
        raw = {s: _torchvision_split(cfg, s == "train") for s in ("train", "test")}
    elif source == "folder":
        raw = {s: _folder_split(cfg, s == "train") for s in ("train", "test")}
    else:  # unreachable through the schema's enum; kept for direct callers
        raise DataError(f"data.source={source!r} is unknown; use cifar10, cifar100 or folder")
    seed = int(cfg.subset_seed)
    tr_targets, tr_decode, classes, tr_paths = raw["train"]
    te_targets, te_decode, _, te_paths = raw["test"]
    train_idx, _ = _stratified(tr_targets.numpy(), cfg.train_size, seed, "data.train_size")
    test_idx, _ = _stratified(te_targets.numpy(), cfg.test_size, seed, "data.test_size")
    # val is held out of the (subsetted) train split: model selection never looks at test
    v = float(cfg.val_size)
    n_val = round(v * len(train_idx)) if 0 < v < 1 else int(v)
    if v <= 0 or n_val < 1 or (v >= 1 and v != int(v)):
        raise DataError(f"data.val_size={cfg.val_size} must be a fraction in (0, 1) or a positive count: "
                        "the best checkpoint is chosen on val, never on test.")
    val_pos, rest = _stratified(tr_targets.numpy()[train_idx], n_val, seed + 1, "data.val_size")
    val_idx, train_idx = train_idx[val_pos], train_idx[rest]
    train = _cached_decode(cfg, "train", train_idx, tr_decode, tr_targets, tr_paths)
    val = _cached_decode(cfg, "train", val_idx, tr_decode, tr_targets, tr_paths)
    test = _cached_decode(cfg, "test", test_idx, te_decode, te_targets, te_paths)
    h = hashlib.sha1()
    for s in (train, val, test):
        h.update(s.images.numpy())  # the buffer itself: no 150 MB copy for CIFAR-10
        h.update(s.labels.numpy())
    log.info("data %s: train %d, val %d, test %d images, %d classes", source, len(train), len(val), len(test), len(classes))
    return Dataset(train, val, test, classes, h.hexdigest())


def batches(n: int, batch_size: int, device, shuffle: bool, generator: Optional[torch.Generator] = None):
    """Yield index tensors (int64, on ``device``) covering range(n) in batches; a random permutation if shuffle."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(device)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]
