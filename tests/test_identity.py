"""One run identity (embclf/identity.py): the roles on the schema, a stage's identity, run dir names, and the
places that decide "same experiment?" by it: the stages (start / completed / resume / refuse), the launcher's
skip, the stage=all reuse of a sweep's autoencoder, and classify's embeddings cache."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict, read_write

from conftest import CIFAR, MINI, SMALL_MODEL, run_embclf

from embclf import faults, identity, report, runs
from embclf.config import conf_dir
from embclf.runtime import EmbclfError
from embclf.stages import autoencode, classify


def _compose(*overrides, hydra_node=False):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_node)


def _name(*overrides) -> str:
    """The run dir name Hydra gives a sweep job with these overrides (hydra.sweep.subdir, resolved)."""
    cfg = _compose(*overrides, hydra_node=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.overrides.task = list(overrides)
        cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig.instance().set_config(cfg)
    return str(OmegaConf.select(cfg, "hydra.sweep.subdir"))


# --- the roles and the identity ---------------------------------------------------------------------

def test_every_key_has_one_role_declared_on_the_schema():
    roles = identity.roles()
    assert {r.role for r in roles.values()} == {"identity", "run", "stage"}
    run_keys = {k for k, r in roles.items() if r.role == "run"}
    assert {"threads", "device", "compile", "tf32", "output_dir", "objective", "logger", "data.cache_dir",
            "data.download", "autoencode.keep_last"} <= run_keys
    assert {"latent", "seed", "precision", "data.root", "model.beta", "head.name", "classify.epochs"}.isdisjoint(run_keys)
    assert set(identity.path_keys()) == {"output_dir", "data.root", "data.cache_dir", "classify.encoder"}
    # the hand-kept lists the roles replace are gone
    for module, name in ((runs, "VOLATILE_KEYS"), (runs, "VOLATILE_SUBKEYS"), (runs, "encoder_identity"),
                         (report, "IGNORED_KEYS"), (report, "PATH_KEYS"), (runs, "BEFORE_KEY_EXISTED")):
        assert not hasattr(module, name), name


def test_a_stage_identity_holds_that_stage_identity_keys_only():
    cfg = _compose("model=vae", "latent=16", "data=folder", "data.root=/x/t/", "threads=3", "head=linear")
    ae, clf = identity.identity(cfg, "autoencode"), identity.identity(cfg, "classify")
    assert ae["latent"] == 16 and ae["data"]["root"] == "/x/t" and "head" not in ae and "classify" not in ae
    assert "threads" not in ae and "cache_dir" not in ae["data"] and "keep_last" not in ae["autoencode"]
    assert clf["head"]["name"] == "linear" and "model" not in clf and clf["encoder"] == ae
    # classifier settings are not the autoencoder's experiment, and the reverse
    other = _compose("model=vae", "latent=16", "data=folder", "data.root=/x/t", "head=mlp", "classify.epochs=3")
    assert identity.identity(other, "autoencode") == ae
    assert identity.differences(identity.identity(other, "classify"), clf) == \
        ["classify.epochs", "head.name"]


@pytest.mark.parametrize("a, b", [
    (["data.root=/x/t/"], ["data.root=/x/t"]),
    (["data.root=/x/./t"], ["data.root=/x/u/../t"]),
    (["latent=064"], ["latent=64"]),
    (["model.beta=0.50"], ["model.beta=0.5"]),
    (["threads=1", "device=cpu"], ["threads=2", "logger=none", "data.cache_dir=/c", "autoencode.keep_last=false"]),
])
def test_every_spelling_of_one_experiment_gets_one_run_dir_name(a, b):
    base = ["model=vae", "data=folder"]
    assert _name(*base, *a) == _name(*base, *b)
    assert re.fullmatch(r"[A-Za-z0-9=,._+\-]+-[0-9a-f]{8}", _name(*base, *a))


def test_relative_and_absolute_data_root_get_one_name(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _name("data=folder", "data.root=data") == _name("data=folder", f"data.root={tmp_path}/data/")
    # a symlink to the same folder is the same place
    (tmp_path / "link").symlink_to(tmp_path / "data")
    assert _name("data=folder", "data.root=link") == _name("data=folder", "data.root=data")


@pytest.mark.parametrize("a, b", [
    (["data.root=/x/cifar"], ["data.root=/y/cifar"]),  # the readable parts are equal: the digest tells them apart
    (["latent=8"], ["latent=16"]),
    (["stage=autoencode"], ["stage=all"]),
    (["stage=classify", "head=mlp"], ["stage=classify", "head=linear"]),
    (["stage=classify", "classify.encoder=/s1/j"], ["stage=classify", "classify.encoder=/s2/j"]),
])
def test_two_experiments_never_share_a_run_dir_name(a, b):
    assert _name("model=ae", "data=folder", *a) != _name("model=ae", "data=folder", *b)


# --- the stages decide by the identity ---------------------------------------------------------------

def _tiny(tmp_path, *more):
    return _compose("data=folder", f"data.root={CIFAR}", "data.train_size=100", "data.test_size=50",
                    f"data.cache_dir={tmp_path / 'cache'}", "autoencode.epochs=1", "autoencode.batch_size=50",
                    "autoencode.image_epochs=[]", "logger=none", "threads=1", "latent=4", "classify.epochs=2",
                    "logger.projections=[]", f"output_dir={tmp_path}", *more)


@pytest.mark.slow
def test_an_unfinished_run_resumes_when_only_how_to_run_keys_changed(tmp_path):
    run_dir = tmp_path / "run"
    cfg = _tiny(tmp_path)
    runs.write_config(run_dir, cfg, identity.identity(cfg, "autoencode"), "autoencode")
    runs.write_json_atomic(run_dir / runs.SUMMARY, {"status": "interrupted", "stage": "autoencode"})
    for change in ("data.cache_dir=/elsewhere", "data.download=false", "threads=2", "autoencode.keep_last=false",
                   "classify.epochs=9", "head=knn"):
        assert runs.open_run_dir(run_dir, identity.identity(_tiny(tmp_path, change), "autoencode"),
                                 "autoencode") == "resume", change
    with pytest.raises(EmbclfError, match=r"holds an unfinished run of another experiment \(differs in: "
                                          r"autoencode.lr\); resuming it would mix two experiments"):
        runs.open_run_dir(run_dir, identity.identity(_tiny(tmp_path, "autoencode.lr=0.1"), "autoencode"), "autoencode")
    # whatever files it holds: no identity.json and no config.yaml, only a last.pt with its config
    (run_dir / identity.IDENTITY_FILE).unlink()
    (run_dir / runs.CONFIG).unlink()
    runs.save_atomic({"config": runs.resolved(cfg)}, run_dir / "checkpoints" / "last.pt")
    with pytest.raises(EmbclfError, match=r"differs in: latent"):
        runs.open_run_dir(run_dir, identity.identity(_tiny(tmp_path, "latent=8"), "autoencode"), "autoencode")
    # a dir with nothing of a run (a failure record of bad input) starts
    empty = tmp_path / "empty"
    runs.write_json_atomic(empty / runs.SUMMARY, {"status": "failed", "stage": "autoencode"})
    assert runs.open_run_dir(empty, identity.identity(cfg, "autoencode"), "autoencode") == "start"


@pytest.mark.slow
def test_completed_autoencoder_stays_completed_when_classifier_settings_change_and_embeddings_follow_the_encoder(
        tmp_path):
    ae_dir, clf_dir = tmp_path / "ae", tmp_path / "clf"
    cfg = _tiny(tmp_path)
    autoencode.run(cfg, ae_dir, [])
    done = runs.read_summary(ae_dir)
    autoencode.run(_tiny(tmp_path, "classify.epochs=7", "head=linear"), ae_dir, [])  # not refused, not retrained
    assert runs.read_summary(ae_dir)["end_time"] == done["end_time"]
    with pytest.raises(EmbclfError, match=r"holds a completed run of another experiment \(differs in: latent\); it "
                                          r"is kept as it is"):
        autoencode.run(_tiny(tmp_path, "latent=8"), ae_dir, [])
    # an embeddings.pt in the classify run dir that another encoder produced is never used
    stale = {s: {"z": torch.zeros(3, 8), "labels": torch.zeros(3, dtype=torch.long)} for s in ("train", "val", "test")}
    runs.save_atomic({**stale, "classes": ["a"]}, clf_dir / "embeddings.pt")
    classify.run(_tiny(tmp_path, "stage=classify"), clf_dir, [])
    emb = runs.load_checkpoint(clf_dir / "embeddings.pt", ("train", "key"))
    assert emb["train"]["z"].shape == (90, 4)
    assert emb["key"]["encoder_sha1"] == runs.file_sha1(ae_dir / "checkpoints" / "best.pt")
    s = runs.read_summary(clf_dir)
    assert s["status"] == "completed" and (json.loads((clf_dir / identity.IDENTITY_FILE).read_text())["identity"]
                                           ["encoder"] == identity.identity(cfg, "autoencode"))
    # a fitted probe keeps no last.pt either: another experiment in its dir is still refused, naming the key
    knn_dir = tmp_path / "knn"
    classify.run(_tiny(tmp_path, "stage=classify", "head=knn"), knn_dir, [])
    assert not (knn_dir / "checkpoints" / "last.pt").exists()
    with pytest.raises(EmbclfError, match=r"differs in: head.name"):
        classify.run(_tiny(tmp_path, "stage=classify", "head=logreg"), knn_dir, [])
    # the same classify run named by the encoder's path instead of the lookup is the same experiment
    again = _tiny(tmp_path, "stage=classify", f"classify.encoder={ae_dir}/")
    assert runs.completed_in(clf_dir, identity.identity(again, "classify"), "classify")


# --- end to end: the launcher, single runs and stage=all -----------------------------------------------

@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("identity")
    sweep = tmp / "sweep"
    args = ["-m", "model=ae", "latent=4", *MINI, *SMALL_MODEL, "autoencode.epochs=1", "classify.epochs=2", "logger=none",
            "stage=all", f"data.root={CIFAR}/", f"hydra.sweep.dir={sweep}"]
    first = run_embclf(args, tmp)
    return {"tmp": tmp, "sweep": sweep, "args": args, "first": first}


def _job_dirs(sweep: Path):
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_respelled_sweep_skips_its_completed_jobs(small_sweep):
    tmp, sweep = small_sweep["tmp"], small_sweep["sweep"]
    [job] = _job_dirs(sweep)
    before = _snapshot(job)
    rel = os.path.relpath(CIFAR, tmp)  # the same data, spelled relative to the launch dir, without the slash
    args = [a if not a.startswith("data.root=") else f"data.root={rel}" for a in small_sweep["args"]] + ["threads=1"]
    proc = run_embclf(args, tmp)
    assert "already completed" in proc.stdout + proc.stderr
    assert _job_dirs(sweep) == [job] and _snapshot(job) == before


@pytest.mark.slow
def test_a_refused_single_run_changes_nothing(small_sweep):
    tmp, sweep = small_sweep["tmp"], small_sweep["sweep"]
    [job] = _job_dirs(sweep)
    before = _snapshot(job)
    args = [a for a in small_sweep["args"] if a != "-m" and not a.startswith("hydra.sweep.dir")]
    proc = run_embclf([*[a if a != "latent=4" else "latent=8" for a in args], f"hydra.run.dir='{job}'"], tmp,
                      check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds a completed run of another experiment (differs in: latent)" in proc.stderr
    assert "resuming it would mix" not in proc.stderr
    assert _snapshot(job) == before


@pytest.mark.slow
def test_a_sweep_with_a_new_head_reuses_the_sweeps_autoencoder(small_sweep):
    tmp, sweep = small_sweep["tmp"], small_sweep["sweep"]
    [job] = _job_dirs(sweep)
    ae_before = _snapshot(job / "autoencode")
    proc = run_embclf([*small_sweep["args"], "head=mlp,linear"], tmp)
    jobs = _job_dirs(sweep)
    assert len(jobs) == 2, [j.name for j in jobs]
    [new] = [j for j in jobs if j != job]
    assert "head=linear" in new.name and not (new / "autoencode").exists()
    assert _snapshot(job / "autoencode") == ae_before  # nothing retrained
    s = runs.read_summary(new / "classify")
    assert s["status"] == "completed" and s["head"] == "linear"
    # the report joins the new head to the sweep's autoencoder: two rows, one reconstruction result
    rows = [r for r in report.collect([sweep]) if r["used"]]
    assert sorted(r["head"] for r in rows) == ["linear", "mlp"] and len({r["test_mse"] for r in rows}) == 1
    # and a third invocation skips both jobs
    again = run_embclf([*small_sweep["args"], "head=mlp,linear"], tmp)
    assert (again.stdout + again.stderr).count("already completed") == 2, proc.stdout[-3000:]


def test_a_run_does_not_resume_on_other_images(tmp_path, monkeypatch):
    """The identity names the data by its place; the files there are checked too: an unfinished run whose images
    changed since it started is refused (its data fingerprint differs), never trained on two datasets."""
    from test_data_cache import _tree

    root = _tree(tmp_path / "d", CIFAR)
    cfg = _compose("data=folder", f"data.root={root}", "data.val_size=4", f"data.cache_dir={tmp_path / 'cache'}",
                   "autoencode.epochs=1", "autoencode.batch_size=4", "autoencode.image_epochs=[]", "logger=none",
                   "threads=1", "latent=4", "model.channels=[4,4,4,4,4]")
    run_dir = tmp_path / "run"
    monkeypatch.setenv(faults.KILL_AT_ENV, "autoencode.summary:1:raise")  # an ordinary failure after last.pt
    monkeypatch.setattr(faults, "_fault_counts", {})
    with pytest.raises(RuntimeError, match="injected failure"):
        autoencode.run(cfg, run_dir, [])
    monkeypatch.delenv(faults.KILL_AT_ENV)
    assert (run_dir / "checkpoints" / "last.pt").is_file() and runs.read_summary(run_dir)["status"] != "completed"
    before = _snapshot(run_dir)
    victim = sorted((root / "train" / "cat").iterdir())[0]
    other = sorted((CIFAR / "train" / "dog").iterdir())[0]
    victim.write_bytes(other.read_bytes())  # same name, other picture
    with pytest.raises(EmbclfError, match=r"started on other images: the files under data.root changed"):
        autoencode.run(cfg, run_dir, [])
    assert _snapshot(run_dir) == before


# --- identity keys added after run dirs were written ----------------------------------------------------------

# the identity keys of the first run-dir format: a key added since must declare ``added`` (its "off" value) in
# embclf/config.py, or every run dir written before it would stop matching its own experiment
FIRST_FORMAT_KEYS = {
    "autoencode.batch_size", "autoencode.epochs", "autoencode.eval_batch_size", "autoencode.image_epochs",
    "autoencode.lr", "autoencode.select_on", "autoencode.weight_decay", "classify.batch_size", "classify.encoder",
    "classify.epochs", "classify.lr", "classify.lr_grid", "classify.patience", "classify.probes",
    "classify.weight_decay", "data.image_size", "data.root", "data.skip_corrupt", "data.source",
    "data.subset_seed", "data.test_size", "data.train_size", "data.val_size", "debug.batch_size",
    "debug.eval_every", "debug.name", "debug.steps", "debug.target_psnr", "debug.test_size", "debug.train_size",
    "head.C", "head.dropout", "head.hidden", "head.k", "head.max_iter", "head.name", "head.temperature", "latent",
    "model.arch", "model.beta", "model.ce_weight", "model.channels", "model.decorrelation",
    "model.decorrelation_weight", "model.kl_warmup_epochs", "model.name", "model.strides", "model.variational",
    "model.weight_decay", "precision", "seed"}


def test_a_new_identity_key_declares_the_value_earlier_runs_used():
    new = sorted(r.key for r in identity._leaf_roles() if r.role == "identity" and r.added is identity._ABSENT
                 and r.key not in FIRST_FORMAT_KEYS)
    assert new == [], (f"identity keys {new} were added without field metadata {{'added': <the value every "
                       "earlier run computed with>}} in embclf/config.py: without it every existing run dir stops "
                       "matching its own experiment (a re-run sweep retrains it in a new run dir)")


def _without(ident: dict, *keys: str) -> dict:
    out = json.loads(json.dumps(ident))
    for key in keys:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return out


@pytest.mark.parametrize("stage", ["autoencode", "classify"])
def test_runs_from_before_an_added_key_keep_their_identity_and_digest(tmp_path, stage):
    """A run dir written before model.input_noise / model.mask_ratio / classify.layers existed (its
    identity.json lacks them) is the same experiment as today's default, with the same digest; one written while
    they were stored at their "off" value (input_noise 0.0, layers "code") too; a non-off value differs."""
    added = [r.key for r in identity._leaf_roles() if r.added is not identity._ABSENT and stage in r.stages]
    today = identity.identity(_compose(), stage)
    assert added and all(identity._get(today, k, None) is None for k in added)  # left out at their off value
    # what a run dir's identity.json held: before the keys (none of them) and while they were stored (all of them)
    full = identity.identity(_compose(), stage)
    full_enc = full.get("encoder", full)
    full_enc.setdefault("model", {}).update(input_noise=0.0, mask_ratio=0.0)
    if stage == "classify":
        full["classify"]["layers"] = "code"
    for old in (_without(today, *added), full):
        run_dir = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        run_dir.mkdir()
        (run_dir / identity.IDENTITY_FILE).write_text(json.dumps(
            {"format": runs.FORMAT, "stage": stage, "digest": identity.digest(old), "identity": old}))
        assert runs.stored_identity(run_dir, stage) == today
        assert runs.open_run_dir(run_dir, today, stage) == "resume"
        assert identity.digest(runs.stored_identity(run_dir, stage)) == identity.digest(today)
    noisy = identity.identity(_compose("model.input_noise=0.1", "classify.layers=all"), stage)
    assert noisy != today
    with pytest.raises(EmbclfError, match=r"differs in: .*input_noise"):
        runs.open_run_dir(run_dir, noisy, stage)
    # what the report shows: every key, the off values included
    shown = identity.with_added(today, stage)
    enc = shown.get("encoder", shown)
    assert enc["model"]["input_noise"] == 0.0 and enc["model"]["mask_ratio"] == 0.0
    assert stage == "autoencode" or shown["classify"]["layers"] == ["code"]
