"""A value that does not fit its typed key (any Enum key of the schema, a bool, an int) is one paragraph naming
the key, its allowed values and the fix: no OmegaConf multi-line error, a non-zero exit, nothing written."""
from __future__ import annotations

import dataclasses
import enum
import typing

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from conftest import embclf_env, run_module

from embclf import config, overrides
from embclf.config import Config, conf_dir


def _typed_keys(cls=Config, prefix=""):
    """Every (dotted key, field type) of the schema, nested dataclasses walked."""
    hints = typing.get_type_hints(cls, vars(config))
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from _typed_keys(t, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", t


ENUM_KEYS = [(k, t) for k, t in _typed_keys() if isinstance(t, type) and issubclass(t, enum.Enum)]


def test_the_walk_finds_the_enum_keys():
    assert {"stage", "precision", "data.source", "model.arch", "model.decorrelation", "autoencode.select_on",
            "logger.wandb.mode"} <= {k for k, _ in ENUM_KEYS}


def _error(override: str) -> str:
    """The entrypoint's check (``embclf.overrides.bad_value``, run before Hydra composes anything), and proof that
    Hydra itself refuses the same value (so the check is about a real error, not a rule of ours)."""
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        with pytest.raises(ConfigCompositionException):
            compose("config", overrides=[override])
    msg = overrides.bad_value([override])
    assert msg is not None, override
    return msg


@pytest.mark.parametrize("key,enum_type", ENUM_KEYS, ids=[k for k, _ in ENUM_KEYS])
def test_every_enum_key_names_its_values(key, enum_type):
    msg = _error(f"{key}=bogus")
    names = [m.name for m in enum_type]
    assert msg.startswith(f"{key}=bogus is invalid: {key} is one of {', '.join(names)} (e.g. {key}=")
    assert "\n" not in msg and "Fix it on the command line" in msg


def test_precision_offers_auto_and_other_types_say_what_they_take():
    assert _error("precision=fp8").startswith(
        "precision=fp8 is invalid: precision is one of fp32, bf16, auto (e.g. precision=fp32).")
    assert _error("compile=maybe").startswith("compile=maybe is invalid: compile is true or false (e.g. compile=false).")
    assert _error("latent=abc").startswith("latent=abc is invalid: latent is an integer (e.g. latent=64).")


@pytest.mark.slow
def test_a_bad_enum_value_on_the_command_line_is_one_paragraph(tmp_path):
    """The real command (``python -m embclf``, forked: conftest.run_module): the paragraph alone, exit status 2,
    nothing written."""
    out = tmp_path / "out"
    proc = run_module("embclf", ["stage=foo", "logger=none", f"output_dir={out}"], tmp_path, embclf_env(tmp_path),
                      timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and "full_key" not in err and "object_type" not in err, err
    (para,) = [ln for ln in err.splitlines() if "is invalid" in ln]
    assert para.startswith("embclf: error: stage=foo is invalid: stage is one of autoencode, classify, all (e.g. stage=")
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))


def test_a_sweep_with_one_bad_value_is_refused_before_any_job():
    assert overrides.bad_value(["-m", "stage=all,foo"]).startswith("stage=foo is invalid")
    assert overrides.bad_value(["-m", "latent=32,64", "seed=range(0,3)", "model=vae", "autoencode.lr=1e-3"]) is None


def test_a_group_option_that_does_not_exist_is_one_paragraph(tmp_path):
    """``model=foo``: Hydra's own message is a dozen lines (options, then its search path), exit status 1."""
    assert overrides.bad_choice(["-m", "head=mlp,mpl"]).startswith(
        "head=mpl is not an option of the head group: it is one of knn, linear, logreg, mlp (conf/head/*.yaml; "
        "e.g. head=mlp).")
    assert overrides.bad_choice(["model=vae", "head=knn", "data=folder", "experiment=quick", "hydra/launcher=slurm"]) \
        is None
    assert overrides.bad_choice(["experiment=mine", "--config-dir", str(tmp_path)]) is None  # the user's own options
    out = tmp_path / "out"
    proc = run_module("embclf", ["model=foo", f"output_dir={out}"], tmp_path, embclf_env(tmp_path), timeout=300)
    assert proc.returncode == 2 and "Config search path" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().startswith("embclf: error: model=foo is not an option of the model group")
    assert not out.exists()
