"""Data path: decode each split once into a uint8 tensor [N, 3, S, S], keep it in memory, batch by index.

Sources (``data.source``): torchvision's CIFAR10 / CIFAR100 (downloaded into ``data.root`` when online, under
a file lock so the jobs of a sweep download once) or any ImageFolder tree (``<root>/train/<class>/*``,
``<root>/test/<class>/*``; what it may hold and how each image mode is decoded: ``docs/data.md``).
Decoded splits are cached as ``.pt`` files under ``data.cache_dir`` (default ``~/.cache/embclf/data``, never
inside ``data.root``, which may be read-only), keyed on a listing of the files they are decoded from (each
file's path, resolved path, size, mtime and ctime: ``file_listing``) and the decode rules, so an edited,
replaced, moved or re-pointed file is decoded again, never served from the cache. Subsets are class-stratified
(scikit-learn's ``train_test_split``) with a fixed seed, so the same config always sees the same images; the
validation split is held out of train the same way. There are no per-sample Python transforms in the
training loop: the stages index these tensors.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from . import runs
from .config import check_group

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
    """train / val / test splits and the class names (index = label).

    ``fingerprint`` describes the pixels (comparable across machines and copies of the data); ``files``
    describes the source files as they were read (their paths, sizes and times: it changes with any edit,
    move or re-pointed symlink, and differs between two copies of the same data)."""

    train: Split
    val: Split
    test: Split
    classes: List[str]
    fingerprint: str  # sha1 over the decoded pixels and labels of all three splits
    files: str = ""  # sha1 over the listing of the source files (``file_listing`` of train, then test)

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


def file_listing(files: Iterable[Tuple[str, int]]) -> str:
    """sha1 hex of a cheap description of ``files`` [(path, label), ...], in their order: each file's path as
    listed, its resolved path (symlinked root, class folder or file followed), its label, and the size,
    mtime_ns, ctime_ns and inode of the file it resolves to.

    It changes when a file is edited (mtime, ctime), replaced (inode, ctime), moved between class folders
    (path, label), added or removed, or when a symlink on its way is re-pointed (resolved path), so a cache
    keyed on it is never served stale. ctime cannot be set back by a tool (``touch -r``, ``cp -p``, an
    un-tar keep the old mtime), so an edit that keeps size and mtime is caught as well. Costs one ``lstat``
    per file (plus a ``realpath`` per folder and per symlinked file): about 0.2 s for CIFAR-10's 60,000
    files on a warm page cache. A path that cannot be stat'ed (a broken symlink) is listed as missing; the
    decoder reports it.
    """
    h = hashlib.sha1()
    resolved_dirs = {}
    for path, label in files:
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                real, st = os.path.realpath(path), os.stat(path)
            else:  # resolve the folder once, not every file (realpath lstat's every component)
                folder, name = os.path.split(path)
                real = resolved_dirs.get(folder)
                if real is None:
                    real = resolved_dirs[folder] = os.path.realpath(folder)
                real = os.path.join(real, name)
            h.update(f"{path}\0{real}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n"
                     .encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(f"{path}\0{label}\0missing\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# --- raw sources: each returns (targets int64 [N], decode(indices) -> uint8 [n,3,S,S], classes, paths or None,
# files: the ``file_listing`` of the files the split is read from) --

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
        except Exception as e:  # URLError, socket.timeout, OSError, "File not found or corrupted": could not fetch
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


# Extensions read as images: torchvision's IMG_EXTENSIONS plus the other common ones Pillow opens
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp",
                    ".tif", ".tiff", ".webp", ".gif", ".tga", ".qoi", ".avif")
# Folders and files that are never classes or images: dot-names (.ipynb_checkpoints/, .DS_Store, macOS's
# AppleDouble ._x.jpg, .git/) and the __MACOSX/ folder macOS zips carry
HIDDEN_NAMES = ("__MACOSX",)
# Transparent pixels are composited onto this background (what a viewer shows on a white page); dropping
# the alpha channel instead would expose whatever colour the file stores under transparent pixels
ALPHA_BACKGROUND = (255, 255, 255)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in HIDDEN_NAMES


def to_rgb(im):
    """A Pillow image of any mode as an 8-bit RGB Pillow image with the pixels a viewer shows.

    * EXIF orientation is applied (a phone photo stored sideways is turned upright, as viewers show it).
    * 16-bit and 32-bit integer grayscale (modes ``I;16*``, ``I``: 16-bit PNG/TIFF/PGM) is scaled from
      0..65535 to 0..255 (round(v / 257); values outside are clipped). Pillow's own ``convert`` clips at
      255, which turns almost every 16-bit image white.
    * Transparency (RGBA, LA, PA, RGBa, a palette or L/RGB image with a ``transparency`` entry) is
      composited onto white (``ALPHA_BACKGROUND``).
    * Everything else (L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX) uses Pillow's ``convert("RGB")``; CMYK is
      converted without a colour profile.

    Raises ``ValueError`` for 32-bit float images (mode ``F``): they have no defined pixel range.
    """
    from PIL import Image, ImageOps

    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception as e:  # a malformed EXIF block must not make a readable image unreadable
        log.debug("ignoring unreadable EXIF orientation of %s (%s)", getattr(im, "filename", "image"), e)
    if im.mode == "F":
        raise ValueError("32-bit float pixels (mode F) have no defined range; save the image with 8-bit pixels")
    if im.mode == "I" or im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray(((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, ALPHA_BACKGROUND + (255,)), im)
    return im.convert("RGB")


def read_image(path: str, size: int) -> torch.Tensor:
    """Decode one image file to uint8 [3, size, size] (pixels 0..255), via ``to_rgb``.

    Images of another size are resized to size x size (not cropped: the aspect ratio is not kept) with
    Pillow's bicubic filter, which is antialiased when shrinking. An animated or multi-page file gives
    its first frame.

    Raises ``DataError`` naming ``path`` when the file cannot be decoded (truncated, corrupt, not an image,
    too large for Pillow's decompression-bomb limit, or a mode ``to_rgb`` refuses).
    """
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    try:
        with Image.open(path) as im:
            im = to_rgb(im)
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return pil_to_tensor(im)
    except Exception as e:  # OSError, UnidentifiedImageError, DecompressionBombError, SyntaxError, ValueError...
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}. Remove or replace the file, or set "
                        "data.skip_corrupt=true to skip unreadable images (they are counted in the log).") from e


def _scan_folder(split_dir: Path, class_to_idx: dict) -> tuple:
    """(samples [(path, label)], skipped {"hidden": n, "other": n, "example": path}) of an ImageFolder split,
    with torchvision's ``make_dataset``; hidden and non-image files are skipped and counted."""
    from torchvision.datasets.folder import make_dataset

    skipped = {"hidden": 0, "other": 0, "example": None}
    prefix = len(os.path.join(str(split_dir), ""))

    def valid(path: str) -> bool:  # called once per file: plain string operations (60,000 files in ~0.1 s)
        rel = path[prefix:]
        if (rel.startswith(".") or os.sep + "." in rel or "__MACOSX" in rel) and \
                any(_hidden(part) for part in rel.split(os.sep)):
            skipped["hidden"] += 1
            return False
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            skipped["other"] += 1
            skipped["example"] = skipped["example"] or path
            return False
        return True

    return make_dataset(str(split_dir), class_to_idx, is_valid_file=valid, allow_empty=True), skipped


def _folder_tree(cfg) -> dict:
    """Scan ``data.root``'s train/ and test/ trees with torchvision's ``make_dataset``.

    Returns {"classes": [name, ...] (index = label), "samples": {"train"|"test": [(path, label), ...]},
    "dir": {"train"|"test": Path}}. Hidden and non-image files are skipped and counted in the log.

    The classes are train/'s class folders (sorted, hidden ones excluded) and their labels are used for
    test/ as well, so a class missing from test/ cannot shift the labels of the others.

    Raises ``DataError``: no train/ or test/, no class folder, an empty class folder in train/, or a class
    folder in test/ that train/ does not have.
    """
    if cfg.root in (None, "", "???"):
        raise DataError("data=folder needs data.root=PATH, a directory with train/<class>/* and test/<class>/* "
                        "(e.g. data.root=../shared/data/cifar10).")
    top = Path(os.path.expanduser(cfg.root))
    dirs = {}
    for split in ("train", "test"):
        d = top / split
        if not d.is_dir():
            raise DataError(
                f"data.root={cfg.root}: no '{split}/' folder at {d}. data=folder expects an ImageFolder "
                f"tree PATH/train/<class>/*.jpg and PATH/test/<class>/*.jpg; set data.root to its top directory.")
        dirs[split] = sorted(e.name for e in os.scandir(d) if e.is_dir() and not _hidden(e.name))
    classes = dirs["train"]
    if not classes:
        loose = sum(1 for e in os.scandir(top / "train") if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        raise DataError(f"data.root={cfg.root}: {top / 'train'} has no class folder"
                        f"{f' (it holds {loose} images directly)' if loose else ''}. data=folder expects one folder "
                        f"per class: PATH/train/<class>/*.jpg and PATH/test/<class>/*.jpg.")
    extra = [c for c in dirs["test"] if c not in classes]
    if extra:
        raise DataError(
            f"data.root={cfg.root}: test/ has class folder(s) {', '.join(str(top / 'test' / c) for c in extra[:5])} "
            f"that train/ does not have ({len(classes)} classes: {', '.join(classes[:10])}"
            f"{', ...' if len(classes) > 10 else ''}). The labels come from train/'s class folders; rename or "
            f"remove the extra folder(s) so test/ holds only classes of train/.")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    out = {}
    for split in ("train", "test"):
        d = top / split
        samples, skipped = _scan_folder(d, class_to_idx)
        if skipped["hidden"] or skipped["other"]:
            log.info("%s: skipped %d hidden file(s) and %d non-image file(s)%s", d, skipped["hidden"],
                     skipped["other"], f" (e.g. {skipped['example']})" if skipped["example"] else "")
        if not samples:  # nothing to train on or to report on: refused before any training
            raise DataError(
                f"data.root={cfg.root}: {d} holds no images ({_what_is_there(d, classes)}). data=folder needs "
                f"images in every split: PATH/{split}/<class>/*.jpg (files with {', '.join(IMAGE_EXTENSIONS[:5])}, "
                "... extensions; hidden files never count). Add images there, or point data.root at a complete tree.")
        counts = np.bincount([t for _, t in samples], minlength=len(classes))
        empty = [c for c, k in zip(classes, counts) if k == 0]
        if empty and split == "train":
            raise DataError(
                f"data.root={cfg.root}: class folder(s) {', '.join(str(d / c) for c in empty[:5])}"
                f"{f' (and {len(empty) - 5} more)' if len(empty) > 5 else ''} hold no images (files with "
                f"{', '.join(IMAGE_EXTENSIONS[:5])}, ... extensions; hidden files never count). Add images or "
                "remove the folder(s).")
        if empty:
            log.warning("data.root=%s: test/ has no images of class(es) %s (no folder, or an empty one); their "
                        "labels stay those of train/, and their test accuracy is undefined", cfg.root,
                        ", ".join(empty[:10]))
        out[split] = samples
    return {"classes": classes, "samples": out, "dir": {s: top / s for s in ("train", "test")}}


def _what_is_there(d: Path, classes: List[str]) -> str:
    """What an image-less split folder ``d`` holds, for the error message."""
    folders = [c for c in classes if (d / c).is_dir()]
    if not folders:
        return "no class folder"
    return f"{len(folders)} class folder(s), all without images: {', '.join(str(d / c) for c in folders[:3])}" + \
        (", ..." if len(folders) > 3 else "")


def _folder_split(cfg, tree: dict, train: bool):
    """An ImageFolder split of ``tree`` (from ``_folder_tree``) as (targets, decode, classes, paths, files)."""
    from PIL import ImageFile

    split = "train" if train else "test"
    samples, root = tree["samples"][split], tree["dir"][split]
    size = cfg.image_size
    skip = cfg.skip_corrupt

    def decode_one(path: str):
        try:
            return read_image(path, size)
        except DataError as e:
            if not skip:
                raise
            return e

    def decode(idx):
        paths = [samples[int(i)][0] for i in idx]
        workers = _decode_workers()
        log.info("decoding %d images of %s with %d thread(s); cached for later runs under %s", len(paths), root,
                 workers, cache_dir(cfg))
        out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
        keep = torch.ones(len(paths), dtype=torch.bool)
        bad = []
        # a library that set LOAD_TRUNCATED_IMAGES would make truncated files decode as grey padding
        old, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            # Pillow releases the GIL while it decodes, so threads use every core (CIFAR-10's 60,000 JPEGs take
            # ~14 s on one core); map keeps the order, and the first failure is raised with its path
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for k, img in enumerate(pool.map(decode_one, paths, chunksize=256)):
                    if isinstance(img, DataError):
                        keep[k] = False
                        bad.append(img)
                    else:
                        out[k] = img
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old
        if bad:
            log.warning("data.skip_corrupt=true: skipped %d unreadable image(s) of %s; first: %s", len(bad), root,
                        bad[0])
            return out[keep], keep
        return out, None

    targets = torch.as_tensor([t for _, t in samples], dtype=torch.int64)
    return targets, decode, list(tree["classes"]), [p for p, _ in samples], file_listing(samples)


def _decode_workers() -> int:
    """Threads for decoding an image folder: every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


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
    ``data.skip_corrupt``) and after what they are decoded from: ``files`` (the split's ``file_listing``) and the
    decode rules. A cache file of the same selection but other files or rules is stale: it is never read, and
    is deleted when the new one is written. ``decode(idx)`` returns (uint8 images, keep) where keep is None or a
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
        except Exception as e:  # a truncated cache file is rebuilt, never trusted
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
        DataError: a value the gate refuses (``config.VALUE_RULES`` for ``data.*``), missing or unreadable files,
            sizes these images cannot meet (message names the key and the fix).
    """
    check_group(cfg, "data", DataError)  # the entrypoint checked the whole config; this is for direct callers
    source = _source(cfg)
    if source in ("cifar10", "cifar100"):
        raw = {s: _torchvision_split(cfg, s == "train") for s in ("train", "test")}
        where = {s: (lambda i, s=s: repr(raw[s][2][i])) for s in ("train", "test")}
    elif source == "folder":
        tree = _folder_tree(cfg)
        raw = {s: _folder_split(cfg, tree, s == "train") for s in ("train", "test")}
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
    v = cfg.val_size  # a fraction in (0, 1) or a whole count (config.VALUE_RULES)
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
    train = _cached_decode(cfg, "train", train_idx, tr_decode, tr_targets, tr_paths, tr_files)
    val = _cached_decode(cfg, "train", val_idx, tr_decode, tr_targets, tr_paths, tr_files)
    test = _cached_decode(cfg, "test", test_idx, te_decode, te_targets, te_paths, te_files)
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
    files = hashlib.sha1(f"{tr_files}\n{te_files}".encode()).hexdigest()
    runs.fault_point("data.load")
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
