"""Aggregate training throughput of one packing variant (``benchmarks/gpu_study.sh`` PACKING=1,
``benchmarks/gpu_check.sh``): how many training images per second a sweep's concurrent jobs achieve together.

    python benchmarks/packing.py SWEEP_DIR --label "8 jobs, MPS" [--wall SECONDS] [--baseline ALONE.json]

Per job: its steady-state rate, the median of its epochs' ``images_per_second`` (metrics.jsonl) after the
first (epoch 1 pays cuDNN autotuning, torch.compile and CUDA-graph capture); with one epoch, that epoch's.
Aggregate = the sum over the jobs: the jobs of a variant start together and train at the same time, so their
rates add (a job that trained alone while the others started up inflates it a little). ``--wall``: the sweep's
wall time, for a second, pessimistic figure: all training images / wall (start-up, evaluation included).
``--baseline``: the JSON line printed for the variant to compare with (one job alone): adds ``ratio``, this
variant's aggregate over the baseline's. Prints one line, then one JSON object (the last line), for scripts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embclf import references, runs


def measure(sweep: Path, label: str, wall: float = 0.0) -> dict:
    """``{"label", "jobs", "completed", "device", "aggregate_images_per_second", "per_job", "sweep_images_per_second"}``
    for the autoencode runs under ``sweep`` (``per_job``: each job's steady-state img/s)."""
    per_job, images, devices, completed = [], 0.0, set(), 0
    for d in references.iter_run_dirs(sweep):
        s = runs.read_summary(d) or {}
        if s.get("stage") != "autoencode":
            continue
        completed += s.get("status") == "completed"
        devices.add(str(s.get("device")))
        rates = [r["images_per_second"] for r in runs.read_metrics(d)
                 if r.get("split") == "train" and r.get("images_per_second")]
        if rates:
            per_job.append(statistics.median(rates[1:] or rates))
        images += float(s.get("n_train", 0)) * int(s.get("epochs", 0))
    return {"label": label, "jobs": len(per_job), "completed": completed, "device": sorted(devices),
            "aggregate_images_per_second": sum(per_job), "per_job": per_job,
            "sweep_images_per_second": images / wall if wall > 0 else None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--label", default="")
    ap.add_argument("--wall", type=float, default=0.0)
    ap.add_argument("--baseline", type=Path)
    a = ap.parse_args(argv)
    r = measure(a.sweep, a.label, a.wall)
    wall = f", {r['sweep_images_per_second']:.0f} img/s over the sweep's wall time" if r["sweep_images_per_second"] else ""
    ratio = ""
    if a.baseline is not None:
        base = json.loads(a.baseline.read_text().strip().splitlines()[-1])
        r["ratio"] = r["aggregate_images_per_second"] / max(base["aggregate_images_per_second"], 1e-9)
        ratio = f" = {r['ratio']:.2f}x {base['label'] or 'the baseline'}"
    print(f"packing {a.label}: {r['jobs']} job(s) on {', '.join(r['device']) or '?'}, "
          f"{r['aggregate_images_per_second']:.0f} img/s aggregate{ratio}{wall}")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
