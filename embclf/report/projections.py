"""2-D projections of embeddings as PNG scatter plots (PCA, t-SNE, UMAP), coloured by class with a legend.

Written by the classify stage into ``images/{pca,tsne,umap}.png`` for the test embeddings. The projections
are scikit-learn's PCA and t-SNE and umap-learn's UMAP (optional: ``pip install embclf[umap]``); a random
subset of ``logger.projection_points`` (1000) points keeps t-SNE to ~4 s on one CPU core; UMAP's first call
in a process spends ~15 s compiling (numba).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

METHODS = ("pca", "tsne", "umap")
TITLES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
MIN_POINTS = 3  # fewer test points than this: no projection (t-SNE's perplexity and UMAP's neighbours need more)


class DegenerateError(ValueError):
    """The embeddings cannot be projected meaningfully (identical or non-finite points)."""


def degenerate(z: np.ndarray) -> str:
    """Why ``z`` float [N, D] cannot be projected ("" when it can): too few points, non-finite values, or
    all points identical (a collapsed or dead encoder). Such input crashes t-SNE and UMAP natively."""
    if len(z) < MIN_POINTS:
        return f"only {len(z)} point(s), fewer than {MIN_POINTS}"
    if not np.isfinite(z).all():
        return "the embeddings hold NaN or infinite values"
    if np.ptp(z, axis=0).max() == 0:
        return f"all {len(z)} embeddings are identical (a collapsed or dead encoder)"
    return ""


def project(z: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """float [N, D] -> float [N, 2] by ``method`` (pca | tsne | umap).

    Raises ``ImportError`` for umap without umap-learn, ``ValueError`` for an unknown method,
    ``DegenerateError`` for input that ``degenerate`` rejects or that has no spread for t-SNE's PCA start.
    A latent of size 1 is padded with zeros, since every method needs two output dimensions.
    """
    why = degenerate(z)
    if why:
        raise DegenerateError(why)
    if z.shape[1] < 2:
        z = np.concatenate([z, np.zeros_like(z)], axis=1)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(z)
    if method == "tsne":
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        # scikit-learn's init="pca", computed here so a degenerate start is caught: it divides the first
        # component by its standard deviation, which is 0 for identical points, and Barnes-Hut t-SNE then
        # segfaults on the NaN start (scikit-learn 1.9, np.ones((200, 32))) -- a crash no except can catch
        init = PCA(n_components=2, random_state=seed).fit_transform(z).astype(np.float32)
        sd = float(np.std(init[:, 0]))
        if not np.isfinite(init).all() or not np.isfinite(sd) or sd == 0.0:
            raise DegenerateError("the embeddings have no spread along any direction")
        # perplexity must stay below the number of points; 30 is scikit-learn's default
        return TSNE(n_components=2, init=init / sd * 1e-4, perplexity=min(30.0, (len(z) - 1) / 3),
                    random_state=seed).fit_transform(z)
    if method == "umap":
        import umap  # optional extra

        # n_neighbors must be at least 2 and below the number of points; 15 is umap-learn's default
        return umap.UMAP(n_components=2, n_neighbors=max(2, min(15, len(z) - 1)), random_state=seed,
                         n_jobs=1).fit_transform(z)
    raise ValueError(f"unknown projection {method!r}; use one of {', '.join(METHODS)} in logger.projections")


AXIS = {"pca": "PC {}", "tsne": "t-SNE {}", "umap": "UMAP {}"}


def _plt():
    from ..images import pyplot  # the one place that picks matplotlib's file-only backend

    return pyplot()


def class_colors(n: int) -> list:
    """n distinguishable RGBA colours: tab10 up to 10 classes, tab20 up to 20, else evenly spaced on turbo."""
    plt = _plt()
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("turbo")(i / (n - 1)) for i in range(n)]


def point_size(n_points: int) -> float:
    """Marker area (points^2) for a scatter of ``n_points``: 40 up to 300 points, 12 for 1000, at least 4,
    so a few hundred points are visible and thousands do not merge into one blot."""
    return float(min(40.0, max(4.0, 12000.0 / max(1, n_points))))


def scatter(xy: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: Path, title: str,
            method: str = "") -> Path:
    """Save a scatter plot of ``xy`` [N, 2] coloured by ``labels`` [N] (indices into ``classes``).

    Points are sized by their number (``point_size``), axes are labelled by the projection's components
    (``method``: pca | tsne | umap), and the legend of class names sits outside the axes (in columns for
    many classes, e.g. CIFAR-100), so it never covers data."""
    plt = _plt()
    colors = class_colors(len(classes))
    ncol = max(1, int(np.ceil(len(classes) / 25)))
    fig, ax = plt.subplots(figsize=(7 + 1.6 * ncol, 6))
    s = point_size(len(xy))
    for i, name in enumerate(classes):
        m = labels == i
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=s, alpha=0.75, color=colors[i], label=name, linewidths=0)
    ax.legend(markerscale=max(1.0, 4 / np.sqrt(s)) * 1.5, fontsize=8 if len(classes) <= 20 else 6,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, ncol=ncol, title="class",
              handletextpad=0.2, columnspacing=0.6)
    ax.set_title(title, fontsize=10)
    fmt = AXIS.get(method, "component {}")
    ax.set_xlabel(fmt.format(1))
    ax.set_ylabel(fmt.format(2))
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    """Confusion matrix int [C, C] (rows: true class, columns: predicted) as a PNG.

    Up to 20 classes: scikit-learn's ConfusionMatrixDisplay with counts in the cells. More classes (e.g.
    CIFAR-100): a heat map of row-normalised rates (fraction of each true class) without per-cell numbers,
    which would be unreadable and slow to draw; the full matrix is in summary.json."""
    plt = _plt()
    cm = np.asarray(cm)
    if len(classes) <= 20:
        from sklearn.metrics import ConfusionMatrixDisplay

        fig, ax = plt.subplots(figsize=(7, 6))
        ConfusionMatrixDisplay(cm, display_labels=list(classes)).plot(ax=ax, xticks_rotation=45, colorbar=False)
    else:
        fig, ax = plt.subplots(figsize=(13, 12))
        rates = cm / np.maximum(1, cm.sum(1, keepdims=True))
        im = ax.imshow(rates, cmap="viridis", vmin=0, vmax=max(1e-9, float(rates.max())), interpolation="nearest")
        ax.set_xticks(range(len(classes)), list(classes), rotation=90, fontsize=5)
        ax.set_yticks(range(len(classes)), list(classes), fontsize=5)
        ax.set_xlabel("predicted label")
        ax.set_ylabel("true label")
        fig.colorbar(im, ax=ax, fraction=0.03, label="fraction of the true class")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_projections(z, labels, classes: List[str], out_dir: Path, methods: Sequence[str], n_points: int,
                     title: str, seed: int = 0) -> Dict[str, Path]:
    """Write ``out_dir/<method>.png`` for each method; returns {method: path} of those written.

    ``z``: float [N, D] embeddings, ``labels``: int [N]. At most ``n_points`` points (a fixed random subset)
    are projected. Degenerate input (``degenerate``: too few, non-finite or identical points) is skipped
    with one warning before any method runs, since t-SNE and UMAP crash the process on it (a segfault, which
    no ``except`` catches). UMAP without umap-learn is skipped with one log line; any other method that fails
    is logged and skipped too, since a plot must not fail a finished run.
    """
    z = np.asarray(z, dtype=np.float32)
    labels = np.asarray(labels)
    if len(z) > n_points > 0:
        pick = np.sort(np.random.default_rng(seed).permutation(len(z))[:n_points])
        z, labels = z[pick], labels[pick]
    out = {}
    why = degenerate(z)
    if why and methods:
        log.warning("projections %s skipped: %s", ", ".join(methods), why)
        return out
    for method in methods:
        t0 = time.time()
        try:
            # one thread: OpenMP t-SNE on busy cores (parallel sweep jobs sharing a node) spin-waits and ran
            # 5-15x slower than single-threaded in our measurements; one thread does 1000 points in ~4 s
            with threadpool_limits(1):
                xy = project(z, method, seed)
        except ImportError:
            log.info("umap-learn is not installed: skipping images/umap.png (pip install 'embclf[umap]')")
            continue
        except Exception as e:  # noqa: BLE001 -- e.g. no spread for t-SNE's start
            log.warning("projection %s failed (%s: %s); skipped", method, type(e).__name__, e)
            continue
        out[method] = scatter(xy, labels, classes, Path(out_dir) / f"{method}.png",
                              f"{TITLES.get(method, method)} of {len(z)} test embeddings: {title}", method)
        log.info("wrote %s (%.1fs)", out[method], time.time() - t0)
    return out
