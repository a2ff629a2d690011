"""The rate–accuracy frontier: ``figures/frontier.png`` and report.md's Pareto table.

Every configuration (a row of the report's table: ``aggregation.aggregate``, mean ± sample std over its seeds) is
one point: test PSNR (dB, the autoencoder's best-on-val checkpoint) on x, test accuracy of the main head (its
best-on-val epoch) on y. A configuration is **Pareto-optimal** when no other configuration is at least as good on
both and strictly better on one (both maximised; ``pareto_front``). Configurations without a test accuracy (no
classify run on the encoder) or without a test PSNR cannot be placed: they are never on the frontier, and the
table and the figure's title say how many were left out.

``pareto_front`` and ``frontier_table`` are pure (pandas in, pandas out); ``plot_frontier`` draws the PNG and
``frontier_section`` writes the markdown."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd

NAME = "frontier.png"
X, Y = "test_psnr", "test_accuracy"  # the aggregate's keys of the two axes
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")  # one per model family, then reused
FRONTIER_COLUMNS = ["label", "model", "latent", "n", "psnr", "psnr_std", "accuracy", "accuracy_std", "pareto"]


def pareto_front(df: pd.DataFrame, x: str = "psnr", y: str = "accuracy") -> pd.DataFrame:
    """The rows of ``df`` on the Pareto front of columns ``x`` and ``y``, both maximised.

    A row is dominated when another row has ``x >= `` and ``y >=`` its own and is strictly greater in at least
    one; the front is every row that is not dominated. Rows equal on both (ties) do not dominate each other, so
    both are on the front. Rows with a missing (NaN/None) ``x`` or ``y`` are never on the front and dominate
    nothing. A single placeable row is the front.

    Args:
        df: any DataFrame with numeric columns ``x`` and ``y`` (e.g. ``frontier_table``'s ``psnr`` in dB and
            ``accuracy`` in [0, 1]).
    Returns:
        The front's rows (``df``'s index and columns kept), sorted by ``x`` ascending (``y`` descending
        among equal ``x``), which is the order of the line joining them. Empty when no row has both numbers.
    Raises:
        KeyError: ``x`` or ``y`` is not a column of ``df``.

    O(n log n): sorted by x descending, a row is on the front iff its y is the largest y among rows with the
    same x and larger than every y of rows with a larger x.
    """
    vals = df[[x, y]].apply(pd.to_numeric, errors="coerce")
    ok = vals.dropna()
    if ok.empty:
        return df.iloc[0:0]
    best_at_x = ok.groupby(x)[y].max()  # per distinct x, ascending
    # the best y among strictly larger x (-inf for the largest x)
    above = best_at_x.iloc[::-1].cummax().shift(1, fill_value=-np.inf).iloc[::-1]
    xs = ok[x].to_numpy()
    keep = (ok[y].to_numpy() == best_at_x.reindex(xs).to_numpy()) & (ok[y].to_numpy() > above.reindex(xs).to_numpy())
    front = ok.index[keep]
    order = ok.loc[front].sort_values([x, y], ascending=[True, False], kind="mergesort").index
    return df.loc[order]


def frontier_table(agg: List[dict]) -> pd.DataFrame:
    """One row per configuration of the report (``aggregation.aggregate``'s dicts, numbers as (mean, std)
    tuples) with ``FRONTIER_COLUMNS``: ``label``, ``model`` (the family), ``latent``, ``n`` (seeds), ``psnr`` /
    ``psnr_std`` (test PSNR in dB, mean and sample std over seeds; std NaN for one seed), ``accuracy`` /
    ``accuracy_std`` (test accuracy of the main head in [0, 1]; NaN without a classify run) and ``pareto``
    (bool: on ``pareto_front`` of ``psnr`` and ``accuracy``). Every configuration is listed, placeable or not."""
    def part(v, i):
        return float(v[i]) if isinstance(v, tuple) and v[i] is not None else np.nan

    df = pd.DataFrame({"label": [a["label"] for a in agg], "model": [a.get("model") for a in agg],
                       "latent": pd.array([a.get("latent") if isinstance(a.get("latent"), int) else None
                                           for a in agg], dtype="Int64"),
                       "n": [a.get("n") for a in agg],
                       "psnr": [part(a.get(X), 0) for a in agg], "psnr_std": [part(a.get(X), 1) for a in agg],
                       "accuracy": [part(a.get(Y), 0) for a in agg],
                       "accuracy_std": [part(a.get(Y), 1) for a in agg]}, columns=FRONTIER_COLUMNS[:-1])
    df["pareto"] = df.index.isin(pareto_front(df).index)
    return df


def plot_frontier(agg: List[dict], out: Path) -> Optional[Path]:
    """Write ``out``/frontier.png: each configuration with both numbers as a point (test PSNR in dB on x, test
    accuracy on y), error bars = sample std over seeds on both axes (none for one seed), its latent size
    written beside it (``z64``; when all share one latent size, the title says it once), one marker and colour per model family; the Pareto-optimal configurations
    joined by a black line and ringed. Returns the path, or None when no configuration has both a test PSNR
    and a test accuracy (nothing to place)."""
    from .figures import _legend, _plt, _savefig

    table = frontier_table(agg)
    placed = table.dropna(subset=["psnr", "accuracy"])
    if placed.empty:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D

    families = list(dict.fromkeys(str(m) for m in placed["model"]))
    cmap = plt.get_cmap("tab10")
    style = {f: {"marker": MARKERS[i % len(MARKERS)], "color": cmap(i % 10)} for i, f in enumerate(families)}
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    for fam in families:
        pts = placed[placed["model"].astype(str) == fam]
        ax.errorbar(pts["psnr"], pts["accuracy"], xerr=pts["psnr_std"].fillna(0), yerr=pts["accuracy_std"].fillna(0),
                    linestyle="none", capsize=3, markersize=6, elinewidth=0.8, **style[fam])
    latents = placed["latent"].dropna().unique()
    for _, p in placed.iterrows():
        if len(latents) > 1 and not pd.isna(p["latent"]):  # one latent size for all: said once, in the title
            ax.annotate(f"z{p['latent']}", (p["psnr"], p["accuracy"]), xytext=(4, 4), textcoords="offset points",
                        fontsize=7)
    front = pareto_front(placed)
    ax.plot(front["psnr"], front["accuracy"], color="black", linewidth=1.2, zorder=1)
    ax.plot(front["psnr"], front["accuracy"], linestyle="none", marker="o", markersize=13, markerfacecolor="none",
            markeredgecolor="black", zorder=3)
    ax.set_xlabel("test PSNR (dB), mean over seeds")
    ax.set_ylabel("test accuracy (main head), mean over seeds")
    left = len(table) - len(placed)
    ax.set_title("rate–accuracy frontier" + (f" (every point at latent {latents[0]})" if len(latents) == 1 else "")
                 + "; error bars: std over seeds"
                 + (f"\n{left} configuration{'s' if left > 1 else ''} without test accuracy or PSNR not drawn"
                    if left else ""), fontsize=9)
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], linestyle="none", label=f, **style[f]) for f in families]
    handles.append(Line2D([], [], color="black", marker="o", markerfacecolor="none", markersize=10,
                          label=f"Pareto front ({len(front)})"))
    _legend(fig, handles, len(handles))
    fig.tight_layout()
    path = out / NAME
    _savefig(fig, path, bbox_inches="tight")
    return path


def frontier_section(agg: List[dict]) -> List[str]:
    """report.md's "Rate–accuracy frontier" section (markdown lines): the Pareto-optimal configurations (test
    PSNR and test accuracy as mean ± std over seeds, n), best PSNR first, and the configurations left out for
    want of a test accuracy (or PSNR). Empty when no configuration has both numbers."""
    from .tables import markdown_table

    table = frontier_table(agg)
    placed = table.dropna(subset=["psnr", "accuracy"])
    if placed.empty:
        return []
    front = pareto_front(placed).iloc[::-1]
    # frontier_table's index is the position in ``agg`` (a label may name two stages' rows)
    rows = [{"label": agg[i]["label"], "test_psnr": agg[i].get(X), "test_accuracy": agg[i].get(Y),
             "n": agg[i].get("n")} for i in front.index]
    md = ["## Rate–accuracy frontier", "",
          f"Pareto-optimal configurations ({len(front)} of {len(placed)}): no other configuration has both a higher "
          "or equal test PSNR and a higher or equal test accuracy (main head), one of them strictly; means over "
          "seeds. Figure: `figures/frontier.png`.", "",
          markdown_table(rows, ["label", "test_psnr", "test_accuracy", "n"]), ""]
    left = table.loc[~table.index.isin(placed.index), "label"].tolist()
    if left:
        md += [f"Not on the frontier for want of a test accuracy (no classify run) or PSNR: "
               f"{', '.join(f'`{x}`' for x in left)}.", ""]
    return md
