"""A study resumed from its storage explores new points (issue 17): the seeded sampler used to restart its
sequence in every process and re-propose the first trials' parameters while the study had fewer than
``n_startup_trials`` trials. See hydra_plugins/embclf_launcher/optuna_resume.py."""
import importlib.util

import pytest

from conftest import run_embclf
from test_research import SMALL

if importlib.util.find_spec("optuna") is None:  # found, not imported: importing optuna costs each worker ~1.7 s
    pytest.skip('the Optuna search is the extra pip install -e ".[optuna]"', allow_module_level=True)

SEARCHED = ("model.beta", "autoencode.lr", "head.dropout")


def _sweep(tmp_path, out, *extra):
    # the autoencoder only (val_loss, minimized): the sampler's draws are what is tested, not the head
    return run_embclf(["hparams_search=vae_optuna", *SMALL, "stage=autoencode", "objective=val_loss",
                       "hydra.sweeper.direction=minimize", "hydra.sweeper.params.latent=8",
                       "hydra.sweeper.n_trials=1", "hydra.sweeper.n_jobs=1", "hydra.sweeper.storage=sqlite:///optuna.db",
                       "hydra.sweeper.study_name=resume_test", f"output_dir={out}", *extra], tmp_path)


@pytest.mark.slow
def test_a_resumed_study_draws_new_parameters(tmp_path):
    """Two consecutive 1-trial searches into one sqlite study (n_startup_trials=8: both in TPE's random phase):
    the second proposes parameters the first did not (it used to repeat them); the study holds both trials."""
    import optuna

    _sweep(tmp_path, tmp_path / "first")
    second = _sweep(tmp_path, tmp_path / "second")
    study = optuna.load_study(study_name="resume_test", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), trials
    first = [tuple(t.params[k] for k in SEARCHED) for t in trials[:1]]
    again = [tuple(t.params[k] for k in SEARCHED) for t in trials[1:]]
    assert not set(first) & set(again), f"the resumed search re-proposed {set(first) & set(again)}"
    assert "sampler seed 0 + 1 = 1" in second.stdout + second.stderr  # says why its draws differ


def test_the_resumed_seed_is_the_seed_plus_the_stored_trials():
    from hydra_plugins.embclf_launcher.optuna_resume import resumed_seed, trials_in_storage

    assert resumed_seed(0, 0) == 0 and resumed_seed(0, 5) == 5 and resumed_seed(None, 5) is None
    assert trials_in_storage(None, "x") == 0 and trials_in_storage("sqlite:///:memory:", None) == 0
