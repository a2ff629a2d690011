"""Collect runs: read every run dir under the given paths once (``read_runs``: summary.json and config.yaml
only; ``frame.load`` builds its DataFrame from the same reading) and join them into rows, one per unit (an
autoencode run joined with the classify run on its encoder), each with its settings, label and row identity."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import yaml  # PyYAML (libyaml's C parser where built with it), a dependency of omegaconf

from .. import identity, liveness, references, runs
from ..errors import EmbclfError

COLUMNS = ["label", "model", "latent", "seed", "stage", "status", "used", "epochs", "test_mse", "test_psnr",
           "test_kl", "active_units", "val_accuracy", "test_accuracy", "final_test_mse", "final_test_psnr",
           "final_test_accuracy", "wall_seconds", "head", "config_id", "run_dir", "classify_dir", "end_time", "error"]
NUMERIC = ["test_mse", "test_psnr", "test_kl", "active_units", "val_accuracy", "test_accuracy", "final_test_mse",
           "final_test_psnr", "final_test_accuracy", "wall_seconds"]
PROBE_PREFIX = "probe:"  # row keys "probe:<name>" (test accuracy) and "probe:<name>:val" of classify.probes
# the group whose ``name`` (or ``source``) makes a key's value unsurprising: model.variational follows
# model.name, so it is not spelled out in a label unless it varies within one model
GROUP_NAME = {"model": "model.name", "head": "head.name", "data": "data.source"}


class ReportError(RuntimeError):
    """A PATH that is missing or holds no run dirs; the message says what was searched."""


# --- reading run dirs -----------------------------------------------------------------------------

def _epochs_done(run_dir: Path, s: dict) -> int:
    """Epochs trained: from the summary where it tells (a completed autoencode run trained all its epochs, a
    completed classify run records ``epochs_run``, early stopping included), else the last train epoch in
    metrics.jsonl (a run that did not complete; the only reason the report opens that file)."""
    if s.get("status") == "completed" and not s.get("debug"):
        if s.get("stage") == "classify" and isinstance(s.get("epochs_run"), int):
            return s["epochs_run"]
        if s.get("stage") == "autoencode" and isinstance(s.get("epochs"), int):
            return s["epochs"]
    return max((int(r.get("epoch", 0)) for r in runs.read_metrics(run_dir) if r.get("split") == "train"), default=0)


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def flatten(d, prefix: str = "") -> Dict[str, object]:
    """Nested dicts -> {"a.b.c": value}; lists stay values (compared as a whole)."""
    out: Dict[str, object] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(flatten(v, key + "."))
            else:
                out[key] = v
    return out


def unit_config(ae_cfg: Optional[dict], clf_cfg: Optional[dict]) -> Dict[str, object]:
    """The settings of one row unit (an autoencode run, optionally with a classify run on its encoder): its run
    identity (``embclf.identity``: the identity keys only, paths normalised, keys a run did not store as the run
    used them) as flattened dotted keys, without the seed (rows average over seeds). The encoder's settings come
    from the autoencode run's resolved config, ``head.*`` and ``classify.*`` from the classify run's."""
    out: Dict[str, object] = {}
    if ae_cfg is not None:
        out.update(flatten(identity.with_added(identity.identity(ae_cfg, "autoencode"), "autoencode")))
    if clf_cfg is not None:
        ci = identity.with_added(identity.identity(clf_cfg, "classify", encoder=ae_cfg or clf_cfg), "classify")
        ci.pop("encoder", None)  # the encoder's identity is the autoencode part above (or unknown)
        cf = flatten(ci)
        out.update(cf if ae_cfg is None else {k: v for k, v in cf.items() if k.startswith(("head.", "classify."))})
    out.pop("seed", None)
    return out


def preset(run_dir: Optional[Path], summary: Optional[dict] = None) -> Optional[str]:
    """The ``experiment=`` preset a run was composed with, or None (no preset, or no record of one).

    Read from the run's summary (``summary`` given: its ``choices``, the option of each config group the job
    was composed with, ``lifecycle.base_summary``); only a summary without ``choices`` (a run dir written
    before the summary recorded them, or outside Hydra) falls back to Hydra's record of the job,
    ``<run dir>/.hydra/hydra.yaml``'s ``hydra.runtime.choices.experiment``."""
    choices = summary.get("choices") if isinstance(summary, dict) else None
    if isinstance(choices, dict):
        choice = choices.get("experiment")
        return None if choice in (None, "null") else str(choice)
    if run_dir is None:
        return None
    try:
        with open(Path(run_dir) / ".hydra" / "hydra.yaml") as f:
            choice = yaml.load(f, Loader=_Loader)["hydra"]["runtime"]["choices"].get("experiment")
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None
    return None if choice in (None, "null") else str(choice)


def code_version(s: Optional[dict]) -> Optional[str]:
    """The code a run ran, from its summary's ``provenance``: the git commit's first 12 hex digits, ``+dirty``
    when the checkout had uncommitted changes to tracked files; ``embclf <version>`` without a git checkout (an
    installed wheel); None when the summary records neither."""
    prov = (s or {}).get("provenance")
    if not isinstance(prov, dict):
        return None
    commit = prov.get("git_commit")
    if commit:
        return str(commit)[:12] + ("+dirty" if prov.get("git_dirty") else "")
    return f"embclf {prov['embclf_version']}" if prov.get("embclf_version") else None


def data_fingerprint(s: Optional[dict]) -> Optional[str]:
    """The SHA-1 of the decoded pixels and labels a run used (summary ``data_fingerprint``, else
    ``provenance.data.fingerprint``), or None when not recorded."""
    s = s or {}
    fp = s.get("data_fingerprint")
    if not fp and isinstance(s.get("provenance"), dict) and isinstance(s["provenance"].get("data"), dict):
        fp = s["provenance"]["data"].get("fingerprint")
    return str(fp) if fp else None


def _implied(configs: Sequence[Dict[str, object]], by: str, k: str) -> bool:
    """Whether setting ``k`` has one value per value of ``by`` across ``configs`` (so ``by`` tells it)."""
    per_choice = defaultdict(set)
    for c in configs:
        per_choice[_key(c.get(by))].add(_key(c.get(k, "<absent>")))
    return all(len(v) == 1 for v in per_choice.values())


def _key(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _short(k: str, v) -> str:
    """A setting's value as a label shows it: lists without spaces, paths by their last component."""
    if v is None:
        return "null"  # as an override would write it
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(k, x) for x in v) + "]"
    role = identity.role_of(k)
    if role is not None and role.path and isinstance(v, str):
        return os.path.basename(v.rstrip("/")) or v
    return str(v)


def read_runs(paths: Sequence[Path]) -> tuple:
    """Read every run dir under ``paths`` once: ``(summaries, configs, unreadable)``, three dicts keyed by the
    resolved run dir, in path order: its summary.json, its config.yaml as a dict (None when it has none) and,
    for a run dir whose summary or config cannot be read, why (``read_summary``/``read_config``). Nothing
    else is opened: no metrics, checkpoints or images.

    Raises ``ReportError`` when a path does not exist or no run dir is found."""
    dirs: Dict[Path, dict] = OrderedDict()
    configs: Dict[Path, Optional[dict]] = {}
    unreadable: Dict[Path, str] = OrderedDict()  # run dir -> why it cannot be reported
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise ReportError(f"{p} does not exist. Pass a sweep dir, a run dir or the output_dir (e.g. outputs/).")
        for d in references.iter_run_dirs(p):
            d = d.resolve()
            s, why = read_summary(d)
            c, why_c = read_config(d)
            if why or why_c:
                unreadable[d] = why or why_c
            else:
                dirs[d] = s
                configs[d] = c
    if not dirs and not unreadable:
        raise ReportError(f"no run dirs (directories with {runs.SUMMARY}) under {', '.join(map(str, paths))}. "
                          "Pass a sweep dir, a run dir or the output_dir (e.g. outputs/).")
    return dirs, configs, unreadable


def collect(paths: Sequence[Path]) -> List[dict]:
    """Rows (dicts with ``COLUMNS`` keys, numbers as float or None) for every run dir under ``paths``.

    A row is one unit: an autoencode run with one classify run trained on its encoder (joined through the
    classify summary's ``encoder_run``), an autoencode run without one, or a classify run whose encoder is
    not under ``paths``. Each row also carries ``config`` (its settings, see ``unit_config``), ``config_id``
    (a hash of them: rows with equal ids are the same configuration), ``varying`` (the settings that differ
    between rows, as "key=value" strings, in ``label``) and ``probes`` (classify.probes results).

    Raises ``ReportError`` when a path does not exist or no run dir is found.
    """
    dirs, configs, unreadable = read_runs(paths)

    def ae_fields(d: Path, s: dict) -> dict:
        status = liveness.status_text(s)
        return {"model": s.get("model"), "latent": s.get("latent"), "seed": s.get("seed"),
                "status": status, "epochs": f"{_epochs_done(d, s)}/{s.get('epochs', '?')}",
                "test_mse": _num(s.get("test_mse")), "test_psnr": _num(s.get("test_psnr")),
                "test_kl": _num(s.get("test_kl")), "active_units": _num(s.get("test_active_units")),
                "final_test_mse": _num(s.get("final_test_mse")), "final_test_psnr": _num(s.get("final_test_psnr")),
                "wall_seconds": _num(s.get("wall_seconds")), "run_dir": str(d), "end_time": _num(s.get("end_time")),
                "n_train": s.get("n_train"), "n_val": s.get("n_val"), "n_test": s.get("n_test"),
                "error": s.get("error") if status != "completed" else None,
                # the job's command-line overrides (tables.commands), code and data of the run (protocol card)
                "overrides": s.get("overrides"), "code_version": code_version(s),
                "data_fingerprint": data_fingerprint(s)}

    classify_by_encoder = defaultdict(list)
    rows = []
    for d, s in dirs.items():
        if s.get("stage") == "classify":
            enc = references.encoder_run_of(d, s)  # a relative record: found where the sweep is now, not where it ran
            classify_by_encoder[enc.resolve() if enc is not None else None].append((d, s))
    for d, s in dirs.items():
        if s.get("stage") != "autoencode":
            continue
        base = {**ae_fields(d, s), "stage": "autoencode"}
        ae_cfg = configs[d]
        for cd, cs in classify_by_encoder.pop(d, []) or [(None, None)]:
            row = _join(base, cd, cs)
            row["config"] = unit_config(ae_cfg, configs[cd] if cd else None)
            row["config"]["experiment"] = (preset(cd, cs) if cd else None) or preset(d, s)
            rows.append(row)
    # classify runs whose encoder is not in the report (or unknown): own row, encoder numbers read if possible
    for enc, items in classify_by_encoder.items():
        for cd, cs in items:
            es = dirs.get(enc) if enc in dirs else (read_summary(enc)[0] if enc is not None else None)
            base = {**(ae_fields(enc, es) if es else {"status": "completed", "epochs": "", "run_dir": str(enc or "")}),
                    "stage": "classify"}
            for k in ("model", "latent", "seed"):
                base[k] = cs.get(k, base.get(k))
            base["wall_seconds"] = None  # the encoder's training is not part of this report
            base["error"] = None
            row = _join(base, cd, cs, joined_stage="classify")
            ae_cfg = (configs[enc] if enc in configs else read_config(enc)[0]) if es else None
            row["config"] = unit_config(ae_cfg, configs[cd])
            if ae_cfg is None:  # classify.encoder outside the report: the encoder's model and latent apply
                row["config"].update({"model.name": row["model"], "latent": row["latent"]})
            row["config"]["experiment"] = preset(cd, cs) or preset(enc, es)
            rows.append(row)
    _identify(rows)
    rows.sort(key=lambda r: (str(r["model"]), r["latent"] if isinstance(r["latent"], int) else -1,
                             r["label"], r["seed"] if isinstance(r["seed"], int) else -1, r.get("end_time") or 0))
    _mark_used(rows)
    # last, so that they change no other row's label
    rows += [_unreadable_row(d, why) for d, why in unreadable.items()]
    return rows


UNREADABLE = "unreadable"  # the status of a run dir whose summary.json or config.yaml cannot be read


def read_summary(run_dir: Path) -> tuple:
    """``(summary, None)`` for a run dir's readable ``summary.json``, else ``(None, why)``: why it cannot be
    reported (unreadable, empty, not valid JSON as after a torn copy or a hand edit, not a JSON object, or no
    ``stage`` of autoencode or classify), as one phrase naming the file."""
    path = Path(run_dir) / runs.SUMMARY
    try:
        text = path.read_text()
    except (OSError, ValueError) as e:  # ValueError: not UTF-8
        return None, f"{runs.SUMMARY} cannot be read ({getattr(e, 'strerror', None) or e})"
    if not text.strip():
        return None, f"{runs.SUMMARY} is empty (a torn copy?)"
    try:
        s = json.loads(text)
    except ValueError as e:
        return None, f"{runs.SUMMARY} is not valid JSON ({e}: a torn copy or a hand edit?)"
    if not isinstance(s, dict):
        return None, f"{runs.SUMMARY} is not a JSON object (it holds a {type(s).__name__})"
    if s.get("stage") not in ("autoencode", "classify"):
        return None, f"{runs.SUMMARY} names no stage (\"stage\": {json.dumps(s.get('stage'))}; autoencode or classify)"
    return s, None


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """YAML as OmegaConf reads it (``omegaconf._utils.get_yaml_loader``: ``1e-3`` is a float, no timestamps),
    on libyaml's C parser: config.yaml and hydra.yaml are plain YAML (resolved, no interpolations), and
    OmegaConf.load spends ~60 ms per file on building a DictConfig the report then throws away."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
     [-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
    |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
_Loader.yaml_implicit_resolvers = {k: [(t, r) for t, r in v if t != "tag:yaml.org,2002:timestamp"]
                                   for k, v in _Loader.yaml_implicit_resolvers.items()}


def _read_yaml(path: Path) -> Optional[object]:
    """A YAML file's value (``_Loader``), None when the file does not exist. Raises ``OSError``,
    ``ValueError`` (not UTF-8) or ``yaml.YAMLError``."""
    try:
        with open(path, encoding="utf-8") as f:
            v = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        return None
    return {} if v is None else v  # an empty file: no settings, as OmegaConf.load reads it


def read_config(run_dir: Path) -> tuple:
    """``(config, None)`` for a run dir's ``config.yaml`` as a dict (None when it has none), else
    ``(None, why)``: it is not valid YAML or not a mapping, so the run's settings are unknown."""
    try:
        c = _read_yaml(Path(run_dir) / runs.CONFIG)
    except (OSError, ValueError, yaml.YAMLError) as e:  # omegaconf raises yaml's errors for bad YAML
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"{runs.CONFIG} cannot be read ({first}), so the run's settings are unknown"
    if c is not None and not isinstance(c, dict):
        return None, f"{runs.CONFIG} is not a mapping of settings, so the run's settings are unknown"
    return c, None


def _unreadable_row(d: Path, why: str) -> dict:
    """The row of a run dir that cannot be reported (``read_summary``/``read_config`` say why): listed among the
    runs that did not complete, in report.csv, and named by whatever its config.yaml still tells."""
    c = read_config(d)[0] or {}
    model = (c.get("model") or {}).get("name") if isinstance(c.get("model"), dict) else None
    latent, seed = c.get("latent"), c.get("seed")
    stage = c.get("stage") if c.get("stage") in ("autoencode", "classify") else \
        (d.name if d.name in ("autoencode", "classify") else None)
    row = {k: None for k in COLUMNS}
    row.update(label=f"{model}-z{latent}" if model and latent is not None else "?", model=model, latent=latent,
               seed=seed, stage=stage, status=UNREADABLE, used=False, repeats=0, epochs="", run_dir=str(d),
               error=why, config={}, varying=[], preset_keys=[], probes={}, per_class_accuracy=None)
    return row


def _join(base: dict, cd: Optional[Path], cs: Optional[dict], joined_stage: str = "autoencode+classify") -> dict:
    """``base`` (autoencode fields) joined with a classify run: accuracy, probes, combined status, summed wall
    time; the row's ``end_time`` is the later of the two."""
    row = {**base, "head": None, "classify_dir": None, "val_accuracy": None, "test_accuracy": None,
           "final_test_accuracy": None, "probes": {}, "per_class_accuracy": None, "classify_overrides": None,
           "classify_code_version": None, "classify_data_fingerprint": None}
    if cs is None:
        return row
    cst = liveness.status_text(cs)
    row.update(stage=joined_stage, head=cs.get("head"), classify_dir=str(cd),
               val_accuracy=_num(cs.get("val_accuracy")), test_accuracy=_num(cs.get("test_accuracy")),
               final_test_accuracy=_num(cs.get("final_test_accuracy")),
               per_class_accuracy=cs.get("per_class_accuracy") if cst == "completed" else None,
               classify_overrides=cs.get("overrides"), classify_code_version=code_version(cs),
               classify_data_fingerprint=data_fingerprint(cs))
    probes = cs.get("probes") if isinstance(cs.get("probes"), dict) else {}
    if set(probes) <= {cs.get("head")}:  # the main head alone: the test acc column already shows it
        probes = {}
    for name, res in probes.items():
        if isinstance(res, dict):
            row["probes"][str(name)] = {"test": _num(res.get("test_accuracy")), "val": _num(res.get("val_accuracy"))}
    by_layer = cs.get("test_accuracy_by_layer") if isinstance(cs.get("test_accuracy_by_layer"), dict) else {}
    if set(by_layer) - {"code"}:  # classify.layers: one "probe:layer:<name>" column per layer (embclf/layers.py)
        val = cs.get("val_accuracy_by_layer") if isinstance(cs.get("val_accuracy_by_layer"), dict) else {}
        for name, acc in by_layer.items():
            row["probes"][f"layer:{name}"] = {"test": _num(acc), "val": _num(val.get(name))}
    ep = f"{_epochs_done(cd, cs)}/{cs.get('epochs', '?')}"
    row["epochs"] = f"{row['epochs']} + {ep}" if row.get("epochs") else ep
    if row["status"] == "completed" and cst != "completed":
        row["status"] = cst if joined_stage == "classify" else f"{cst} (classify)"
        row["error"] = cs.get("error")
    elif row["status"] != "completed":
        row["status"] = f"{row['status']} (autoencode)"
    w = _num(cs.get("wall_seconds"))
    row["wall_seconds"] = (row["wall_seconds"] or 0) + w if w is not None else row["wall_seconds"]
    ends = [t for t in (row.get("end_time"), _num(cs.get("end_time"))) if t is not None]
    row["end_time"] = max(ends) if ends else None
    return row


def varying_keys(configs: Sequence[Dict[str, object]]) -> List[str]:
    """The settings whose values differ between ``configs`` (a key missing from one config differs too)."""
    keys = sorted(set().union(*configs)) if configs else []
    # a key only some rows have (head.* of rows that trained no head) is told apart by the stage column
    return [k for k in keys if len({_key(c[k]) for c in configs if k in c}) > 1]


def _identify(rows: List[dict]) -> None:
    """Set ``config_id``, ``varying`` and ``label`` on every row.

    ``config_id`` hashes every setting of the row (``unit_config``) and its stage, so two rows share it only
    when they are the same configuration (they may differ in seed). ``label`` is ``<model>-z<latent>`` plus
    each setting that differs between rows, except settings that merely follow a group choice already in the
    label (``model.variational`` follows ``model.name``; the settings an ``experiment=`` preset sets follow the
    preset: ``ae-z32 experiment=improved``, not its ten settings). ``preset_keys`` lists the settings a row's
    ``experiment`` stands for."""
    configs = [r["config"] for r in rows]
    vary = varying_keys(configs)
    shown, by_preset = [], []
    for k in vary:
        if k in ("model.name", "latent"):
            continue
        group = GROUP_NAME.get(k.split(".")[0])
        # implied by the group's choice: one value per choice across all rows
        if group and group != k and group in vary and _implied(configs, group, k):
            continue
        if k != "experiment" and "experiment" in vary and _implied(configs, "experiment", k):
            by_preset.append(k)
            continue
        shown.append(k)
    for r in rows:
        c = r["config"]
        r["config_id"] = hashlib.sha1(_key([r["stage"], sorted((k, _key(v)) for k, v in c.items())]).encode()
                                      ).hexdigest()[:8]
        r["varying"] = [f"{k}={_short(k, c.get(k))}" for k in shown if k in c]
        r["preset_keys"] = by_preset
        r["label"] = f"{r['model']}-z{r['latent']}" + ("".join(f" {v}" for v in r["varying"]))


def _mark_used(rows: List[dict]) -> None:
    """``used``: whether a completed row enters the table. A configuration run more than once with the same
    seed uses its newest completed run (latest ``end_time``); the others keep ``used`` false and are counted
    in ``repeats`` of the used one."""
    by = defaultdict(list)
    for r in rows:
        r["used"] = False
        r["repeats"] = 0
        if r["status"] == "completed":
            by[(r["config_id"], r["seed"])].append(r)
    for rs in by.values():
        newest = max(rs, key=lambda r: r.get("end_time") or 0)
        newest["used"] = True
        newest["repeats"] = len(rs) - 1


def curve_rows(rows: List[dict]) -> List[dict]:
    """The rows whose training curves the figures draw: each used (completed) row, and a run that has not completed
    (running, interrupted, failed) only when its experiment and seed has no completed run. A seed re-run after
    an interruption is one seed: its interrupted first attempt would otherwise count as another seed in the
    curves' mean and band. The experiment of a row with an autoencode run is that run's stored autoencode identity
    (``runs.stored_identity``): an interrupted autoencode-only job and the completed stage=all job that redid it
    are one experiment, though their rows' settings differ by the classify part."""
    def experiment(r: dict):
        if str(r.get("stage", "")).startswith("autoencode") and r.get("run_dir"):
            try:
                ident = runs.stored_identity(Path(r["run_dir"]), "autoencode")
            except (EmbclfError, OSError):  # an unreadable record: fall back to the row's own settings
                ident = None
            if ident is not None:
                return "autoencode", json.dumps(ident, sort_keys=True, default=str), r.get("seed")
        return r.get("stage"), r.get("config_id"), r.get("seed")

    unfinished = [r for r in rows if r["status"] not in ("completed", UNREADABLE)]
    if not unfinished:  # the usual case: no identity file to read
        return [r for r in rows if r.get("used")]
    done = {experiment(r) for r in rows if r.get("used")}
    keep = {id(r) for r in unfinished if experiment(r) not in done}
    return [r for r in rows if r.get("used") or id(r) in keep]


def probe_names(rows: Iterable[dict]) -> List[str]:
    """Every probe name (``classify.probes``) found in the rows, in first-seen order."""
    names: Dict[str, None] = OrderedDict()
    for r in rows:
        for n in r.get("probes") or {}:
            names[n] = None
    return list(names)


