"""Two PSNR conventions on a trained autoencoder's real reconstructions (docs/report.md, "Why the PSNR
convention matters").

    python benchmarks/psnr_conventions.py RUN_DIR [RUN_DIR ...]    # autoencode run dirs; test split, best.pt

embclf reports the mean over images of each image's PSNR, ``10 log10(1 / MSE_image)`` dB with data range 1
(``embclf.losses.psnr_per_image``). torchmetrics' ``peak_signal_noise_ratio(preds, target, data_range=1.0)``
with its default ``dim=None`` pools the squared error over the whole batch first: the PSNR of the mean MSE,
which is never higher (log is concave: Jensen's inequality) and is lower the more the images' MSEs spread.
Prints, per run dir, both numbers over the run's test images (float reconstructions of its best-on-val
checkpoint, eval mode, as the stage evaluates them), the gap, and torchmetrics' own number when torchmetrics is
installed (it is not an embclf dependency). One thread, CPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def conventions(x_hat: torch.Tensor, x: torch.Tensor) -> dict:
    """``{"mean_per_image": dB, "pooled": dB, "gap": dB, "torchmetrics": dB or None}`` of reconstructions
    ``x_hat`` of images ``x`` (float [N, C, H, W] in [0, 1])."""
    from embclf import losses

    per_image = losses.psnr_per_image(x_hat, x).mean().item()
    pooled = (10 * torch.log10(1.0 / (x_hat - x).pow(2).mean())).item()
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio
    except ImportError:
        tm = None
    else:
        tm = peak_signal_noise_ratio(x_hat, x, data_range=1.0).item()
    return {"mean_per_image": per_image, "pooled": pooled, "gap": per_image - pooled, "torchmetrics": tm}


def reconstruct(run_dir: Path) -> tuple:
    """(x_hat, x): the run's test images and their reconstructions by its best-on-val checkpoint, float32 on the
    CPU, from the run's own config.yaml (data, image size)."""
    from embclf import data as data_mod
    from embclf.artefacts import load_autoencoder
    from embclf.evaluate import run_config

    cfg = run_config(run_dir, [])
    model, _ = load_autoencoder(run_dir / "checkpoints" / "best.pt", torch.device("cpu"), cfg.data.image_size,
                                "checkpoint=best")
    model.eval()
    split = data_mod.load(cfg.data).split("test")
    xs, outs = [], []
    with torch.no_grad():
        for i in range(0, len(split), 500):
            x = data_mod.to_float(split.images[i:i + 500])
            xs.append(x)
            outs.append(model(x, sample=False)["x_hat"].float())
    return torch.cat(outs), torch.cat(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for d in args.run_dirs:
        x_hat, x = reconstruct(d)
        c = conventions(x_hat, x)
        tm = "not installed" if c["torchmetrics"] is None else f"{c['torchmetrics']:.3f} dB"
        print(f"{d}: {len(x)} test images; mean of per-image PSNR {c['mean_per_image']:.3f} dB; PSNR of the pooled "
              f"MSE {c['pooled']:.3f} dB (torchmetrics data_range=1.0, dim=None: {tm}); gap {c['gap']:.3f} dB")


if __name__ == "__main__":
    main()
