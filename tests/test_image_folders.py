"""ImageFolder trees built with Pillow in tmp_path: every image mode decodes to the right RGB pixels, hidden and
non-image files never become classes or images, labels agree between train/ and test/, corrupt files and
impossible subset sizes fail with messages naming the file or the typed value. Plus the CIFAR download lock,
the size-1 training batch and projections of degenerate embeddings. All in-process and small (8x8 images)."""
from __future__ import annotations

import io
import logging
import multiprocessing
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from embclf import data
from embclf.config import DataConfig, Source

from conftest import zygote_python

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _cfg(tmp_path, root, **kw):
    cfg = OmegaConf.structured(DataConfig)
    cfg.source, cfg.root, cfg.image_size = Source.folder, str(root), 8
    cfg.cache_dir = str(tmp_path / "cache")
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def _tree(root: Path, spec: dict) -> Path:
    """spec: {"train/a": n or [colour, ...], ...}: n solid images per class folder, coloured by class."""
    colours = {}
    for folder, content in spec.items():
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        cls = d.name
        colour = colours.setdefault(cls, tuple(int(x) for x in np.random.default_rng(len(colours)).integers(0, 256, 3)))
        for k in range(content):
            Image.new("RGB", (8, 8), colour).save(d / f"{k}.png")
    return root


# --- every mode Pillow opens -> the RGB a viewer shows ------------------------------------------------

def _png(im, path, **kw):
    im.save(path, **kw)
    return path


def _cases(tmp: Path):
    """(name, file, expected uint8 [8, 8, 3] or a per-pixel check)."""
    a16 = np.full((8, 8), 40000, dtype=np.uint16)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (10, 20, 30, 0)  # transparent: its stored colour must not show
    rgba[:, 4:] = (10, 20, 30, 255)
    pal = Image.new("P", (8, 8))
    pal.putpalette([10, 20, 30, 200, 100, 50])
    pal.paste(1, (4, 0, 8, 8))
    la = Image.fromarray(np.dstack([np.full((8, 8), 90, np.uint8), np.r_[np.zeros((4, 8)), np.full((4, 8), 255)].astype(np.uint8)]), "LA")
    white, half = np.full((8, 8, 3), 255, np.uint8), np.zeros((8, 8, 3), np.uint8)
    rgba_exp = white.copy()
    rgba_exp[:, 4:] = (10, 20, 30)
    pal_exp = white.copy()
    pal_exp[:, 4:] = (200, 100, 50)
    la_exp = white.copy()
    la_exp[4:] = 90
    half[:, :] = 156  # round(40000 / 257): 16-bit scaled, not clipped at 255
    # EXIF orientation 6 ("rotate 90 CW to display"): stored top half red -> displayed right half red
    exif_im = Image.new("RGB", (8, 8), BLUE)
    exif_im.paste(RED, (0, 0, 8, 4))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif_exp = np.zeros((8, 8, 3), np.uint8)
    exif_exp[:, :4], exif_exp[:, 4:] = BLUE, RED
    # odd size, not square: left third green, rest red; squashed (not cropped) to 8x8
    odd = Image.new("RGB", (21, 13), RED)
    odd.paste(GREEN, (0, 0, 7, 13))
    return [
        ("L", _png(Image.new("L", (8, 8), 77), tmp / "l.png"), np.full((8, 8, 3), 77, np.uint8)),
        ("1", _png(Image.new("1", (8, 8), 1), tmp / "one.png"), white),
        ("P", _png(pal, tmp / "p.png"), np.where(np.arange(8)[None, :, None] < 4, [10, 20, 30], [200, 100, 50]).astype(np.uint8)),
        ("P+transparency", _png(pal, tmp / "pt.png", transparency=0), pal_exp),
        ("RGBA", _png(Image.fromarray(rgba, "RGBA"), tmp / "rgba.png"), rgba_exp),
        ("LA", _png(la, tmp / "la.png"), la_exp),
        ("I;16 png", _png(Image.fromarray(a16), tmp / "i16.png"), half),
        ("I pgm (16-bit)", _png(Image.fromarray(a16), tmp / "i16.pgm"), half),
        ("I;16 tiff", _png(Image.fromarray(a16), tmp / "i16.tif"), half),
        ("CMYK", _png(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp / "cmyk.tif"), np.full((8, 8, 3), (0, 255, 255), np.uint8)),
        ("EXIF orientation", _png(exif_im, tmp / "exif.png", exif=exif), exif_exp),
        ("odd size", _png(odd, tmp / "odd.png"), None),
    ]


def test_every_mode_decodes_to_the_pixels_a_viewer_shows(tmp_path):
    for name, path, expected in _cases(tmp_path):
        with Image.open(path) as im:
            mode = im.mode
        got = data.read_image(str(path), 8).permute(1, 2, 0).numpy()
        assert got.dtype == np.uint8 and got.shape == (8, 8, 3), name
        if expected is None:  # the odd-sized image: resized, left ~third green, right red
            assert (got[:, 0] == GREEN).all() and (got[:, -1] == RED).all(), (name, got[0])
            continue
        assert np.abs(got.astype(int) - expected).max() <= 1, (name, mode, got[0], expected[0])


def test_float_corrupt_and_non_image_files_fail_naming_the_file(tmp_path):
    flt = tmp_path / "f.tif"
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(flt)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), RED).save(buf, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[:300])  # truncated
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    for path in (flt, cut, fake):
        with pytest.raises(data.DataError, match="cannot read image " + str(path)) as e:
            data.read_image(str(path), 8)
        assert "data.skip_corrupt=true" in str(e.value)


# --- the tree: hidden files, non-images, labels, empty and mismatched classes -------------------------

def _colours_match_labels(ds):
    """Every image's colour is that of its label's class (each class folder has its own solid colour)."""
    for split in (ds.train, ds.val, ds.test):
        for img, y in zip(split.images, split.labels):
            ref = ds.train.images[ds.train.labels == y][0]
            assert torch.equal(img, ref)


def test_hidden_and_non_image_files_are_never_classes_or_images(tmp_path, caplog):
    root = _tree(tmp_path / "tree", {"train/a": 3, "train/b": 3, "test/a": 2, "test/b": 2})
    (root / "train/.ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8), GREEN).save(root / "train/.ipynb_checkpoints/x.png")
    (root / "train/a/.ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8), GREEN).save(root / "train/a/.ipynb_checkpoints/0-checkpoint.png")
    (root / "train/a/.DS_Store").write_bytes(b"\0Bud1")
    (root / "train/a/._0.png").write_bytes(b"\0\5\26\7AppleDouble")  # macOS AppleDouble: not a PNG
    (root / "train/__MACOSX/a").mkdir(parents=True)
    (root / "train/__MACOSX/a/._0.png").write_bytes(b"\0\5\26\7")
    (root / "train/b/notes.txt").write_text("labels by hand")
    (root / "test/a/Thumbs.db").write_bytes(b"\0")
    with caplog.at_level(logging.INFO, logger="embclf.data"):
        ds = data.load(_cfg(tmp_path, root, val_size=2))
    assert ds.classes == ["a", "b"]
    assert len(ds.train) + len(ds.val) == 6 and len(ds.test) == 4
    _colours_match_labels(ds)
    assert f"{root / 'train'}: skipped 3 hidden file(s) and 1 non-image file(s)" in caplog.text
    assert f"{root / 'test'}: skipped 0 hidden file(s) and 1 non-image file(s)" in caplog.text


def test_test_labels_follow_train_class_names(tmp_path, caplog):
    # test/ lacks class b: ImageFolder alone would label test/c as 1 (b's label in train/)
    root = _tree(tmp_path / "tree", {"train/a": 2, "train/b": 2, "train/c": 2, "test/a": 2, "test/c": 2})
    with caplog.at_level(logging.WARNING, logger="embclf.data"):
        ds = data.load(_cfg(tmp_path, root, val_size=3))
    assert ds.classes == ["a", "b", "c"] and ds.test.labels.tolist() == [0, 0, 2, 2]
    _colours_match_labels(ds)
    assert "test/ has no images of class(es) b" in caplog.text
    _tree(root, {"test/d": 1})  # a class train/ does not have has no label
    with pytest.raises(data.DataError, match=f"test/ has class folder\\(s\\) {root / 'test' / 'd'} that train/ does not have"):
        data.load(_cfg(tmp_path, root, val_size=3))


def test_empty_class_folder_is_named(tmp_path):
    root = _tree(tmp_path / "tree", {"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 1})
    (root / "train/empty").mkdir()
    (root / "train/empty/.DS_Store").write_bytes(b"\0")
    with pytest.raises(data.DataError, match=f"class folder\\(s\\) {root / 'train' / 'empty'} hold no images"):
        data.load(_cfg(tmp_path, root))


def test_corrupt_image_fails_or_is_skipped_and_counted(tmp_path, caplog):
    root = _tree(tmp_path / "tree", {"train/a": 3, "train/b": 3, "test/a": 1, "test/b": 1})
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), RED).save(buf, "JPEG")
    bad = root / "train/a/bad.jpg"
    bad.write_bytes(buf.getvalue()[:300])
    with pytest.raises(data.DataError, match=f"cannot read image {bad}"):
        data.load(_cfg(tmp_path, root, val_size=2))
    with caplog.at_level(logging.WARNING, logger="embclf.data"):
        ds = data.load(_cfg(tmp_path, root, val_size=2, skip_corrupt=True))
    assert len(ds.train) + len(ds.val) == 6  # 7 files, the corrupt one left out
    _colours_match_labels(ds)
    assert "skipped 1 unreadable image(s)" in caplog.text and str(bad) in caplog.text


# --- subset sizes: the typed value, why, and a value that works -------------------------------------

def test_impossible_subset_messages_quote_the_typed_value(tmp_path):
    root = _tree(tmp_path / "tree", {**{f"train/c{i}": 5 for i in range(10)}, **{f"test/c{i}": 2 for i in range(10)}})
    with pytest.raises(data.DataError) as e:
        data.load(_cfg(tmp_path, root, val_size=0.1))
    msg = str(e.value)
    assert msg.startswith("data.val_size=0.1 gives 5 validation images for 10 classes") and "data.val_size=0.2" in msg
    assert len(data.load(_cfg(tmp_path, root, val_size=0.2)).val) == 10  # the advice works
    with pytest.raises(data.DataError, match="data.val_size=0.9 leaves 5 training images for 10 classes.*data.val_size=0.8"):
        data.load(_cfg(tmp_path, root, val_size=0.9))
    with pytest.raises(data.DataError, match="data.train_size=5 gives 5 training images for 10 classes.*data.train_size=10 or more"):
        data.load(_cfg(tmp_path, root, train_size=5))
    with pytest.raises(data.DataError, match="data.val_size=0.1: the 15 training images of data.train_size=15 cannot be "
                                             "split.*use data.train_size=20 or more"):
        data.load(_cfg(tmp_path, root, train_size=15))
    with pytest.raises(data.DataError, match="data.test_size=500: there are only 20 test images"):
        data.load(_cfg(tmp_path, root, test_size=500))
    _tree(root, {"train/lonely": 1, "test/lonely": 1})
    with pytest.raises(data.DataError, match=f"class 'lonely' \\({root / 'train' / 'lonely'}\\) has a single image"):
        data.load(_cfg(tmp_path, root, val_size=0.2))


# --- CIFAR download: one job downloads, a corrupt archive is named --------------------------------------

def _fetch_under_lock(root, log_file, barrier):
    barrier.wait()
    marker = Path(root) / "done"

    def fetch():
        with open(log_file, "a") as f:
            f.write("fetch\n")
        time.sleep(0.5)  # a slow download: without the lock the other job starts its own meanwhile
        marker.write_text("ok")

    data.download_once(Path(root), marker.exists, fetch)
    assert marker.read_text() == "ok"


def test_download_runs_once_under_a_file_lock(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_fetch_under_lock, args=(str(tmp_path / "root"), str(tmp_path / "log"), barrier))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (tmp_path / "log").read_text() == "fetch\n"


def test_corrupt_cifar_archive_says_checksum_mismatch(tmp_path):
    root = tmp_path / "cifar"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b half a download")
    cfg = _cfg(tmp_path, root, source=Source.cifar10)
    with pytest.raises(data.DataError, match=f"checksum mismatch, delete {root / 'cifar-10-python.tar.gz'}"):
        data.load(cfg)


# --- BatchNorm never sees a training batch of one image -----------------------------------------------

@pytest.mark.slow
def test_no_training_batch_of_one_image():
    from embclf.models import build_model
    from embclf import engine

    g = torch.Generator().manual_seed(0)
    sizes = lambda n, b, shuffle: [len(i) for i in data.batches(n, b, "cpu", shuffle, g)]  # noqa: E731
    assert sizes(90, 89, True) == [90] and sizes(91, 45, True) == [45, 46] and sizes(90, 45, True) == [45, 45]
    assert sizes(90, 89, False) == [89, 1]  # evaluation: BatchNorm uses its running statistics
    idx = torch.cat(list(data.batches(91, 45, "cpu", True, g)))
    assert sorted(idx.tolist()) == list(range(91))  # every image once per epoch
    # the reported failure: the conv trunk at data.image_size=8, 90 images, autoencode.batch_size=89
    model = build_model(OmegaConf.create({"name": "ae", "arch": "conv", "variational": False, "beta": 0.1,
                                          "channels": [32, 64, 128, 256, 256], "strides": [2, 1, 2, 1, 2]}), 8, 8)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    images = torch.randint(0, 256, (90, 3, 8, 8), dtype=torch.uint8)
    sums = engine.train_epoch(lambda x: engine.batch_step(model, x, 0.0), model, opt, images, 89, g)
    assert torch.isfinite(sums).all()


# --- projections of degenerate embeddings never crash the process --------------------------------------

@pytest.mark.slow
def test_constant_embeddings_skip_projections_without_crashing(tmp_path):
    # in another process (a child of the test zygote: no interpreter start-up): scikit-learn's t-SNE segfaults on
    # this input, which would take pytest down with it
    code = ("import numpy as np, logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
            "from embclf.report import projections as plots\n"
            f"out = plots.save_projections(np.ones((200, 32)), np.arange(200) % 2, ['a', 'b'], r'{tmp_path}', "
            "['pca', 'tsne'], 1000, 'dead encoder')\n"
            "print('written', sorted(out))\n"
            "plots.project(np.r_[np.ones((49, 32)), np.zeros((1, 32))], 'tsne')\n"  # one point apart: fine
            "print('near-constant ok')\n")
    proc = subprocess.run([zygote_python(tmp_path), "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "written []" in proc.stdout and "near-constant ok" in proc.stdout
    assert proc.stdout.count("skipped: all 200 embeddings are identical") == 1


def test_classify_result_survives_failing_extras(tmp_path, caplog):
    """The classify result is written before the optional extras; an extra that fails (here: images/ is a
    file, so no figure can be written) is a warning and the run stays completed with its accuracy."""
    import json

    from hydra import compose, initialize_config_dir

    from embclf import runs
    from embclf.config import conf_dir
    from embclf.models import build_model
    from embclf.stages import classify

    root = _tree(tmp_path / "tree", {"train/a": 4, "train/b": 4, "test/a": 2, "test/b": 2})
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", overrides=[
            "stage=classify", "model=ae", "latent=4", "data=folder", f"data.root={root}", "data.image_size=8",
            "data.val_size=2", f"data.cache_dir={tmp_path / 'cache'}", "classify.epochs=1", "threads=1",
            "device=cpu", "logger=none", "logger.projections=[pca]", f"output_dir={tmp_path / 'out'}",
            f"classify.encoder={tmp_path / 'enc.pt'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 4, 8)
    torch.save({"model": model.state_dict(), "config": runs.resolved(cfg), "state": {"epoch": 1}}, tmp_path / "enc.pt")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "images").write_text("a file where the figures' folder should be")
    with caplog.at_level(logging.WARNING):
        classify.run(cfg, run_dir, [])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and 0 <= summary["test_accuracy"] <= 1
    assert "images/confusion.png failed after the result was written" in caplog.text


def test_degenerate_embeddings_are_recognised():
    from embclf.report import projections as plots

    rng = np.random.default_rng(0)
    assert "identical" in plots.degenerate(np.ones((200, 32), np.float32))
    assert "NaN" in plots.degenerate(np.r_[rng.normal(size=(10, 4)), [[np.nan] * 4]])
    assert "fewer than 3" in plots.degenerate(rng.normal(size=(2, 4)))
    assert plots.degenerate(rng.normal(size=(20, 4))) == ""
    assert plots.project(rng.normal(size=(3, 1)), "tsne").shape == (3, 2)  # 3 points, latent 1: still works
