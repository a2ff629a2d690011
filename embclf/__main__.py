"""The single entrypoint: ``python -m embclf [overrides]`` / ``embclf [overrides]`` (``-m`` for sweeps).

Hydra composes ``conf/`` (validated by ``embclf.config``); this function turns one composed config into
run dirs. ``stage=all`` trains the autoencoder, then the classifier on it, inside the same job: the job dir
then holds two run dirs, ``autoencode/`` and ``classify/``, laid out exactly as when run separately.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from . import debug, runs, tracking
from .config import Stage, conf_dir
from .data import DataError
from .runtime import EmbclfError
from .stages import autoencode, classify

log = logging.getLogger("embclf")


def _stage_cfg(cfg: DictConfig, stage: Stage) -> DictConfig:
    sub = cfg.copy()
    with open_dict(sub):
        sub.stage = stage
    return sub


@contextlib.contextmanager
def _log_to(run_dir: Path):
    """Also write the log to ``run_dir/embclf.log`` (stage=all: each stage's run dir gets its own log)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "embclf.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def run_job(cfg: DictConfig, job_dir: Path, overrides) -> Path:
    """Run the stage(s) of ``cfg`` into ``job_dir``; on any error mark the run dir failed and re-raise."""
    stage = cfg.stage
    current = job_dir
    with open_dict(cfg):
        # a relative data.root means "relative to where I launched": store it absolute, so lookups and
        # resumes from another directory compare the same path
        cfg.data.root = _abs_root(cfg.data.root)
    # debug=fast shrinks the config; debug=overfit swaps in its one-batch loops (embclf/debug.py)
    ae_run, clf_run = autoencode.run, classify.run
    try:
        if debug.apply(cfg) == "overfit":
            ae_run, clf_run = debug.overfit_autoencoder, debug.overfit_head
        if stage == Stage.autoencode:
            return ae_run(cfg, job_dir, overrides)
        if stage == Stage.classify:
            return clf_run(cfg, job_dir, overrides)
        # stage=all: two complete run dirs; each gets its own copy of .hydra so it stands alone
        for name in ("autoencode", "classify"):
            if (job_dir / ".hydra").is_dir() and not (job_dir / name / ".hydra").exists():
                shutil.copytree(job_dir / ".hydra", job_dir / name / ".hydra")
        current = job_dir / "autoencode"
        with _log_to(current):
            ae_dir = ae_run(_stage_cfg(cfg, Stage.autoencode), current, overrides)
        current = job_dir / "classify"
        with _log_to(current):
            return clf_run(_stage_cfg(cfg, Stage.classify), current, overrides, encoder=ae_dir)
    except BaseException as e:  # KeyboardInterrupt/SystemExit too: the summary must not say "running"
        # a signal or a requeue (submitit exits with SystemExit) is an interruption, not a failure
        stopped = isinstance(e, (SystemExit, KeyboardInterrupt))
        if not (current / runs.SUMMARY).is_file() and HydraConfig.get().mode == RunMode.MULTIRUN:
            # bad input before anything was written: a sweep still records who failed and why (for the
            # launcher's table and the report); a single run leaves no run dir at all (see main)
            sub = current.name if current.name in ("autoencode", "classify") and stage == Stage.all else \
                ("autoencode" if stage == Stage.all else stage.value)
            runs.write_json_atomic(current / runs.SUMMARY, runs.base_summary(cfg, sub, overrides))
        if (current / runs.SUMMARY).is_file():
            runs.mark_failed(current, f"{type(e).__name__}: {e}", "interrupted" if stopped else "failed",
                             reason=getattr(e, "reason", None))
        tracking.finish_active(exit_code=1)  # the wandb run shows failed; the next job in this process starts fresh
        if not isinstance(e, (EmbclfError, DataError, SystemExit, KeyboardInterrupt)):
            log.error("failed:\n%s", traceback.format_exc())
        raise


def _abs_root(root):
    if root in (None, "", "???"):
        return root
    return os.path.abspath(os.path.expanduser(str(root)))


def _remove_if_empty(job_dir: Path) -> None:
    """Remove a run dir that holds only what Hydra wrote before the job failed on bad input."""
    if job_dir.is_dir() and {p.name for p in job_dir.iterdir()} <= {".hydra", "embclf.log"}:
        shutil.rmtree(job_dir, ignore_errors=True)


@hydra.main(config_path=conf_dir(), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra task function (see module docstring)."""
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    try:
        run_job(cfg, job_dir, list(hc.overrides.task))
        debug.warn(cfg)  # a debug run says so again at its end, where the user looks
    except (EmbclfError, DataError) as e:
        if hc.mode == RunMode.RUN:  # one paragraph, no traceback, exit status 2, no half-made run dir
            _remove_if_empty(job_dir)
            print(f"embclf: error: {e}", file=sys.stderr)
            sys.exit(2)
        log.error("%s", e)
        raise  # in a sweep the launcher records and reports it


if __name__ == "__main__":
    main()
