"""report.md's protocol card (``embclf/report/protocol.py``): runs that differ in a protocol key (classify
epochs, the code version) are named with their values; runs of one protocol say so; the card reads the
probe, the data and the code from the run dirs."""
from __future__ import annotations

import json

from report_fixtures import ae_run, clf_run

from embclf.report import collect, protocol_card, protocol_differences, report


def _edit_summary(run_dir, **fields):
    p = run_dir / "summary.json"
    s = json.loads(p.read_text())
    s.update(fields)
    p.write_text(json.dumps(s))


def _pair(root, epochs=(50, 50), commits=("a" * 40, "a" * 40)):
    """Two configurations (ae and vae, latent 8, one seed each), each with an MLP head trained for
    ``epochs[i]`` classify epochs, their summaries recording git commit ``commits[i]``."""
    for (m, ep, commit) in zip(("ae", "vae"), epochs, commits):
        a = ae_run(root / m, m, 8, 0)
        c = clf_run(root / f"{m}-clf", a, 0.3, dotlist=[f"classify.epochs={ep}"])
        for d in (a, c):
            _edit_summary(d, provenance={"git_commit": commit, "git_dirty": False}, data_fingerprint="f" * 40)
    return root


def test_runs_of_one_protocol_say_so(tmp_path):
    rows = collect([_pair(tmp_path / "runs")])
    assert protocol_differences(rows) == {}
    md = "\n".join(protocol_card(rows))
    assert "All reported runs follow one protocol" in md and "differ in protocol" not in md
    assert "`classify.epochs` `50`" in md and "head `mlp` (hidden `[128,64]`" in md
    assert "`aaaaaaaaaaaa`" in md and "`ffffffffffff`" in md  # the code version and the data's SHA-1, shortened
    assert "β = `model.beta`: 0.1" in md  # a VAE is reported: its objective's weight


def test_runs_that_differ_in_classify_epochs_name_the_key(tmp_path):
    rows = collect([_pair(tmp_path / "runs", epochs=(20, 50))])
    assert protocol_differences(rows) == {"classify.epochs": ["20", "50"]}
    md = "\n".join(protocol_card(rows))
    assert "the reported runs differ in protocol**: `classify.epochs` (20, 50)." in md
    assert "All reported runs follow one protocol" not in md


def test_two_data_roots_of_one_basename_differ(tmp_path):
    """The data root is compared in full, not by the basename a row label shows."""
    for i, root in enumerate(("/a/cifar10", "/b/cifar10")):
        a = ae_run(tmp_path / "runs" / f"ae{i}", "ae", 8, i, dotlist=[f"data.root={root}"])
        clf_run(tmp_path / "runs" / f"c{i}", a, 0.3, dotlist=[f"data.root={root}"])
    assert protocol_differences(collect([tmp_path / "runs"])) == {"data.root": ["/a/cifar10", "/b/cifar10"]}


def test_a_different_code_version_is_a_protocol_difference(tmp_path):
    rows = collect([_pair(tmp_path / "runs", commits=("a" * 40, "b" * 40))])
    assert protocol_differences(rows) == {"code version": ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]}


def test_the_card_is_in_report_md_before_the_table(tmp_path):
    report([_pair(tmp_path / "runs", epochs=(20, 50))], out=tmp_path / "rep", figures=False)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.index("## Protocol") < md.index("## Results")
    assert "`classify.epochs` (20, 50)" in md


def test_psnr_conventions_on_hand_made_images():
    """benchmarks/psnr_conventions.py: two images with per-pixel MSE 0.01 and 0.0001 have PSNR 20 and 40 dB, so
    embclf's mean of per-image PSNR is 30 dB; pooled, the MSE is 0.00505 and its PSNR 10 log10(1/0.00505) =
    22.967 dB."""
    import sys

    import torch
    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import psnr_conventions

    x = torch.full((2, 3, 4, 4), 0.5)
    x_hat = x.clone()
    x_hat[0] += 0.1  # squared error 0.01 in every value
    x_hat[1] += 0.01  # 0.0001
    c = psnr_conventions.conventions(x_hat, x)
    assert abs(c["mean_per_image"] - 30.0) < 1e-3 and abs(c["pooled"] - 22.9671) < 1e-3
    assert abs(c["gap"] - 7.0329) < 1e-3
    if c["torchmetrics"] is not None:  # installed: its default (dim=None) is the pooled number
        assert abs(c["torchmetrics"] - c["pooled"]) < 1e-3
