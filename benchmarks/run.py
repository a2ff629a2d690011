"""embclf's speed and memory, as ratios measured side by side in one invocation (not part of the tests).

    python benchmarks/run.py                 # rows 1-6, ~10 minutes on a 2-core CPU
    python benchmarks/run.py --rows 1,5      # some rows
    python benchmarks/run.py --rows 6 --repeats 7   # fp32 vs bf16 autocast at batch 200 (~2 min)
    python benchmarks/run.py --json out.json # also write every measurement

Rows (each ratio: variants interleaved, repeated ``--repeats`` times, median reported):
1. autoencode training images/s: embclf's loop (``engine.train_epoch``: uint8 tensor on the
   device, index batches, metric sums on the device) vs the reference study's naive loop (torchvision
   ImageFolder + DataLoader, per-sample ToTensor, 2 workers, shuffle, batch 200, ``loss.item()`` per
   step), the same conv AE and Adam step on the same images; and embclf vs the pure-compute bound (the
   same steps on one pre-made float tensor, no metrics).
2. classify: N epochs on cached embeddings (what the stage does: encode once, then train the head) vs
   re-encoding every batch with the frozen encoder; same head, order and seed, so the same accuracy.
3. launcher: fixed overhead of a 1-job sweep over the same job run plainly, and a 2-job sweep vs a 1-job
   sweep (1 thread per job) -- ``benchmarks/bench_launcher.py``.
4. peak resident memory of one job on the whole CIFAR-10 (first decode and cache, then training steps).
5. training images/s per model at fp32 and bf16, FLOPs per image per training step counted by
   ``torch.utils.flop_counter`` (forward + backward), achieved GFLOP/s.
6. conv AE training images/s at batch 200: fp32 vs bf16 autocast, interleaved, and what ``precision=auto``
   resolves to on this machine (``runtime.resolve_precision``): the row that decides ``auto``.

Needs ../shared/data/cifar10 (an ImageFolder copy of CIFAR-10) beside the repo, or ``--data PATH``.
Exit status 0 always: a measurement, not a test.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from embclf import data as data_mod  # noqa: E402
from embclf import losses  # noqa: E402
from embclf.heads import MLPHead  # noqa: E402
from embclf import engine  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"
MODELS = ("ae", "vae", "resnet", "resnet_vae")


def model_cfg(name: str):
    """The ``model`` group's config for ``name``, composed by Hydra as the entrypoint does."""
    from hydra import compose, initialize_config_dir

    from embclf.config import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=[f"model={name}"]).model


def build(name: str, latent: int = 64, seed: int = 0):
    """A freshly initialised model (same weights for the same seed) and its Adam, as the stage builds them."""
    from embclf.models import build_model

    torch.manual_seed(seed)
    model = build_model(model_cfg(name), latent)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def train_flops_per_image(name: str, latent: int = 64, batch: int = 8) -> float:
    """FLOPs of one training step (forward + backward) per image, counted by ``torch.utils.flop_counter``
    (convolutions and matmuls; elementwise ops are not counted). The optimizer step is not included."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = build(name, latent)
    model.train()
    x = torch.rand(batch, 3, 32, 32)
    with FlopCounterMode(display=False) as fc:
        loss, _, _ = engine.batch_step(model, x, 0.1)
        loss.backward()
    return fc.get_total_flops() / batch


def _median(xs):
    return statistics.median(xs)


def _subset_indices(root: Path, n: int, seed: int = 0):
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(root / "train"))
    g = torch.Generator().manual_seed(seed)
    return folder, torch.randperm(len(folder), generator=g)[:n].tolist()


def _decode(folder, idx) -> torch.Tensor:
    """uint8 [n, 3, 32, 32] of ImageFolder samples ``idx``, decoded as embclf's data path decodes them."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    out = torch.empty(len(idx), 3, 32, 32, dtype=torch.uint8)
    for k, i in enumerate(idx):
        with Image.open(folder.samples[i][0]) as im:
            out[k] = pil_to_tensor(im.convert("RGB"))
    return out


# --- row 1 --------------------------------------------------------------------------------------------

def row1(root: Path, repeats: int, n_images: int = 1000, batch: int = 200) -> dict:
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    folder, idx = _subset_indices(root, n_images)
    images = _decode(folder, idx)  # what embclf keeps on the device
    floats = data_mod.to_float(images.clone())  # the pure-compute bound's one pre-made float tensor
    naive_ds = Subset(ImageFolder(str(root / "train"), transform=transforms.ToTensor()), idx)

    def naive():
        model, opt = build("ae")
        model.train()
        loader = DataLoader(naive_ds, batch_size=batch, shuffle=True, num_workers=2)
        t0 = time.perf_counter()
        running = 0.0
        for x, _ in loader:
            out = model(x)
            loss = losses.ae_loss(out["x_hat"], x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += loss.item()  # the reference study's per-step bookkeeping
        return n_images / (time.perf_counter() - t0)

    def embclf(precision="fp32"):
        model, opt = build("ae")
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        sums = engine.train_epoch(lambda x: engine.batch_step(model, x, 0.1, precision), model, opt,
                                      images, batch, g)
        sums.tolist()  # the epoch's one host read, as in the stage
        return n_images / (time.perf_counter() - t0)

    def compute():
        model, opt = build("ae")
        model.train()
        t0 = time.perf_counter()
        for i in range(0, n_images, batch):
            x = floats[i:i + batch]
            loss = losses.ae_loss(model(x)["x_hat"], x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return n_images / (time.perf_counter() - t0)

    # bf16 is not a variant here: on a CPU without native bf16 it is ~15x slower (row 5 measures it)
    variants = {"naive": naive, "embclf": embclf, "compute": compute}
    for fn in variants.values():  # warm-up: thread pools, allocator, first-call dispatch
        fn()
    r = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            r[k].append(fn())
    med = {k: _median(v) for k, v in r.items()}
    return {"images": n_images, "batch": batch, "images_per_second": med, "runs": r,
            "ratio_vs_naive": med["embclf"] / med["naive"], "ratio_vs_compute": med["embclf"] / med["compute"],
            "goals": {"ratio_vs_naive": 1.3, "ratio_vs_compute": 0.95}}


# --- row 2 --------------------------------------------------------------------------------------------

def row2(root: Path, repeats: int, n_train: int = 400, n_val: int = 200, epochs: int = 50, batch: int = 200) -> dict:
    folder, idx = _subset_indices(root, n_train + n_val, seed=1)
    images = _decode(folder, idx)
    labels = torch.as_tensor([folder.targets[i] for i in idx])
    tr = data_mod.Split(images[:n_train], labels[:n_train])
    va = data_mod.Split(images[n_train:], labels[n_train:])
    encoder, _ = build("ae")
    encoder.eval().requires_grad_(False)
    z_ref = engine.embed(encoder, tr, "cpu", 1000)

    def head_and_opt():
        torch.manual_seed(0)
        head = MLPHead(z_ref.shape[1], 10)
        head.fit_standardizer(z_ref)  # given to the re-encoding baseline for free (not timed)
        return head, torch.optim.Adam(head.parameters(), lr=1e-3)

    def cached():
        t0 = time.perf_counter()
        z_tr, z_va = engine.embed(encoder, tr, "cpu", 1000), engine.embed(encoder, va, "cpu", 1000)
        head, opt = head_and_opt()
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            engine.train_head_epoch(head, opt, z_tr, tr.labels, batch, g).tolist()
            m, _ = engine.eval_head(head, z_va, va.labels, 4096)
        return time.perf_counter() - t0, m["accuracy"]

    @torch.no_grad()
    def encode(x_u8):
        return encoder.encode(data_mod.to_float(x_u8))[0]

    def reencode():
        t0 = time.perf_counter()
        head, opt = head_and_opt()
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            head.train()
            for i in data_mod.batches(n_train, batch, "cpu", shuffle=True, generator=g):
                logits = head(encode(tr.images[i]))
                loss = losses.cross_entropy(logits, tr.labels[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
            head.eval()
            with torch.no_grad():
                acc = losses.accuracy(head(encode(va.images)), va.labels)
        return time.perf_counter() - t0, acc

    r = {"cached": [], "reencode": []}
    for _ in range(repeats):
        r["cached"].append(cached())
        r["reencode"].append(reencode())
    t = {k: _median([s for s, _ in v]) for k, v in r.items()}
    acc = {k: v[0][1] for k, v in r.items()}
    return {"n_train": n_train, "n_val": n_val, "epochs": epochs, "seconds": t, "val_accuracy": acc,
            "speedup": t["reencode"] / t["cached"], "accuracy_diff_pt": 100 * abs(acc["cached"] - acc["reencode"]),
            "goals": {"speedup": 20.0, "accuracy_diff_pt": 0.5}}


# --- row 3 --------------------------------------------------------------------------------------------

def row3(root: Path, repeats: int) -> dict:
    import bench_launcher

    return bench_launcher.measure(repeats=repeats)


# --- row 4 --------------------------------------------------------------------------------------------

_ROW4_CHILD = r"""
import resource, sys, time, torch
from hydra import compose, initialize_config_dir
from embclf import data as data_mod
from embclf.config import conf_dir
from embclf import engine
torch.set_num_threads(2)
with initialize_config_dir(config_dir=conf_dir(), version_base=None):
    cfg = compose("config", overrides=["data=folder", f"data.root={sys.argv[1]}", "model=ae"])
t0 = time.time()
ds = data_mod.load(cfg.data)  # first use: decode every JPEG, write the cache
t_data = time.time() - t0
rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from embclf.models import build_model
model = build_model(cfg.model, 64)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
steps = int(sys.argv[2])
g = torch.Generator().manual_seed(0)
images = ds.train.images[torch.randperm(len(ds.train), generator=g)[:steps * 200]]  # a view's worth of batches
engine.train_epoch(lambda x: engine.batch_step(model, x, 0.1), model, opt, images, 200, g).tolist()
val = engine.evaluate(lambda x: engine.batch_step(model, x, 0.1), model, ds.val, 1000)
print({"n_train": len(ds.train), "n_val": len(ds.val), "n_test": len(ds.test), "data_seconds": t_data,
       "rss_after_data_kib": rss_data, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
"""


def row4(root: Path, repeats: int, steps: int = 20) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, XDG_CACHE_HOME=tmp, OMP_NUM_THREADS="2")
        out = subprocess.run([sys.executable, "-c", _ROW4_CHILD, str(root), str(steps)], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    r = ast.literal_eval(out.stdout.strip().splitlines()[-1])  # our own child's dict literal
    r.update(steps=steps, peak_rss_gib=r["peak_rss_kib"] / 2**20, goals={"peak_rss_gib": 2.0})
    return r


# --- row 5 --------------------------------------------------------------------------------------------

def _steps_per_second(name: str, x: torch.Tensor, precision: str, steps: int) -> float:
    """Training steps per second of a fresh ``name`` model (forward under ``precision``'s autocast, backward,
    Adam) on the batch ``x``: one warm-up step (allocations, dispatch), then ``steps`` timed."""
    model, opt = build(name)
    model.train()
    for s in range(steps + 1):
        if s == 1:
            t0 = time.perf_counter()
        loss, _, _ = engine.batch_step(model, x, 0.1, precision)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)



def row5(root: Path, repeats: int) -> dict:
    """Batch sizes keep each step near a second here: bf16 on a CPU without native bf16 kernels (AVX2 only)
    runs emulated, ~15x (conv) to ~30x (ResNet-18) slower than fp32, so its batches are small."""
    batches = {("conv", "fp32"): 50, ("conv", "bf16"): 8, ("resnet", "fp32"): 10, ("resnet", "bf16"): 2}
    out = {}
    for name in MODELS:
        flops = train_flops_per_image(name)
        arch = "resnet" if name.startswith("resnet") else "conv"
        for precision in ("fp32", "bf16"):
            batch = batches[(arch, precision)]
            x = data_mod.to_float(torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8))
            rates = [_steps_per_second(name, x, precision, 2) * batch for _ in range(repeats)]
            ips = _median(rates)
            out[f"{name}/{precision}"] = {"batch": batch, "images_per_second": ips, "gflop_per_image": flops / 1e9,
                                          "achieved_gflops": ips * flops / 1e9}
    return out


# --- row 6 --------------------------------------------------------------------------------------------

def row6(root: Path, repeats: int, batch: int = 200, steps: int = 3) -> dict:
    """The conv AE's training step (forward under autocast, backward, Adam) at ``batch``, fp32 and bf16
    alternating in every repeat (a busy machine slows both alike), ``steps`` timed after one warm-up step.
    Returns the median img/s of each, their ratio and ``precision=auto``'s choice here."""
    from embclf import runtime

    x = data_mod.to_float(torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8))
    rates = {"fp32": [], "bf16": []}
    for _ in range(repeats):
        for precision in ("fp32", "bf16"):
            rates[precision].append(_steps_per_second("ae", x, precision, steps) * batch)
    med = {k: _median(v) for k, v in rates.items()}
    auto, why = runtime.resolve_precision("auto", "cpu")
    return {"batch": batch, "images_per_second": med, "all": rates, "ratio": med["bf16"] / med["fp32"],
            "auto": auto, "auto_why": why, "capability": torch.backends.cpu.get_cpu_capability()}


# --- table ----------------------------------------------------------------------------------------------

def _fmt(r: dict) -> str:
    lines = ["| row | measurement | value | goal |", "|---|---|---:|---|"]
    if "row1" in r:
        a = r["row1"]
        ips = a["images_per_second"]
        lines += [f"| 1 | autoencode img/s: embclf / naive DataLoader loop ({ips['embclf']:.0f} / {ips['naive']:.0f}) | "
                  f"{a['ratio_vs_naive']:.2f}x | >= 1.3x |",
                  f"| 1 | autoencode img/s: embclf / pure compute ({ips['embclf']:.0f} / {ips['compute']:.0f}) | "
                  f"{a['ratio_vs_compute']:.2f}x | >= 0.95x |"]
    if "row2" in r:
        a = r["row2"]
        lines += [f"| 2 | classify {a['epochs']} epochs: re-encoding / cached ({a['seconds']['reencode']:.1f} s / "
                  f"{a['seconds']['cached']:.2f} s) | {a['speedup']:.0f}x | >= 20x |",
                  f"| 2 | val accuracy cached vs re-encoding ({a['val_accuracy']['cached']:.3f} / "
                  f"{a['val_accuracy']['reencode']:.3f}) | {a['accuracy_diff_pt']:.1f} pt | <= 0.5 pt |"]
    if "row3" in r:
        a = r["row3"]
        if "error" in a:
            lines.append(f"| 3 | launcher | error: {a['error'][:100]} | |")
        else:
            lines += [f"| 3 | launcher overhead: 1-job sweep - plain run ({a['sweep1_s']:.1f} s - {a['plain_s']:.1f} s) | "
                      f"{a['overhead_s']:.1f} s | <= 2 s |",
                      f"| 3 | 2-job sweep / 1-job sweep, 1 thread each ({a['sweep2_s']:.1f} s / {a['sweep1_s']:.1f} s) | "
                      f"{a['parallel_ratio']:.2f}x | <= 1.15x |"]
    if "row4" in r:
        a = r["row4"]
        if "error" in a:
            lines.append(f"| 4 | peak RSS | error: {a['error'][-200:]} | |")
        else:
            lines.append(f"| 4 | peak RSS, whole CIFAR-10 ({a['n_train']}+{a['n_val']}+{a['n_test']} images decoded in "
                         f"{a['data_seconds']:.0f} s, then {a['steps']} steps of 200) | {a['peak_rss_gib']:.2f} GiB | <= 2 GiB |")
    if "row5" in r:
        for k, a in r["row5"].items():
            lines.append(f"| 5 | {k} (batch {a['batch']}): img/s, GFLOP/img (fwd+bwd), GFLOP/s | "
                         f"{a['images_per_second']:.1f} img/s, {a['gflop_per_image']:.2f}, {a['achieved_gflops']:.1f} | |")
    if "row6" in r:
        a = r["row6"]
        ips = a["images_per_second"]
        lines.append(f"| 6 | conv AE training img/s, batch {a['batch']}: bf16 autocast / fp32 ({ips['bf16']:.0f} / "
                     f"{ips['fp32']:.0f}; {a['capability']}; precision=auto -> {a['auto']}) | {a['ratio']:.2f}x | |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,3,4,5,6", help="comma-separated rows to run (default all)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per variant; the median is reported")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder root with train/ and test/")
    p.add_argument("--json", type=Path, help="also write all measurements here")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not (a.data / "train").is_dir():
        sys.exit(f"benchmarks/run.py: no ImageFolder tree at {a.data} (train/<class>/*.jpg); pass --data PATH")
    rows = {"1": row1, "2": row2, "3": row3, "4": row4, "5": row5, "6": row6}
    res = {"machine": {"cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    for k in a.rows.split(","):
        t0 = time.time()
        print(f"row {k} ...", file=sys.stderr, flush=True)
        res[f"row{k}"] = rows[k](a.data, a.repeats)
        print(f"row {k} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"machine: {res['machine']}")
    print(_fmt(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
