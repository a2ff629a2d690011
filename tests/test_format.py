"""Run dirs carry a format version (``runs.FORMAT``): written into summary.json and identity.json; a run dir of a
newer format is refused with one paragraph and left as it was. The summary also records the job's config group
choices, so no reader needs Hydra's ``.hydra/`` record for them."""
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write

from embclf import identity, runs
from embclf.config import conf_dir
from embclf.runtime import EmbclfError


def _compose(*overrides, hydra_node=False):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_node)


def _accepted(tmp_path):
    cfg = _compose("model=vae", "latent=8")
    ident = identity.identity(cfg, "autoencode")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runs.write_config(run_dir, cfg, ident, "autoencode")
    runs.write_json_atomic(run_dir / runs.SUMMARY, {**runs.base_summary(cfg, "autoencode", []), "status": "completed"})
    return run_dir, ident


def test_records_carry_the_format(tmp_path):
    run_dir, ident = _accepted(tmp_path)
    assert runs.FORMAT == 1
    assert json.loads((run_dir / identity.IDENTITY_FILE).read_text())["format"] == runs.FORMAT
    assert runs.read_summary(run_dir)["format"] == runs.FORMAT
    assert runs.open_run_dir(run_dir, ident, "autoencode") == "completed"
    assert runs.completed_in(run_dir, ident, "autoencode")


@pytest.mark.parametrize("record", [identity.IDENTITY_FILE, runs.SUMMARY])
def test_a_newer_format_is_refused_and_left_alone(tmp_path, record):
    run_dir, ident = _accepted(tmp_path)
    path = run_dir / record
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": runs.FORMAT + 1}))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(EmbclfError) as e:
        runs.open_run_dir(run_dir, ident, "autoencode")
    msg = str(e.value)
    assert f"{path} was written by a newer embclf (run dir format {runs.FORMAT + 1}" in msg
    assert f"reads format {runs.FORMAT} and older" in msg and "\n" not in msg
    assert not runs.completed_in(run_dir, ident, "autoencode")  # the launcher does not skip it: the stage refuses
    assert runs.find_encoder_run(_compose("model=vae", "latent=8"), tmp_path) is None
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_the_summary_records_the_group_choices(tmp_path):
    HydraConfig.instance().cfg = None  # (an earlier test in this process may have set one)
    assert "choices" not in runs.base_summary(_compose(), "autoencode", [])  # no Hydra job: nothing to record
    cfg = _compose("experiment=quick", "model=vae", "head=knn", hydra_node=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    try:
        s = runs.base_summary(cfg, "autoencode", ["experiment=quick", "model=vae", "head=knn"])
    finally:
        HydraConfig.instance().cfg = None
    assert s["choices"]["experiment"] == "quick" and s["choices"]["model"] == "vae" and s["choices"]["head"] == "knn"
    assert s["choices"]["hparams_search"] is None and not any(k.startswith("hydra") for k in s["choices"])
    json.dumps(s)  # plain values only
