"""The core install pulls no optuna, SQLAlchemy or alembic (issue 18): the Optuna search is the extra
``pip install -e ".[optuna]"``, and a search without it says how to install it."""
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
KEPT_OUT = {"optuna", "sqlalchemy", "alembic", "hydra-optuna-sweeper"}


def _name(req: Requirement) -> str:
    return re.sub(r"[-_.]+", "-", req.name).lower()


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _core(requirements) -> list:
    """The requirements that hold without any extra (markers evaluated here, ``extra`` unset)."""
    out = []
    for text in requirements or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req)
    return out


def test_core_dependencies_leave_optuna_sqlalchemy_and_alembic_to_the_extra():
    project = _pyproject()
    core = {_name(Requirement(d)) for d in project["dependencies"]}
    assert not core & KEPT_OUT, f"core dependencies of embclf include {sorted(core & KEPT_OUT)}: move them to [optuna]"
    extra = {_name(Requirement(d)) for d in project["optional-dependencies"]["optuna"]}
    assert {"hydra-optuna-sweeper", "sqlalchemy", "alembic"} <= extra
    # the README's test command installs ".[test]": the Optuna tests need the extra
    assert any(_name(Requirement(d)) == "embclf" and "optuna" in Requirement(d).extras
               for d in project["optional-dependencies"]["test"])


def test_nothing_the_core_install_pulls_in_requires_them_either():
    """The dependency closure of the core requirements, walked through the installed distributions' own metadata
    (extras not taken), reaches none of optuna, SQLAlchemy, alembic."""
    todo = _core(_pyproject()["dependencies"])
    seen, path = set(), {}
    while todo:
        req = todo.pop()
        name = _name(req)
        if name in seen:
            continue
        seen.add(name)
        try:
            below = _core(metadata.requires(req.name))
        except metadata.PackageNotFoundError:
            continue  # not installed here (an optional platform dependency): nothing below it to walk
        for sub in below:
            path.setdefault(_name(sub), f"{path.get(name, name)} -> {_name(sub)}")
        todo.extend(below)
    pulled = {name: path.get(name, name) for name in seen & KEPT_OUT}
    assert not pulled, f"the core install pulls {pulled}"


def test_the_installed_metadata_says_the_same():
    """``importlib.metadata.requires('embclf')`` (what pip installs from): optuna & co. only under an extra."""
    try:
        installed = metadata.requires("embclf") or []
    except metadata.PackageNotFoundError:
        pytest.skip("embclf is not installed (run from a checkout without pip install -e .)")
    core_installed = {_name(r) for r in _core(installed)}
    core_here = {_name(Requirement(d)) for d in _pyproject()["dependencies"]}
    if core_installed != core_here:
        pytest.skip("the installed embclf metadata predates this pyproject.toml: pip install -e . again to check it")
    assert not core_installed & KEPT_OUT
    optuna_extra = {_name(Requirement(r)) for r in installed if "extra == \"optuna\"" in r.replace("'", '"')}
    assert "hydra-optuna-sweeper" in optuna_extra


# Runs python with optuna and its Hydra plugin made unimportable, as in an install without the extra.
_WITHOUT_OPTUNA = textwrap.dedent("""
    import importlib.abc, sys

    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("optuna", "sqlalchemy", "alembic") or name.startswith("hydra_plugins.hydra_optuna"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
""")


@pytest.mark.slow
def test_a_search_without_the_extra_says_how_to_install_it(tmp_path):
    """End to end with the plugin hidden (``hydra/sweeper=optuna`` takes the same path: see the test below)."""
    override = "hparams_search=vae_optuna"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_WITHOUT_OPTUNA)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "embclf", override, f"output_dir={tmp_path / 'out'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert 'pip install -e ".[optuna]"' in err and override in err, err
    assert "Traceback" not in err and "Could not load" not in err, err
    assert len(err.strip().splitlines()) == 1, err  # one paragraph
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_check_stays_out_of_the_way():
    """No search asked for, or the plugin installed: the check says nothing."""
    from embclf.optional import missing_optuna_message

    assert missing_optuna_message(["model=vae", "latent=8"], installed=False) is None
    assert missing_optuna_message(["hparams_search=vae_optuna"], installed=True) is None
    assert missing_optuna_message(["hparams_search=vae_optuna"], installed=False) is not None
    assert missing_optuna_message(["-m", "hydra/sweeper=optuna"], installed=False) is not None
    assert missing_optuna_message(["hydra/sweeper=basic"], installed=False) is None
