"""Reading an ImageFolder tree (``data=folder``): the classes and files of ``<root>/train`` and ``<root>/test``,
and each image decoded as a viewer shows it (EXIF orientation, 16-bit grayscale scaled, transparency on white),
resized to ``data.image_size``. ``embclf.data`` draws the subsets and caches the decoded pixels; this module only
reads files. Raises ``DataError`` (one paragraph naming the file or folder and the fix) for what cannot be read.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, List, Tuple

import numpy as np
import torch

from .errors import DataError

# logged as part of the data log (``embclf.data``: what users and tests filter on)
log = logging.getLogger("embclf.data")


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
    except Exception as e:  # noqa: BLE001 -- a malformed EXIF block must not make a readable image unreadable
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


def folder_tree(cfg) -> dict:
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


def folder_split(cfg, tree: dict, train: bool, cached_under: Path):
    """An ImageFolder split of ``tree`` (from ``folder_tree``) as (targets, decode, classes, paths, files)."""
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
                 workers, cached_under)
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
    return targets, decode, list(tree["classes"]), [p for p, _ in samples], split_listing(samples)


def split_listing(samples: List[Tuple[str, int]]):
    """``listing(idx) -> str``: sha1 hex of what the images ``idx`` (int array of positions in ``samples``) are
    decoded from. It covers every file's path and label in ``samples`` (which files there are decides the subset
    drawn) and the ``file_listing`` of the files at ``idx`` only (the files read: an edit elsewhere changes no
    decoded pixel). One ``lstat`` per file read instead of per file listed: train, val and test of a 500-image subset
    of CIFAR-10 cost 0.02-0.035 s (mostly hashing the 60,000 names), where the ``file_listing`` of all files took
    0.31-0.43 s per run (measured on the 2-core test machine, warm page cache)."""
    names = hashlib.sha1("".join(f"{p}\0{t}\n" for p, t in samples).encode("utf-8", "surrogateescape")).hexdigest()

    def listing(idx) -> str:
        return hashlib.sha1(f"{names}\n{file_listing(samples[int(i)] for i in idx)}".encode()).hexdigest()

    return listing


def _decode_workers() -> int:
    """Threads for decoding an image folder: every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
