"""``python -m embclf.embed RUN_DIR [data=...] [split=test|train|val] [format=npz|csv|pt] [key=value ...]``:
export a trained encoder's embeddings for use outside embclf (scikit-learn, pandas, UMAP...).

RUN_DIR is an autoencode run dir (its ``checkpoints/best.pt``, or ``checkpoint=last``), a classify run dir
(the encoder it was trained on) or a ``stage=all`` job dir (its ``autoencode/``). The images are the run's
data split (``split=test`` by default) or any other data given with the usual overrides, applied to the run's
saved config exactly as ``python -m embclf.evaluate`` applies them (``data=folder data.root=PATH``,
``data.test_size=null``, ``device=cpu``...). Each image is embedded by ``engine.embed``, as stage=classify does: the
encoder in eval mode, a VAE's posterior mean mu.

Writes ``RUN_DIR/export/embeddings_<split>.<format>`` (or ``out=PATH``):

- ``npz`` (default; ``numpy.load``): ``embeddings`` float32 [N, latent], ``labels`` int64 [N], ``paths`` str [N]
  (the image files of a ``data=folder`` tree; empty strings for torchvision sources, which have no files),
  ``classes`` str [K] (label i is ``classes[i]``).
- ``csv`` (``pandas.read_csv``): columns index, path, label, class, z0 ... z<latent-1>.
- ``pt`` (``torch.load(..., weights_only=True)``): a dict with the same four entries (tensors and lists).

Deterministic: the same command gives a byte-identical file (fixed zip timestamps in npz and pt, floats
written exactly). The file is written atomically. An existing file with the same bytes is left as it is;
one with other content (other data or checkpoint) is never overwritten: the command stops and names it.
Exit status 2 with a one-paragraph message for bad input.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import sys
import zipfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from . import data as data_mod
from . import engine, runs, runtime
from .artefacts import encoder_checkpoint, load_autoencoder
from .data import DataError
from .evaluate import CHECKPOINTS, SPLITS, check_writable, parse_args, run_config, run_stage
from .runtime import EmbclfError

log = logging.getLogger("embclf.embed")

FORMATS = ("npz", "csv", "pt")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold: no wall-clock time in the file


def npz_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
    """``arrays`` as an ``.npz`` archive (what ``numpy.savez`` writes, readable by ``numpy.load`` without
    pickle), but deterministic: ``numpy.savez`` stamps every entry with the current time, so two exports a
    second apart would differ; here every entry carries ``ZIP_DATE``. Raises ``ValueError`` for object arrays."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def csv_bytes(z: np.ndarray, labels: np.ndarray, paths, classes) -> bytes:
    """One row per image: index, path, label, class, z0..z<latent-1> (float32 values written exactly)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "path", "label", "class", *[f"z{j}" for j in range(z.shape[1])]])
    for i, (row, y) in enumerate(zip(z.tolist(), labels.tolist())):
        w.writerow([i, paths[i], y, classes[y] if 0 <= y < len(classes) else "", *map(repr, row)])
    return buf.getvalue().encode()


def pt_bytes(obj: dict) -> bytes:
    """``torch.save(obj)`` into memory: the archive's inner folder is then always named ``archive`` (saved to
    a file it is named after the file, so a temp file's name would leak in), and torch writes fixed dates."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_export(path: Path, blob: bytes) -> str:
    """Write ``blob`` to ``path`` atomically. Returns "written" or "unchanged" (same bytes already there).
    Raises ``EmbclfError`` when ``path`` holds other content: an earlier export is never overwritten."""
    if path.is_file():
        if hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(blob).digest():
            return "unchanged"
        raise EmbclfError(f"{path} exists with other embeddings (another data, split or checkpoint); it is never "
                          "overwritten. Move it away, or write elsewhere with out=PATH.")
    runs._atomic(path, lambda t: t.write_bytes(blob))
    return "written"


def check_out(path: Path, fmt: str, explicit: bool) -> None:
    """Refuse, before any work, an export path that cannot hold this export: empty, a folder, a suffix naming
    another format (``out=z.csv`` with ``format=npz``), or a place that cannot be created. Raises ``EmbclfError``."""
    what = f"out={path}" if explicit else f"the export file {path}"
    if explicit and not str(path).strip():
        raise EmbclfError("out=: give a file path, e.g. out=embeddings.npz (or leave out= out for RUN_DIR/export/).")
    if path.is_dir():
        raise EmbclfError(f"{what} is a folder; out= names the file to write, e.g. out={path / f'embeddings.{fmt}'}.")
    suffix = path.suffix.lstrip(".").lower()
    if suffix in FORMATS and suffix != fmt:
        raise EmbclfError(f"{what} ends in .{suffix} but format={fmt}: the file would hold {fmt} data. Use "
                          f"format={suffix}, or out={path.with_suffix('.' + fmt)}.")
    check_writable(path, what, f"Write the export elsewhere with out=PATH, e.g. out=/tmp/{path.name}.")


def _encoder_source(run_dir: Path, which: Optional[str]) -> Tuple[Path, Path]:
    """(the run dir whose config describes the data, the encoder checkpoint) for an autoencode run, a
    classify run or a stage=all job dir."""
    if runs.read_summary(run_dir) is None and (run_dir / "autoencode" / runs.SUMMARY).is_file():
        run_dir = run_dir / "autoencode"  # a stage=all job: its encoder
    stage, summary = run_stage(run_dir)
    if stage == "autoencode":
        return run_dir, run_dir / "checkpoints" / f"{which or 'best'}.pt"
    if which:
        raise EmbclfError(f"checkpoint={which}: a classify run embeds with the encoder it was trained on; to export "
                          "another checkpoint, pass the autoencode run dir.")
    return run_dir, encoder_checkpoint(run_dir, summary)


def export(argv: Sequence[str]) -> Tuple[Path, str, Tuple[int, int]]:
    """Run one export (see the module docstring). Returns (the file, "written" or "unchanged", (N, latent)).

    Raises ``EmbclfError`` / ``DataError`` for bad input, before anything is written."""
    run_dir, own, overrides = parse_args(argv, {"split": SPLITS, "format": FORMATS, "checkpoint": CHECKPOINTS,
                                                "out": None}, "embclf.embed")
    split_name, fmt = own.get("split", "test"), own.get("format", "npz")
    cfg_dir, ckpt = _encoder_source(run_dir, own.get("checkpoint"))
    log.info("encoder: %s", ckpt)
    path = Path(own["out"]).expanduser() if own.get("out") else run_dir / "export" / f"embeddings_{split_name}.{fmt}"
    check_out(path, fmt, "out" in own)  # before any work
    cfg = run_config(cfg_dir, overrides)
    device = runtime.setup(cfg)["device"]
    model, ck = load_autoencoder(ckpt, device, cfg.data.image_size, "encoder checkpoint")
    ds = data_mod.load(cfg.data)
    split = ds.split(split_name)
    z = engine.embed(model, split, device, 1000, ck["config"].get("precision", "fp32")).numpy().astype(np.float32)
    labels = split.labels.numpy().astype(np.int64)
    paths = list(split.paths) if split.paths is not None else [""] * len(labels)
    classes = list(ds.classes)
    if fmt == "npz":
        blob = npz_bytes({"embeddings": z, "labels": labels, "paths": np.array(paths, dtype=str),
                          "classes": np.array(classes, dtype=str)})
    elif fmt == "csv":
        blob = csv_bytes(z, labels, paths, classes)
    else:
        blob = pt_bytes({"embeddings": torch.from_numpy(z), "labels": torch.from_numpy(labels), "paths": paths,
                         "classes": classes})
    return path, write_export(path, blob), z.shape


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point. Returns the exit status (0, or 2 with a one-paragraph message on bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        path, what, shape = export(argv)
    except (EmbclfError, DataError) as e:
        print(f"embclf.embed: error: {e}", file=sys.stderr)
        return 2
    print(f"{what} {path}: embeddings float32 [{shape[0]}, {shape[1]}] (a VAE's posterior mean), labels, paths"
          + (" (identical to the file already there)" if what == "unchanged" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
