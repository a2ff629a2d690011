"""The command: ``report`` (compute everything, then write report.csv, figures/ and report.md atomically) and
``main`` (``python -m embclf.report``'s argument parsing, printing and exit status). See the package docstring."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from .aggregation import aggregate, class_names
from .rows import PROBE_PREFIX, UNREADABLE, ReportError, collect, curve_rows, probe_names
from .tables import PC_PREFIX, _atomic, _differs, markdown_table, no_completed_run, preamble, write_csv


def report(paths: Sequence[Path], out: Optional[Path] = None, figures: bool = True,
           compare: Sequence[str] = (), baseline: Optional[str] = None) -> Dict[str, object]:
    """Write report.csv, report.md and figures/ for the runs under ``paths`` into ``out``.

    Everything is computed first and written last, each file atomically. Results are readable from anywhere:
    when ``out`` cannot be written (a read-only archive, a colleague's results, a full disk) the writing stops
    at the first failure, leaves no partial file, and ``unwritten`` says which file and why; the rest of the
    result (the table above all) is complete.

    ``compare``: settings to compare paired on seed (``embclf.report.comparisons``; ``baseline`` its reference value),
    written to comparisons.csv and report.md's "Comparisons"; the gain over the random-init encoder
    (``autoencode.epochs=0`` runs beside trained ones) is added to both whenever the runs allow it.

    Returns {"rows": per-run rows, "comparisons": the comparison frame (``comparisons.COLUMNS``, also the random-init
    gain), "comparison_md": report.md's lines for them, "agg": one row per configuration, "table": the markdown table printed (or,
    when no run has completed, one sentence saying so), "not_completed": rows that did not complete (failed,
    running, unreadable, ...), "files": paths written, "out": ``out``, "unwritten": None, or (path, why) of
    the write that failed}. Raises ``ReportError`` (see ``collect``).
    """
    paths = [Path(p) for p in paths]
    rows = collect(paths)
    if out is None:
        out = paths[0] if len(paths) == 1 else Path(os.path.commonpath([p.resolve() for p in paths]))
    out = Path(out)
    agg = aggregate(rows)
    probes = [PROBE_PREFIX + p for p in probe_names(rows)]
    cols = ["label", "stage", "seed", "n", "repeats", "epochs", "test_mse", "test_psnr"]
    cols += ["final_test_psnr"] if _differs(agg, "test_psnr", "final_test_psnr") else []
    cols += ["test_kl", "active_units", "val_accuracy", "test_accuracy"]
    cols += ["final_test_accuracy"] if _differs(agg, "test_accuracy", "final_test_accuracy") else []
    cols += probes + ["wall_seconds"]
    if all(a["n"] == 1 for a in agg):
        cols.remove("n")
    table = markdown_table(agg, cols) if agg else no_completed_run(rows)
    bad = [r for r in rows if r["status"] != "completed"]
    from .comparisons import comparison_sections

    comparisons, comparison_md = comparison_sections(rows, compare, baseline)
    res = {"rows": rows, "agg": agg, "table": table, "not_completed": bad, "files": [], "out": out,
           "unwritten": None, "comparisons": comparisons, "comparison_md": comparison_md}
    try:
        res["files"] = _write(paths, out, rows, agg, table, bad, figures, comparisons, comparison_md)
    except OSError as e:  # read-only, full, permissions: the table is still the result
        res["unwritten"] = (Path(e.filename) if e.filename else out, e.strerror or str(e))
    return res


def _write(paths: List[Path], out: Path, rows: List[dict], agg: List[dict], table: str, bad: List[dict],
           figures: bool, comparisons=None, comparison_md: Sequence[str] = ()) -> List[Path]:
    """report.csv, figures/ and report.md into ``out`` (see ``report``); returns the paths written. Raises
    ``OSError`` (its ``filename`` the file or directory) at the first write that fails."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.csv", out / "report.md"]
    write_csv(rows, files[0])
    if comparisons is not None and len(comparisons):
        from .comparisons import write_csv as write_comparisons

        files.append(out / "comparisons.csv")
        write_comparisons(comparisons, files[-1])
    figs: List[Path] = []
    if figures:
        from .figures import plot_curves, plot_per_class, plot_prior_samples, plot_reconstructions, plot_vs_latent


        fig_dir = out / "figures"
        fig_dir.mkdir(exist_ok=True)
        figs = plot_curves(curve_rows(rows), fig_dir)
        figs += [p for p in (plot_vs_latent(agg, fig_dir), plot_prior_samples(rows, fig_dir),
                             plot_reconstructions(rows, fig_dir), plot_per_class(agg, fig_dir)) if p]
        from .frontier import plot_frontier  # PSNR against accuracy, the Pareto set joined

        figs += [p for p in (plot_frontier(agg, fig_dir),) if p]
    from .frontier import frontier_section
    from .protocol import protocol_card

    md = [f"# embclf report: {', '.join(str(p) for p in paths)}", ""] + preamble(rows, agg) + protocol_card(rows)
    md += ["## Results", ""]
    if agg:
        md += [f"{len(agg)} configurations from {len(rows)} runs ({sum(r['status'] == 'completed' for r in rows)} "
               "completed). Per-run numbers: report.csv.", ""]
    md += [table, ""] + frontier_section(agg) + list(comparison_md)
    pcs = [a for a in agg if a.get("per_class_accuracy")]
    classes = class_names(pcs)
    if pcs and len(classes) <= 20:
        # "pc:<class>" columns: formatted and headed by their prefix (tables.PC_PREFIX), no table is changed
        pc_rows = [{"label": a["label"], **{f"{PC_PREFIX}{c}": a["per_class_accuracy"].get(c) for c in classes}}
                   for a in pcs]
        missing = any(c not in a["per_class_accuracy"] for a in pcs for c in classes)
        md += ["## Test accuracy per class", "", "(best-on-val head, mean over seeds"
               + ("; blank: the class is not in that configuration's data)" if missing else ")"), "",
               markdown_table(pc_rows, ["label"] + [f"{PC_PREFIX}{c}" for c in classes]), ""]
    elif pcs:
        md += ["## Test accuracy per class", "", f"{len(classes)} classes: see "
               "figures/per_class_accuracy.png (the numbers are in each classify run's summary.json).", ""]
    if bad:
        md += ["## Not completed", "", markdown_table(
            [{**r, "error": (r.get("error") or "").strip().splitlines()[-1][:160] if r.get("error") else ""} for r in bad],
            ["label", "seed", "stage", "status", "epochs", "error", "run_dir"]), ""]
    if figs:
        md += ["## Figures", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figs] + [""]
    with _atomic(files[1]) as tmp:
        tmp.write_text("\n".join(md))
    return files + figs


HELP_EPILOG = """\
writes (into --out, default: the PATH):
  report.md    what was run (sweep commands, data, epochs, heads, settings that differ), the protocol
               card, the table, the Pareto set (PSNR vs accuracy), per-class accuracy, runs that did not
               complete, the figures
  report.csv   every run, every field (repeated seeds too: column `used`)
  comparisons.csv  with --compare KEY, or autoencode.epochs=0 runs beside trained ones: paired differences
               (value - baseline, same seed) of test accuracy and PSNR, 95% t-interval, pairs, sign agreement
  figures/     val_psnr, val_mse, val_accuracy, ce (per epoch), probe_vs_epoch, vs_latent, frontier,
               prior_samples, reconstructions, per_class_accuracy (.png)

rows: one per configuration; any setting that differs between runs (model, latent, data.*, autoencode.*,
head, head.*, classify.*, model.* options) separates rows and appears in the row label; only distinct
seeds are averaged (n = seeds); a seed run more than once counts once (its newest completed run).

read-only results (an archive, a colleague's sweep): the table is printed all the same, then one line
saying where the files could not be written; --out DIR writes them elsewhere.

exit status: 0 table printed (also when the PATH itself cannot be written); 1 an explicit --out DIR
could not be written (table printed); 2 a PATH does not exist or holds no run dirs.

examples:
  python -m embclf.report outputs/2026-11-30_10-00-00_3fa9c1          # one sweep
  python -m embclf.report outputs/sweepA outputs/sweepB --out reports/ab   # two sweeps, one table
  python -m embclf.report outputs                                      # everything under outputs/
  python -m embclf.report outputs/sweep --compare autoencode.epochs    # trained vs random-init, paired on seed
"""


def main(argv: Optional[Iterable[str]] = None) -> int:
    """CLI entry point (see module docstring). Returns the exit status."""
    ap = argparse.ArgumentParser(
        prog="python -m embclf.report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Summarise finished embclf runs: one row per configuration (mean ± std over distinct seeds), "
                    "the sweep commands, and figures.\nReads every run dir (a dir with summary.json) under each "
                    "PATH; never modifies or trains anything.",
        epilog=HELP_EPILOG)
    ap.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="sweep dir, run dir, or output_dir")
    ap.add_argument("--out", type=Path, default=None, help="where to write report.md/.csv and figures/ "
                    "(default: the PATH, or the common parent of several)")
    ap.add_argument("--no-figures", action="store_true", help="table only (no matplotlib)")
    ap.add_argument("--compare", action="append", default=[], metavar="KEY",
                    help="paired comparison over seeds of the setting KEY (e.g. autoencode.epochs, experiment, "
                         "model.input_noise): mean difference of test accuracy and PSNR with a 95%% t-interval; "
                         "repeatable. Written to comparisons.csv and report.md's Comparisons section")
    ap.add_argument("--baseline", default=None, metavar="VALUE",
                    help="the value of the --compare KEY the others are compared with (default: the smallest "
                         "number; else false, null or quick; else the first value)")
    args = ap.parse_args(None if argv is None else list(argv))
    if args.out is not None and args.out.exists() and not args.out.is_dir():  # before any run dir is read
        print(f"error: --out {args.out} is a file; --out names the folder that receives report.md, report.csv and "
              "figures/ (it is created if missing).", file=sys.stderr)
        return 2
    try:
        res = report(args.paths, args.out, figures=not args.no_figures, compare=args.compare, baseline=args.baseline)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["table"])
    if res["comparison_md"]:
        print("\n".join(res["comparison_md"]))
    for r in res["not_completed"]:
        why = f": {r['error']}" if r["status"] == UNREADABLE else ""
        print(f"{r['status']}: {r['label']} seed {r['seed']} ({r.get('classify_dir') or r['run_dir']}){why}")
    if res["unwritten"] is not None:
        path, why = res["unwritten"]
        print(f"could not write the report files into {res['out']} ({why}: {path}); the table above is complete. "
              "--out DIR writes report.md, report.csv and figures/ elsewhere.", file=sys.stderr)
        # the table is the result; a write asked for by --out that did not happen is an error
        return 1 if args.out is not None else 0
    extra = ", comparisons.csv" if any(p.name == "comparisons.csv" for p in res["files"]) else ""
    print(f"wrote {res['files'][1]} , report.csv{extra} and {sum(p.suffix == '.png' for p in res['files'])} figures")
    return 0
