"""The command line's ``key=value`` overrides, checked against the schema before Hydra composes them.

A value that does not fit its typed key (``stage=foo``, ``precision=fp8``, ``latent=abc``) is one paragraph
naming the key and what it takes (``bad_value``), instead of OmegaConf's multi-line validation error.
A mistyped key names the closest valid one: ``autoencode.epoch=3`` -> "Could not override 'autoencode.epoch':
no such key. Did you mean autoencode.epochs?". ``+key=value`` / ``++key=value`` that would add a key the schema
does not have (``+autoencode.epoch=3``) fails the same way: nothing reads such a key, so its value would be
silently ignored. The entrypoint (``embclf.__main__.main``) calls ``mistyped`` on ``sys.argv`` before it hands
over to Hydra; Hydra 1.3 has no hook at composition time, and this module changes nothing in Hydra. (Composing
``conf/`` another way, e.g. ``hydra.compose`` in a notebook, gets Hydra's own error, which names the key, and
the gate ``embclf.validation.problems`` still refuses a key added with ``+``.)
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from .config import Config, conf_dir


def config_keys(cfg) -> List[str]:
    """Every dotted key of a (Dict)Config, nested ones too, without resolving interpolations."""
    out: List[str] = []

    def walk(node, prefix):
        for k in node.keys() if isinstance(node, (dict, DictConfig)) else ():
            try:
                child = node._get_node(k) if isinstance(node, DictConfig) else node[k]
            except Exception:  # noqa: BLE001 (an odd node: the key is still a key)
                child = None
            key = f"{prefix}{k}"
            out.append(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none() \
                    and not child._is_interpolation():
                walk(child, key + ".")

    walk(cfg, "")
    return out


def closest_key(key: str, cfg) -> Optional[str]:
    """The valid key of ``cfg`` nearest to a mistyped ``key`` (difflib ratio >= 0.6), or None."""
    keys = [k for k in config_keys(cfg) if (not k.startswith("hydra.") or key.startswith("hydra."))
            and k != "defaults" and not any(p.startswith("_") for p in k.split("."))]
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return match[0] if match else None


def _known(schema: DictConfig, key: str) -> bool:
    """True when the schema has ``key``, or ``key`` lies inside a list or a free-form node (any key is fine)."""
    node = schema
    for part in key.split("."):
        if isinstance(node, ListConfig) or (isinstance(node, DictConfig) and OmegaConf.get_type(node) in (dict, None)):
            return True
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
    return True


def unknown_keys(node: Any, schema: Any, prefix: str, out: List[str]) -> None:
    """Append to ``out`` a message for every key of ``node`` (a composed config, recursively) that its structured
    ``schema`` node does not define, naming the closest valid key: the gate's check (``validation.problems``) for a key
    that got past composition (``+key=`` under an untyped node, a hand-edited stored config)."""
    if not isinstance(node, DictConfig) or not isinstance(schema, DictConfig):
        return
    if OmegaConf.get_type(schema) in (dict, None):  # a free-form Dict[str, ...] field: any key is fine
        return
    known = [str(k) for k in schema.keys()]
    for key in node.keys():
        key = str(key)
        full = f"{prefix}{key}"
        if full == "hydra":
            continue
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{close[0]}?" if close else \
                f"valid keys here: {', '.join(prefix + k for k in known)}"
            out.append(f"{full} is not a config key ({hint}); `+{full}=...` adds a key that nothing reads. "
                       f"Remove it or fix its name.")
            continue
        unknown_keys(node._get_node(key), schema._get_node(key), f"{full}.", out)


def mistyped(argv: Sequence[str]) -> Optional[str]:
    """The error for the first override in ``argv`` (the command line after the program name) whose key the
    schema does not have, naming the closest valid key; None when every key is known.

    Skipped (Hydra checks them itself): flags and their values, config group choices (``model=vae``,
    ``experiment=quick``, ``hydra/launcher=slurm``), ``hydra.*`` keys, deletions (``~key``), overrides with a
    package (``key@pkg=...``) and anything Hydra's grammar cannot parse (Hydra reports it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [a for a in argv if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception:  # noqa: BLE001 -- a syntax error: Hydra's own message says where
        return None
    groups = {p.name for p in Path(conf_dir()).iterdir() if p.is_dir()}
    schema = OmegaConf.structured(Config)
    for o in parsed:
        key = o.key_or_group
        if o.is_delete() or o.package is not None or key.split(".")[0].split("/")[0] == "hydra" or "/" in key \
                or key in groups or _known(schema, key):
            continue
        near = closest_key(key, schema)
        hint = (f" Did you mean {near}?" if near else "") + \
            " (python -m embclf --help lists the main keys; --cfg job shows every key.)"
        if o.is_add() or o.is_force_add():
            return f"Could not add '{key}': embclf has no such key, so the value would be ignored." + hint
        return f"Could not override '{key}': no such key." + hint
    return None


# what a typed node of the schema holds, for the message about a value that does not fit it
_KINDS = {"IntegerNode": "an integer", "FloatNode": "a number", "BooleanNode": "true or false"}


def _values(o) -> list:
    """The values a parsed override sets: one, or each of a sweep's (``stage=all,foo``; a range's are numbers)."""
    from hydra.core.override_parser.types import ChoiceSweep, Glob, IntervalSweep, RangeSweep

    v = o.value()
    if isinstance(v, ChoiceSweep):
        return list(v.list)
    if isinstance(v, (RangeSweep, IntervalSweep, Glob)):
        return []  # numbers by construction, or a glob over group options: nothing to check here
    return [v]


def bad_value(argv: Sequence[str]) -> Optional[str]:
    """One paragraph for the first override in ``argv`` whose value does not fit its typed key in the schema
    (an Enum key: its values, read from the schema, and the closest as an example; an int, float or bool key:
    what it takes and its default as an example); None when every value fits. Values of untyped keys, group
    choices, ``hydra.*``, interpolations and ``null`` are left to Hydra and the gate (``validation.problems``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf.errors import ValidationError
    from omegaconf.nodes import EnumNode

    from .validation import _as_override

    lines = [a for a in argv if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception:  # noqa: BLE001 -- a syntax error: Hydra's own message says where
        return None
    schema = OmegaConf.structured(Config)
    for o in parsed:
        key = o.key_or_group
        if o.is_delete() or o.package is not None or "/" in key or key.split(".")[0] == "hydra":
            continue
        parent, _, leaf = key.rpartition(".")
        try:
            node = (OmegaConf.select(schema, parent) if parent else schema)._get_node(leaf)
        except Exception:  # noqa: BLE001 -- not a schema key (``mistyped`` names it) or a free-form node
            continue
        if not (isinstance(node, EnumNode) or type(node).__name__ in _KINDS):
            continue
        for v in _values(o):
            if v is None or (isinstance(v, str) and "${" in v):
                continue
            try:
                node.validate_and_convert(v)
                continue
            except ValidationError:
                pass
            shown = str(v).lower() if isinstance(v, bool) else str(v)
            if isinstance(node, EnumNode):
                names = [m.name for m in node.enum_type]
                what = f"one of {', '.join(names)}"
                example = f"{key}={(difflib.get_close_matches(shown, names, n=1, cutoff=0.3) or names)[0]}"
            else:
                what, d = _KINDS[type(node).__name__], node._value()
                example = None if d is None else f"{key}={str(d).lower() if isinstance(d, bool) else _as_override(d)}"
            return (f"{key}={shown} is invalid: {key} is {what}" + (f" (e.g. {example})" if example else "") +
                    ". Fix it on the command line or in the YAML that sets it; nothing was run. (python -m embclf "
                    "--help lists the main keys; --cfg job shows every key and its value.)")
    return None


def bad_choice(argv: Sequence[str]) -> Optional[str]:
    """One paragraph for the first override in ``argv`` that picks an option a config group of ``conf/`` does not
    have (``model=foo``, ``head=mpl``, ``experiment=quik``; each value of a sweep too): the group, its options and
    the closest as an example. None when every choice exists. Hydra's own message for this is a dozen lines
    (the options, then its config search path); ``hydra/...`` groups are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.split("=")[0] in ("--config-dir", "-cd", "--config-path", "-cp") or a.lstrip("+").startswith(
            "hydra.searchpath") for a in argv):
        return None  # the user's own config dirs may hold more options: Hydra knows them, we do not
    lines = [a for a in argv if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception:  # noqa: BLE001 -- a syntax error: Hydra's own message says where
        return None
    conf = Path(conf_dir())
    for o in parsed:
        group = o.key_or_group
        if o.is_delete() or o.package is not None or not (conf / group).is_dir() or group.startswith("hydra"):
            continue
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        for v in _values(o):
            if v is None or not isinstance(v, str) or "${" in v or v in options:
                continue
            near = (difflib.get_close_matches(v, options, n=1, cutoff=0.3) or options)[0]
            return (f"{group}={v} is not an option of the {group} group: it is one of {', '.join(options)} "
                    f"(conf/{group}/*.yaml; e.g. {group}={near}). Fix it on the command line; nothing was run.")
    return None
