"""Tracking: the wandb run of a stage run, progress bars, provenance, and the "where do outputs go" line.

The stages call a small object and nothing else::

    tracker = tracking.start(cfg, run_dir, "autoencode")    # after summary.json says "running"
    tracker.log_epoch(epoch, train=train_m, val=val_m, lr=lr)  # once per epoch
    tracker.log_images(epoch, recon=path, samples=path)     # PNGs already written to images/
    tracker.finish(summary)                                 # at the end; failures: see finish_active()

``logger=none`` or ``logger.wandb.mode=disabled`` gives a tracker that does nothing and never imports
wandb. Otherwise there is exactly one wandb run per stage run, also when the basic launcher runs several
jobs in one process, and also across the attempts of a resumed run (its id is kept in the run dir's
``wandb_run_id``; ``wandb.init(id=..., resume="allow")``): ``finish`` closes it, and ``embclf.__main__.run_job`` calls ``finish_active(1)`` when
a stage raises, so a failed job shows as failed (exit code 1) and the next job starts a fresh run.

Mode (``logger.wandb.mode``): ``online``/``offline``/``disabled`` as given; ``auto`` (the default) uses
``WANDB_MODE`` if set, else online only when the user is logged in (``WANDB_API_KEY`` or a netrc entry for
the wandb host) *and* the host accepts a TCP connection within 2 s; otherwise offline. The mode is decided
before ``wandb.init``, so a node without network never waits on wandb's own time-outs, and nothing prompts.
The API key is only ever tested for presence; it is never read into a config, a log or a run dir.
"""
from __future__ import annotations

import atexit
import logging
import netrc
import os
import re
import secrets
import shlex
import socket
import string
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from hydra.experimental.callback import Callback

from . import runs

log = logging.getLogger(__name__)

DEFAULT_HOST = "https://api.wandb.ai"
PROBE_SECONDS = 2.0


# --- mode -----------------------------------------------------------------------------------------

def _wandb_host() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST


def logged_in() -> bool:
    """True when wandb would find credentials without prompting: ``WANDB_API_KEY``, an identity token file,
    or a netrc entry (``$NETRC`` or ``~/.netrc``) for the wandb host. Never reads the key's value out."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(_wandb_host()).hostname or ""
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """True if ``url``'s host accepts a TCP connection within ``timeout`` seconds (DNS included).

    Runs in a daemon thread because ``getaddrinfo`` ignores socket time-outs: a node without network
    may hang in DNS far longer than ``timeout``.
    """
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    ok = []

    def probe():
        try:
            socket.create_connection((u.hostname, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def resolve_mode(requested: str) -> tuple:
    """Decide the wandb mode before ``wandb.init``. Returns ``(mode, reason)``, mode in online|offline|disabled.

    ``requested``: ``logger.wandb.mode`` (auto|online|offline|disabled). An online mode whose server does not
    answer within 2 s becomes offline (a one-line warning), so a job never waits on the network.
    """
    if requested == "auto":
        env = (os.environ.get("WANDB_MODE") or "").strip().lower()
        if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
            return "disabled", "WANDB_DISABLED is set"
        if env:
            mode = {"dryrun": "offline", "run": "online"}.get(env, env)
            if mode not in ("online", "offline", "disabled"):
                log.warning("WANDB_MODE=%s is not online/offline/disabled; using offline", env)
                mode = "offline"
            reason = f"WANDB_MODE={env}"
        elif logged_in():
            mode, reason = "online", "logged in"
        else:
            return "offline", "not logged in (wandb login, or WANDB_API_KEY, enables online)"
    else:
        mode, reason = requested, f"logger.wandb.mode={requested}"
    if mode == "online" and not reachable(_wandb_host()):
        log.warning("wandb: %s does not answer within %.0f s; logging offline instead (upload later with "
                    "`wandb sync`)", _wandb_host(), PROBE_SECONDS)
        return "offline", f"{reason}, but {_wandb_host()} unreachable"
    return mode, reason


# --- the tracker ----------------------------------------------------------------------------------

_active: Optional["Tracker"] = None  # the tracker with an open wandb run in this process, if any


class Tracker:
    """The wandb side of one stage run. Every method is a no-op when ``self.run`` is None (no wandb)."""

    def __init__(self, run=None, run_dir: Optional[Path] = None):
        self.run = run
        self.run_dir = run_dir

    def log_epoch(self, epoch: int, lr: Optional[float] = None, **splits: Dict[str, float]) -> None:
        """Log one epoch's metrics, e.g. ``log_epoch(3, train={"mse": ...}, val={...}, lr=1e-3)`` as
        ``train/mse``, ``val/mse``, ..., ``lr`` against the x-axis ``epoch``."""
        if self.run is None:
            return
        row: Dict[str, Any] = {"epoch": epoch}
        for split, m in splits.items():
            row.update({f"{split}/{k}": v for k, v in m.items() if isinstance(v, (int, float))})
        if lr is not None:
            row["lr"] = lr
        self.run.log(row)

    def log_images(self, epoch: Optional[int] = None, **paths: Path) -> None:
        """Log PNG files already written to the run dir as wandb images, keyed ``images/<name>``."""
        if self.run is None:
            return
        import wandb

        row: Dict[str, Any] = {f"images/{k}": wandb.Image(str(p)) for k, p in paths.items() if Path(p).is_file()}
        if epoch is not None:
            row["epoch"] = epoch
        self.run.log(row)

    def log_embeddings(self, z, labels, classes: List[str], rows: int, seed: int = 0) -> None:
        """Log up to ``rows`` test embeddings as the table ``embeddings`` (columns z0..z{D-1}, class).

        ``z``: float [N, D], ``labels``: int [N] indexing ``classes``. A fixed random subset (``seed``) keeps
        the table the same across reruns. wandb's 2-D projection panel (PCA / t-SNE / UMAP) reads it.
        """
        if self.run is None or rows <= 0:
            return
        import numpy as np
        import wandb

        z, labels = np.asarray(z, dtype=np.float32), np.asarray(labels)
        pick = np.random.default_rng(seed).permutation(len(z))[:rows]
        pick.sort()
        cols = [f"z{i}" for i in range(z.shape[1])] + ["class"]
        data = [[*map(float, z[i]), classes[int(labels[i])]] for i in pick]
        self.run.log({"embeddings": wandb.Table(columns=cols, data=data)})

    def log_confusion(self, y_true, y_pred, classes: List[str]) -> None:
        """Log the test confusion matrix as wandb's interactive confusion-matrix chart."""
        if self.run is None:
            return
        import wandb

        self.run.log({"confusion_matrix": wandb.plot.confusion_matrix(
            y_true=[int(v) for v in y_true], preds=[int(v) for v in y_pred], class_names=list(classes))})

    def finish(self, summary: Optional[dict] = None, exit_code: int = 0) -> None:
        """Copy the numeric headline values of ``summary`` into the wandb summary and close the run.

        ``exit_code`` != 0 marks the run failed in wandb. Safe to call twice.
        """
        global _active
        if self.run is None:
            return
        try:
            if summary:
                self.run.summary.update({k: v for k, v in summary.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)
                                         and k not in ("pid", "start_time", "end_time")})
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001 -- tracking must never turn a finished training run into a failed job
            log.warning("wandb finish failed: %s", e)
        finally:
            self.run = None
            if _active is self:
                _active = None


def _group(run_dir: Path) -> str:
    """The sweep dir's name (multirun), the job dir's name (single run), or the run dir's parent's name."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            return Path(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.runtime.output_dir).name
    except Exception:  # noqa: BLE001 -- outside a Hydra app (tests, notebooks)
        pass
    return Path(run_dir).resolve().parent.name


def start(cfg, run_dir: Path, stage: str, encoder_cfg: Optional[dict] = None) -> Tracker:
    """Open the wandb run of this stage run (or a no-op tracker; see module docstring).

    The run is named ``<model>-z<latent>-s<seed>`` (e.g. ``vae-z64-s0``; classify adds the head: ``vae-z64-s0-knn``),
    grouped by sweep, typed by stage and tagged ``model=``, ``latent=``, ``data=`` (classify: ``head=``); its config is the resolved config as plain values. A classify
    run passes its encoder's resolved config as ``encoder_cfg``: the model and latent it really ran on (which
    ``classify.encoder=PATH`` may make differ from its own ``model``/``latent`` keys) then name, tag and
    configure the run, so filtering runs by ``latent`` finds the classifier too.

    If wandb.init itself fails (bad credentials, an unwritable dir) the job goes on without wandb after a
    one-line warning: tracking is never a reason to lose a training run.
    """
    global _active
    lc = cfg.get("logger")
    if lc is None or lc.name == "none":
        return Tracker()
    requested = getattr(lc.wandb.mode, "value", lc.wandb.mode)
    if requested == "disabled":
        return Tracker()
    mode, reason = resolve_mode(str(requested))
    if mode == "disabled":
        log.info("wandb disabled (%s)", reason)
        return Tracker()
    finish_active(0)  # a previous job in this process that forgot to finish: close it, never reuse it
    import wandb

    config = runs.resolved(cfg)
    if encoder_cfg is not None:
        config.update(model=encoder_cfg["model"], latent=encoder_cfg["latent"])
    model, latent, data = config["model"]["name"], config["latent"], config["data"]["source"]
    # a classify run is also named and tagged by its head (several probes may run on one encoder)
    head_name = config.get("head", {}).get("name") if stage == "classify" else None
    head_part, head_tag = (f"-{head_name}", [f"head={head_name}"]) if head_name else ("", [])
    try:
        # one wandb run per run dir: a resumed job continues it (same id) instead of opening a second run
        run_id = run_id_of(run_dir)
        run = wandb.init(
            id=run_id, resume="allow",
            mode=mode, dir=str(run_dir), project=lc.wandb.project, entity=lc.wandb.entity,
            group=_group(run_dir), job_type=stage, name=f"{model}-z{latent}-s{cfg.seed}{head_part}",
            tags=[f"model={model}", f"latent={latent}", f"data={data}", *head_tag, *lc.wandb.tags],
            config=config, reinit="finish_previous",
            # silent: the one line below says what matters; wandb's banner would repeat per job in a sweep
            settings=wandb.Settings(silent=True, init_timeout=60),
        )
    except Exception as e:  # noqa: BLE001 -- wandb is optional: whatever stops it from starting, the run goes on without it
        log.warning("wandb.init failed (%s: %s); continuing without wandb (set logger=none to skip it)",
                    type(e).__name__, e)
        return Tracker()
    run.define_metric("epoch")
    for prefix in ("train/*", "val/*", "lr", "images/*"):
        run.define_metric(prefix, step_metric="epoch")
    where = run.url if mode == "online" else f"upload later with: wandb sync {Path(run.dir).parent}"
    log.info("wandb %s run %s (%s); %s", mode, run.id, reason, where)
    _active = Tracker(run, Path(run_dir))
    return _active


WANDB_ID_FILE = "wandb_run_id"


def run_id_of(run_dir: Path) -> str:
    """The wandb run id of ``run_dir``: read from ``run_dir/wandb_run_id``, or made (random, like wandb's own)
    and written there (atomically) before the first ``wandb.init``, so every attempt of a resumed job logs to
    the same wandb run (``wandb.init(id=..., resume="allow")``)."""
    path = Path(run_dir) / WANDB_ID_FILE
    try:
        run_id = path.read_text().strip()
    except OSError:
        run_id = ""
    if not run_id:  # 8 characters of [a-z0-9], as wandb's own ids
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        runs._atomic(path, lambda t: t.write_text(run_id + "\n"))
    return run_id


def finish_active(exit_code: int = 1) -> None:
    """Close the wandb run left open by a stage that raised (marked failed unless ``exit_code`` is 0)."""
    if _active is not None:
        _active.finish(exit_code=exit_code)


# --- progress -------------------------------------------------------------------------------------

def progress(total: int, desc: str):
    """A tqdm bar over ``total`` images (rate shown in img/s) when stderr is a terminal; disabled otherwise,
    so batch logs (SLURM, CI) get only the one line per epoch the stages log."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, leave=False, dynamic_ncols=True,
                disable=None, file=sys.stderr)


def _remove_if_only_multirun_yaml(sweep_dir: Path) -> None:
    """Remove ``sweep_dir`` if it holds nothing but Hydra's ``multirun.yaml`` (no job ever started)."""
    try:
        if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} == {"multirun.yaml"}:
            (sweep_dir / "multirun.yaml").unlink()
            sweep_dir.rmdir()
    except OSError:
        pass


class AnnounceOutputs(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): a single run says where it writes (its run
    dir); a sweep says where its outputs go, and at the end how to summarise them."""

    def on_run_start(self, config, **kwargs) -> None:
        # a single run says where it writes, as a sweep does (the dir is also the key to resuming it)
        log.info("run dir: %s", Path(str(config.hydra.run.dir)).resolve())

    def on_multirun_start(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        log.info("sweep outputs: %s", sweep_dir)
        # a sweep refused before any job started (a composition error, an invalid value) leaves nothing behind
        atexit.register(_remove_if_only_multirun_yaml, sweep_dir)

    def on_multirun_end(self, config, **kwargs) -> None:
        # the interpreter running now (a bare `python` fails outside an activated venv); quoted for the shell
        cmd = [sys.executable, "-m", "embclf.report", str(Path(str(config.hydra.sweep.dir)).resolve())]
        log.info("sweep done; summarise it with: %s", " ".join(shlex.quote(c) for c in cmd))


def run_dir_override(run_dir: Path) -> str:
    """``"hydra.run.dir='<run dir>'"`` as the README writes it: single-quoted for Hydra (run dir names contain
    ``=`` and ``,``), double-quoted for the shell; shell-quoted otherwise when the path holds characters the
    shell would expand inside double quotes."""
    # Hydra's quoted values: a quote is escaped as \', and only backslashes before a quote (or the closing one)
    # are doubled
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, str(run_dir)).replace("'", "\\'")
    override = f"hydra.run.dir='{value}'"
    return f'"{override}"' if not set(override) & set('"$`\\!') else shlex.quote(override)


def resume_command(task_overrides: List[str], hydra_overrides: List[str], run_dir: Path) -> str:
    """The shell command that continues a single run in ``run_dir``: this interpreter, ``-m embclf``, the run's
    own overrides (Hydra's ``overrides.task``, then its ``hydra.*`` ones but the run dir), and
    ``run_dir_override``."""
    hydra_ov = [o for o in map(str, hydra_overrides) if not o.startswith(("hydra.run.dir=", "hydra.mode="))]
    return " ".join([shlex.quote(sys.executable), "-m", "embclf", *(shlex.quote(str(o)) for o in task_overrides),
                     *map(shlex.quote, hydra_ov), run_dir_override(run_dir)])


def saved_state(run_dir: Path) -> str:
    """What a resume of the run in ``run_dir`` starts from, as a phrase read from the files themselves (not from
    what the code meant to save): completed; ``checkpoints/last.pt`` at the end of epoch E of N (the unfinished
    epoch E+1 is redone), at step S of epoch E (mid-epoch: the resume continues with the next batch), or after
    the training's last epoch (the last one, or a head stopped early: only the test and what follows are redone);
    only the embeddings of a classify run; or nothing (no epoch finished)."""
    from . import runs
    from .runtime import EmbclfError

    run_dir = Path(run_dir)
    s = runs.read_summary(run_dir) or {}
    if s.get("status") == "completed":
        return "completed"
    total = s.get("epochs", "?")
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file():
        try:
            ck = runs.load_checkpoint(last, ("state",), "last.pt")
        except EmbclfError:
            return "checkpoints/last.pt is unreadable: the resume starts over"
        epoch, pos = int(ck["state"].get("epoch", 0)), ck.get("epoch_position")
        if pos:
            return (f"checkpoints/last.pt at step {int(pos['step'])} of epoch {int(pos['epoch'])} of {total} "
                    "(the resume continues with the next batch)")
        # the head's early stopping (classify.patience) also ends the training before the last epoch
        patience = ((ck.get("config") or {}).get("classify") or {}).get("patience") \
            if s.get("stage") == "classify" else None
        stopped = isinstance(patience, int) and epoch and epoch - int(ck["state"].get("best_epoch", 0)) >= patience
        if (isinstance(total, int) and epoch >= total) or stopped:
            return (f"checkpoints/last.pt after the training's last epoch ({epoch}; the resume redoes only what "
                    "follows the training: the test evaluation and after)")
        if epoch:
            return (f"checkpoints/last.pt at the end of epoch {epoch} of {total} (the unfinished epoch "
                    f"{epoch + 1} is redone on resume)")
    if (run_dir / "embeddings.pt").is_file():
        return "embeddings.pt (no head epoch had finished: the head's training starts over)"
    return "nothing to resume from (no epoch had finished: the run starts over)"
