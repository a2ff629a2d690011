"""Probes on frozen embeddings (the ``head`` config group: conf/head/<name>.yaml <-> this module).

Every probe reads the same cached embeddings (``stage=classify``'s embeddings.pt) and predicts class
scores float [N, classes] whose argmax is the prediction:

* ``mlp`` (trainable): the reference study's MLP, latent -> 128 -> 64 -> classes with ReLU.
* ``linear`` (trainable): one linear layer (the usual linear probe).
* ``knn``: weighted k-nearest-neighbour vote with cosine similarity, k = 20 and temperature T = 0.07, as in
  Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination" (CVPR 2018) and the
  k-NN evaluation of DINO (Caron et al. 2021, ``eval_knn.py``). Runs on the embeddings' device, batched.
* ``logreg``: scikit-learn ``LogisticRegression`` (L2, lbfgs, multinomial) on standardized embeddings, with
  the inverse regularization strength C chosen on val from ``head.C``.

Trainable heads standardize their input with the training embeddings' per-dim mean and std (stored as
buffers), so AE codes and VAE means of very different scales train with the same learning rate. The
non-trainable ones (``knn``, ``logreg``) are fitted once by ``fit(z_train, y_train, z_val, y_val)``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .validation import HEAD_NAMES, check_group, check_value
from .runtime import EmbclfError

HEADS = HEAD_NAMES  # the head group's options: one list, the gate's (embclf/config.py)
TRAINABLE = ("mlp", "linear")


class MLPHead(nn.Module):
    """float [B, in_dim] -> logits float [B, n_classes].

    Args:
        in_dim: embedding size (the latent). n_classes: number of classes.
        hidden: widths of the hidden layers (ReLU after each); ``()`` makes a linear probe.
        dropout: after each hidden ReLU (with no hidden layer: on the standardized input).
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: Sequence[int] = (128, 64), dropout: float = 0.0):
        super().__init__()
        layers, d = [], in_dim
        if not hidden and dropout:
            layers.append(nn.Dropout(dropout))
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True)] + ([nn.Dropout(dropout)] if dropout else [])
            d = h
        layers.append(nn.Linear(d, n_classes))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def fit_standardizer(self, z: torch.Tensor) -> None:
        """Set the input mean/std from training embeddings z float [N, in_dim]."""
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0).clamp_min(1e-6))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net((z - self.mean) / self.std)


class KNNProbe(nn.Module):
    """Weighted k-NN on cosine similarity: float [B, D] -> class scores float [B, n_classes] (the summed
    vote weights, not logits).

    Each query's k most similar training embeddings vote for their class with weight exp(s / T), s the
    cosine similarity (Wu et al. 2018, eq. 8; DINO's ``knn_classifier``). Fitting stores the L2-normalised
    training embeddings on their device; ``forward`` works through the queries in ``batch_size`` chunks,
    so memory is O(batch_size x N_train) and nothing is read back to the host.

    Args:
        n_classes: number of classes. k: neighbours (capped at the training set size; >= 1).
        temperature: T > 0. batch_size: queries per similarity matrix. (``build_head`` checks both against
        the gate, ``validation.VALUE_RULES``.)
    """

    trainable = False

    def __init__(self, n_classes: int, k: int = 20, temperature: float = 0.07, batch_size: int = 1024):
        super().__init__()
        self.n_classes, self.k, self.temperature, self.batch_size = n_classes, k, temperature, batch_size
        self.register_buffer("bank", torch.zeros(0))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))

    def fit(self, z: torch.Tensor, y: torch.Tensor, z_val=None, y_val=None) -> Dict[str, float]:
        """Store the training embeddings z float [N, D] and labels y int64 [N]. Returns the settings used."""
        self.bank = F.normalize(z.float(), dim=1)
        self.labels = y.long()
        return {"k": min(self.k, len(z)), "temperature": self.temperature}

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        k = min(self.k, len(self.bank))
        out = []
        for i in range(0, len(z), self.batch_size):
            sim = F.normalize(z[i:i + self.batch_size].float(), dim=1) @ self.bank.T  # [b, N] cosine
            s, idx = sim.topk(k, dim=1)
            votes = torch.zeros(len(s), self.n_classes, device=z.device)
            out.append(votes.scatter_add_(1, self.labels[idx], (s / self.temperature).exp()))
        return torch.cat(out) if out else torch.zeros(0, self.n_classes, device=z.device)


class LogRegProbe:
    """scikit-learn ``LogisticRegression`` on standardized embeddings: float [B, D] (any device) -> class
    probabilities float32 [B, n_classes] on the same device.

    ``fit`` standardizes with the training embeddings' mean/std (``StandardScaler``), fits one model per
    C in ``Cs`` on train, and keeps the one with the best val accuracy (ties: the smaller C, i.e. the
    stronger regularization). Selection never sees test. ``Cs``: a non-empty grid of C > 0 (``build_head``
    checks it against the gate, ``validation.VALUE_RULES``).
    """

    trainable = False

    def __init__(self, n_classes: int, Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), max_iter: int = 1000,
                 seed: int = 0):
        self.n_classes, self.Cs, self.max_iter, self.seed = n_classes, sorted(Cs), max_iter, seed
        self.model = None

    def fit(self, z: torch.Tensor, y: torch.Tensor, z_val: torch.Tensor, y_val: torch.Tensor) -> Dict[str, object]:
        """Fit on z float [N, D], y int64 [N]; choose C on (z_val, y_val). Returns {"C", "val_accuracy_by_C"}."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x, t = z.detach().cpu().numpy(), y.cpu().numpy()
        xv, tv = z_val.detach().cpu().numpy(), y_val.cpu().numpy()
        scores: Dict[str, float] = {}
        best = None
        for c in self.Cs:
            m = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=self.max_iter, random_state=self.seed))
            m.fit(x, t)
            acc = float((m.predict(xv) == tv).mean())
            scores[f"{c:g}"] = acc
            if best is None or acc > best[0]:
                best = (acc, c, m)
        self.model = best[2]
        return {"C": best[1], "val_accuracy_by_C": scores}

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        proba = self.model.predict_proba(z.detach().cpu().numpy())
        out = np.zeros((len(proba), self.n_classes), dtype=np.float32)
        out[:, self.model.classes_] = proba  # a class absent from train keeps probability 0
        return torch.from_numpy(out).to(z.device)

    def eval(self):  # the nn.Module calls classify makes on every head
        return self


def build_head(head_cfg, in_dim: int, n_classes: int, seed: int = 0):
    """Build the head named by ``head.name`` (see module docstring) from the ``head`` config.

    Returns an ``nn.Module`` (``mlp``, ``linear``: to train; ``knn``) or a ``LogRegProbe``.
    Raises ``EmbclfError`` with the gate's message (``validation.VALUE_RULES``, ``head.*``) for an unknown name or
    a bad setting: the entrypoint checked the whole config already; this is for direct callers.
    """
    check_group(head_cfg, "head", EmbclfError)
    name = head_cfg.name
    if name == "mlp":
        return MLPHead(in_dim, n_classes, list(head_cfg.hidden), head_cfg.dropout)
    if name == "linear":
        return MLPHead(in_dim, n_classes, (), head_cfg.dropout)
    if name == "knn":
        return KNNProbe(n_classes, head_cfg.k, head_cfg.temperature)
    assert name == "logreg", name  # the gate allows no other name
    return LogRegProbe(n_classes, list(head_cfg.C), head_cfg.max_iter, seed)


def is_trainable(name: str) -> bool:
    """True for heads trained by gradient descent (``mlp``, ``linear``)."""
    return name in TRAINABLE


def check_names(names: List[str], key: str) -> None:
    """Raise ``EmbclfError`` with the gate's message (``validation.VALUE_RULES[key]``) if any of ``names`` is not a
    head; ``key`` is ``head.name`` (one name) or ``classify.probes`` (a list)."""
    check_value(key, list(names) if key == "classify.probes" else names[0], EmbclfError)


def check_dropout(head_cfg) -> float:
    """``head.dropout`` after the gate's check (``validation.VALUE_RULES``); raises ``EmbclfError`` outside [0, 1)."""
    check_value("head.dropout", head_cfg.dropout, EmbclfError)
    return head_cfg.dropout
