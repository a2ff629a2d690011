"""Optional parts of embclf that live in extras, and the check that says how to install one before Hydra fails.

The Optuna search (``hydra/sweeper=optuna``, ``hparams_search=...``) is the extra ``pip install -e ".[optuna]"``:
hydra-optuna-sweeper pins optuna<3, which needs SQLAlchemy<2 and alembic<1.14, so the core install leaves it out
(issue 18). Without it Hydra would stop with "Could not load 'hydra/sweeper/optuna'" and a list of sweepers;
:func:`needs_search_extras` says instead, in one paragraph, which override needs it and the command that
installs it.
"""
from __future__ import annotations

import functools
import importlib.util
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import conf_dir

INSTALL = 'pip install -e ".[optuna]"'


def optuna_installed() -> bool:
    """Whether Hydra's Optuna sweeper and optuna itself can be imported (found, not imported: cheap)."""
    for name in ("optuna", "hydra_plugins.hydra_optuna_sweeper"):
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):
            return False
    return True


def _needs_optuna(arg: str) -> bool:
    """Whether one command-line override selects the Optuna sweeper: ``hydra/sweeper=optuna`` (also ``+``/``++``/
    ``override``), or ``hparams_search=NAME`` whose ``conf/hparams_search/NAME.yaml`` overrides the sweeper to optuna."""
    m = re.fullmatch(r"(?:\+{1,2}|~)?(?:override\s+)?([\w/]+)=(.*)", arg.strip())
    if not m:
        return False
    key, value = m.group(1), m.group(2).strip()
    if key == "hydra/sweeper":
        return value == "optuna"
    if key == "hparams_search":
        try:
            text = (Path(conf_dir()) / "hparams_search" / f"{value}.yaml").read_text()
        except OSError:
            return False  # no such preset: Hydra names the missing option itself
        return re.search(r"hydra/sweeper\s*:\s*optuna\b", text) is not None
    return False


def missing_optuna_message(argv: Sequence[str], installed: Optional[bool] = None) -> Optional[str]:
    """The one-paragraph error for a command line that asks for the Optuna search while its extra is not
    installed, or None (no search asked for, or installed). ``installed``: override the check (tests)."""
    wanted = [a for a in argv if _needs_optuna(a)]
    if not wanted:
        return None
    if installed is None:
        installed = optuna_installed()
    if installed:
        return None
    return (f"{wanted[0]} runs an Optuna search, which is an optional extra of embclf and not installed here "
            "(hydra-optuna-sweeper pins optuna<3 with SQLAlchemy<2 and alembic<1.14, so the core install leaves it "
            f"out). Install it in this environment with {INSTALL} in the embclf checkout (or pip install "
            "\"embclf[optuna]\"), then run the same command again; nothing was started.")


def needs_search_extras(main: Callable) -> Callable:
    """Wrap the Hydra entrypoint: before Hydra composes anything, a command line that needs a missing extra
    prints :func:`missing_optuna_message` on stderr and exits with status 2."""

    @functools.wraps(main)
    def checked(*args, **kwargs):
        if not args and not kwargs:  # the command line (a direct call with a config is Hydra's business)
            message = missing_optuna_message(sys.argv[1:])
            if message:
                print(f"embclf: error: {message}", file=sys.stderr)
                sys.exit(2)
        return main(*args, **kwargs)

    return checked
