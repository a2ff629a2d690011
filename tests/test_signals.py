"""A signal anywhere in a stage ends with the run recorded "interrupted", never left "running".

SIGTERM's and SIGUSR2's default action kills a process without running any Python code, so a signal outside the
epoch loops (which save and hand on: ``lifecycle.CheckpointOnSignal``) left summary.json saying "running". A single
run of ``stage=all`` is signalled at each phase in turn (``EMBCLF_KILL_AT=POINT:1:SIG``) in one run dir, as a
user re-running the same command after each stop would; ``resume_harness.py`` runs each attempt.
"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

from conftest import embclf_env
from resume_harness import run_spec
from test_resume import ARGS, _small_tree


# (point, signal, the run dir whose summary must say "interrupted" afterwards; None: none is written yet)
PHASES = [
    ("data.load:1:TERM", None),                    # the autoencoder's data, before the run dir is accepted
    ("startup:1:TERM", "autoencode"),              # run dir and summary written, nothing trained
    ("classify.embed:1:TERM", "classify"),         # the autoencoder completes; embeddings computed, not saved
    ("classify.lr_search:1:USR2", "classify"),     # the learning-rate search (SIGUSR2: a requeue signal)
    ("classify.test:1:TERM", "classify"),          # the trained head's final test
    ("classify.probe_fit:1:TERM", "classify"),     # a k-NN fit of the probes loop
    ("classify.probes:1:INT", "classify"),         # between probes (Ctrl-C)
    ("classify.plots:1:TERM", "classify"),         # the result written, figures not yet: it stays completed
]


def _sequence(tmp: Path, spec: dict) -> dict:
    return run_spec(tmp, spec, embclf_env(tmp))


@pytest.mark.slow
def test_a_signal_in_any_phase_records_the_run_as_interrupted(tmp_path, cifar_root):
    tree = _small_tree(tmp_path / "data")
    run_dir = tmp_path / "run"
    args = [*ARGS, f"data.root={tree}", f"data.cache_dir={tmp_path / 'cache'}", "autoencode.epochs=1",
            "classify.epochs=2", "classify.lr_grid=[0.01,0.1]", "head=linear", "classify.probes=[knn]"]
    attempts = _sequence(tmp_path, {"args": args, "runs": {"run": {"run_dir": str(run_dir),
                                                                     "kills": [k for k, _ in PHASES]}}})["run"]
    log = (tmp_path / "run.attempts.log").read_text()
    for a, (kill_at, where) in zip(attempts, PHASES):
        sig = signal.Signals["SIG" + kill_at.rsplit(":", 1)[1]]
        # an orderly exit with the signal's status (Ctrl-C: 130, the single run's one-line hint), never a
        # death by the signal that skips every except and finally
        assert a["signal"] is None and a["exit"] == 128 + sig, (a, log[-3000:])
        assert "running" not in a["statuses"].values(), (a, log[-3000:])
        if where is not None:
            want = "completed" if kill_at.startswith("classify.plots") else "interrupted"
            assert a["statuses"][where] == want, (a, log[-3000:])
    assert attempts[len(PHASES)]["exit"] == 0 and set(attempts[-1]["statuses"].values()) == {"completed"}, attempts


@pytest.mark.slow
def test_a_forked_attempt_starts_with_a_fresh_interpreters_signal_dispositions(tmp_path, cifar_root):
    """The harness forks its caller: a SIGINT/SIGTERM disposition the caller has ignored (inherited here from the
    parent, as an earlier test could have left it in a pytest worker) must not reach the run (stop_on_signals
    takes over only default ones), or a kill would not stop it. The harness runs in an interpreter of its own
    that starts with both ignored, so this holds whatever threads the test process has."""
    import json
    import subprocess
    import sys

    tree = _small_tree(tmp_path / "data")
    args = [*ARGS, f"data.root={tree}", f"data.cache_dir={tmp_path / 'cache'}", "autoencode.epochs=1",
            "stage=autoencode"]
    spec = {"args": args, "runs": {"run": {"run_dir": str(tmp_path / "run"),
                                           "kills": ["startup:1:INT", "startup:1:TERM"]}}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    def ignore_signals():  # in the child before exec: SIG_IGN survives exec, as in a process started with it
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)

    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "resume_harness.py"),
                           str(tmp_path / "spec.json")], cwd=tmp_path, env=embclf_env(tmp_path),
                          preexec_fn=ignore_signals, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    attempts = json.loads(proc.stdout.strip().splitlines()[-1])["run"]
    assert [(a["signal"], a["exit"]) for a in attempts[:2]] == [(None, 130), (None, 143)], attempts
