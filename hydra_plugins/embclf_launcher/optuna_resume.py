"""Hydra's Optuna sweeper, made to continue a stored study instead of repeating it (issue 17).

A seeded sampler (``hydra.sweeper.sampler.seed``, 0 in ``conf/hparams_search/vae_optuna.yaml``) restarts its
random sequence in every process, and Optuna stores the trials but not the sampler's state. Resuming a study
from its storage (``hydra.sweeper.storage=sqlite:///optuna.db``, same ``study_name``) therefore proposed the same
parameters again while the study had fewer than ``n_startup_trials`` trials (TPE's random start-up phase), and
the same first draws after it. :class:`ResumingOptunaSweeper` re-creates the sampler with the seed
``seed + <trials already in the storage>`` before the search starts: a fresh study keeps the configured seed
(so a search is still reproducible), a resumed one draws new points, and the same storage contents give the
same draws again. (Optuna's own advice is to pickle and restore the sampler; this needs no extra file.)

Used by ``hparams_search=vae_optuna`` (its ``hydra.sweeper._target_``); with a bare ``hydra/sweeper=optuna`` set
``hydra.sweeper._target_=hydra_plugins.embclf_launcher.optuna_resume.ResumingOptunaSweeper`` to get it.

Hydra imports every module under ``hydra_plugins`` at start-up, with or without the ``[optuna]`` extra: without
it this module defines nothing (and the entrypoint says how to install the extra, ``embclf/optional.py``).
"""
import functools
import logging
from typing import Any, List, Optional

log = logging.getLogger("embclf.launcher")

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # the [optuna] extra is not installed
    OptunaSweeper = None


def trials_in_storage(storage: Optional[str], study_name: Optional[str]) -> int:
    """How many trials (any state) the study ``study_name`` already holds in ``storage`` (an RDB URL such as
    ``sqlite:///optuna.db``); 0 for an in-memory search, no study name, or a study not created yet."""
    if not storage or not study_name:
        return 0
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage,
                                  sampler=optuna.samplers.RandomSampler(seed=0))  # not used: only counted
    except KeyError:  # no such study in this storage yet
        return 0
    return len(study.trials)


def resumed_seed(seed: Optional[int], done: int) -> Optional[int]:
    """The sampler seed for a search that starts with ``done`` trials stored: ``seed + done`` (``seed`` for a
    fresh study, None stays None: an unseeded sampler draws new points anyway)."""
    return None if seed is None else int(seed) + int(done)


if OptunaSweeper is not None:

    class ResumingOptunaSweeper(OptunaSweeper):
        """hydra-optuna-sweeper's ``OptunaSweeper``, re-seeding its sampler by the stored trial count (see the
        module docstring). Takes the same configuration (``hydra/sweeper=optuna``'s keys)."""

        def sweep(self, arguments: List[str]) -> Any:
            impl = self.sweeper  # OptunaSweeperImpl, after setup(): has config, sampler, storage, study_name
            sampler_cfg = impl.config.hydra.sweeper.get("sampler")
            seed = sampler_cfg.get("seed") if sampler_cfg is not None else None
            # GridSampler comes as a partial (it needs the search space first) and is not seeded
            if seed is not None and not isinstance(impl.sampler, functools.partial):
                done = trials_in_storage(impl.storage, impl.study_name)
                if done:
                    from hydra.utils import instantiate

                    new_seed = resumed_seed(seed, done)
                    impl.sampler = instantiate(sampler_cfg, seed=new_seed)
                    log.info("resuming study %s with %d stored trial(s): sampler seed %s + %d = %s, so it draws "
                             "new points", impl.study_name, done, seed, done, new_seed)
            return super().sweep(arguments)
