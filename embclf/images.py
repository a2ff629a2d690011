"""The images an autoencode run writes (``images/``), as PNGs for people and as data for programs.

- ``recon_eNNN.png`` / ``recon_eNNN.pt``: a fixed, class-balanced set of test images (``recon_indices``)
  above their reconstructions. The ``.pt`` holds the same images as uint8 tensors (``read_reconstructions``),
  so the report never parses the PNG's geometry back.
- ``samples_eNNN.png`` / ``samples_eNNN.pt``: 64 decoded draws, the same z at every epoch and in every run.
  A VAE draws from its prior N(0, I). A plain AE has no prior (its codes are not N(0, I); decoding N(0, I)
  gave black squares), so it draws from a Gaussian fitted to the codes of ``N_FIT`` training images (their
  mean and full covariance); the ``.pt``'s ``source`` says which (``read_samples``).
- ``interpolation.png``: decoded points on straight lines between pairs of test embeddings.
- ``worst_figure``: the labelled worst-images figure of ``python -m embclf.evaluate``.
Everything is read by the stage, ``debug``, ``evaluate`` and the report; nothing here imports a stage.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torchvision.utils import make_grid, save_image

from . import data as data_mod
from . import runs

N_RECON = 20  # test images shown above their reconstructions: a fixed, class-balanced set (recon_indices)
RECON_COLS, RECON_PAD = 10, 2  # images/recon_eNNN.png: rows of 10, originals above their reconstructions
RECON_PIXELS = 96  # each image is enlarged (nearest neighbour) to about this many pixels, to be judged by eye
N_SAMPLES = 64  # decoded draws per samples_eNNN.png
N_FIT = 2000  # training images whose codes a plain AE's sampling Gaussian is fitted to (a fixed draw, seed 0)
N_INTERP_PAIRS, N_INTERP_STEPS = 8, 10  # images/interpolation.png: rows of pairs, decoded points per row
PRIOR = "prior N(0, I)"
FITTED = "Gaussian fitted to the codes of {n} training images (an AE has no prior)"


def _save_data(obj: dict, path: Path) -> None:
    """``obj`` (tensors and plain values) as a torch file at ``path``, atomically. Not ``runs.save_atomic``: that
    is the checkpoints' write, whose test-only fault point counts checkpoint writes (tests/test_resume.py)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    runs._atomic(path, lambda t: t.write_bytes(buf.getvalue()))


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (figures are written, never shown; a job on a node
    without a display must not try to open one). Imported on first use: matplotlib costs ~0.5 s to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [..] in [0, 1] -> uint8 [..] on the CPU, rounded as ``torchvision.utils.save_image`` rounds."""
    return x.detach().float().mul(255).add(0.5).clamp(0, 255).to(torch.uint8).cpu()


def recon_indices(labels: torch.Tensor, n: int = N_RECON) -> torch.Tensor:
    """Indices (int64 [m], m <= n) of a fixed, class-balanced set of test images for reconstruction grids.

    With C <= n classes, n // C images of every class; with more classes, one image of each of n classes
    spread evenly over the class indices. Within a class the images are a fixed random draw (seed 0), and the
    order is round-robin (one image per class, then the next round), so the first row of a grid shows
    different classes. The same test split gives the same images in every run, so runs compare side by side.
    The test split is ordered by class, which is why the first n images would all be airplanes.
    """
    labels = labels.detach().cpu()
    classes = torch.unique(labels)
    if len(classes) == 0 or n < 1:
        return torch.zeros(0, dtype=torch.long)
    if len(classes) > n:
        classes, per = classes[torch.linspace(0, len(classes) - 1, n).round().long()], 1
    else:
        per = n // len(classes)
    g = torch.Generator().manual_seed(0)
    picks = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per]])
    return torch.stack([p[j] for j in range(per) for p in picks if j < len(p)])


def enlarge(x: torch.Tensor, pixels: int = RECON_PIXELS) -> torch.Tensor:
    """float [B, C, S, S] -> [B, C, k*S, k*S] by nearest neighbour, k = pixels // S (at least 1)."""
    k = max(1, pixels // x.shape[-1])
    return torch.nn.functional.interpolate(x, scale_factor=k, mode="nearest") if k > 1 else x


@torch.no_grad()
def save_images(model, test: data_mod.Split, device, run_dir: Path, epoch: int,
                train: Optional[data_mod.Split] = None) -> Dict[str, Path]:
    """images/recon_eNNN.png and .pt (a fixed, class-balanced set of test images, ``recon_indices``: rows of 10
    originals, each above the row of their reconstructions, enlarged to ~96 pixels) and images/samples_eNNN.png
    and .pt (``sample_codes``: a VAE's prior; for a plain AE a Gaussian fitted to ``train``'s codes).

    Args:
        test, train: splits with uint8 [N, 3, S, S] images (on any device; ``train`` only read for a plain AE).
    Returns:
        {"recon": png path, "samples": png path}."""
    model.eval()
    idx = recon_indices(test.labels)
    cols = min(RECON_COLS, len(idx))
    idx = idx[:len(idx) - len(idx) % cols]  # whole rows only
    x = data_mod.to_float(test.images[idx.to(test.images.device)].to(device))
    x_hat = model(x, sample=False)["x_hat"].float()
    img_dir = run_dir / "images"
    img_dir.mkdir(exist_ok=True)
    rows = torch.cat([torch.cat([x[i:i + cols], x_hat[i:i + cols]]) for i in range(0, len(x), cols)])
    recon = img_dir / f"recon_e{epoch:03d}.png"
    save_image(make_grid(enlarge(rows.cpu()), nrow=cols, padding=RECON_PAD, pad_value=1.0), recon)
    _save_data({"originals": to_uint8(x), "reconstructions": to_uint8(x_hat), "indices": idx.cpu(),
                      "labels": test.labels[idx.to(test.labels.device)].cpu(), "epoch": epoch}, recon.with_suffix(".pt"))
    z, source = sample_codes(model, train, device)
    samples = model.decode(z).float()
    path = img_dir / f"samples_e{epoch:03d}.png"
    save_image(make_grid(samples.cpu(), nrow=8, padding=1), path)
    _save_data({"samples": to_uint8(samples), "source": source, "epoch": epoch}, path.with_suffix(".pt"))
    return {"recon": recon, "samples": path}


@torch.no_grad()
def sample_codes(model, train: Optional[data_mod.Split], device, n: int = N_SAMPLES):
    """``n`` codes to decode, float [n, latent] on ``device``, and where they come from (text).

    The draws eps ~ N(0, I) come from a generator seeded 0, so every epoch and every run decodes the same
    eps. A VAE decodes them (its prior). A plain AE (``model.variational`` False) decodes mean + L eps, with
    mean and covariance C = L L^T (Cholesky, 1e-6 added to the diagonal) of the codes of ``N_FIT`` training
    images (a fixed draw, seed 0): an AE's codes are not N(0, I), so decoding eps itself shows nothing.
    Without ``train`` an AE falls back to the prior, and says so."""
    eps = torch.randn(n, model.latent, generator=torch.Generator().manual_seed(0))
    if model.variational or train is None or len(train) < 2:
        return eps.to(device), PRIOR if model.variational else PRIOR + " (no training codes to fit)"
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:N_FIT]
    mus = []
    for i in range(0, len(pick), 500):
        x = data_mod.to_float(train.images[pick[i:i + 500].to(train.images.device)].to(device))
        mus.append(model.encode(x)[0].float().cpu().double())
    mu = torch.cat(mus)
    cov = torch.cov(mu.T).reshape(model.latent, model.latent) + 1e-6 * torch.eye(model.latent, dtype=mu.dtype)
    chol = torch.linalg.cholesky(cov)
    z = mu.mean(0) + eps.double() @ chol.T
    return z.float().to(device), FITTED.format(n=len(pick))


@torch.no_grad()
def save_interpolation(model, test: data_mod.Split, device, run_dir: Path) -> Path:
    """images/interpolation.png: one row per pair of test images (i, j): image i, the decoded points of the
    straight line (1 - t) z_i + t z_j for 10 values of t in [0, 1] (z = mu for a VAE), image j.

    The pairs are a fixed random draw (seed 0), so rows usually join different classes (the test split is
    ordered by class) and every run of a sweep shows the same pairs."""
    model.eval()
    n = min(N_INTERP_PAIRS, len(test) // 2)
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:2 * n]
    x = data_mod.to_float(test.images[pick.to(test.images.device)].to(device))  # a no-op when on the device
    z = model.encode(x)[0]
    t = torch.linspace(0, 1, N_INTERP_STEPS, device=device).view(1, -1, 1)
    line = (1 - t) * z[:n, None] + t * z[n:, None]  # [n, steps, latent]
    decoded = model.decode(line.flatten(0, 1)).view(n, N_INTERP_STEPS, *x.shape[1:])
    rows = torch.cat([x[:n, None], decoded, x[n:, None]], dim=1).flatten(0, 1)
    path = run_dir / "images" / "interpolation.png"
    path.parent.mkdir(exist_ok=True)
    save_image(make_grid(rows.cpu(), nrow=N_INTERP_STEPS + 2, padding=1), path)
    return path



def _latest(run_dir: Path, prefix: str, epoch: Optional[int]) -> Optional[Path]:
    d = Path(run_dir) / "images"
    if epoch is not None:
        p = d / f"{prefix}_e{epoch:03d}.pt"
        return p if p.is_file() else None
    files = sorted(d.glob(f"{prefix}_e*.pt"))
    return files[-1] if files else None


def read_reconstructions(run_dir: Path, epoch: Optional[int] = None) -> Optional[dict]:
    """The reconstruction images of an autoencode run at ``epoch`` (default: the last epoch that has them).

    Returns None when the run has none (no ``images/recon_eNNN.pt``: not written yet, or a run from before
    the file existed), else {"originals": uint8 [n, 3, S, S], "reconstructions": uint8 [n, 3, S, S],
    "indices": int64 [n] (in the test split), "labels": int64 [n], "epoch": int}; n is a multiple of
    ``RECON_COLS`` (at most ``N_RECON``). Raises ``EmbclfError`` for an unreadable file."""
    p = _latest(run_dir, "recon", epoch)
    return None if p is None else runs.load_checkpoint(p, ("originals", "reconstructions", "epoch"),
                                                       "reconstruction images")


def read_samples(run_dir: Path, epoch: Optional[int] = None) -> Optional[dict]:
    """The decoded samples of an autoencode run (like ``read_reconstructions``): None, or {"samples": uint8
    [64, 3, S, S], "source": ``PRIOR`` or the fitted Gaussian's description, "epoch": int}."""
    p = _latest(run_dir, "samples", epoch)
    return None if p is None else runs.load_checkpoint(p, ("samples", "source", "epoch"), "sample images")


def strip(images: torch.Tensor, pixels: int = RECON_PIXELS, pad: int = RECON_PAD):
    """uint8 [n, 3, S, S] -> one row of the images, enlarged to ~``pixels`` and ``pad`` white pixels apart, as a
    numpy uint8 [H, W, 3] array (what ``matplotlib``'s ``imshow`` shows)."""
    grid = make_grid(enlarge(images.float() / 255, pixels), nrow=len(images), padding=pad, pad_value=1.0)
    return to_uint8(grid).permute(1, 2, 0).numpy()


def worst_figure(images: torch.Tensor, captions: Sequence[str], path_or_buf, title: str,
                 below: Optional[torch.Tensor] = None, cols: int = 8) -> List[str]:
    """A labelled figure of ``images`` (float [n, 3, S, S] in [0, 1]; with ``below`` [n, 3, S, S] each image is
    shown above its counterpart, e.g. its reconstruction), a caption under each (class, PSNR/MSE or the
    prediction), ``cols`` per row, each image ~1.3 inch wide at 100 dpi (so a 32-pixel image is shown at
    ~4x), saved as PNG to a path or a binary file object. Returns the captions drawn."""

    plt = pyplot()
    n = max(1, len(images))
    rows = (n + cols - 1) // cols
    per = 2 if below is not None else 1
    fig, axes = plt.subplots(rows * per, cols, figsize=(1.3 * cols, (1.25 * per + 0.5) * rows), squeeze=False)
    for ax in axes.flat:  # no axes drawn; an x label (the caption) still takes its room in tight_layout
        ax.set_xticks([]), ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    for i in range(len(images)):
        r, c = divmod(i, cols)
        shown = [images[i]] + ([below[i]] if below is not None else [])
        for k, im in enumerate(shown):
            ax = axes[r * per + k, c]
            ax.imshow(im.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        axes[r * per + per - 1, c].set_xlabel(captions[i], fontsize=7)
    if not len(images):
        axes[0, 0].text(0, 0.5, "none", fontsize=10)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path_or_buf, format="png", dpi=100)
    plt.close(fig)
    return list(captions)


def worst_png(x: torch.Tensor, captions: Sequence[str], title: str, below: Optional[torch.Tensor] = None) -> bytes:
    """``worst_figure`` of x float [n, 3, S, S] in [0, 1] (and ``below``), a caption under each, as PNG bytes (what
    ``embclf.evaluate`` writes atomically with the rest of an evaluation)."""
    buf = io.BytesIO()
    worst_figure(x.cpu(), captions, buf, title, None if below is None else below.cpu())
    return buf.getvalue()
