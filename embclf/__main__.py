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
import signal
import sys
import traceback
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from . import debug, lifecycle, locks, overrides, references, runs, runtime, tracking
from .config import Stage, conf_dir
from .validation import problems
from .identity import absolute_paths
from .data import DataError
from .optional import needs_search_extras
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
    """Run the stage(s) of ``cfg`` into ``job_dir``; on any error mark the run dir failed and re-raise.

    The process holds ``job_dir`` for the whole job (``embclf.locks``; stage=all: the job dir covers
    ``autoencode/`` and ``classify/``). A single run and a sweep job took it already, before Hydra wrote its
    record there (``hold_dirs.HoldOutputDirs``, the launchers); this hold covers any other caller. Raises
    ``locks.InUseError`` when another live process holds it, before anything is read or written."""
    # a signal anywhere in the job (data loading, embedding, fits, plots) records the run "interrupted"
    with lifecycle.hold(job_dir):
        before = _config_mtimes(job_dir)
        try:
            return _run_stages(cfg, job_dir, overrides, before)
        finally:
            _settle_hydra_record(job_dir, before)


PENDING_HYDRA = runs.PENDING_HYDRA


def _config_mtimes(job_dir: Path) -> dict:
    found = {}
    for d in (job_dir, job_dir / "autoencode", job_dir / "classify"):
        with contextlib.suppress(OSError):
            found[str(d)] = (d / runs.CONFIG).stat().st_mtime_ns
    return found


def _settle_hydra_record(job_dir: Path, before: dict) -> None:
    pending = job_dir / PENDING_HYDRA
    if not pending.is_dir():
        return
    if (job_dir / ".hydra").is_dir() and _config_mtimes(job_dir) == before:
        # an earlier run's record, and no stage wrote its config this time (refused, failed on input, or
        # already completed): keep the run dir as it was
        shutil.rmtree(pending, ignore_errors=True)
        return
    runs.promote_hydra_record(job_dir)  # a stage accepted it (normally done already by runs.write_config)


def _run_stages(cfg: DictConfig, job_dir: Path, overrides, before: dict) -> Path:
    bad = problems(cfg)
    if bad:  # before anything is written: one paragraph naming every bad key
        raise EmbclfError("invalid config, nothing was run: " + " ".join(bad))
    stage = cfg.stage
    current = job_dir
    # precision=auto becomes what this machine runs (bf16 where native, else fp32) before anything is written:
    # the run dir's config, identity and summary hold the precision the run used (docs/run-dirs.md)
    runtime.resolve_precision_in(cfg)
    # a relative path means "relative to where I launched" (not the job's working dir, which
    # hydra.job.chdir=true moves into the run dir): store it absolute, so lookups and resumes compare one path
    absolute_paths(cfg, _launch_dir())
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
        ae_cfg = _stage_cfg(cfg, Stage.autoencode)
        ae_dir = _sibling_encoder(ae_cfg, job_dir)
        record = next((d for d in (job_dir / PENDING_HYDRA, job_dir / ".hydra") if d.is_dir()), None)
        for name in ("autoencode", "classify") if ae_dir is None else ("classify",):
            if record is not None and not (job_dir / name / ".hydra").exists():
                shutil.copytree(record, job_dir / name / ".hydra")
        current = job_dir / "autoencode"
        if ae_dir is None:
            with _log_to(current):
                ae_dir = ae_run(ae_cfg, current, overrides)
        current = job_dir / "classify"
        with _log_to(current):
            return clf_run(_stage_cfg(cfg, Stage.classify), current, overrides, encoder=ae_dir)
    except BaseException as e:  # KeyboardInterrupt/SystemExit too: the summary must not say "running"
        # a run dir no stage accepted this time (a refused re-run: another config is in it) is not ours to mark
        if _config_mtimes(job_dir) != before or not (current / runs.SUMMARY).is_file():
            # bad input before anything was written: a sweep still records who failed and why (for the
            # launcher's table and the report); a single run leaves no run dir at all (see main)
            sub = current.name if current.name in ("autoencode", "classify") and stage == Stage.all else \
                ("autoencode" if stage == Stage.all else stage.value)
            base = lifecycle.base_summary(cfg, sub, overrides) if HydraConfig.get().mode == RunMode.MULTIRUN else None
            lifecycle.record_failure(current, e, base)
        tracking.finish_active(exit_code=1)  # the wandb run shows failed; the next job in this process starts fresh
        if not isinstance(e, (EmbclfError, DataError, SystemExit, KeyboardInterrupt)):
            log.error("failed:\n%s", traceback.format_exc())
        raise


def _sibling_encoder(ae_cfg: DictConfig, job_dir: Path) -> Optional[Path]:
    """For a ``stage=all`` job of a sweep: a completed autoencode run of the same experiment (identity) in
    another job dir of the same sweep dir, when this job has none of its own, else None.

    One experiment runs once per sweep dir: a sweep re-invoked with another head (``head=mlp,linear``) trains
    only the new heads, on the autoencoders the sweep already has. The job then has no ``autoencode/`` of its
    own; its ``classify/`` run records the encoder it used (``encoder_run``), which is how the report joins them.
    """
    own = job_dir / "autoencode"
    if HydraConfig.get().mode != RunMode.MULTIRUN or runs.stored_identity(own, "autoencode") is not None:
        return None
    found = references.find_encoder_run(ae_cfg, job_dir.parent)
    if found is not None and found.parent != job_dir:
        log.info("stage=all: the sweep dir already holds this autoencoder, completed, in %s; training the head on "
                 "it (nothing is retrained)", found)
        return found
    return None


def _launch_dir() -> str:
    """The directory the command was launched from (Hydra's runtime.cwd; the job may run elsewhere)."""
    try:
        return str(HydraConfig.get().runtime.cwd)
    except Exception:  # noqa: BLE001 -- called outside a Hydra job (tests): the working directory
        return os.getcwd()


# what a job dir holds before any stage accepted it: Hydra's record, the log, the lock (and for stage=all the same
# in its autoencode/ and classify/ run dirs, which get their own copy of the record and log before the stage runs)
_NOTHING_YET = {".hydra", PENDING_HYDRA, "embclf.log", locks.LOCK_NAME}


def _holds_nothing(d: Path, stage_dirs: bool = True) -> bool:
    for p in d.iterdir():
        if p.name in _NOTHING_YET:
            continue
        if not (stage_dirs and p.name in ("autoencode", "classify") and p.is_dir() and _holds_nothing(p, False)):
            return False
    return True


def _remove_if_empty(job_dir: Path) -> None:
    """Remove a run dir that holds only what Hydra and the log wrote before the job failed on bad input (for
    stage=all: its ``autoencode/`` and ``classify/`` holding no more than that either): nothing half-written."""
    if job_dir.is_dir() and _holds_nothing(job_dir):
        locks.forget(job_dir)  # held until here; the lock file goes with the dir
        shutil.rmtree(job_dir, ignore_errors=True)


def objective_key(cfg) -> str:
    """The summary key the task function returns (``objective``; ``auto`` = ``val_accuracy`` for
    stage=classify|all, ``val_loss`` for stage=autoencode). Dotted keys reach nested values
    (``probes.knn.val_accuracy``).

    Raises ``EmbclfError`` unless the key's last part starts with ``val_``: a search must never select on test.
    """
    key = cfg.get("objective", "auto")
    if key == "auto":
        # the stage as an Enum (composed config) or as text (a resolved plain copy)
        return "val_loss" if getattr(cfg.stage, "value", cfg.stage) == Stage.autoencode.value else "val_accuracy"
    if not key.split(".")[-1].startswith("val_"):
        raise EmbclfError(
            f"objective={key}: the objective must be a validation value of the last stage's summary.json (a val_* "
            "key, e.g. objective=val_accuracy, objective=probes.knn.val_accuracy, objective=val_psnr), so a "
            "hyperparameter search never selects on test. objective=auto picks val_accuracy (stage=classify|all) "
            "or val_loss (stage=autoencode).")
    return key


def objective_value(cfg, run_dir: Path) -> float:
    """The ``objective`` (see ``objective_key``) read from ``run_dir``'s summary.json, as a float.

    Raises ``EmbclfError`` naming the key and the val_* keys the summary has when it is missing or not a number."""
    key = objective_key(cfg)
    summary = runs.read_summary(Path(run_dir)) or {}
    value = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        have = sorted(k for k in summary if k.startswith("val_")) + \
            [f"probes.{p}.val_accuracy" for p in summary.get("probes", {}) or {}]
        raise EmbclfError(f"objective={key}: {run_dir}/summary.json has no number there; available: "
                          f"{', '.join(have) or 'none'}.")
    return float(value)


def _interrupted(cfg: DictConfig, job_dir: Path, hc, signum: int = signal.SIGINT) -> None:
    """Ctrl-C (or SIGTERM, or SIGUSR2 outside SLURM: ``signum``) on a single run (its summary already says
    "interrupted"): log one line saying what was saved, read from the run dir's files
    (``tracking.saved_state``: a checkpoint at an epoch's end, or mid-epoch, or nothing), and the exact command
    that resumes it (``tracking.resume_command``, with its ``hydra.run.dir``), then exit with status
    128 + signum (130 for Ctrl-C, 143 for SIGTERM), as a shell reports them. A run dir that holds nothing yet
    (interrupted before the run started) is removed, as after bad input."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):  # a second signal must not make it a traceback
        signal.signal(s, signal.SIG_IGN)
    _remove_if_empty(job_dir)
    if not job_dir.is_dir():
        saved = "nothing was saved (interrupted before the run started)"
    elif cfg.stage == Stage.all:
        parts = [f"{name}/ {tracking.saved_state(job_dir / name)}" if (job_dir / name / runs.SUMMARY).is_file()
                 else f"{name}/ not started" for name in ("autoencode", "classify")]
        saved = f"saved in {job_dir}: " + "; ".join(parts)
    else:
        saved = f"saved in {job_dir}: {tracking.saved_state(job_dir)}"
    cmd = tracking.resume_command(list(hc.overrides.task), list(hc.overrides.hydra), job_dir)
    how = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    log.warning("interrupted (%s); %s. %s with: %s", how, saved, "Resume" if job_dir.is_dir() else "Start it again", cmd)
    sys.exit(128 + signum)


@hydra.main(config_path=conf_dir(), config_name="config", version_base=None)
def task(cfg: DictConfig) -> float:
    """Hydra task function (see module docstring). Returns the value named by ``objective`` (a float, what
    a sweeper such as Optuna's optimizes; see docs/research.md)."""
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    if hasattr(signal, "SIGXFSZ"):  # past `ulimit -f` a write then fails with a message instead of killing the job
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        objective_key(cfg)  # a bad objective fails before any training
        run_dir = run_job(cfg, job_dir, list(hc.overrides.task))
        debug.warn(cfg)  # a debug run says so again at its end, where the user looks
        return objective_value(cfg, run_dir)
    except (KeyboardInterrupt, lifecycle.Stopped) as e:  # Ctrl-C; SIGTERM, SIGUSR2 (lifecycle.stop_on_signals)
        if hc.mode != RunMode.RUN:
            raise  # in a sweep the launcher records and reports it
        # one line: what was saved, the command that resumes it; exit 128 + signum (130, 143)
        _interrupted(cfg, job_dir, hc, getattr(e, "signum", signal.SIGINT))
    except locks.InUseError as e:  # another process holds the job dir: nothing there is ours to touch
        if hc.mode == RunMode.RUN:
            print(f"embclf: error: {e}", file=sys.stderr)
            sys.exit(2)
        raise  # not logged: the log is the holder's; the launcher reports it
    except (EmbclfError, DataError) as e:
        if hc.mode == RunMode.RUN:  # one paragraph, no traceback, exit status 2, no half-made run dir
            _remove_if_empty(job_dir)
            print(f"embclf: error: {e}", file=sys.stderr)
            sys.exit(2)
        log.error("%s", e)
        raise  # in a sweep the launcher records and reports it


@needs_search_extras  # before Hydra: a search without its extra says how to install it (embclf/optional.py)
def main() -> None:
    """``python -m embclf`` / ``embclf``: check the command line's keys (``embclf.overrides``: a mistyped key
    names the closest valid one, exit status 2, nothing written), then run ``task`` under Hydra."""
    argv = sys.argv[1:]
    bad = overrides.mistyped(argv) or overrides.bad_choice(argv) or overrides.bad_value(argv)
    if bad:
        print(f"embclf: error: {bad}", file=sys.stderr)
        sys.exit(2)
    task()


if __name__ == "__main__":
    main()
