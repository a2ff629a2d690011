"""What the linear probe during autoencoding (``autoencode.probe_every``) costs, against one epoch of the quick
preset (``experiment=quick``: 1,800 train + 200 val images, batch 50, the conv AE at latent 64).

    python benchmarks/probe_cost.py                       # sizes 500,1000,1800, 5 repeats (~4 min on 2 cores)
    python benchmarks/probe_cost.py --sizes 1000 --repeats 9 --json out.json

The epoch is what the stage does per epoch apart from checkpoints: ``engine.train_epoch`` over the train split
plus ``engine.evaluate`` on val. The probe is ``probe.linear_probe`` (embed the class-balanced train subset and
val, fit the closed-form ridge probe, one host read). The variants are interleaved (epoch, probe at each size,
epoch, ...) so a busy shared machine slows all of them alike; each ratio is the median over repeats of
probe seconds / epoch seconds measured back to back. Exit status 0 always: a measurement, not a test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embclf import data as data_mod  # noqa: E402
from embclf import engine, probe, runtime  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"


def quick_cfg(root: Path, cache: Path, model: str = "ae", extra=()):
    """The quick preset's config for one job (Hydra-composed as the entrypoint does), plus ``extra`` overrides."""
    from hydra import compose, initialize_config_dir

    from embclf.config import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=["experiment=quick", f"model={model}", "latent=64", "data=folder",
                                            f"data.root={root}", f"data.cache_dir={cache}", *extra])


def measure(root: Path, sizes, repeats: int, model: str = "ae", extra=()) -> dict:
    """Seconds of one quick-preset epoch and of one probe at each of ``sizes``, interleaved ``repeats`` times
    (``extra``: more overrides, e.g. a smaller ``data.train_size`` for a test); returns {"epoch_s", "probe_s":
    {size: median}, "ratio": {size: median of probe/epoch}, ...}."""
    from embclf.models import build_model
    from embclf.models.objectives import build_objective

    with tempfile.TemporaryDirectory() as cache:
        cfg = quick_cfg(root, Path(cache), model, extra)
        ds = data_mod.load(cfg.data)
    device = torch.device("cpu")
    train, val = ds.train, ds.val
    torch.manual_seed(0)
    net = build_model(cfg.model, cfg.latent, cfg.data.image_size)
    objective = build_objective(cfg.model, cfg.latent, len(ds.classes))
    opt = runtime.adam(net.parameters(), device, cfg.autoencode.lr, 0.0)
    beta = torch.tensor(cfg.model.beta)

    def step(x, y=None):
        return engine.batch_step(net, x, beta, "fp32", y, objective)

    g = torch.Generator().manual_seed(0)
    subsets = {n: probe.balanced_subset(train.labels, n, 0) for n in sizes}

    def epoch():
        engine.train_epoch(step, net, opt, train.images, cfg.autoencode.batch_size, g).tolist()
        engine.evaluate(step, net, val, cfg.autoencode.eval_batch_size, objective=objective)

    def run_probe(n):
        return probe.linear_probe(net, train, subsets[n], val, len(ds.classes), cfg.autoencode.eval_batch_size)

    epoch()  # warm-up: allocator, kernels
    for n in sizes:
        run_probe(n)
    ep, pr, ratio, acc = [], {n: [] for n in sizes}, {n: [] for n in sizes}, {}
    for r in range(repeats):
        t0 = time.perf_counter()
        epoch()
        e = time.perf_counter() - t0
        ep.append(e)
        for n in sizes:
            t0 = time.perf_counter()
            acc[n] = run_probe(n)["probe_accuracy"]
            p = time.perf_counter() - t0
            pr[n].append(p)
            ratio[n].append(p / e)
        print(f"repeat {r + 1}/{repeats}: epoch {e:.2f} s, probes "
              + ", ".join(f"{n}: {pr[n][-1]:.3f} s" for n in sizes), file=sys.stderr, flush=True)
    return {"model": model, "n_train": len(train), "n_val": len(val), "batch_size": cfg.autoencode.batch_size,
            "threads": torch.get_num_threads(), "repeats": repeats, "epoch_s": statistics.median(ep),
            "probe_s": {n: statistics.median(v) for n, v in pr.items()},
            "ratio": {n: statistics.median(v) for n, v in ratio.items()},
            "probe_accuracy_after_warmup": acc, "actual_subset": {n: len(s) for n, s in subsets.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="500,1000,1800", help="probe_size values, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats; medians reported")
    p.add_argument("--model", default="ae", help="ae or vae")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder root with train/ and test/")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not (a.data / "train").is_dir():
        sys.exit(f"benchmarks/probe_cost.py: no ImageFolder tree at {a.data}; pass --data PATH")
    res = measure(a.data, [int(s) for s in a.sizes.split(",")], a.repeats, a.model)
    print(f"quick preset epoch ({res['n_train']} train + {res['n_val']} val images, batch {res['batch_size']}, "
          f"{res['model']}, {res['threads']} threads): {res['epoch_s']:.2f} s (median of {res['repeats']})")
    for n in res["probe_s"]:
        print(f"probe_size={n} ({res['actual_subset'][n]} images): {res['probe_s'][n]:.3f} s = "
              f"{100 * res['ratio'][n]:.1f} % of an epoch")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
