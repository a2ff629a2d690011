"""The report on results it cannot write to or fully read: a read-only or full output dir, torn summaries,
sweeps with no completed run yet, runs on different class sets. Hand-written run dirs (report_fixtures), no
training; read-only and full file systems are real mounts (a bind mount remounted read-only, a tiny tmpfs),
since root ignores file permissions."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess

import pytest

from report_fixtures import ae_run, clf_run

from embclf import references, report, runs


@contextlib.contextmanager
def _mounted(target, *mount_args):
    target.mkdir(parents=True, exist_ok=True)
    try:
        for args in mount_args:
            subprocess.run(["mount", *args], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount here (needs root with CAP_SYS_ADMIN): {getattr(e, 'stderr', e)}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


@contextlib.contextmanager
def read_only_view(src, target):
    """``target``: ``src`` bind-mounted read-only (an archive, a colleague's results)."""
    with _mounted(target, ["--bind", str(src), str(target)],
                  ["-o", "remount,bind,ro", str(target)]) as t:
        yield t


def _sweep(t):
    """Two configurations (latent 8 and 16), each autoencode + classify, one seed; the classify runs record
    their encoder as real runs do (relative: the tree can be read wherever it is mounted or copied)."""
    for z in (8, 16):
        e = ae_run(t / f"latent={z}" / "autoencode", "ae", z, 0)
        c = clf_run(t / f"latent={z}" / "classify", e, 0.3 + z / 100)
        s = runs.read_summary(c)
        s.update(references.reference_fields(c, t, encoder_run=e))
        runs.write_json_atomic(c / runs.SUMMARY, s)
    return t


def _files(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_report_on_a_read_only_sweep_prints_the_table_and_where_it_could_not_write(tmp_path, capsys):
    src = _sweep(tmp_path / "sweep")
    before = _files(src)
    table = report.report([src], out=tmp_path / "elsewhere", figures=False)["table"]
    assert "autoencode+classify" in table and "0.3800" in table
    with read_only_view(src, tmp_path / "archive") as ro:
        assert report.main([str(ro)]) == 0  # the table is the result; the files are a by-product
        out, err = capsys.readouterr()
        assert out.startswith(table + "\n")
        (line,) = err.strip().splitlines()
        assert f"could not write the report files into {ro}" in line and "read-only" in line.lower()
        assert "--out DIR" in line
        # an --out DIR that cannot be written was asked for explicitly: the table, the line, exit status 1
        assert report.main([str(ro), "--out", str(ro / "reports")]) == 1
        out, err = capsys.readouterr()
        assert "ae-z16" in out and f"into {ro / 'reports'}" in err and len(err.strip().splitlines()) == 1
        # elsewhere it writes as usual
        assert report.main([str(ro), "--out", str(tmp_path / "rep"), "--no-figures"]) == 0
        assert (tmp_path / "rep" / "report.md").is_file()
    assert _files(src) == before


def test_report_into_a_full_disk_leaves_no_partial_file(tmp_path, capsys):
    """Every write of the report, figures too, either completes or leaves nothing (the kind: a read-only dir
    fails at the first file, a full disk at any one)."""
    src = _sweep(tmp_path / "sweep")
    with _mounted(tmp_path / "small", ["-t", "tmpfs", "-o", "size=48k", "tmpfs", str(tmp_path / "small")]) as small:
        assert report.main([str(src), "--out", str(small)]) == 1
        out, err = capsys.readouterr()
        assert "ae-z16" in out and f"could not write the report files into {small}" in err
        assert "no space left" in err.lower()
        for p in small.rglob("*"):  # what exists is complete: no temporary, no truncated png
            assert not p.name.startswith("."), p
            if p.suffix == ".png":
                assert p.read_bytes().endswith(b"IEND\xaeB`\x82"), p


def test_unreadable_summaries_are_listed_with_why(tmp_path, capsys):
    _sweep(tmp_path)
    torn = tmp_path / "latent=16" / "classify" / runs.SUMMARY
    torn.write_text(torn.read_text()[:40])  # a torn copy
    e = ae_run(tmp_path / "latent=32" / "autoencode", "ae", 32, 0)
    (e / runs.SUMMARY).write_text("[]\n")  # a hand edit gone wrong: valid JSON, not a summary
    e = ae_run(tmp_path / "latent=64" / "autoencode", "ae", 64, 0)
    s = runs.read_summary(e)
    del s["stage"]
    (e / runs.SUMMARY).write_text(json.dumps(s))
    e = ae_run(tmp_path / "latent=128" / "autoencode", "ae", 128, 0)
    (e / runs.CONFIG).write_text("model: {name: ae\n")  # an unreadable config: the run's settings are unknown
    with open(tmp_path / "latent=8" / "autoencode" / runs.METRICS, "a") as f:
        f.write("[1, 2]\n42\n")  # stray values in metrics.jsonl are not records (the run is still reported)
    res = report.report([tmp_path], out=tmp_path / "rep", figures=False)
    bad = {r["run_dir"]: r for r in res["not_completed"]}
    assert {os.path.relpath(d, tmp_path) for d in bad} == {"latent=16/classify", "latent=32/autoencode",
                                                            "latent=64/autoencode", "latent=128/autoencode"}
    assert all(r["status"] == "unreadable" for r in bad.values())
    why = {os.path.relpath(d, tmp_path): r["error"] for d, r in bad.items()}
    assert "summary.json is not valid JSON" in why["latent=16/classify"]
    assert "not a JSON object" in why["latent=32/autoencode"]
    assert "no stage" in why["latent=64/autoencode"]
    assert "config.yaml" in why["latent=128/autoencode"]
    assert bad[str(tmp_path / "latent=16" / "classify")]["label"] == "ae-z16"  # named from its config.yaml
    # the readable runs still make the table: latent 8 joined, latent 16's encoder alone
    assert sorted((a["label"], a["stage"]) for a in res["agg"]) == [("ae-z16", "autoencode"),
                                                                     ("ae-z8", "autoencode+classify")]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Not completed" in md and "summary.json is not valid JSON" in md
    assert report.main([str(tmp_path), "--out", str(tmp_path / "rep"), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert f"unreadable: ae-z16 seed 0 ({tmp_path / 'latent=16' / 'classify'}): summary.json is not valid JSON" in out


def test_only_unreadable_runs_still_make_a_report(tmp_path):
    e = ae_run(tmp_path / "a", "ae", 8, 0)
    (e / runs.SUMMARY).write_text("")
    res = report.report([tmp_path], out=tmp_path / "rep", figures=False)
    (r,) = res["not_completed"]
    assert r["status"] == "unreadable" and "empty" in r["error"]
    assert "No run has completed yet (1 unreadable)" in res["table"]


def test_a_sweep_with_every_job_running_says_so(tmp_path, capsys):
    alive = {"status": "running", "hostname": socket.gethostname(), "pid": os.getpid()}
    for z in (8, 16):
        d = ae_run(tmp_path / f"latent={z}", "ae", z, 0)
        s = runs.read_summary(d)
        s.update(alive)
        for k in ("test_mse", "test_psnr", "final_test_mse", "final_test_psnr"):
            s.pop(k)
        runs.write_json_atomic(d / runs.SUMMARY, s)
    res = report.report([tmp_path], out=tmp_path / "rep")
    assert res["agg"] == [] and res["table"] == "No run has completed yet (2 running); every run is listed below."
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| |" not in md and "||" not in md.split("## Not completed")[0] and res["table"] in md
    assert report.main([str(tmp_path), "--out", str(tmp_path / "rep"), "--no-figures"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == res["table"]
    assert lines[1:3] == [f"running: ae-z8 seed 0 ({tmp_path / 'latent=8'})",
                          f"running: ae-z16 seed 0 ({tmp_path / 'latent=16'})"]


def test_markdown_table_of_nothing_is_empty():
    assert report.markdown_table([], ["label", "test_mse"]) == ""
    assert report.markdown_table([{"label": None}], ["label"]) == ""


def test_per_class_accuracy_shows_every_class_that_occurs(tmp_path):
    e = ae_run(tmp_path / "a" / "autoencode", "ae", 8, 0)
    clf_run(tmp_path / "a" / "classify", e, 0.4, classes=("cat", "dog"))
    e = ae_run(tmp_path / "b" / "autoencode", "ae", 16, 0)
    clf_run(tmp_path / "b" / "classify", e, 0.6, classes=("bird", "cat"))
    e = ae_run(tmp_path / "c" / "autoencode", "ae", 16, 1)  # a second seed of b on yet another class set
    clf_run(tmp_path / "c" / "classify", e, 0.8, classes=("cat", "frog"))
    res = report.report([tmp_path], out=tmp_path / "rep")
    pcs = {a["label"]: a["per_class_accuracy"] for a in res["agg"]}
    assert pcs["ae-z8"] == {"cat": 0.4, "dog": 0.4}
    assert pcs["ae-z16"] == pytest.approx({"bird": 0.6, "cat": 0.7, "frog": 0.8})
    assert report.class_names(res["agg"]) == ["cat", "dog", "bird", "frog"]
    md = (tmp_path / "rep" / "report.md").read_text().split("## Test accuracy per class")[1]
    header = md.split("\n")[4]
    assert [c.strip() for c in header.strip("|").split("|")] == ["run", "cat", "dog", "bird", "frog"]
    assert "blank: the class is not in that configuration's data" in md
    assert (tmp_path / "rep" / "figures" / "per_class_accuracy.png").stat().st_size > 5000
