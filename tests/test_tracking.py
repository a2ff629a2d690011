"""wandb for real (offline, no network) and the local artifacts of a run dir, read back from what was written."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SECRET
from wandb_log import read_run

from embclf import references, runs, tracking


def _run_dirs(out: Path):
    """{run dir: summary} for every run under ``out``."""
    return {d: runs.read_summary(d) for d in references.iter_run_dirs(out)}  # evaluations' eval/*/ are not runs


def _keys(run: dict) -> set:
    return {k for row in run["history"] for k in row}


def test_one_offline_wandb_run_per_job(tiny_sweep):
    dirs = _run_dirs(tiny_sweep["out"])
    assert len(dirs) == 8  # 4 autoencode + 4 classify jobs, two sweeps
    seen = set()
    for d, s in dirs.items():
        r = read_run(d)  # exactly one wandb run inside each run dir
        seen.add(r["id"])
        assert r["exit_code"] == 0
        assert r["group"] == d.parent.name and r["job_type"] == s["stage"]  # group = the sweep dir
        head = "-mlp" if s["stage"] == "classify" else ""  # a classify run is named and tagged by its head too
        assert r["name"] == f"{s['model']}-z{s['latent']}-s0{head}"
        assert {f"model={s['model']}", f"latent={s['latent']}", "data=folder"} <= set(r["tags"])
        assert ("head=mlp" in r["tags"]) == (s["stage"] == "classify")
        # the resolved config as plain values: filterable by latent, no interpolation left
        cfg = r["config"]
        assert cfg["latent"] == s["latent"] and cfg["model"]["name"] == s["model"] and cfg["stage"] == s["stage"]
        assert cfg == runs.read_config(d) and "${" not in json.dumps(cfg)  # == the run dir's config.yaml
        keys = _keys(r)
        if s["stage"] == "autoencode":
            assert {"epoch", "lr", "train/mse", "train/psnr", "val/mse", "val/psnr", "train/images_per_second"} <= keys
            assert ("val/kl" in keys) == (s["model"] == "vae")
            assert {"images/recon/path", "images/samples/path", "images/interpolation/path"} <= keys
            assert r["summary"]["test_mse"] == pytest.approx(s["test_mse"])
        else:
            assert {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "embeddings/path",
                    "confusion_matrix_table/path", "images/confusion/path", "images/pca/path", "images/tsne/path"} <= keys
            assert r["summary"]["test_accuracy"] == pytest.approx(s["test_accuracy"])
            # the embeddings table: one column per latent dim plus the class name, one row per test image
            table = next(d.glob("wandb/offline-run-*/files/media/table/embeddings_*.table.json"))
            t = json.loads(table.read_text())
            n_test = sum(map(sum, s["confusion_matrix"]))
            assert t["columns"] == [f"z{i}" for i in range(s["latent"])] + ["class"]
            assert len(t["data"]) == min(n_test, cfg["logger"]["wandb"]["table_rows"])
            assert {row[-1] for row in t["data"]} == set(s["classes"])
    assert len(seen) == 8  # distinct runs, also for the jobs that shared a process


def test_run_dir_artifacts_and_provenance(tiny_sweep):
    for d, s in _run_dirs(tiny_sweep["out"]).items():
        p = s["provenance"]
        assert p["versions"]["torch"] and p["versions"]["wandb"] and p["versions"]["hydra-core"] and p["versions"]["python"]
        assert p["data"]["fingerprint"] == s["data_fingerprint"] and p["data"]["source"] == "folder"
        if s["stage"] == "autoencode":  # the source files' listing beside the pixel hash (data.Dataset.files)
            assert len(p["data"]["files_fingerprint"]) == 40
            assert p["data"]["root_resolved"] == os.path.realpath(p["data"]["root"])
        assert p["hostname"] and p["device_name"] == "cpu" and s["end_time"] > s["start_time"]
        # what bit-identical results depend on: the CPU kernels' ISA and the thread count
        import torch
        assert p["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability() and p["threads"] >= 1
        assert (p["git_commit"] is None) == (p["git_dirty"] is None)  # None only outside a git checkout
        if s["stage"] == "autoencode":
            from PIL import Image

            # 8 pairs x (image, 10 decoded points, image) of 32 px with 1 px padding
            assert Image.open(d / "images" / "interpolation.png").size == (12 * 33 + 1, 8 * 33 + 1)
        else:
            for name in ("confusion", "pca", "tsne"):
                assert (d / "images" / f"{name}.png").stat().st_size > 5000, name
            try:
                import umap  # noqa: F401
                assert (d / "images" / "umap.png").is_file()
            except ImportError:  # optional extra: skipped with one log line
                assert not (d / "images" / "umap.png").exists()
                assert "umap-learn is not installed" in (d / "embclf.log").read_text()


def test_sweep_announces_its_outputs(tiny_sweep):
    text = tiny_sweep["ae"].stdout + tiny_sweep["ae"].stderr
    assert f"sweep outputs: {tiny_sweep['out'].resolve()}" in text
    # the interpreter that ran the sweep (a bare `python` fails outside an activated venv), however pytest was started
    assert f"{shlex.quote(sys.executable)} -m embclf.report {tiny_sweep['out'].resolve()}{os.sep}" in text, text[-2000:]


def test_failed_job_is_a_failed_wandb_run_and_the_next_job_starts_fresh(failing_sweep):
    assert failing_sweep["proc"].returncode != 0  # Hydra reports the failed job
    dirs = _run_dirs(failing_sweep["sweep"])
    by_status = {s["status"]: d for d, s in dirs.items()}
    assert set(by_status) == {"failed", "completed"}, dirs
    failed, ok = read_run(by_status["failed"]), read_run(by_status["completed"])
    assert failed["exit_code"] == 1 and ok["exit_code"] == 0 and failed["id"] != ok["id"]
    # named after the encoder it ran on (vae-z8), not the default model/latent of its own config
    assert failed["name"] == "vae-z8-s0-mlp" and ok["name"] == "vae-z8-s0-knn" and ok["config"]["latent"] == 8
    assert "injected failure at classify.metrics" in dirs[by_status["failed"]]["error"]


def test_api_key_never_written(failing_sweep):
    proc = failing_sweep["proc"]
    assert SECRET not in proc.stdout + proc.stderr
    files = [p for p in failing_sweep["out"].rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files)  # wandb did write its files there
    leaks = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks


def test_mode_decided_without_network(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert tracking.resolve_mode("auto")[0] == "offline"  # not logged in
    assert tracking.resolve_mode("disabled")[0] == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert tracking.resolve_mode("auto")[0] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode("auto")[0] == "disabled"
    assert tracking.resolve_mode("offline")[0] == "offline"  # the config wins over the environment
    monkeypatch.delenv("WANDB_MODE")
    # logged in (a netrc entry) but the server does not answer: offline at once, no wandb time-out
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: connection refused
    (tmp_path / "netrc").write_text("machine 127.0.0.1 login user password not-a-real-key\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.logged_in()
    t0 = time.time()
    mode, reason = tracking.resolve_mode("auto")
    assert mode == "offline" and "unreachable" in reason and time.time() - t0 < 3
    assert tracking.resolve_mode("online")[0] == "offline"


@pytest.mark.slow
def test_logger_none_never_imports_wandb(tmp_path):
    code = f"""
import sys
from hydra import compose, initialize_config_dir
from embclf import tracking
from embclf.config import conf_dir
with initialize_config_dir(config_dir=conf_dir(), version_base=None):
    cfg = compose("config", overrides=["logger=none"])
t = tracking.start(cfg, {str(tmp_path)!r}, "autoencode")
t.log_epoch(1, train={{"mse": 0.1}})
t.finish({{"test_mse": 0.1}})
print("wandb" in sys.modules, t.run)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["False", "None"] and not (tmp_path / "wandb").exists()
