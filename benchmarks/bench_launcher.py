"""What does the local launcher cost? Fixed overhead and parallelism of ``python -m embclf -m``.

Three commands run side by side, each ``repeats`` times, interleaved (plain, 1-job sweep, 2-job
sweep, plain, ...) so that a load change on the machine hits all three alike; the median wall time
of each is reported:

* ``plain``:  ``python -m embclf <job> threads=1`` -- one small real job as a single run;
* ``sweep1``: ``python -m embclf -m <job> hydra.launcher.threads_per_job=1`` -- the same job as a
  1-job sweep through the default launcher (``hydra/launcher=local``);
* ``sweep2``: the same with ``seed=0,1`` -- two jobs of the same size, one per core.

All three use one thread per job. ``<job>`` is a small autoencoder on a 1000-image real CIFAR-10
subset, 1 epoch, no tracker. The decoded-data cache (``XDG_CACHE_HOME``) is shared and warmed once
first, so no measurement pays for decoding JPEGs.

Reported (seconds, medians): ``plain_s``, ``sweep1_s``, ``sweep2_s``, ``overhead_s`` = sweep1 - plain
(the launcher's fixed cost; goal <= 2 s) and ``parallel_ratio`` = sweep2 / sweep1 (goal <= 1.15 on a
machine with >= 2 free cores), plus ``goals``, every repeat's time (``all_s``) and a ``breakdown`` of
where the wall time of the last repeat went (the jobs' own ``summary.json`` start/end times against
the command's start and exit):

* ``to_job_start_s``: process start to the job's own start (``summary.json`` ``start_time``): Python
  and Hydra start, imports, composition and -- for a sweep -- the launcher's prologue and the worker's
  start;
* ``job_s``: the job itself (its ``start_time`` to ``end_time``);
* ``after_job_s``: the job's end to the command's exit (result collection, report, interpreter exit).

Usage (from the repo root)::

    python benchmarks/bench_launcher.py            # repeats=3: 10 commands, ~4 min on a 2-core VM
    python benchmarks/bench_launcher.py --repeats 5 --json

Exit status 0 (a measurement, not a test), 1 when a command fails. The machine should be otherwise
quiet: other load shows up as spread between repeats (``all_s`` in the result).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "data" / "cifar10"
GOALS = {"overhead_s": 2.0, "parallel_ratio": 1.15}


def job_args(data_root: Path = DATA_ROOT) -> List[str]:
    """Overrides of the small real job every measurement runs (the same work in all three)."""
    return [
        "stage=autoencode", "model=ae", "latent=16", "data=folder", f"data.root={data_root}",
        "data.train_size=1000", "data.test_size=200", "autoencode.epochs=1", "autoencode.image_epochs=[1]",
        "logger=none",
    ]


def _env(cache: Path) -> Dict[str, str]:
    env = dict(os.environ)
    # this checkout's embclf and hydra_plugins first, as the tests do
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["XDG_CACHE_HOME"] = str(cache)  # one decoded-data cache for every run (warmed once)
    env["WANDB_MODE"] = "offline"
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _run(args: List[str], env: Dict[str, str]) -> Dict[str, object]:
    """Run ``python -m embclf <args>``; returns wall seconds, start/end time and output.

    Raises ``RuntimeError`` with the command's output tail when it fails.
    """
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "embclf", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): python -m embclf {' '.join(args)}\n{proc.stdout[-4000:]}")
    return {"wall": wall, "t0": t0, "t1": t0 + wall, "out": proc.stdout}


def _summaries(root: Path) -> List[dict]:
    out = []
    for p in root.rglob("summary.json"):
        if ".submitit" not in p.parts:
            out.append(json.loads(p.read_text()))
    return out


def _breakdown(run: Dict[str, object], root: Path) -> Optional[Dict[str, float]]:
    """Split one command's wall time at the first job start and the last job end (see module doc)."""
    recs = [r for r in _summaries(root) if r.get("start_time") and r.get("end_time")]
    if not recs:
        return None
    start = min(float(r["start_time"]) for r in recs)
    end = max(float(r["end_time"]) for r in recs)
    return {
        "to_job_start_s": round(start - float(run["t0"]), 2),
        "job_s": round(end - start, 2),
        "after_job_s": round(float(run["t1"]) - end, 2),
    }


def measure(repeats: int = 3, data_root: Path = DATA_ROOT, keep: bool = False) -> dict:
    """Time plain run, 1-job sweep and 2-job sweep (see the module docstring); returns the result dict.

    Raises ``FileNotFoundError`` when the CIFAR-10 tree is missing, ``RuntimeError`` (with the output's
    tail) when a command fails.
    """
    if not (Path(data_root) / "train").is_dir():
        raise FileNotFoundError(f"CIFAR-10 ImageFolder tree not found at {data_root} (train/, test/)")
    tmp = Path(tempfile.mkdtemp(prefix="embclf-bench-launcher-"))
    try:
        env = _env(tmp / "cache")
        job = job_args(data_root)
        # warm the decoded-data cache (and the OS file cache) once; not measured
        _run([*job, "threads=1", f"output_dir={tmp / 'warm'}"], env)
        kinds = {
            "plain": lambda out: [*job, "seed=0", "threads=1", f"output_dir={out}"],
            "sweep1": lambda out: ["-m", *job, "seed=0", "hydra.launcher.threads_per_job=1", f"output_dir={out}"],
            "sweep2": lambda out: ["-m", *job, "seed=0,1", "hydra.launcher.threads_per_job=1", f"output_dir={out}"],
        }
        walls: Dict[str, List[float]] = {k: [] for k in kinds}
        breakdown: Dict[str, Optional[Dict[str, float]]] = {}
        for i in range(repeats):
            for kind, make in kinds.items():
                out = tmp / f"{kind}_{i}"
                run = _run(make(out), env)
                walls[kind].append(run["wall"])
                breakdown[kind] = _breakdown(run, out)
        med = {k: statistics.median(v) for k, v in walls.items()}
        return {
            "plain_s": round(med["plain"], 2),
            "sweep1_s": round(med["sweep1"], 2),
            "sweep2_s": round(med["sweep2"], 2),
            "overhead_s": round(med["sweep1"] - med["plain"], 2),
            "parallel_ratio": round(med["sweep2"] / med["sweep1"], 3),
            "goals": dict(GOALS),
            "repeats": repeats,
            "all_s": {k: [round(x, 2) for x in v] for k, v in walls.items()},
            "breakdown": breakdown,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        }
    finally:
        if keep:
            print(f"outputs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-root", type=Path, default=DATA_ROOT)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object only")
    ap.add_argument("--keep", action="store_true", help="keep the temporary output dir")
    a = ap.parse_args()
    try:
        r = measure(a.repeats, a.data_root, a.keep)
    except (RuntimeError, FileNotFoundError) as e:
        sys.exit(f"bench_launcher: {e}")
    if a.json:
        print(json.dumps(r))
        return
    ok = {k: r[k] <= g for k, g in r["goals"].items()}
    print(f"plain run   {r['plain_s']:6.2f} s   (all: {r['all_s']['plain']})")
    print(f"1-job sweep {r['sweep1_s']:6.2f} s   (all: {r['all_s']['sweep1']})")
    print(f"2-job sweep {r['sweep2_s']:6.2f} s   (all: {r['all_s']['sweep2']})")
    print(f"overhead       = sweep1 - plain  = {r['overhead_s']:.2f} s  "
          f"(goal <= {r['goals']['overhead_s']}: {'ok' if ok['overhead_s'] else 'MISSED'})")
    print(f"parallel ratio = sweep2 / sweep1 = {r['parallel_ratio']:.3f}   "
          f"(goal <= {r['goals']['parallel_ratio']}: {'ok' if ok['parallel_ratio'] else 'MISSED'})")
    print(f"breakdown of the last repeat: {json.dumps(r['breakdown'])}")
    print(json.dumps({k: r[k] for k in ("plain_s", "sweep1_s", "sweep2_s", "overhead_s", "parallel_ratio", "goals")}))


if __name__ == "__main__":
    main()
