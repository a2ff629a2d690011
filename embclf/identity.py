"""What makes two runs the same experiment: one rule, used by every place that asks.

The roles of the config keys are declared once, on the schema (``embclf/config.py``: ``RUN``, ``PATH``,
``stages(...)`` field metadata). From them this module derives a stage's **identity**: the nested dict of the
identity keys that stage reads, with paths normalised and keys a stored config lacks filled with the value a
run of that time used. Two stage runs are the same experiment exactly when their identities are equal; the
``digest`` of an identity (8 hex digits of its SHA-1) names it.

Who asks (and nobody decides it another way):
- the stages, when a run dir is opened: empty (start), the same experiment completed (nothing to do) or not
  (resume), another experiment (refused, naming the keys that differ) -- ``runs.open_run_dir``;
- the launchers' "already completed?" and the Optuna sweeper's skip of a finished trial (``runs.completed_in``);
- run dir names (``run_name``: the swept identity keys, readable, plus the digest of the job's identity);
- the encoder lookup of ``stage=classify`` (``references.find_encoder_run``);
- the report's rows (a row is one identity without the seed; a seed run twice is a repeat) and
  ``embclf.evaluate``'s "same data as the run?" check (``data_identity``).

A classify run's identity holds its encoder's autoencode identity under ``encoder`` instead of the path in
``classify.encoder``: one encoder named by two paths is one experiment, and two encoders are two.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf, open_dict

STAGES = ("autoencode", "classify")
IDENTITY_FILE = "identity.json"


@dataclasses.dataclass(frozen=True)
class Role:
    """The role of one dotted config key: ``role`` "identity", "run" or "stage"; ``path``: normalised;
    ``stages``: whose identity it belongs to; ``before``: the value runs written before the key existed used;
    ``added``: for an identity key added after runs were written, the value they computed with, at which the
    key is left out of the identity (``ABSENT`` for the keys the first run-dir format already had)."""

    key: str
    role: str
    path: bool
    stages: Tuple[str, ...]
    before: Any = None
    added: Any = None


@lru_cache(maxsize=1)
def roles() -> Dict[str, Role]:
    """Every key of the schema (groups and leaves, dotted) -> its ``Role``, read from the field metadata of
    ``embclf.config.Config``. A nested key inherits its group's role and stages unless it declares its own."""
    from .config import Config

    out: Dict[str, Role] = {}

    def walk(cls, prefix: str, role: str, stages: Tuple[str, ...]) -> None:
        for f in dataclasses.fields(cls):
            md = f.metadata or {}
            key = prefix + f.name
            r = Role(key, md.get("role", role), bool(md.get("path", False)), tuple(md.get("stages", stages)),
                     md.get("before"), md.get("added", _ABSENT))
            out[key] = r
            typ = f.type if isinstance(f.type, type) else None
            if typ is None and isinstance(f.default_factory, type):  # postponed annotations: the factory is the class
                typ = f.default_factory
            if typ is not None and dataclasses.is_dataclass(typ):
                walk(typ, key + ".", r.role, r.stages)

    walk(Config, "", "identity", ())
    return out


def role_of(key: str) -> Optional[Role]:
    """The role of a dotted key (``+``/``~`` prefixes ignored), or None for a key outside the schema."""
    return roles().get(key.lstrip("+~"))


def path_keys() -> List[str]:
    """The dotted keys whose values are paths (normalised before they are stored or compared)."""
    return [k for k, r in roles().items() if r.path]


def normalise_path(value: Any, base: Optional[str] = None) -> Any:
    """``value`` as one spelling of its place: ``~`` expanded, absolute (relative to ``base``, default the
    working directory), symlinks resolved, no trailing slash. None, '' and '???' are returned unchanged."""
    if value in (None, "", "???"):
        return value
    p = os.path.expanduser(str(value))
    if not os.path.isabs(p):
        p = os.path.join(base or os.getcwd(), p)
    return os.path.realpath(p)


def plain(cfg: Any) -> dict:
    """A config as plain nested values: a DictConfig resolved (enums as their names, no ``hydra``/``defaults``),
    a dict copied. A debug node is kept only for a debug run (``debug.name`` other than ``none``)."""
    if isinstance(cfg, DictConfig):
        c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    else:
        c = json.loads(json.dumps(cfg, default=lambda v: getattr(v, "value", str(v))))
    c.pop("hydra", None)
    c.pop("defaults", None)
    if debug_mode(c) == "none":
        c.pop("debug", None)
    return c


def debug_mode(cfg) -> str:
    """``debug.name`` of a config (DictConfig or plain dict): ``fast``, ``overfit`` or ``none``."""
    d = cfg.get("debug") if hasattr(cfg, "get") else None
    name = d.get("name") if hasattr(d, "get") else None
    return str(name or "none")


@lru_cache(maxsize=1)
def _defaults_json() -> str:
    from .config import Config

    d = OmegaConf.to_container(OmegaConf.structured(Config), enum_to_str=True)
    d.pop("defaults", None)
    return json.dumps(d)


def with_schema_defaults(stored: dict) -> dict:
    """A stored resolved config with every key it lacks filled: with the key's ``before`` value where the
    schema declares one (what runs written before the key existed did), else with its default. Returns a new
    dict; the input is not modified."""
    defaults = json.loads(_defaults_json())
    table = roles()

    def fill(old, default, prefix):
        if not isinstance(old, dict) or not isinstance(default, dict):
            return old
        out = dict(old)
        for k, v in default.items():
            if k not in out:
                r = table.get(prefix + k)
                v = r.before if r is not None and r.before is not None else v
                if v != "???":
                    out[k] = v
            else:
                out[k] = fill(out[k], v, f"{prefix}{k}.")
        return out

    out = fill(stored, defaults, "")
    if debug_mode(out) == "none":
        out.pop("debug", None)
    return out


def _get(c: dict, key: str, default: Any = None) -> Any:
    node: Any = c
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set(out: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        out = out.setdefault(p, {})
    out[leaf] = value


def _leaves() -> Iterator[Role]:
    return iter(_leaf_roles())


@lru_cache(maxsize=1)
def _leaf_roles() -> Tuple[Role, ...]:
    # computed once: quadratic in the schema's keys, it was 2 of the report's 4 s over 250 run dirs
    table = roles()
    return tuple(r for k, r in table.items() if not any(o.startswith(k + ".") for o in table))


_ABSENT = object()


def identity(cfg: Any, stage: str, encoder: Any = None) -> dict:
    """The identity of a ``stage`` ("autoencode" or "classify") run of ``cfg`` (a DictConfig or a stored
    resolved config dict): every identity key of that stage, as a nested dict, paths normalised.

    For ``classify`` the value of ``classify.encoder`` is replaced by ``encoder``: the autoencode identity of
    the encoder's config. Pass the encoder's stored config as ``encoder`` when it is known; without it, the
    encoder is ``cfg``'s own autoencode identity when ``classify.encoder`` is null (the lookup finds exactly
    that encoder), else the config stored beside the given path is read (``encoder_config``).

    Raises ``EmbclfError`` (classify only) when ``classify.encoder`` names a place without a readable config.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
    c = with_schema_defaults(plain(cfg))
    if c.get("precision") == "auto":  # the precision the run uses on this machine is what it computes
        from .runtime import resolve_precision

        c["precision"] = resolve_precision("auto", c.get("device"))[0]
    out: dict = {}
    for r in _leaves():
        if r.role != "identity" or stage not in r.stages or r.key == "classify.encoder":
            continue
        v = _get(c, r.key, _ABSENT)
        if v is _ABSENT or (r.added is not _ABSENT and v == r.added):  # a key added later, at its "off" value
            continue
        _set(out, r.key, normalise_path(v) if r.path else v)
    if stage == "classify":
        if encoder is None:
            given = _get(c, "classify.encoder")
            encoder = c if not given else encoder_config(given)
        out["encoder"] = identity(encoder, "autoencode")
        _canonical_layers(out)
    return out


def with_added(ident: dict, stage: str) -> dict:
    """``ident`` with every key added since the first format (``added``) that it leaves out at its "off"
    value put back at that value: what a table or a comparison shows (``model.input_noise`` 0.0 beside 0.1)."""
    out = json.loads(json.dumps(ident))
    for r in _leaf_roles():
        if r.added is not _ABSENT and stage in r.stages and _get(out, r.key, _ABSENT) is _ABSENT:
            _set(out, r.key, json.loads(json.dumps(r.added)))
    if stage == "classify" and isinstance(out.get("encoder"), dict):
        out["encoder"] = with_added(out["encoder"], "autoencode")
    return out


def stored(ident: dict, stage: str) -> dict:
    """A stored identity (``identity.json``) as :func:`identity` makes it today: the keys added since at their
    "off" value (``added``) left out (as written by a version that had them), classify's layers canonical."""
    out = json.loads(json.dumps(ident))
    for r in _leaf_roles():
        if r.added is _ABSENT or stage not in r.stages:
            continue
        *parents, leaf = r.key.split(".")
        parent = _get(out, ".".join(parents), None) if parents else out
        if isinstance(parent, dict) and leaf in parent and parent[leaf] == r.added:
            del parent[leaf]
    if stage == "classify":
        if isinstance(out.get("encoder"), dict):
            out["encoder"] = stored(out["encoder"], "autoencode")
        _canonical_layers(out)
    return out


def _canonical_layers(out: dict) -> None:
    """``classify.layers`` in a classify identity as ``layers.canonical`` spells it; the code only is left out
    (as before the key existed)."""
    spec, model = out.get("classify", {}).get("layers", _ABSENT), out.get("encoder", {}).get("model")
    if spec is not _ABSENT and isinstance(model, dict):
        from . import layers  # imported here: layers builds on engine (torch), identity is imported by the config

        out["classify"]["layers"] = layers.canonical(spec, model)
        if out["classify"]["layers"] == role_of("classify.layers").added:
            del out["classify"]["layers"]


def job_identity(cfg: Any) -> dict:
    """What one job of ``cfg`` computes: its stage and the identity of each stage it runs. A ``classify`` job
    given ``classify.encoder`` is identified by the normalised path (its run dir name is fixed before the
    encoder is read)."""
    c = with_schema_defaults(plain(cfg))
    stage = c.get("stage", "autoencode")
    out: dict = {"stage": stage}
    if stage in ("autoencode", "all"):
        out["autoencode"] = identity(c, "autoencode")
    if stage in ("classify", "all"):
        out["classify"] = identity(c, "classify", encoder=c)  # stage=all: its own autoencoder
        given = _get(c, "classify.encoder")
        if given and stage == "classify":
            out["classify"]["encoder"] = {"path": normalise_path(given)}
    return out


def digest(ident: dict) -> str:
    """8 hex digits of the SHA-1 of an identity (keys sorted): equal identities give equal digests."""
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]


def differences(old: dict, new: dict, prefix: str = "") -> List[str]:
    """The dotted keys whose values differ between two identities (a key only one has differs too)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: List[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def data_identity(cfg: Any) -> Optional[dict]:
    """The identity of the images a config selects (``data.*`` identity keys, paths normalised), or None for a
    config without a data node."""
    c = plain(cfg) if isinstance(cfg, DictConfig) else cfg
    if not isinstance(c, dict) or not isinstance(c.get("data"), dict):
        return None
    return identity(c, "autoencode").get("data")


def encoder_config(path: Any) -> dict:
    """The resolved config of the encoder at ``path`` (an autoencode run dir, a stage=all job dir, or a
    checkpoint .pt): the run dir's ``config.yaml``, else the config stored in the checkpoint.

    Raises ``EmbclfError`` naming the path when neither can be read."""
    from . import runs
    from .runtime import EmbclfError

    p = Path(normalise_path(path))
    for d in ([p, p / "autoencode"] if p.is_dir() else [p.parent.parent]):
        c = runs.read_config(d)
        if c is not None and (d / "checkpoints").is_dir():
            return c
    ck = p if p.is_file() else p / "checkpoints" / "best.pt"
    if ck.is_file():
        return runs.load_checkpoint(ck, ("config",), "classify.encoder")["config"]
    raise EmbclfError(f"classify.encoder={path}: no encoder there (no config.yaml beside checkpoints/, no "
                      "checkpoint file). Point it at a completed autoencode run dir, a stage=all job dir (holding "
                      "autoencode/), or a checkpoint .pt file.")


# --- run dir names ---------------------------------------------------------------------------------

MAX_NAME = 120
# identity keys lead the name, so a sweep's varying keys stay readable even when the rest is cut
NAME_FIRST = ("model", "latent", "stage", "seed", "head", "data", "experiment")
# overrides outside the app schema that never name an experiment: Hydra's own (hydra/launcher=slurm, hydra.*)
# and the search preset (its trials' values are their own overrides). Groups of the schema follow their role
# (logger=none: RUN, left out; model=vae: identity, shown).
NAME_GROUPS_RUN = ("hparams_search", "hydra")
# trailing parts of a classify.encoder path that say nothing about which encoder it is
_ENCODER_TAILS = ("best.pt", "last.pt", "checkpoints", "autoencode")


def _shown(key: str, value: Any) -> str:
    """A value as a run dir name shows it: lists as [a,b], null, paths by their last component."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_shown(key, v) for v in value) + "]"
    r = role_of(key)
    if r is not None and r.path and isinstance(value, str):
        parts = [p for p in value.replace(os.sep, "/").split("/") if p]
        if key == "classify.encoder":
            while len(parts) > 1 and parts[-1] in _ENCODER_TAILS:
                parts.pop()
        return parts[-1] if parts else value
    return str(value)


def readable(overrides: Any, values: Optional[dict] = None) -> str:
    """The readable part of a run dir name: the job's overrides of identity keys and groups, identity keys
    first (``model=vae,latent=64``), each key's value as the job resolved it (``values``, a plain config:
    ``latent=064`` and ``latent=64`` read the same; paths by their last component), unsafe characters as ``_``,
    cut at 111 characters by leaving out the longest non-leading overrides. Overrides of how-to-run keys
    (threads, device, logger, caches, ``hydra.*``, ...) are left out. '' when nothing is left."""
    items = [overrides] if isinstance(overrides, str) else [str(o) for o in overrides or []]
    shown = []
    for o in items:
        key, eq, value = o.partition("=")
        key = key.lstrip("+~")
        if not eq or not key:
            continue
        r = role_of(key)
        if key.split("/")[0].split(".")[0] in NAME_GROUPS_RUN or (r is not None and r.role == "run"):
            continue
        # a key's value as the job resolved it; a group's choice (model=vae) or an unknown key as written
        v = _get(values, key, _ABSENT) if values is not None and r is not None else _ABSENT
        shown.append((key, _shown(key, value.strip("'\"") if v is _ABSENT or isinstance(v, dict) else v)))
    rank = {k: i for i, k in enumerate(NAME_FIRST)}
    shown.sort(key=lambda kv: (rank.get(kv[0], len(rank)), kv[0], kv[1]))
    clean = [re.sub(r"[^A-Za-z0-9=,._+\-\[\]]", "_", f"{k}={v}").replace("[", "_").replace("]", "") for k, v in shown]
    name = ",".join(clean).strip("._")
    limit = MAX_NAME - 9
    if len(name) > limit:
        keep = list(range(len(clean)))
        droppable = sorted((i for i in keep if shown[i][0] not in rank), key=lambda i: -len(clean[i]))
        for i in droppable:
            if len(",".join(clean[k] for k in keep)) <= limit:
                break
            keep.remove(i)
        name = ",".join(clean[k] for k in keep).strip("._")[:limit]
    return name


def run_name(overrides: Any, prefix: str = "", *, _root_: Any = None) -> str:
    """``${embclf_name:${hydra.overrides.task}}``: a job's run dir name, ``[<prefix>,]<readable>-<digest>``.

    ``readable`` shows the overridden identity keys (see ``readable``); the digest is that of the job's
    identity (``job_identity``), so every spelling of one experiment (``data.root=/x/t/``, ``data.root=t``
    from /x, ``threads=4``) gets one digest, and two experiments never share one. In a sweep, a run dir of the
    sweep dir that already ends with this digest is this job's run dir, whatever its readable part says: a
    sweep re-invoked with ``seed=0,1`` finds the ``seed=0`` runs it made without a ``seed`` override. Relative
    paths are read against the directory the command was launched from (``hydra.runtime.cwd``). ``prefix``
    leads the name (``trial=3`` for Optuna trials)."""
    values = None
    ident_hash = None
    if _root_ is not None:
        try:
            values = _app_config(_root_)
            ident_hash = digest(job_identity(values))
        except Exception:  # noqa: BLE001 -- an incomplete config (--help, --cfg hydra): the overrides alone
            values = None
    if ident_hash is None:
        ident_hash = hashlib.sha1(",".join(sorted(map(str, overrides or []))).encode()).hexdigest()[:8]
    else:
        existing = _existing_run_dir(_root_, ident_hash)
        if existing:
            return existing
    name = readable(overrides, values)
    name = ",".join(p for p in (str(prefix), name) if p)
    return f"{name}-{ident_hash}" if name else f"run-{ident_hash}"


def _existing_run_dir(root: Any, ident_hash: str) -> Optional[str]:
    """In a sweep: the name of the sweep dir's run dir for this digest, if it has one (the first by name)."""
    try:
        if str(OmegaConf.select(root, "hydra.mode", default="")).split(".")[-1] != "MULTIRUN":
            return None
        sweep = Path(str(OmegaConf.select(root, "hydra.sweep.dir")))
    except Exception:  # noqa: BLE001 -- no sweep dir at hand
        return None
    found = sorted(p.name for p in sweep.glob(f"*-{ident_hash}") if p.is_dir()) if sweep.is_dir() else []
    return found[0] if found else None


def _app_config(root: Any) -> dict:
    """The app part of a composed config (no ``hydra`` node), resolved, with every path key made absolute
    against the launch dir (``hydra.runtime.cwd``) as the job itself stores it."""
    base = OmegaConf.select(root, "hydra.runtime.cwd", default=None) or os.getcwd()
    app = OmegaConf.masked_copy(root, [k for k in root.keys() if k != "hydra"])
    c = OmegaConf.to_container(app, resolve=True, enum_to_str=True)
    for key in path_keys():
        v = _get(c, key, _ABSENT)
        if v is not _ABSENT:
            _set(c, key, normalise_path(v, str(base)))
    return c


# --- paths and names the entrypoint and Hydra's run/sweep dir names use ------------------------------------

def absolute_paths(cfg: Any, base: str) -> Any:
    """Normalise every path key of ``cfg`` (a DictConfig or a plain nested dict; the keys the schema marks
    ``PATH``) in place: ``~`` expanded, absolute against ``base`` (the directory the command was launched from;
    ``hydra.job.chdir=true`` runs the job elsewhere), symlinks resolved, no trailing slash. Stored so, one place
    has one spelling in config.yaml, lookups, resumes and the launcher's "already completed?". Returns ``cfg``."""
    for key in path_keys():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.get(p) if isinstance(node, (dict, DictConfig)) else None
        if not isinstance(node, (dict, DictConfig)) or leaf not in node:
            continue
        if isinstance(node, DictConfig):
            if OmegaConf.is_missing(node, leaf):
                continue
            with open_dict(node):
                node[leaf] = normalise_path(node[leaf], base)
        else:
            node[leaf] = normalise_path(node[leaf], base)
    return cfg


def safe_name(overrides: Any) -> str:
    """A flat, filesystem-safe name from overrides alone (no config at hand): the readable part of a run dir
    name (``readable``) and 8 hex digits of the overrides' SHA-1. Run dirs are named by ``run_name``
    (``${embclf_name:...}``), whose digest is the job's identity instead."""
    return run_name(overrides)


_SWEEP_TOKEN = os.urandom(3).hex()


def sweep_token() -> str:
    """``${embclf_token:}``: a random 6-hex token, fixed per process, that makes two invocations' dirs distinct.

    Timestamps alone collide when two sweeps start in the same second (e.g. on a cluster).
    """
    return _SWEEP_TOKEN


def output_dir_resolver(*, _root_: Any) -> Any:
    """``${embclf_output_dir:}`` in ``hydra.run.dir``/``hydra.sweep.dir``: the config's ``output_dir``.

    A plain ``${output_dir}`` cannot resolve when Hydra shows its own node alone (``--cfg hydra --resolve``
    drops the app keys); Hydra then still holds the whole composed config as the hydra node's parent.
    """
    if "output_dir" in _root_:
        return _root_.output_dir
    try:
        from hydra.core.hydra_config import HydraConfig
        return HydraConfig.instance().cfg.hydra._get_parent().output_dir
    except Exception:  # noqa: BLE001 -- no composed config at hand: the schema's default
        from .config import Config

        return Config.output_dir
