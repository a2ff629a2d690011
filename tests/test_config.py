"""Composition of every config-group option and schema errors, in-process with Hydra's compose API."""
from pathlib import Path

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError, ConfigKeyError

from embclf.config import Config, Stage, conf_dir
from embclf.identity import safe_name

from conftest import run_embclf

GROUPS = {g: sorted(p.stem for p in (Path(conf_dir()) / g).glob("*.yaml"))
          for g in ("data", "model", "head", "experiment", "debug")}


def _compose(*overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=list(overrides))


def test_defaults_are_the_reference_study():
    cfg = _compose()
    assert cfg.model.name == "ae" and cfg.latent == 64 and cfg.stage == Stage.autoencode
    assert cfg.autoencode.epochs == 80 and cfg.classify.epochs == 50
    assert cfg.autoencode.batch_size == 200 and cfg.autoencode.lr == 1e-3
    assert cfg.data.val_size == 0.1 and cfg.data.train_size is None and cfg.seed == 0
    assert list(cfg.head.hidden) == [128, 64] and cfg.classify.encoder is None


def _option_values(group: str, option: str) -> dict:
    """{dotted key: value} an option file sets (its in-group ``defaults`` first, as Hydra merges them), keys
    under its package (``_global_`` for experiments); ``hydra.*`` and the ``defaults`` list left out."""
    node = OmegaConf.load(Path(conf_dir()) / group / f"{option}.yaml")
    values = {}
    for d in node.get("defaults", []):
        if isinstance(d, str) and d != "_self_":  # another option of the same group (experiment=improved: quick)
            values.update(_option_values(group, d))
    own = OmegaConf.to_container(node)
    own.pop("defaults", None)
    own.pop("hydra", None)

    def flat(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    values.update(flat(own, "" if group == "experiment" else f"{group}."))
    return values


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    """Each option composes and sets every value its file gives, under its group's key (an experiment: anywhere)."""
    cfg = _compose(f"{group}={option}", "data.root=/somewhere")
    expected = _option_values(group, option)
    # (a default option may set nothing: its values are the schema's; the name checks below still hold)
    for key, value in expected.items():
        if key == "data.root":
            continue  # overridden above
        got = OmegaConf.select(cfg, key)
        got = got.name if hasattr(got, "name") and not isinstance(got, (str, int, float)) else got  # enums
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, f"{group}={option}: {key} is {got!r}, the file sets {value!r}"
    if group in ("head", "debug"):
        assert cfg[group].name == option
    if group == "data":
        assert cfg.data.source.name == option
    if group == "model":
        assert cfg.model.name == option
        assert cfg.model.variational == option.endswith("vae")
    if group == "experiment":  # every preset is the study's stage=all sweep of both models over four latents
        assert cfg.stage == Stage.all
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            hc = compose("config", overrides=[f"experiment={option}"], return_hydra_config=True).hydra
        assert dict(hc.sweeper.params) == {"model": "ae,vae", "latent": "32,64,128,256"}
        if option == "reference":
            assert cfg.head.name == "mlp"  # its `override /head: mlp`
    if group == "debug" and option != "none":
        assert cfg.debug.train_size == 256 and cfg.debug.test_size == 100 and cfg.debug.batch_size == 32


def test_all_groups_have_options():
    assert set(GROUPS["model"]) >= {"ae", "vae", "resnet", "resnet_vae"}
    assert set(GROUPS["data"]) >= {"cifar10", "cifar100", "folder"}
    assert "mlp" in GROUPS["head"]
    assert set(GROUPS["debug"]) == {"none", "fast", "overfit"}


@pytest.mark.parametrize("stage", ["autoencode", "classify", "all"])
def test_stages_compose(stage):
    assert _compose(f"stage={stage}").stage == Stage[stage]


@pytest.mark.parametrize("override,key", [
    ("latent=abc", "latent"),
    ("data.train_size=many", "data.train_size"),
    ("autoencode.epochs=1.5", "autoencode.epochs"),
    ("stage=train", "stage"),
    ("data.source=imagenet", "data.source"),
    ("model.beta=high", "model.beta"),
])
def test_schema_errors_name_the_key(override, key):
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        _compose(override)
    text = str(e.value) + str(getattr(e.value, "__cause__", ""))
    assert key in text


def test_unknown_key_fails():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        _compose("autoencode.epoch=3")
    assert "epoch" in str(e.value) + str(e.value.__cause__)


def test_cfg_job_prints_composed_config(tmp_path):
    proc = run_embclf(["model=vae", "latent=128", "stage=all", "--cfg", "job"], tmp_path)
    assert "latent: 128" in proc.stdout and "variational: true" in proc.stdout and "stage: all" in proc.stdout


def test_safe_name_is_flat_and_bounded():
    assert re.fullmatch(r"model=vae,latent=64-[0-9a-f]{8}", safe_name(["latent=64", "model=vae"]))
    assert safe_name(["autoencode.image_epochs=[1]", "model=ae"]).startswith("model=ae,autoencode.image_epochs=_1-")
    assert "/" not in safe_name(["data.train_size=1", "x=a/b"])
    long = "x=" + "y" * 500
    a, b = safe_name([long]), safe_name([long + "z"])
    assert len(a) <= 120 and a != b
    assert re.fullmatch(r"run-[0-9a-f]{8}", safe_name([]))
    # how-to-run keys are not part of the name: they do not change the experiment
    assert safe_name(["model=vae", "threads=2", "logger=none"]).startswith("model=vae-")


@pytest.mark.parametrize("a, b", [
    (["data.root=/x/cifar"], ["data.root=/y/cifar"]),  # same last component
    (["logger.wandb.project=a/b"], ["logger.wandb.project=a_b"]),  # '/' replaced
    (["classify.encoder=/s/model=ae,latent=8/autoencode"], ["classify.encoder=/s/model=ae,latent=16/autoencode"]),
    (["classify.encoder=/s1/j/autoencode"], ["classify.encoder=/s2/j/autoencode"]),
])
def test_run_dir_names_never_collide_when_information_is_lost(a, b):
    na, nb = safe_name(["model=ae", *a]), safe_name(["model=ae", *b])
    assert na != nb and "/" not in na + nb
    # paths stay readable by their last meaningful component (a stage=all job dir, not "autoencode")
    if "classify.encoder" in a[0]:
        assert "latent=8" in na or "j" in na


def test_long_names_keep_the_short_swept_values_readable():
    common = ["data.cache_dir=/" + "c" * 150, "data.root=/" + "r" * 90, "model=vae"]
    n1, n2 = safe_name([*common, "model.beta=0.1"]), safe_name([*common, "model.beta=0.2"])
    assert len(n1) <= 120 and n1 != n2
    assert "model.beta=0.1" in n1 and "model.beta=0.2" in n2


def _problems(*overrides):
    from embclf.validation import problems
    return problems(_compose(*overrides))


def test_config_problems_name_the_key_and_suggest_the_closest():
    assert _problems() == [] and _problems("model=vae", "latent=8", "data=folder", "data.root=/x") == []
    # a key that got past composition (Hydra's `+key=` under an untyped node, a hand-edited config): named,
    # with the closest valid key
    from omegaconf import open_dict
    from embclf.validation import problems
    cfg = _compose()
    with open_dict(cfg), open_dict(cfg.autoencode):
        cfg.autoencode.epoch = 3
        cfg.colour = "red"
    p1, p2 = problems(cfg)
    assert "autoencode.epoch is not a config key" in p1 + p2 and "did you mean autoencode.epochs?" in p1 + p2
    assert "colour is not a config key" in p1 + p2
    bad = _problems("latent=0", "model.beta=-0.5", "autoencode.batch_size=0", "head.dropout=1.0", "classify.lr=0")
    assert [x.split("=")[0] for x in bad] == ["latent", "model.beta", "head.dropout", "autoencode.batch_size",
                                             "classify.lr"], bad
    assert any("data.root has no value" in x for x in _problems("data=folder", "data.root=???"))


def test_relative_paths_are_stored_absolute_against_the_launch_dir():
    from embclf.identity import absolute_paths
    cfg = {"output_dir": "outputs", "data": {"root": "../d", "cache_dir": None}, "classify": {"encoder": "~/e"}}
    absolute_paths(cfg, "/home/u/proj")
    assert cfg["output_dir"] == "/home/u/proj/outputs" and cfg["data"]["root"] == "/home/u/d"
    assert cfg["data"]["cache_dir"] is None and cfg["classify"]["encoder"].startswith("/") and "~" not in cfg["classify"]["encoder"]


# --- one home per default ----------------------------------------------------------------------------------

def _schema_defaults() -> dict:
    return OmegaConf.to_container(OmegaConf.structured(Config), enum_to_str=True)


def _leaves(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _at(tree, key):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return KeyError
        tree = tree[part]
    return tree


def _yaml_values():
    """(file, dotted key of the composed config, value) for every value that a conf/ YAML sets, where a group
    option's keys are placed under its group (head/mlp.yaml's hidden is head.hidden) and a ``_global_`` preset's
    at the top. Hydra's own node, defaults lists and ``_self_`` are not values of the app."""
    root = Path(conf_dir())
    for path in sorted(root.rglob("*.yaml")):
        text = path.read_text()
        raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
        raw.pop("defaults", None)
        raw.pop("hydra", None)
        rel = path.relative_to(root)
        group = "" if len(rel.parts) == 1 or "@package _global_" in text else rel.parts[0] + "."
        for key, value in _leaves(raw):
            yield str(rel), group + key, value


def test_no_yaml_repeats_a_schema_default():
    """Every default has one home, the schema (embclf/config.py): a conf/ YAML holds only what differs from it.
    A preset (experiment=, hparams_search=) may set a key back to its default only where an option of a schema
    group (model=, data=, head=, logger=, debug=) sets it otherwise: a real reset, not a repeat."""
    defaults = _schema_defaults()
    groups = set(defaults)
    set_by_options = {key for f, key, v in _yaml_values() if f.split("/")[0] in groups and _at(defaults, key) != v}
    repeats = [f"{f}: {key}: {v!r}" for f, key, v in _yaml_values() if _at(defaults, key) == v
               and not (f.split("/")[0] not in groups and "/" in f and key in set_by_options)]
    assert repeats == [], "these conf/ values repeat the schema's default (embclf/config.py); remove them " \
        f"from the YAML, or change the default in the schema: {repeats}"


def test_the_yaml_walk_sees_every_group_and_finds_a_repeat(tmp_path, monkeypatch):
    """The walk above reads every group's options and would catch a repeat (guards against a vacuous pass)."""
    seen = {f.split("/")[0] for f, _, _ in _yaml_values()}
    assert {"data", "model", "head", "logger", "debug", "experiment", "hparams_search"} <= seen
    keys = {key for _, key, _ in _yaml_values()}
    assert {"head.name", "model.variational", "logger.wandb.mode", "data.source", "classify.probes"} <= keys
    import shutil
    import sys
    shutil.copytree(conf_dir(), tmp_path / "conf")
    (tmp_path / "conf" / "head" / "mlp.yaml").write_text("hidden: [128, 64]\n")
    monkeypatch.setattr(sys.modules[__name__], "conf_dir", lambda: str(tmp_path / "conf"))
    with pytest.raises(AssertionError, match=r"head/mlp.yaml: head.hidden: \[128, 64\]"):
        test_no_yaml_repeats_a_schema_default()


def test_reference_preset_pins_every_study_setting():
    """experiment=reference sets only what differs from the defaults; the study's settings stay pinned here, so a
    change of a default that would change the reference study fails (conf/experiment/reference.yaml; tests/test_research.py checks the headline values)."""
    for model in ("ae", "vae"):
        cfg = _compose("experiment=reference", f"model={model}")
        assert cfg.stage == Stage.all and cfg.head.name == "mlp" and list(cfg.head.hidden) == [128, 64]
        assert cfg.data.train_size is None and cfg.data.test_size is None and cfg.data.val_size == 0.1
        assert (cfg.autoencode.epochs, cfg.autoencode.batch_size, cfg.autoencode.lr) == (80, 200, 1e-3)
        assert cfg.autoencode.weight_decay == 0.0 and list(cfg.autoencode.image_epochs) == [1, 10, 40]
        assert (cfg.classify.epochs, cfg.classify.batch_size, cfg.classify.lr) == (50, 200, 1e-3)
        assert cfg.classify.weight_decay == 0.0 and cfg.classify.patience is None and list(cfg.classify.lr_grid) == []
        assert cfg.head.dropout == 0.0 and cfg.model.beta == 0.1 and cfg.model.arch.value == "conv"
        assert cfg.model.weight_decay == (1e-4 if model == "ae" else None) and cfg.model.ce_weight == 0.0


# --- a mistyped key on the command line ----------------------------------------------------------------------

def test_mistyped_keys_suggest_the_closest():
    from embclf.overrides import mistyped

    for override in ("autoencode.epoch=3", "autoencod.epochs=3", "+autoencode.epoch=3", "++autoencode.epoch=3"):
        assert "Did you mean autoencode.epochs?" in mistyped(["model=vae", override]), override
    assert mistyped(["+autoencode.epoch=3"]).startswith("Could not add 'autoencode.epoch'")
    assert mistyped(["autoencode.epoch=3"]).startswith("Could not override 'autoencode.epoch': no such key.")
    # group choices, Hydra's keys, flags, sweeps, deletions, list elements: Hydra's business, never refused here
    assert mistyped(["-m", "model=ae,vae", "experiment=quick", "hydra/launcher=slurm", "hydra.job.chdir=true",
                     "--cfg", "job", "~logger.wandb.tags", "autoencode.epochs=1,2", "+hparams_search=vae_optuna",
                     "head.hidden=[1,2]", "data.root=/x=y"]) is None
    assert _compose("autoencode.epochs=3").autoencode.epochs == 3


def test_mistyped_key_on_the_command_line_fails_naming_the_closest(tmp_path):
    proc = run_embclf(["autoencode.epoch=3", f"output_dir={tmp_path / 'out'}"], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "embclf: error: Could not override 'autoencode.epoch': no such key. Did you mean autoencode.epochs?" \
        in proc.stderr and not (tmp_path / "out").exists()


def test_importing_embclf_patches_nothing_in_hydra():
    """``import embclf`` (and the entrypoint) only add entries to Hydra's ConfigStore and OmegaConf's resolvers."""
    import importlib

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    importlib.import_module("embclf.__main__")  # everything the entrypoint imports

    apply = ConfigLoaderImpl._apply_overrides_to_config
    assert apply.__module__ == "hydra._internal.config_loader_impl" and not hasattr(apply, "_embclf_suggests")
    assert "config_schema.yaml" in ConfigStore.instance().list("")
    assert all(OmegaConf.has_resolver(r) for r in ("embclf_name", "embclf_token", "embclf_output_dir"))
