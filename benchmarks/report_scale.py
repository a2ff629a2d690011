"""The report at scale: table and figures for N synthetic run dirs, and peak memory (not part of the tests).

    python benchmarks/report_scale.py                    # 250, 500, 1000 run dirs: table, figures, memory
    python benchmarks/report_scale.py --runs 1000 --no-figures
    python benchmarks/report_scale.py --keep /tmp/sweep  # keep the generated sweep (reused when it exists)

The run dirs are real: written with ``embclf.runs``' own writers (``write_config``, ``base_summary``,
``write_json_atomic``, ``append_metrics``) and the autoencode stage's own image layout (``make_grid``/
``save_image`` of ``RECON_COLS`` images per row), as a 500-trial search of ``stage=all`` jobs leaves them
(half autoencode, half classify run dirs, each job dir an ``autoencode/`` and a ``classify/``): 2 models x
50 learning rates x seeds, 20 + 10 epochs of metrics, a 2 MB ``checkpoints/last.pt`` the report must not read.

Each measurement runs ``python -m embclf.report`` in a fresh interpreter (its own peak RSS from
``resource.getrusage(RUSAGE_SELF)``), so the interpreter start and imports are counted.
Goals (docs/performance.md): table for 1,000 run dirs <= 5 s, figures <= 30 s, memory flat in N.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {"ae": False, "vae": True}
LRS = [round(1e-4 * 1.1 ** i, 8) for i in range(50)]


def _cfg(model: str, lr: float, seed: int, stage: str):
    from omegaconf import OmegaConf

    from embclf.config import Config

    c = OmegaConf.structured(Config)
    c.model.name, c.model.variational = model, MODELS[model]
    c.latent, c.seed, c.stage = 32, seed, stage
    c.data.root = "/data/cifar10"
    c.autoencode.lr = lr
    c.autoencode.epochs, c.classify.epochs = 20, 10
    return c


def _images(run_dir: Path, epoch: int, seed: int) -> None:
    """images/recon_eNNN.png/.pt and samples_eNNN.png/.pt as the autoencode stage writes them (random pixels):
    the report reads the .pt data (``embclf.images.read_reconstructions`` / ``read_samples``)."""
    import torch
    from torchvision.utils import make_grid, save_image

    from embclf import images

    g = torch.Generator().manual_seed(seed)
    d = run_dir / "images"
    d.mkdir(exist_ok=True)
    x, x_hat = (torch.rand(images.N_RECON, 3, 32, 32, generator=g) for _ in range(2))
    rows = torch.cat([x[:images.RECON_COLS], x_hat[:images.RECON_COLS]])
    save_image(make_grid(images.enlarge(rows), nrow=images.RECON_COLS, padding=images.RECON_PAD, pad_value=1.0),
               d / f"recon_e{epoch:03d}.png")
    images._save_data({"originals": images.to_uint8(x), "reconstructions": images.to_uint8(x_hat),
                       "indices": torch.arange(len(x)), "labels": torch.arange(len(x)) % 10, "epoch": epoch},
                      d / f"recon_e{epoch:03d}.pt")
    samples = torch.rand(images.N_SAMPLES, 3, 32, 32, generator=g)
    save_image(make_grid(samples, nrow=8, padding=1), d / f"samples_e{epoch:03d}.png")
    images._save_data({"samples": images.to_uint8(samples), "source": images.PRIOR, "epoch": epoch},
                      d / f"samples_e{epoch:03d}.pt")


def _run(run_dir: Path, cfg, stage: str, extra: dict, encoder=None) -> None:
    from embclf import identity, runs

    run_dir.mkdir(parents=True, exist_ok=True)
    plain = runs.resolved(cfg)
    runs.write_config(run_dir, cfg, identity.identity(plain, stage, encoder=encoder), stage)
    s = runs.base_summary(cfg, stage, [f"model={cfg.model.name}", f"autoencode.lr={cfg.autoencode.lr}",
                                       f"seed={cfg.seed}", "stage=all"])
    epochs = int(cfg[stage].epochs)
    for e in range(1, epochs + 1):
        for split in ("train", "val"):
            rec = {"epoch": e, "split": split, "loss": 1.0 / e}
            rec.update({"mse": 0.05 / e, "psnr": 12 + e * 0.3} if stage == "autoencode"
                       else {"accuracy": 0.2 + 0.02 * e})
            runs.append_metrics(run_dir, rec)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(os.urandom(2 << 20))  # never read by the report
    s.update(status="completed", end_time=time.time(), wall_seconds=100.0, **extra)
    runs.write_json_atomic(run_dir / runs.SUMMARY, s)


def make_sweep(root: Path, n_runs: int) -> Path:
    """A sweep dir of ``n_runs // 2`` stage=all jobs (autoencode/ + classify/ run dirs each)."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = n_runs // 2
    fsync, os.fsync = os.fsync, lambda fd: None  # the writers' durability is not what is measured: 5x faster setup
    try:
        _jobs(root, jobs)
    finally:
        os.fsync = fsync
    from omegaconf import OmegaConf

    # last: the sweep's record marks a complete sweep (an interrupted generation is continued, not measured)
    overrides = ["model=ae,vae", "autoencode.lr=" + ",".join(map(str, LRS)), "seed=range(0,5)", "stage=all"]
    (root / "multirun.yaml").write_text(OmegaConf.to_yaml({"hydra": {"overrides": {"task": overrides}}}))
    return root


def _jobs(root: Path, jobs: int) -> None:
    from embclf import runs

    for j in range(jobs):
        model = ("ae", "vae")[j % 2]
        lr = LRS[(j // 2) % len(LRS)]
        seed = j // (2 * len(LRS))
        job = root / f"{j}_model={model},lr={lr},seed={seed}"
        if (job / "classify" / runs.SUMMARY).is_file():  # grown from a smaller sweep (hard-linked copy)
            continue
        ae_dir = job / "autoencode"
        ae = _cfg(model, lr, seed, "autoencode")
        _run(ae_dir, ae, "autoencode", {"test_mse": 0.01 + j * 1e-5, "test_psnr": 20 + (j % 7) * 0.1,
                                        "final_test_mse": 0.011, "final_test_psnr": 19.9, "n_train": 45000,
                                        "n_val": 5000, "n_test": 10000,
                                        **({"test_kl": 30.0, "test_active_units": 20} if model == "vae" else {})})
        _images(ae_dir, 20, j)
        clf = _cfg(model, lr, seed, "classify")
        acc = 0.4 + (j % 11) * 0.01
        _run(job / "classify", clf, "classify", {
            "head": "mlp", "test_accuracy": acc, "val_accuracy": acc, "final_test_accuracy": acc,
            "per_class_accuracy": {c: acc for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                    "horse", "ship", "truck")},
            **runs.reference_fields(job / "classify", root, encoder_run=ae_dir)}, encoder=runs.resolved(ae))


# runs the report's CLI in this child, then writes the child's own peak RSS (KiB) to the file in argv[1]
_CHILD = """import resource, runpy, sys
peak_file = sys.argv.pop(1)
sys.argv[0] = "embclf.report"
try:
    runpy.run_module("embclf.report", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
ru = resource.getrusage(resource.RUSAGE_SELF)
open(peak_file, "w").write(f"{ru.ru_maxrss} {ru.ru_utime + ru.ru_stime}")
sys.exit(code)
"""


def measure(sweep: Path, figures: bool, repo: Path = REPO) -> dict:
    """Wall seconds, CPU seconds (user + system: what the wall time is on a quiet machine, the report being
    single-threaded) and peak RSS (MiB) of ``python -m embclf.report SWEEP`` in a fresh interpreter, run from
    the checkout ``repo`` (another one measures a baseline)."""
    out = Path(tempfile.mkdtemp(prefix="report_out_"))
    peak = out / "peak"
    cmd = [sys.executable, "-c", _CHILD, str(peak), str(sweep), "--out", str(out / "rep")]
    cmd += [] if figures else ["--no-figures"]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"report failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rss, cpu = peak.read_text().split()
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": round(wall, 2), "cpu_seconds": round(float(cpu), 2), "peak_rss_mib": round(int(rss) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="250,500,1000", help="comma-separated numbers of run dirs (increasing)")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--keep", type=Path, default=None, help="generate the sweeps under this dir and keep them")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--baseline", type=Path, default=None, help="also measure the table with this checkout")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="report_scale_"))
    rows, smaller = [], None
    for n in [int(x) for x in args.runs.split(",")]:
        sweep = base / f"sweep_{n}"
        if not (sweep / "multirun.yaml").is_file():
            t0 = time.perf_counter()
            if smaller is not None and not sweep.exists():  # the smaller sweep's jobs, hard-linked, then the rest
                subprocess.run(["cp", "-al", str(smaller), str(sweep)], check=True)
            make_sweep(sweep, n)
            print(f"generated {n} run dirs in {time.perf_counter() - t0:.0f} s: {sweep}", flush=True)
        row = {"run_dirs": n, "table": measure(sweep, figures=False)}
        if args.baseline:
            row["table_baseline"] = measure(sweep, figures=False, repo=args.baseline.resolve())
        if not args.no_figures:
            row["with_figures"] = measure(sweep, figures=True)
        print(json.dumps(row), flush=True)
        rows.append(row)
        smaller = sweep
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.keep is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
