"""Experiment presets (conf/experiment) and the Optuna search (conf/hparams_search) end to end at a tiny size,
and the task function's ``objective``. See docs/research.md."""
import json

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from embclf.__main__ import objective_key, objective_value
from embclf.config import ModelConfig, conf_dir
from embclf.runtime import EmbclfError

from conftest import CIFAR, run_embclf

# smaller than MINI: 100 images, 8-channel conv nets, 1 epoch; mechanics only
SMALL = ["data=folder", f"data.root={CIFAR}", "data.train_size=100", "data.test_size=50", "autoencode.epochs=1",
         "autoencode.image_epochs=[1]", "model.channels=[8,8,8,8,8]", "logger=none", "logger.projections=[pca]"]
# experiment=improved uses the improved objectives' keys (model.ce_weight, ...): composes once they exist
HAS_OBJECTIVES = "ce_weight" in OmegaConf.structured(ModelConfig)
PRESETS = ["quick", "reference"] + (["improved"] if HAS_OBJECTIVES else [])


def _compose(*overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("preset", ["quick", "reference", "improved"])
def test_each_preset_sets_its_own_sweep(preset):
    if preset == "improved" and not HAS_OBJECTIVES:
        pytest.skip("experiment=improved needs model.ce_weight, model.decorrelation_weight, model.kl_warmup_epochs")
    cfg = _compose(f"experiment={preset}")
    assert dict(cfg.hydra.sweeper.params) == {"model": "ae,vae", "latent": "32,64,128,256"}
    assert cfg.stage.value == "all"


def test_reference_preset_is_the_reference_study():
    ae, vae = _compose("experiment=reference", "model=ae"), _compose("experiment=reference", "model=vae")
    for c in (ae, vae):
        assert (c.autoencode.epochs, c.classify.epochs, c.autoencode.batch_size, c.classify.batch_size) == (80, 50, 200, 200)
        assert c.autoencode.lr == c.classify.lr == 1e-3 and c.classify.weight_decay == 0.0
        assert list(c.head.hidden) == [128, 64] and c.head.name == "mlp" and c.data.train_size is None
    # Adam weight decay 1e-4 for the plain AE only
    assert ae.model.weight_decay == 1e-4 and vae.model.weight_decay is None and vae.autoencode.weight_decay == 0.0
    assert vae.model.beta == 0.1


@pytest.mark.slow
def test_every_preset_runs_end_to_end(tmp_path):
    """One job per preset, all in one sweep (one interpreter): the command line's model/latent replace each
    preset's own sweep, SMALL its sizes; every job completes both stages."""
    out = tmp_path / "out"
    run_embclf(["-m", f"experiment={','.join(PRESETS)}", "model=ae", "latent=8", *SMALL, "classify.epochs=2",
                f"output_dir={out}"], tmp_path)
    summaries = {}
    for p in out.rglob("summary.json"):
        s = json.loads(p.read_text())
        exp = next(o.split("=", 1)[1] for o in s["overrides"] if o.startswith("experiment="))
        summaries[(exp, s["stage"])] = s
    assert set(summaries) == {(e, st) for e in PRESETS for st in ("autoencode", "classify")}, sorted(summaries)
    assert all(s["status"] == "completed" for s in summaries.values())
    # the presets' own settings reached the jobs: per-model weight decay, the quick preset's batch size
    assert summaries[("reference", "autoencode")]["weight_decay"] == 1e-4
    cfg = yaml.safe_load(next(out.glob("*/*experiment=quick*/autoencode/config.yaml")).read_text())
    assert cfg["autoencode"]["batch_size"] == 50 and cfg["data"]["train_size"] == 100
    if "improved" in PRESETS:
        assert set(summaries[("improved", "classify")]["probes"]) == {"mlp", "linear", "knn", "logreg"}


@pytest.mark.slow
def test_optuna_search_four_trials_through_the_local_launcher(tmp_path):
    """hparams_search=vae_optuna, 4 trials at a tiny size, 2 at a time through the local launcher. A trial
    that fails (classify.epochs=0, drawn for some trials) is recorded as failed and the search goes on; the
    best value is the best completed trial's val accuracy, returned by the task function."""
    out = tmp_path / "out"
    proc = run_embclf(["hparams_search=vae_optuna", *SMALL, "hydra.sweeper.params.latent=8",
                       "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=4", "classify.epochs=choice(2,0)",
                       f"output_dir={out}"], tmp_path)
    (sweep,) = [p.parent for p in out.glob("*/optimization_results.yaml")]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = sorted(sweep.glob("trial=*"))
    assert [t.name.split(",")[0] for t in trials] == [f"trial={i}" for i in range(4)]
    val, failed = {}, []
    for t in trials:
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((t / ".hydra" / "overrides.yaml").read_text()))
        assert 0.01 <= float(overrides["model.beta"]) <= 1.0 and 0.0 <= float(overrides["head.dropout"]) <= 0.5
        assert 1e-4 <= float(overrides["autoencode.lr"]) <= 3e-3 and overrides["model"] == "vae"
        if overrides["classify.epochs"] == "0":  # refused by the config check at the job's start, before training
            s = json.loads((t / "autoencode" / "summary.json").read_text())
            assert s["status"] == "failed" and "classify.epochs=0 is invalid" in s["error"], s
            failed.append(t)
        else:
            s = json.loads((t / "classify" / "summary.json").read_text())
            assert s["status"] == "completed" and s["latent"] == 8
            val[t] = s["val_accuracy"]
    assert failed and val, "seed 0 draws classify.epochs=0 for some trials, not all"
    assert result["best_value"] == pytest.approx(max(val.values()))
    assert set(result["best_params"]) == {"model.beta", "autoencode.lr", "head.dropout", "classify.epochs"}
    assert "Failed experiment" in proc.stdout + proc.stderr  # reported by the sweeper, not fatal (exit 0)


def test_objective_names_a_val_value(tmp_path):
    cfg = OmegaConf.create({"stage": "all", "objective": "auto"})
    assert objective_key(cfg) == "val_accuracy"
    assert objective_key(_compose("stage=autoencode")) == "val_loss"  # the composed config's Enum
    assert objective_key(OmegaConf.create({"stage": "autoencode", "objective": "auto"})) == "val_loss"
    (tmp_path / "summary.json").write_text(json.dumps({"val_accuracy": 0.4, "test_accuracy": 0.9,
                                                       "probes": {"knn": {"val_accuracy": 0.3}}}))
    assert objective_value(cfg, tmp_path) == 0.4
    assert objective_value(OmegaConf.create({"stage": "all", "objective": "probes.knn.val_accuracy"}), tmp_path) == 0.3
    with pytest.raises(EmbclfError, match="never selects on test"):
        objective_key(OmegaConf.create({"stage": "all", "objective": "test_accuracy"}))
    with pytest.raises(EmbclfError, match="available: val_accuracy, probes.knn.val_accuracy"):
        objective_value(OmegaConf.create({"stage": "all", "objective": "val_psnr"}), tmp_path)


def test_a_skipped_trial_returns_its_stored_objective(tmp_path):
    """A re-run search skips completed trials; the launcher hands the sweeper their stored objective."""
    from hydra_plugins.embclf_launcher.sweep_plan import PlannedJob, skipped_return

    (tmp_path / "classify").mkdir()
    (tmp_path / "classify" / "summary.json").write_text(json.dumps({"status": "completed", "val_accuracy": 0.4}))
    job = PlannedJob(idx=0, overrides=[], cfg=OmegaConf.create({"stage": "all"}), run_dir=tmp_path,
                     extra={"app": {"stage": "all", "objective": "auto"}})
    assert skipped_return(job).return_value == 0.4
