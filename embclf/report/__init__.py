"""``python -m embclf.report PATH [PATH ...] [--out DIR]``: one table and the reference study's figures for sweeps;
``embclf.report.load(*paths)``: the same runs as a pandas DataFrame for a notebook (docs/report.md).

PATH is a sweep dir, a run dir, or a whole ``outputs/``; every run dir under it (a dir holding summary.json,
including the ``autoencode/`` and ``classify/`` run dirs of a ``stage=all`` job) is read, never modified, and
nothing is trained. Written into ``--out`` (default: the PATH, or the common parent of several PATHs):

- ``report.md``: what was run (the sweep commands, data and sizes, epochs, heads, which settings differ, where
  the numbers come from), the protocol card (the probe, the PSNR and objective conventions, data and code
  version, and which protocol keys differ between runs), one row per configuration (every setting that
  differs between runs either
  separates rows or, for settings implied by a group choice such as ``model.variational``, follows it; only
  distinct seeds are averaged, as mean ± std with n = seeds; a seed run twice counts once, its newest run),
  last-epoch numbers where they differ from best-on-val, one test-accuracy column per probe, the Pareto set of
  test PSNR against test accuracy, per-class accuracy, the runs that did not complete, and the figures.
- ``report.csv``: every run (repeats too, ``used`` false), every field, one ``cfg:<key>`` column per setting
  that differs and ``probe:<name>`` columns.
- ``figures/``: ``val_psnr.png``, ``val_mse.png``, ``val_accuracy.png``, ``ce.png`` per epoch (per
  configuration the mean over seeds, a band from min to max); ``probe_vs_epoch.png`` (linear probe accuracy
  and val PSNR per epoch, with ``autoencode.probe_every``); ``vs_latent.png``; ``frontier.png`` (test PSNR
  against test accuracy per configuration, the Pareto set joined); ``prior_samples.png`` and
  ``reconstructions.png`` (runs side by side, the same test
  images); ``per_class_accuracy.png``.

The table is also printed to the terminal, then the runs that did not complete (failed, interrupted, still
running, or unreadable: a torn or hand-edited summary.json or config.yaml, with why); when no run has
completed yet the table is one sentence saying so.

Results are readable from anywhere: PATH may be read-only (an archive, a colleague's results). Everything
is computed before anything is written, and each file is written atomically, so when the output dir cannot
be written (read-only, full, no permission) the table is still printed, no partial file is left, and one
line on stderr names the file and the reason and says that ``--out DIR`` writes elsewhere.

Exit status: 0 when the table was printed (also when the default output dir, the PATH, could not be
written: the table is the result); 1 when an explicit ``--out DIR`` could not be written (the table is
printed all the same); 2 with a one-paragraph message when a PATH does not exist or holds no run dirs.

The package, by job: ``rows`` (collect runs: read run dirs once, join stages into rows, row identity),
``frame`` (``load``: one DataFrame row per run dir), ``aggregation`` (configurations: mean ± std over seeds, pandas),
``tables`` (markdown, CSV, report.md's opening), ``protocol`` (report.md's protocol card), ``figures`` (the
report's PNGs), ``curves`` (probe_vs_epoch.png), ``frontier`` (the Pareto set and frontier.png), ``projections`` (the
classify stage's 2-D embedding plots and confusion matrix), ``cli`` (``report``, ``main``); whether a
"running" run still runs is ``embclf.liveness``. Names are imported on first use, so a stage importing
``embclf.report.projections`` does not import pandas. (No module is named like a function it exports: an
imported submodule would shadow the function of the same name on the package.)
"""
from __future__ import annotations

import importlib

# public name -> the module that defines it (imported when first asked for: PEP 562)
_WHERE = {
    "load": "frame",
    "report": "cli", "main": "cli", "HELP_EPILOG": "cli",
    "collect": "rows", "read_runs": "rows", "read_summary": "rows", "read_config": "rows",
    "unit_config": "rows", "flatten": "rows", "preset": "rows", "probe_names": "rows",
    "varying_keys": "rows", "ReportError": "rows", "COLUMNS": "rows", "NUMERIC": "rows",
    "PROBE_PREFIX": "rows", "UNREADABLE": "rows",
    "aggregate": "aggregation", "class_names": "aggregation",
    "markdown_table": "tables", "write_csv": "tables", "commands": "tables", "preamble": "tables",
    "no_completed_run": "tables", "FORMATS": "tables", "HEADERS": "tables", "COUNTS": "tables",
    "plot_curves": "figures", "plot_vs_latent": "figures", "plot_prior_samples": "figures",
    "plot_reconstructions": "figures", "plot_per_class": "figures", "styles": "figures",
    "probe_vs_epoch": "curves",
    "plot_frontier": "frontier", "pareto_front": "frontier", "frontier_table": "frontier",
    "frontier_section": "frontier",
    "protocol_card": "protocol", "protocol_values": "protocol", "protocol_differences": "protocol",
    "code_version": "rows", "data_fingerprint": "rows",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
