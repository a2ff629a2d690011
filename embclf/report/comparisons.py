"""Paired comparisons over seeds (``python -m embclf.report PATH --compare KEY``) and the gain over the random-init
encoder (``autoencode.epochs=0``), as pandas frames, Markdown and ``comparisons.csv``.

A comparison pairs runs that differ only in the setting ``KEY`` (any setting a report row has: ``model.input_noise``,
``autoencode.epochs``, ``head.hidden``, or ``experiment``, the ``experiment=`` preset) and share the seed. For each
configuration and each value of KEY other than the baseline it reports, over the pairs (one per shared seed):

- ``mean_diff_acc`` / ``mean_diff_psnr``: the mean paired difference (value minus baseline) of the test accuracy of
  the main head (fraction in [0, 1]) and of the test PSNR (dB);
- ``ci_*``: the 95 % Student t-interval over the paired differences, mean ± t_{0.975, n-1} · sd / √n (sd the sample
  standard deviation, ddof 1; Student 1908, any statistics text, e.g. Wasserman, *All of Statistics*, 2004, §10.4);
  ``t`` comes from ``scipy.stats.t.ppf`` (scipy is installed with scikit-learn), else from the table ``T975``;
- ``detectable_*``: the interval's half-width t · sd / √n: the smallest mean difference whose interval excludes zero
  at the observed spread and this many seeds (a mean difference smaller than it cannot be told from zero);
- ``n_pairs`` and ``agree_*``: how many pairs have the sign of the mean difference.

Which settings define "the same configuration": every setting of the runs except KEY and the seed, less the
settings KEY implies (one value per value of KEY, e.g. the ten settings of ``experiment=improved``, or
``model.variational`` under ``model.name``; only a preset or a group's choice implies settings, ``_follows``). So
``--compare experiment`` pairs ``ae-z64 experiment=quick`` seed 0 with ``ae-z64 experiment=improved`` seed 0.

The baseline: ``baseline`` if given, else the smallest value when every value is a number (``autoencode.epochs=0``,
``model.input_noise=0``), else false / null / ``quick`` when present, else the first value in sorted order.
"""
from __future__ import annotations

import json
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .rows import GROUP_NAME, ReportError, _implied, _key, _short

# t_{0.975, df} for df = 1..30 (two-sided 95 %), used only when scipy cannot be imported; beyond 30: 1.96
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
METRICS = (("acc", "test_accuracy"), ("psnr", "test_psnr"))
COLUMNS = ["key", "configuration", "value", "baseline", "n_pairs", "seeds",
           "mean_diff_acc", "sd_diff_acc", "ci_low_acc", "ci_high_acc", "detectable_acc", "agree_acc",
           "mean_diff_psnr", "sd_diff_psnr", "ci_low_psnr", "ci_high_psnr", "detectable_psnr", "agree_psnr",
           "interval"]
RANDOM_INIT_KEY = "autoencode.epochs"


def t975(df: int) -> Tuple[float, str]:
    """(t_{0.975, df}, where it came from): scipy's Student t quantile, else the table ``T975`` (df > 30: 1.96).
    Raises ValueError for df < 1 (one pair has no spread)."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 pairs (df={df})")
    try:
        from scipy.stats import t
        return float(t.ppf(0.975, df)), "scipy.stats.t"
    except ImportError:  # pragma: no cover -- scipy comes with scikit-learn
        return (T975[df - 1] if df <= len(T975) else 1.96), "t table (scipy not installed)"


def paired_stats(diffs: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean, sample sd, 95 % t-interval, half-width and sign agreement of paired differences.

    Args: ``diffs``: one difference per pair (NaN/None left out).
    Returns {"n", "mean", "sd", "ci_low", "ci_high", "detectable", "agree", "t_source"}; with one pair only
    ``mean`` and ``agree`` (the rest None); with none, every number None. ``agree``: pairs whose difference has
    the mean's sign (a zero mean: pairs equal to zero)."""
    d = np.array([x for x in diffs if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    out: Dict[str, Optional[float]] = dict(n=len(d), mean=None, sd=None, ci_low=None, ci_high=None, detectable=None,
                                           agree=None, t_source=None)
    if not len(d):
        return out
    mean = float(d.mean())
    out.update(mean=mean, agree=int((np.sign(d) == np.sign(mean)).sum()))
    if len(d) >= 2:
        sd = float(d.std(ddof=1))
        t, source = t975(len(d) - 1)
        half = t * sd / math.sqrt(len(d))
        out.update(sd=sd, ci_low=mean - half, ci_high=mean + half, detectable=half, t_source=source)
    return out


def units(rows: List[dict]) -> pd.DataFrame:
    """The report's completed, used row units (``rows.collect``) as a frame: ``seed``, ``stage``, ``model``,
    ``latent``, ``test_accuracy`` (fraction), ``test_psnr`` (dB) and one column per setting (``cfg:<key>``, the
    JSON of the value, so lists and nulls compare exactly); ``attrs["values"]`` maps each ``cfg:`` column's JSON
    back to the value."""
    done = [r for r in rows if r.get("status") == "completed" and r.get("used", True)]
    keys = sorted(set().union(*[r["config"] for r in done])) if done else []
    recs = []
    values: Dict[str, object] = {}
    for r in done:
        rec = {"seed": r["seed"], "stage": r["stage"], "model": r["model"], "latent": r["latent"],
               "test_accuracy": r.get("test_accuracy"), "test_psnr": r.get("test_psnr")}
        for k in keys:
            v = r["config"].get(k, "<absent>")
            values[_key(v)] = v
            rec["cfg:" + k] = _key(v)
        recs.append(rec)
    df = pd.DataFrame.from_records(recs, columns=["seed", "stage", "model", "latent", "test_accuracy", "test_psnr"]
                                   + ["cfg:" + k for k in keys])
    df.attrs["values"] = values
    return df


def _order(values: List[object]) -> List[object]:
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return sorted(values, key=lambda v: json.dumps(v, sort_keys=True, default=str))


def _baseline(key: str, values: List[object], asked: Optional[str]) -> object:
    if asked is not None:
        for v in values:
            if _short(key, v) == str(asked) or str(v) == str(asked):
                return v
        raise ReportError(f"--baseline {asked} is not a value of {key} here (values: "
                          f"{', '.join(_short(key, v) for v in _order(values))}); pick one of them or leave "
                          "--baseline out.")
    ordered = _order(values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return ordered[0]
    for plain in (False, None, "quick"):
        if any(v is plain or (isinstance(v, str) and v == plain) for v in values):
            return plain
    return ordered[0]


def _follows(key: str, setting: str) -> bool:
    """Whether ``setting`` may follow from ``key`` (and is then no pairing key when it has one value per value of
    ``key``): every setting follows a preset (``experiment``), the settings of a group follow its choice
    (``model.variational`` and ``model.beta`` follow ``model.name``); nothing follows any other key, so runs that
    differ in a second setting never pair (e.g. ``autoencode.epochs=0`` only for the AE and ``=12`` only for the
    VAE: no pair)."""
    return key == "experiment" or (GROUP_NAME.get(setting.split(".")[0]) == key and setting != key)


def compare(rows: List[dict], key: str, baseline: Optional[str] = None) -> pd.DataFrame:
    """The paired comparisons of ``key`` (a setting name as in report.csv's ``cfg:`` columns, or ``experiment``)
    over the report rows ``rows`` (``rows.collect``). One frame row per (configuration, value of ``key`` other
    than the baseline) with at least one pair, columns ``COLUMNS`` (see the module docstring; accuracy differences
    as fractions, PSNR differences in dB; ``interval`` says where t came from). Empty when no configuration has
    two values of ``key`` with a seed in common.

    Raises ``ReportError`` when no run has the setting ``key`` (naming the settings that differ) or ``baseline``
    is not one of its values."""
    df = units(rows)
    col = "cfg:" + key
    if col not in df.columns:
        varying = sorted(c[4:] for c in df.columns if c.startswith("cfg:") and df[c].nunique() > 1)
        raise ReportError(f"--compare {key}: no run here has the setting {key!r}. Settings that differ between these "
                          f"runs: {', '.join(varying) or 'none'}; any setting of report.csv's cfg: columns can be "
                          "compared (e.g. --compare autoencode.epochs, --compare experiment).")
    vals = df.attrs["values"]
    df = df[df[col] != _key("<absent>")]
    if df.empty or df[col].nunique() < 2:
        return pd.DataFrame(columns=COLUMNS)
    base = _baseline(key, [vals[j] for j in df[col].unique()], baseline)
    # the settings that define a configuration: all but key, those key implies, and those equal everywhere
    configs = [{c: row[c] for c in df.columns if c.startswith("cfg:")} for _, row in df.iterrows()]
    pair_on = [c for c in df.columns if c.startswith("cfg:") and c != col and df[c].nunique() > 1
               and not (_follows(key, c[4:]) and _implied(configs, col, c))]
    shown = [c for c in pair_on if c not in ("cfg:model.name", "cfg:latent")
             and not ("cfg:model.name" in pair_on and _implied(configs, "cfg:model.name", c))]
    out = []
    for _, grp in df.groupby(["stage"] + pair_on, sort=False, dropna=False):
        first = grp.iloc[0]
        # the model and latent of the pair (not the compared one's: --compare model.name / latent)
        label = "-".join(x for x, k in ((str(first["model"]), "model.name"), (f"z{first['latent']}", "latent"))
                         if k != key) + "".join(
            f" {c[4:]}={_short(c[4:], vals[first[c]])}" for c in shown)
        at_base = grp[grp[col] == _key(base)].drop_duplicates("seed").set_index("seed")
        if at_base.empty:
            continue
        for v in _order([vals[j] for j in grp[col].unique() if j != _key(base)]):
            other = grp[grp[col] == _key(v)].drop_duplicates("seed").set_index("seed")
            seeds = sorted(set(other.index) & set(at_base.index), key=str)
            if not seeds:
                continue
            rec = {"key": key, "configuration": label, "value": _short(key, v), "baseline": _short(key, base),
                   "n_pairs": len(seeds), "seeds": ",".join(str(s) for s in seeds), "interval": None}
            for short, metric in METRICS:
                diffs = [_diff(other.at[s, metric], at_base.at[s, metric]) for s in seeds]
                st = paired_stats(diffs)
                rec.update({f"mean_diff_{short}": st["mean"], f"sd_diff_{short}": st["sd"],
                            f"ci_low_{short}": st["ci_low"], f"ci_high_{short}": st["ci_high"],
                            f"detectable_{short}": st["detectable"],
                            f"agree_{short}": None if st["agree"] is None else f"{st['agree']}/{st['n']}"})
                rec["interval"] = rec["interval"] or st["t_source"]
            out.append(rec)
    return pd.DataFrame.from_records(out, columns=COLUMNS)


def _diff(a, b) -> Optional[float]:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return None
    return float(a) - float(b)


def _fmt(v, digits: int, signed: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def markdown(frame: pd.DataFrame, title: str, intro: str) -> List[str]:
    """report.md lines for ``frame`` (``compare``): a heading, ``intro``, one table row per comparison
    (accuracy differences as fractions, PSNR differences in dB), and how the interval was computed."""
    lines = [f"## {title}", "", intro, ""]
    if frame.empty:
        return lines + ["No configuration has two values with a seed in common.", ""]
    head = ["configuration", "value − baseline", "pairs", "Δ test acc [95 % CI]", "agree", "detectable Δ acc",
            "Δ test PSNR dB [95 % CI]", "agree", "detectable Δ PSNR"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for _, r in frame.iterrows():
        def cell(m, d):
            mean, lo, hi = r[f"mean_diff_{m}"], r[f"ci_low_{m}"], r[f"ci_high_{m}"]
            ci = f" [{_fmt(lo, d)}, {_fmt(hi, d)}]" if lo is not None and not pd.isna(lo) else ""
            return _fmt(mean, d) + ci
        lines.append("| " + " | ".join([
            str(r["configuration"]), f"{r['value']} − {r['baseline']}", str(r["n_pairs"]),
            cell("acc", 4), str(r["agree_acc"] or ""), _fmt(r["detectable_acc"], 4, signed=False),
            cell("psnr", 2), str(r["agree_psnr"] or ""), _fmt(r["detectable_psnr"], 2, signed=False)]) + " |")
    src = next((s for s in frame["interval"] if s), None)
    lines += ["", "Paired on seed: value minus baseline of the same seed, everything else equal. 95 % CI: Student "
              "t-interval over the paired differences, mean ± t₀.₉₇₅,ₙ₋₁·sd/√n (t from "
              f"{src or 'scipy.stats.t'}); none with one pair. `agree`: pairs with the mean's sign. `detectable Δ`: "
              "the interval's half-width t·sd/√n, the smallest mean difference these seeds can tell from zero at "
              "the observed spread. Numbers: comparisons.csv.", ""]
    return lines


def random_init_gain(rows: List[dict]) -> pd.DataFrame:
    """Each configuration's gain over its random-init encoder: ``compare(rows, "autoencode.epochs", "0")`` when
    the rows hold both ``autoencode.epochs=0`` runs and trained ones, else an empty frame."""
    eps = {r["config"].get(RANDOM_INIT_KEY) for r in rows if r.get("status") == "completed" and r.get("config")}
    if 0 not in eps or len(eps) < 2:
        return pd.DataFrame(columns=COLUMNS)
    return compare(rows, RANDOM_INIT_KEY, "0")


def comparison_sections(rows: List[dict], keys: Sequence[str], baseline: Optional[str] = None
                        ) -> Tuple[pd.DataFrame, List[str]]:
    """(every comparison as one frame, report.md's lines): the gain over the random-init encoder when the rows
    allow it (``random_init_gain``; not repeated when ``autoencode.epochs`` is among ``keys``), then one
    "Comparisons" table per key of ``keys``. Raises ``ReportError`` as ``compare``."""
    frames, md = [], []
    if RANDOM_INIT_KEY not in keys:
        gain = random_init_gain(rows)
        if len(gain):
            frames.append(gain)
            md += markdown(gain, "Gain over the random-init encoder",
                           "Each configuration minus the same configuration with `autoencode.epochs=0` (the seed's "
                           "untrained encoder, same seed), test accuracy of the main head and test PSNR.")
    for i, key in enumerate(keys):
        frame = compare(rows, key, baseline)
        frames.append(frame)
        md += markdown(frame, "Comparisons" if i == 0 else f"Comparisons: {key}",
                       f"`--compare {key}`: each value of `{key}` minus "
                       f"{'the baseline ' + str(frame['baseline'].iloc[0]) if len(frame) else 'the baseline'}, "
                       "per configuration, paired on seed.")
    frames = [f for f in frames if len(f)]
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)), md


def write_csv(frame: pd.DataFrame, path) -> None:
    """``frame`` (``COLUMNS``) to ``path`` atomically (``tables._atomic``): differences of accuracy as fractions,
    of PSNR in dB."""
    from .tables import _atomic

    with _atomic(path) as tmp:
        frame.to_csv(tmp, index=False)
