"""``hydra.launcher.mps`` (hydra_plugins/embclf_launcher/mps.py) with a fake ``nvidia-cuda-mps-control`` on the
PATH that records each call (its arguments, stdin and pipe/log directories) and, like the real daemon, creates
its control pipe on ``-d`` and removes it on ``quit``."""
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from conftest import MINI, SMALL_MODEL, run_embclf
from hydra_plugins.embclf_launcher import mps

FAKE = r"""#!/bin/sh
stdin=""
if [ "$1" != "-d" ]; then stdin=$(cat); fi
echo "args=$* stdin=$stdin pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> "$FAKE_MPS_RECORD"
if [ "$1" = "-d" ]; then mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" && : > "$CUDA_MPS_PIPE_DIRECTORY/control"; exit 0; fi
if [ "$stdin" = "quit" ]; then rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"; fi
"""


@pytest.fixture
def fake_mps(tmp_path, monkeypatch):
    """The fake on the PATH; yields a function returning the recorded calls (one line each)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / mps.CONTROL
    script.write_text(FAKE)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "mps-calls.txt"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_RECORD", str(record))
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no-daemon-here"))
    monkeypatch.delenv("CUDA_MPS_LOG_DIRECTORY", raising=False)
    return lambda: record.read_text().splitlines() if record.exists() else []


def _pipe_for(sweep):
    """Where the per-sweep daemon's pipes go: under the sweep dir, or, for a path too long for a Unix socket
    (pytest's tmp dirs on CI are), a short temporary stand-in that :func:`mps.serving` removes afterwards."""
    pipe = sweep / ".mps" / "pipe"
    return pipe if len(str(pipe)) <= mps.MAX_PIPE_DIR else None


@pytest.mark.parametrize("depth", ["short", "long"])
def test_on_starts_a_daemon_for_the_sweep_passes_it_to_jobs_and_stops_it(tmp_path, fake_mps, depth):
    base = Path(tempfile.mkdtemp(prefix="s", dir="/tmp")) if depth == "short" else tmp_path / ("deep" * 30)
    sweep = base / "sweep"
    before = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
    assert mps.planned("on", [0], 8) == "start" and mps.planned("auto", [0], 8) == "none"
    assert mps.planned("on", [0], 1) == mps.planned("on", [], 8) == mps.planned("off", [0], 8) == "off"
    with mps.serving("on", [0], 8, str(sweep)) as info:
        pipe = _pipe_for(sweep)
        assert (pipe is None) == (depth == "long")
        if pipe is None:  # the stand-in: short, under the temp dir
            pipe = Path(info["pipe_dir"])
            assert pipe.name.startswith(mps.TEMP_PREFIX) and len(str(pipe)) <= mps.MAX_PIPE_DIR
        assert info == {"mode": "on", "state": "started", "pipe_dir": str(pipe)}
        assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == str(pipe)  # what every forked job inherits
        assert os.environ["CUDA_MPS_LOG_DIRECTORY"] == str(sweep / ".mps" / "log")
        assert mps.mps_active() and mps.current()["state"] == "started"
    assert fake_mps() == [f"args=-d stdin= pipe={pipe} log={sweep / '.mps' / 'log'}",
                          f"args= stdin=quit pipe={pipe} log={sweep / '.mps' / 'log'}"]
    assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == before and "CUDA_MPS_LOG_DIRECTORY" not in os.environ
    assert not (pipe / "control").exists() and mps.current() is None
    assert pipe.exists() == (depth == "short")  # the stand-in is removed, the sweep's own .mps/ kept
    if depth == "short":
        shutil.rmtree(base)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_the_daemon_is_stopped_on_ctrl_c_and_failure(tmp_path, fake_mps, error):
    with pytest.raises(error):
        with mps.serving("on", [0, 1], 2, str(tmp_path / "sweep")):
            raise error()
    assert [line.split(" pipe=")[0] for line in fake_mps()] == ["args=-d stdin=", "args= stdin=quit"]


def test_auto_uses_a_daemon_that_serves_and_never_starts_one(tmp_path, fake_mps, monkeypatch):
    with mps.serving("auto", [0], 8, str(tmp_path / "sweep")) as info:
        assert info == {"mode": "auto", "state": "none"} and not mps.mps_active()
    served = tmp_path / "admin-mps"
    served.mkdir()
    (served / "control").touch()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(served))
    assert mps.planned("auto", [0], 8) == mps.planned("on", [0], 8) == "present"
    for mode in ("auto", "on"):
        with mps.serving(mode, [0], 8, str(tmp_path / "sweep")) as info:
            assert info == {"mode": mode, "state": "present", "pipe_dir": str(served)}
    with mps.serving("off", [0], 8, str(tmp_path / "sweep")) as info:
        assert info == {"mode": "off", "state": "off"}
    with mps.serving("on", [0], 1, str(tmp_path / "sweep")) as info:  # one job per GPU: nothing to share
        assert info["state"] == "off"
    assert fake_mps() == []


def test_bad_mode_and_missing_control_binary_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"hydra.launcher.mps=yes is invalid: it must be auto"):
        with mps.serving("yes", [0], 2, str(tmp_path)):
            pass
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"hydra.launcher.mps=on needs NVIDIA's nvidia-cuda-mps-control on the PATH"):
        with mps.serving("on", [0], 2, str(tmp_path)):
            pass


@pytest.mark.slow
def test_a_sweep_on_a_shared_gpu_runs_its_jobs_under_the_sweeps_daemon(tmp_path, fake_mps):
    """Two jobs sharing (fake) GPU 0 with hydra.launcher.mps=on: one daemon started before them and stopped
    after; both jobs' summaries name its pipe directory under the sweep dir."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HYDRA_FULL_ERROR": "0"}
    run_embclf(["-m", *MINI, *SMALL_MODEL, "model=ae", "latent=4", "seed=1,2", "device=cpu", "logger=none", "autoencode.epochs=1",
                "stage=autoencode", "hydra.launcher.gpus=[0]", "hydra.launcher.jobs_per_gpu=2",
                "hydra.launcher.mps=on", f"hydra.sweep.dir={sweep}", f"output_dir={tmp_path / 'out'}"],
               tmp_path, env=env)
    calls = fake_mps()
    assert [line.split(" pipe=")[0] for line in calls] == ["args=-d stdin=", "args= stdin=quit"]
    pipe = calls[0].split(" pipe=")[1].split(" log=")[0]  # the daemon's pipe directory, as the daemon saw it
    assert _pipe_for(sweep) is None or pipe == str(_pipe_for(sweep))
    summaries = [json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")]
    assert len(summaries) == 2 and all(s["cuda_mps_pipe_directory"] == pipe for s in summaries), summaries
