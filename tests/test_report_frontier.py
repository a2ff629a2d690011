"""The rate–accuracy frontier (``embclf/report/frontier.py``): the Pareto set of hand-made tables is exactly the
rows worked out by hand (ties, one point, one point dominating all, missing accuracy), and the report writes
figures/frontier.png and the Pareto table for fake run dirs."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from PIL import Image
from report_fixtures import ae_run, clf_run

from embclf.report import collect, frontier_section, frontier_table, pareto_front, plot_frontier, report
from embclf.report.aggregation import aggregate

NAN = float("nan")


def _front(points):
    """The labels on the front of ``{label: (psnr, accuracy)}``, in the front's order (PSNR ascending)."""
    df = pd.DataFrame([(k, x, y) for k, (x, y) in points.items()], columns=["label", "psnr", "accuracy"])
    return pareto_front(df)["label"].tolist()


def test_pareto_set_of_a_hand_made_table():
    # C (11, .6) dominates A (10, .5) and E (11, .3); B has the best PSNR, D the best accuracy; none of B, C, D
    # is >= another on both axes
    pts = {"A": (10, 0.5), "B": (12, 0.4), "C": (11, 0.6), "D": (9, 0.7), "E": (11, 0.3)}
    assert _front(pts) == ["D", "C", "B"]


def test_ties_are_both_on_the_front_and_equal_on_one_axis_is_dominated():
    # P and Q are the same point: neither is strictly better, both stay; R has P's PSNR but a lower accuracy,
    # S has P's accuracy but a lower PSNR: both dominated by P (>= on both, > on one)
    pts = {"P": (12, 0.5), "Q": (12, 0.5), "R": (12, 0.4), "S": (11, 0.5), "T": (13, 0.2)}
    assert sorted(_front(pts)[:2]) == ["P", "Q"] and _front(pts)[2:] == ["T"]


def test_single_point_and_all_dominated_but_one():
    assert _front({"only": (5.0, 0.1)}) == ["only"]
    pts = {"best": (20, 0.9), "a": (19, 0.9), "b": (20, 0.8), "c": (10, 0.1), "d": (19.5, 0.85)}
    assert _front(pts) == ["best"]


def test_missing_accuracy_is_left_out_of_the_front_but_listed():
    # "noclf" would dominate everything with any accuracy >= 0.6; without one it cannot be placed
    pts = {"noclf": (30, NAN), "a": (10, 0.6), "b": (12, 0.3), "nopsnr": (NAN, 0.99)}
    assert _front(pts) == ["a", "b"]
    assert _front({"x": (1, NAN)}) == []
    agg = [{"label": k, "model": "ae", "latent": 8, "n": 2,
            "test_psnr": None if math.isnan(x) else (x, 0.1), "test_accuracy": None if math.isnan(y) else (y, 0.01)}
           for k, (x, y) in pts.items()]
    table = frontier_table(agg)
    assert table["label"].tolist() == ["noclf", "a", "b", "nopsnr"]  # every configuration is listed
    assert table["pareto"].tolist() == [False, True, True, False]
    assert table["latent"].dtype == "Int64" and math.isnan(table.loc[0, "accuracy"])
    md = "\n".join(frontier_section(agg))
    assert "Pareto-optimal configurations (2 of 2)" in md
    assert "| b   | 12.00 ± 0.10   | 0.3000 ± 0.0100 | 2 |" in md  # best PSNR first
    assert "for want of a test accuracy (no classify run) or PSNR: `noclf`, `nopsnr`" in md


def test_pareto_front_needs_its_columns():
    with pytest.raises(KeyError):
        pareto_front(pd.DataFrame({"psnr": [1.0]}))


@pytest.fixture
def sweep(tmp_path):
    """ae and vae at latent 8 (two seeds, with an MLP head), ae at latent 16 (no head): the vae is the only
    Pareto-optimal configuration with an accuracy (same PSNR, higher accuracy)."""
    for m, acc in (("ae", 0.30), ("vae", 0.40)):
        for s in (0, 1):
            a = ae_run(tmp_path / "runs" / f"{m}-s{s}", m, 8, s)
            clf_run(tmp_path / "runs" / f"{m}-s{s}-clf", a, acc + 0.02 * s)
    ae_run(tmp_path / "runs" / "ae16", "ae", 16, 0)
    return tmp_path / "runs"


def test_report_md_lists_the_pareto_set(sweep, tmp_path):
    report([sweep], out=tmp_path / "rep", figures=False)
    md = (tmp_path / "rep" / "report.md").read_text()
    section = md.split("## Rate–accuracy frontier")[1].split("##")[0]
    # vae-z8: 17 dB, accuracy mean of 0.40 and 0.42 = 0.41, std = 0.02 / sqrt(2) = 0.0141
    assert "| vae-z8 | 17.00 ± 0.00   | 0.4100 ± 0.0141 | 2 |" in section and "| ae-z8 " not in section
    assert "`ae-z16`" in section  # listed as left out: no classify run


def test_frontier_png_is_written(sweep, tmp_path):
    path = plot_frontier(aggregate(collect([sweep])), tmp_path)
    assert path == tmp_path / "frontier.png" and Image.open(path).size[0] >= 500


@pytest.mark.slow
def test_the_report_lists_the_frontier_among_its_figures(sweep, tmp_path):
    res = report([sweep], out=tmp_path / "rep")
    assert tmp_path / "rep" / "figures" / "frontier.png" in res["files"]
    assert "![frontier](figures/frontier.png)" in (tmp_path / "rep" / "report.md").read_text()


def test_the_package_names_every_figure_function():
    """``embclf.report``'s lazy name map (``_WHERE``) lists the figure functions of every module."""
    import embclf.report as rep
    from embclf.report import curves, frontier

    assert rep.probe_vs_epoch is curves.probe_vs_epoch and rep.plot_frontier is frontier.plot_frontier
    assert {"probe_vs_epoch", "plot_frontier", "pareto_front", "protocol_card"} <= set(rep.__all__)


def test_no_figure_without_any_accuracy(tmp_path):
    ae_run(tmp_path / "runs" / "a", "ae", 8, 0)
    agg = aggregate(collect([tmp_path / "runs"]))
    assert plot_frontier(agg, tmp_path) is None and not (tmp_path / "frontier.png").exists()
    assert frontier_section(agg) == []
