"""embclf.evaluate and embclf.embed on run dirs nobody may write (an archive, a colleague's results): refused
before any work with one line naming where they could not write and the ``out=`` that writes elsewhere; with
``out=`` they work. Two kinds of read-only, since root ignores file modes: a tmpfs remounted read-only (in
process), and a ``chmod -R a-w`` copy read by ``nobody`` (a fork of the test process that drops root as
``setpriv`` would: ``conftest.run_module``'s ``user``)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import embclf_env, run_module

from embclf import embed, evaluate


def _ae_run(out: Path) -> Path:
    for s in sorted(out.rglob("summary.json")):
        d = json.loads(s.read_text())
        if d.get("stage") == "autoencode" and d.get("model") == "ae" and d.get("status") == "completed":
            return s.parent
    raise AssertionError(f"no completed ae autoencode run under {out}")


def _one_line(err: str) -> str:
    """The one error line of a command's stderr (its log lines, "[time][name][LEVEL] - ...", aside)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("[")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_on_a_read_only_file_system(sweep, small_tmpfs, tmp_path, capsys):
    ro = small_tmpfs(64 << 20)
    run = ro / "run"
    shutil.copytree(_ae_run(sweep["out"]), run)
    done = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount read-only: {done.stderr.strip()}")
    capsys.readouterr()
    assert evaluate.main([str(run), "threads=1"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"embclf.evaluate: error: the evaluation folder: cannot create {run}/eval/test-best: "
                           f"{run} is not writable") and "nothing was computed" in line
    assert "Write the evaluation elsewhere with out=DIR (it goes to DIR/<name>/)" in line
    assert evaluate.main([str(run), "threads=1", f"out={tmp_path / 'evals'}"]) == 0
    s = json.loads((tmp_path / "evals" / "test-best" / "summary.json").read_text())
    assert s["run_dir"] == str(run.resolve()) and s["n"] == 200 and s["psnr"] > 0
    capsys.readouterr()
    assert embed.main([str(run), "threads=1"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"cannot create {run}/export/embeddings_test.npz" in line
    assert "Write the export elsewhere with out=PATH, e.g. out=/tmp/embeddings_test.npz." in line
    assert embed.main([str(run), "threads=1", f"out={tmp_path / 'z.npz'}"]) == 0 and (tmp_path / "z.npz").is_file()


@pytest.mark.parametrize("how", ["read-only-bind", "nobody"])
def test_the_commands_on_a_copy_nobody_may_write(sweep, how):
    """The real commands on a ``chmod -R a-w`` copy, read through a read-only bind mount (root), or as ``nobody``
    (``conftest.run_module``'s ``user``: a fork of this process that drops root, else setpriv)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a bind mount, or to become nobody)")
    base = Path("/tmp") / f"embclf-readonly-{os.getpid()}"  # pytest's tmp dirs are root's 0700: nobody cannot read them
    shutil.rmtree(base, ignore_errors=True)
    results, mine = base / "results", base / "mine"
    user = None
    env = embclf_env(base)
    try:
        shutil.copytree(_ae_run(sweep["out"]), results / "run")
        subprocess.run(["chmod", "-R", "a-w,a+rX", str(results)], check=True)
        base.chmod(0o755)
        mine.mkdir()
        if how == "nobody":
            user = 65534
            os.chown(mine, 65534, 65534)
            env.update(HOME=str(mine), XDG_CACHE_HOME=str(mine / "cache"))
            run = results / "run"
        else:
            run = base / "mounted"
            run.mkdir()
            for cmd in (["mount", "--bind", str(results / "run"), str(run)], ["mount", "-o", "remount,bind,ro", str(run)]):
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    pytest.skip(f"{' '.join(cmd)}: {done.stderr.strip()}")

        def command(module, *args):  # a fork of this process (no interpreter start-up), as the other commands' tests
            return run_module(module, [*args, "threads=1"], mine, env, user=user)

        proc = command("embclf.evaluate", str(run))
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = _one_line(proc.stderr)
        assert f"cannot create {run}/eval/test-best: {run} is not writable" in line and "out=DIR" in line
        proc = command("embclf.evaluate", str(run), f"out={mine / 'evals'}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (mine / "evals" / "test-best" / "per_sample.csv").is_file()
        proc = command("embclf.embed", str(run))
        assert proc.returncode == 2 and "out=PATH" in _one_line(proc.stderr), proc.stderr[-3000:]
        assert not (run / "eval").exists() and not (run / "export").exists()
    finally:
        subprocess.run(["umount", "-l", str(base / "mounted")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
