"""Summarise a finished study sweep (``benchmarks/gpu_study.sh`` step 3): wall time, training images/s and
achieved TFLOP/s, from the run dirs' summary.json files.

    python benchmarks/study_summary.py SWEEP_DIR [--times T_START T_DATA_DONE T_SWEEP_DONE]

Training FLOPs per image are counted by ``torch.utils.flop_counter`` (forward + backward of one step,
convolutions and matmuls; ``benchmarks/run.py: train_flops_per_image``); the total is that times the
images each autoencoder trained on (train split x epochs). Achieved TFLOP/s = total / sweep wall time, so
it includes everything the sweep did besides training (evaluation, checkpoints, classifiers, start-up).
Prints one JSON object too (last line), for scripts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embclf import references, runs


def summarise(sweep: Path, times=None) -> dict:
    from run import train_flops_per_image

    ae, clf, other = [], [], []
    for d in references.iter_run_dirs(sweep):
        s = runs.read_summary(d) or {}
        (ae if s.get("stage") == "autoencode" else clf if s.get("stage") == "classify" else other).append(s)
    flops_cache = {}
    total_images = total_flops = 0.0
    per_job = []
    for s in ae:
        key = (s["model"], s["latent"])
        if key not in flops_cache:
            flops_cache[key] = train_flops_per_image(*key)
        images = float(s.get("n_train", 0)) * int(s.get("epochs", 0))
        total_images += images
        total_flops += images * flops_cache[key]
        per_job.append({"model": s["model"], "latent": s["latent"], "status": s.get("status"),
                        "train_images_per_second": s.get("train_images_per_second"),
                        "wall_seconds": s.get("wall_seconds")})
    r = {"sweep": str(sweep), "autoencode_runs": len(ae), "classify_runs": len(clf),
         "completed": sum(s.get("status") == "completed" for s in ae + clf),
         "device": sorted({s.get("device_name") for s in ae if s.get("device_name")}),
         "precision": sorted({s.get("precision") for s in ae if s.get("precision")}),
         "train_images": total_images, "train_tflop": total_flops / 1e12, "jobs": per_job}
    if times:
        t0, t1, t2 = times
        r.update(data_seconds=t1 - t0, sweep_seconds=t2 - t1, wall_seconds=t2 - t0)
        r["train_images_per_second"] = total_images / r["sweep_seconds"]
        r["achieved_tflops"] = total_flops / 1e12 / r["sweep_seconds"]
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--times", type=float, nargs=3, metavar=("START", "DATA_DONE", "SWEEP_DONE"))
    a = ap.parse_args(argv)
    r = summarise(a.sweep, a.times)
    print(f"study: {r['autoencode_runs']} autoencoders + {r['classify_runs']} classifiers, {r['completed']} completed, "
          f"on {', '.join(r['device']) or '?'} ({', '.join(r['precision']) or '?'})")
    for j in r["jobs"]:
        ips = j["train_images_per_second"]
        print(f"  {j['model']}-z{j['latent']}: {j['status']}, {ips or 0:.0f} train img/s per job, "
              f"{j['wall_seconds'] or 0:.0f} s")
    if a.times:
        print(f"wall time {r['wall_seconds']:.1f} s (data decode/cache {r['data_seconds']:.1f} s, sweep "
              f"{r['sweep_seconds']:.1f} s); {r['train_images']:.0f} training images -> "
              f"{r['train_images_per_second']:.0f} img/s over the sweep; {r['train_tflop']:.1f} TFLOP of training -> "
              f"{r['achieved_tflops']:.2f} TFLOP/s achieved")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
