"""Bad values are refused before anything runs (issue #17): every key of the schema has its valid range in the one
gate (``validation.problems``, called by a single run and by the launcher's sweep planning), ranges across keys
included; data that cannot make a run is refused before training; a classify run on an encoder of another image
size and every bad argument of ``embclf.evaluate`` / ``embclf.embed`` / ``embclf.report`` fail before the work.

Composition-level checks run in-process (Hydra's compose API); each kind has one real command showing exit 2, one
paragraph, no traceback and no run dir left."""
from __future__ import annotations

import dataclasses
import shutil
from enum import Enum
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import MINI, run_embclf

from embclf import config as config_mod
from embclf import validation
from embclf import data
from embclf.config import conf_dir
from embclf.validation import problems

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def _problems(*overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return problems(compose("config", overrides=list(overrides)))


# --- every key of the schema has a rule (or a type that admits only valid values) ----------------------------

# keys whose every typed value can run: free text, paths (checked as resources where they are used), lists of
# tags, Hydra's defaults list, the encoder path and the stage's own name
NO_RANGE = {"defaults", "output_dir", "data.root", "data.cache_dir", "model.name", "classify.encoder",
            "logger.wandb.project", "logger.wandb.entity", "logger.wandb.tags"}


def _leaves(cls, prefix=""):
    for f in dataclasses.fields(cls):
        t = f.type if not isinstance(f.type, str) else eval(f.type, vars(config_mod))  # noqa: S307 (our schema)
        if dataclasses.is_dataclass(t):
            yield from _leaves(t, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", t


def test_every_schema_key_is_typed_or_ranged():
    unranged = [k for k, t in _leaves(config_mod.Config)
                if k not in validation.VALUE_RULES and k not in NO_RANGE
                and not (isinstance(t, type) and issubclass(t, (Enum, bool)))]
    assert unranged == [], f"keys with no valid range in validation.VALUE_RULES: {unranged}"


BAD = [  # (override(s), the key the message must name, a valid value it must give)
    (["seed=-1"], "seed=-1", "seed=0"),
    (["seed=4294967296"], "seed=4294967296", "seed=0"),
    (["data.subset_seed=-3"], "data.subset_seed=-3", "data.subset_seed=0"),
    (["data.subset_seed=4294967295"], "data.subset_seed=4294967295", "data.subset_seed=0"),
    (["device=gpu"], "device=gpu", "device=cuda:0"),
    (["device=cuda1"], "device=cuda1", "device=cuda:0"),
    (["device=cuda:x"], "device=cuda:x", "device=cuda:0"),
    (["head.k=0"], "head.k=0", "head.k=20"),
    (["head.max_iter=0"], "head.max_iter=0", "head.max_iter=1000"),
    (["head.C=[]"], "head.C=[]", "head.C=[0.1,1,10]"),
    (["head.C=[1,-1]"], "head.C=[1.0,-1.0]", "head.C=[0.1,1,10]"),
    (["head.temperature=0"], "head.temperature=0", "head.temperature=0.07"),
    (["head.name=mpl"], "head.name=mpl", "head=mlp"),
    (["classify.patience=0"], "classify.patience=0", "null"),
    (["classify.lr_grid=[0.1,0]"], "classify.lr_grid=[0.1,0.0]", "classify.lr_grid=[1e-4,1e-3]"),
    (["classify.probes=[linear,kn]"], "classify.probes=[linear,kn]", "classify.probes=[linear,knn]"),
    (["autoencode.batch_size=1"], "autoencode.batch_size=1", "at least 2"),
    (["autoencode.lr=inf"], "autoencode.lr=inf", "1e-3"),
    (["model.weight_decay=-1"], "model.weight_decay=-1", ">= 0"),
    (["data.val_size=1.5"], "data.val_size=1.5", "0.1"),
    (["debug.name=fats"], "debug.name=fats", "debug=fast"),
    (["debug.batch_size=1"], "debug.batch_size=1", "at least 2"),
    (["debug.steps=0"], "debug.steps=0", "at least 1"),
    (["debug.eval_every=0"], "debug.eval_every=0", "at least 1"),
    (["debug.train_size=0"], "debug.train_size=0", "debug.train_size=256"),
    (["debug.target_psnr=nan"], "debug.target_psnr=nan", "debug.target_psnr=25"),
    (["logger.name=wandbb"], "logger.name=wandbb", "logger=none"),
    (["logger.projections=[pca,tsn]"], "logger.projections=[pca,tsn]", "logger.projections=[pca]"),
    (["objective=test_accuracy"], "objective=test_accuracy", "objective=val_accuracy"),
    # ranges across keys
    (["data.image_size=12"], "data.image_size=12", "data.image_size=8"),
    (["model.strides=[2,2,2,2,2]", "data.image_size=48"], "data.image_size=48", "data.image_size=32"),
    (["model=resnet", "data.image_size=64"], "data.image_size=64", "data.image_size=32"),
    (["model.channels=[8,8]"], "model.channels=[8,8] and model.strides=[2,1,2,1,2]", "model.strides=[2,1,2,1,2]"),
    (["data.train_size=100", "data.val_size=100"], "data.val_size=100 is invalid with data.train_size=100",
     "data.val_size=10"),
]


@pytest.mark.parametrize("overrides,key,valid", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_values_are_named_with_a_valid_one(overrides, key, valid):
    try:
        bad = _problems(*overrides)
    except Exception as e:  # noqa: BLE001 -- an enum: Hydra refuses the value at composition, naming it
        bad = [str(e)]
    assert len(bad) == 1 and key in bad[0] and valid in bad[0], bad


def test_every_shipped_option_passes_the_gate():
    groups = {g: sorted(p.stem for p in (Path(conf_dir()) / g).glob("*.yaml"))
              for g in ("data", "model", "head", "experiment", "debug", "logger", "hparams_search")}
    for g, options in groups.items():
        for o in options:
            assert _problems(f"{g}={o}", "data.root=/x") == [], (g, o)
    # the encoder given to classify decides the architecture: the stride rule is then its checkpoint's
    assert _problems("stage=classify", "classify.encoder=/e", "data.image_size=12") == []
    assert _problems("model.strides=[2,2,2,2,2]", "data.image_size=64") == []


def _no_run_dir(proc, out: Path):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.strip() and "[INFO]" not in line and "[WARNING]" not in line]
    assert len(err) == 1 and err[0].startswith("embclf"), proc.stderr
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
    return err[0]


@pytest.mark.parametrize("bad", [["seed=-1"], ["data.image_size=12"]])
def test_bad_value_single_run_exits_2_and_leaves_nothing(tmp_path, bad):
    out = tmp_path / "outputs"
    proc = run_embclf([*MINI, "logger=none", *bad, f"output_dir={out}"], tmp_path, check=False, timeout=120)
    assert bad[0] in _no_run_dir(proc, out)


@pytest.mark.parametrize("stage", ["autoencode", "classify", "all"])
def test_missing_data_root_leaves_no_run_dir_for_any_stage(tmp_path, stage):
    """Found by a fresh user: stage=all left a job dir with autoencode/ and classify/ holding only Hydra's record
    and an empty log after ``data.root`` was missing."""
    out = tmp_path / "outputs"
    args = [*MINI, "logger=none", f"stage={stage}", f"data.root={tmp_path / 'nope'}", f"output_dir={out}"]
    if stage == "classify":
        args.append(f"classify.encoder={tmp_path / 'no-encoder'}")
    proc = run_embclf(args, tmp_path, check=False, timeout=120)
    _no_run_dir(proc, out)


@pytest.mark.slow
def test_bad_value_sweep_starts_nothing(tmp_path):
    out = tmp_path / "outputs"
    proc = run_embclf(["-m", *MINI, "logger=none", "seed=0,-1", f"output_dir={out}"], tmp_path, check=False,
                      timeout=120)
    assert proc.returncode != 0 and "seed=-1 is invalid" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(out.rglob("summary.json"))


# --- data that cannot make a run ------------------------------------------------------------------------------

def _copy_tree(root: Path, spec: dict) -> Path:
    """A tiny ImageFolder tree of real CIFAR-10 JPEGs: spec {"train/cat": n, ...} copies n images per folder."""
    for folder, n in spec.items():
        split, cls = folder.split("/")
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        src = sorted((CIFAR / split / cls).iterdir())[:n]
        for f in src:
            shutil.copy(f, d / f.name)
    return root


def _data_cfg(tmp_path, root, **kw):
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(config_mod.DataConfig)
    cfg.source, cfg.root, cfg.image_size, cfg.cache_dir = config_mod.Source.folder, str(root), 8, str(tmp_path / "c")
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_an_image_less_split_is_refused_naming_the_folder(tmp_path):
    root = _copy_tree(tmp_path / "t", {"train/cat": 4, "train/dog": 4})
    (root / "test").mkdir()
    with pytest.raises(data.DataError, match=f"{root / 'test'} holds no images \\(no class folder\\)"):
        data.load(_data_cfg(tmp_path, root, val_size=2))
    (root / "test" / "cat").mkdir()
    (root / "test" / "dog").mkdir()
    (root / "test" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(data.DataError, match=f"{root / 'test'} holds no images \\(2 class folder\\(s\\), all without"):
        data.load(_data_cfg(tmp_path, root, val_size=2))
    # every image of a split unreadable and skipped: the split is empty, refused the same way
    for i in range(2):
        (root / "test" / "cat" / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(data.DataError, match=f"the test split holds no readable image .*{root / 'test'}"):
        data.load(_data_cfg(tmp_path, root, val_size=2, skip_corrupt=True))


def test_empty_test_folder_single_run_exits_2_before_training(tmp_path):
    root = _copy_tree(tmp_path / "t", {"train/cat": 6, "train/dog": 6})
    (root / "test" / "cat").mkdir(parents=True)
    out = tmp_path / "outputs"
    proc = run_embclf(["data=folder", f"data.root={root}", "data.image_size=8", "autoencode.epochs=1",
                       "autoencode.batch_size=4", "data.val_size=2", "logger=none", f"output_dir={out}"],
                      tmp_path, check=False, timeout=120)
    assert f"{root / 'test'} holds no images" in _no_run_dir(proc, out)
    assert "epoch 1/1" not in proc.stderr  # refused before training


# --- an encoder of another image size; every argument of evaluate / embed / report --------------------------

@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One tiny real stage=all job (8-pixel images, a narrow conv AE): its dir, autoencode/ and classify/ in it."""
    tmp = tmp_path_factory.mktemp("gate")
    out = tmp / "outputs"
    run_embclf(["stage=all", "data=folder", f"data.root={CIFAR}", "data.train_size=100", "data.test_size=40",
                "data.image_size=8", "latent=4", "model.channels=[8,8,8,8,8]", "autoencode.epochs=1",
                "autoencode.batch_size=30", "autoencode.image_epochs=[1]", "classify.epochs=1", "logger=none",
                "logger.projections=[]", f"output_dir={out}", "hydra.run.dir=" + str(out / "job")], tmp, timeout=600)
    return {"tmp": tmp, "dir": out / "job"}


@pytest.mark.slow
def test_classify_on_an_encoder_of_another_image_size_is_refused_up_front(job, tmp_path):
    out = tmp_path / "outputs"
    proc = run_embclf(["stage=classify", f"classify.encoder={job['dir'] / 'autoencode'}", "data=folder",
                       f"data.root={CIFAR}", "data.train_size=100", "data.test_size=40", "data.image_size=16",
                       "logger=none", f"output_dir={out}"], tmp_path, check=False, timeout=300)
    msg = _no_run_dir(proc, out)
    assert "data.image_size=16" in msg and "trained on 8-pixel images" in msg and "data.image_size at 8" in msg


def _one_paragraph(proc):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.strip() and "[INFO]" not in line]
    assert len(err) == 1, proc.stderr
    return err[0]


@pytest.mark.slow
def test_evaluate_arguments_are_checked_before_the_work(job, tmp_path):
    ae = job["dir"] / "autoencode"
    for name in ("sub/x", ".hidden", ".."):
        proc = run_embclf([str(ae), f"name={name}"], job["tmp"], check=False, timeout=120, module="embclf.evaluate")
        assert f"name={name}: the evaluation's name is one folder name" in _one_paragraph(proc)
        assert "decoding" not in proc.stderr and "encoder:" not in proc.stderr  # no work was done
    assert not (ae / "eval").exists()
    (ae / "eval").write_text("a file where the evaluations go")
    try:
        proc = run_embclf([str(ae)], job["tmp"], check=False, timeout=120, module="embclf.evaluate")
        assert f"cannot create {ae / 'eval' / 'test-best'}: {ae / 'eval'} is a file" in _one_paragraph(proc)
    finally:
        (ae / "eval").unlink()
    proc = run_embclf([str(ae), "data.image_size=12"], job["tmp"], check=False, timeout=120, module="embclf.evaluate")
    assert "data.image_size=12 is invalid" in _one_paragraph(proc)
    proc = run_embclf([str(job["dir"] / "classify"), "checkpoint=worst"], job["tmp"], check=False, timeout=120,
                      module="embclf.evaluate")
    assert "checkpoint must be one of best, last" in _one_paragraph(proc)
    assert not (ae / "eval").exists() and not (job["dir"] / "classify" / "eval").exists()


@pytest.mark.slow
def test_embed_arguments_are_checked_before_the_work(job, tmp_path):
    ae = job["dir"] / "autoencode"
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = [(f"out={tmp_path / 'folder'}", "is a folder"),
             (f"out={tmp_path / 'z.csv'}", "ends in .csv but format=npz"),
             (f"out={tmp_path / 'afile' / 'z.npz'}", f"{tmp_path / 'afile'} is a file, not a folder")]
    for arg, why in cases:
        proc = run_embclf([str(ae), arg], job["tmp"], check=False, timeout=120, module="embclf.embed")
        assert why in _one_paragraph(proc)
        assert "decoding" not in proc.stderr and "device" not in proc.stderr  # before any work
    assert not (ae / "export").exists()


@pytest.mark.slow
def test_report_out_that_is_a_file_is_refused(job, tmp_path):
    (tmp_path / "r").write_text("x")
    proc = run_embclf([str(job["dir"]), "--out", str(tmp_path / "r")], job["tmp"], check=False, timeout=120,
                      module="embclf.report")
    assert "--out" in _one_paragraph(proc) and "is a file" in proc.stderr


def test_a_gpu_index_the_machine_lacks_is_refused_before_the_stage(monkeypatch):
    """No GPU here: torch's CUDA queries are replaced by a one-GPU machine's answers (the check reads only them)."""
    import torch
    from omegaconf import OmegaConf

    from embclf import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = OmegaConf.create({"threads": None, "seed": 0, "device": "cuda:3", "precision": "fp32"})
    with pytest.raises(runtime.EmbclfError, match="device=cuda:3: this machine has 1 CUDA device\\(s\\), cuda:0 to cuda:0"):
        runtime.setup(cfg)


def test_the_gates_name_lists_are_the_modules_own():
    """config.py cannot import the modules (torch) at composition time, so it lists their names: kept equal here."""
    from embclf import debug, heads
    from embclf.report import projections as plots

    assert validation.HEAD_NAMES == heads.HEADS and validation.PROJECTIONS == plots.METHODS
    assert validation.DEBUG_MODES == debug.MODES
    assert sorted(validation.LOGGERS) == sorted(p.stem for p in (Path(conf_dir()) / "logger").glob("*.yaml"))
    assert sorted(validation.HEAD_NAMES) == sorted(p.stem for p in (Path(conf_dir()) / "head").glob("*.yaml"))
