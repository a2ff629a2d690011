"""stage=classify: a head on the frozen embeddings of a trained autoencoder. Readable top to bottom.

1. Find the encoder: ``classify.encoder`` (a run dir or a checkpoint) or else the newest completed
   autoencode run under ``output_dir`` whose data, model, latent, seed and ``autoencode.*`` equal ours.
2. Encode train/val/test once with the frozen encoder in eval mode (a VAE's embedding is its posterior
   mean mu, so embeddings are deterministic) and save them as embeddings.pt.
3. Train the head (cross-entropy, Adam, cosine annealing per epoch), keep the best epoch on val accuracy.
4. Report test accuracy (best-on-val head: ``test_accuracy``; last epoch: ``final_test_accuracy``),
   per-class accuracy and the confusion matrix (JSON and images/confusion.png).
5. Project the test embeddings to 2-D (images/pca.png, tsne.png, umap.png; ``embclf.plots``) and log them,
   a table of test embeddings and the confusion matrix to the tracker (wandb, ``embclf.tracking``).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

from .. import data as data_mod
from .. import losses, plots, runs, runtime, tracking
from ..heads import build_head
from ..models import build_model

log = logging.getLogger(__name__)


def resolve_encoder(cfg) -> Path:
    """Path of the encoder checkpoint to use (see module docstring).

    Raises ``runtime.EmbclfError`` when the given path holds no checkpoint, or when no matching run exists
    (naming the identity searched and the command that trains it).
    """
    given = cfg.classify.encoder
    if given:
        p = Path(str(given)).expanduser()
        ck = p / "checkpoints" / "best.pt" if p.is_dir() else p
        if not ck.is_file():
            raise runtime.EmbclfError(
                f"classify.encoder={given}: no checkpoint there (expected an autoencode run dir with "
                "checkpoints/best.pt, or a .pt file). Point it at a completed autoencode run.")
        return ck
    out = Path(str(cfg.output_dir))
    found = runs.find_encoder_run(cfg, out)
    if found is None:
        ident = runs.encoder_identity(cfg)
        ae = ident["autoencode"]
        d = ident["data"]
        # every setting that makes the identity, so the printed command really trains the missing encoder
        keys = [f"data={d['source']}"] + [f"data.{k}={_q(v)}" for k, v in d.items() if k != "source"] + \
               [f"autoencode.{k}={_q(v)}" for k, v in ae.items()] + \
               ([f"debug={ident['debug']}"] if ident["debug"] != "none" else [])
        raise runtime.EmbclfError(
            f"stage=classify found no completed autoencode run under output_dir={out} matching model={ident['model']['name']} "
            f"latent={ident['latent']} seed={ident['seed']} data={d['source']} (root {d['root']}, train_size "
            f"{d['train_size']}, test_size {d['test_size']}, val_size {d['val_size']}) autoencode.epochs={ae['epochs']} "
            f"batch_size={ae['batch_size']} lr={ae['lr']}. Train it first with the same command line and stage=autoencode "
            f"(or run stage=all), e.g. `python -m embclf stage=autoencode model={ident['model']['name']} "
            f"latent={ident['latent']} seed={ident['seed']} {' '.join(keys)} output_dir={out}`, "
            "or pass classify.encoder=PATH (a run dir or checkpoint).")
    return found / "checkpoints" / "best.pt"


def _q(v) -> str:
    """A config value as a Hydra override value (lists without spaces, null for None)."""
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_q(x) for x in v) + "]"
    return str(v)


@torch.no_grad()
def embed(encoder, split: data_mod.Split, device, batch_size: int, precision: str = "fp32") -> torch.Tensor:
    """Embeddings of a split: float32 [N, latent] (mu for a VAE), on the CPU.

    The split's images are moved to ``device`` once; the batches' embeddings stay there and come back to
    the host in one copy at the end (no per-batch sync)."""
    encoder.eval()
    device = torch.device(device)
    images = split.images.to(device)
    fmt = runtime.memory_format(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = data_mod.to_float(images[i:i + batch_size]).contiguous(memory_format=fmt)
        with runtime.autocast(device, precision):
            out.append(encoder.encode(x)[0].float())
    return torch.cat(out).cpu()


@torch.no_grad()
def _eval(head, z, y, batch_size: int):
    """Cross-entropy (nats) and accuracy of ``head`` on embeddings z [N, latent] with labels y [N]; one
    host read. Returns ({"loss", "accuracy"}, logits [N, classes] on z's device)."""
    head.eval()
    logits = torch.cat([head(z[i:i + batch_size]) for i in range(0, len(z), batch_size)])
    loss, acc = torch.stack([losses.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()]).tolist()
    return {"loss": loss, "accuracy": acc}, logits


def save_confusion_png(cm, classes: List[str], path: Path, title: str) -> None:
    """Confusion matrix (rows: true class, columns: predicted) as a PNG, via scikit-learn's display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(7, 6))
    ConfusionMatrixDisplay(cm, display_labels=classes).plot(ax=ax, xticks_rotation=45, colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_head_epoch(head, opt, z: torch.Tensor, y: torch.Tensor, batch_size: int,
                     generator: torch.Generator) -> torch.Tensor:
    """One epoch of cross-entropy training of ``head`` on embeddings z float32 [N, latent] with labels
    y int64 [N] (both on the device), in the random order drawn from ``generator``.

    Returns fp32 [2] on the device: the epoch's summed cross-entropy (nats) and number of correct
    predictions; nothing is read back to the host inside the loop."""
    head.train()
    sums = torch.zeros(2, device=z.device)
    for idx in data_mod.batches(len(z), batch_size, z.device, shuffle=True, generator=generator):
        logits = head(z[idx])
        loss = losses.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            sums += torch.stack([loss.detach() * len(idx), (logits.argmax(1) == y[idx]).sum().float()])
    return sums


def run(cfg, run_dir: Path, overrides: List[str], encoder: Optional[Path] = None) -> Path:
    """Train ``cfg.head`` on the embeddings of the matching (or given) encoder into ``run_dir``.

    Raises ``runtime.EmbclfError`` (no encoder) or ``data.DataError`` (bad data config).
    """
    from sklearn.metrics import confusion_matrix

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if runs.is_completed(run_dir, cfg):
        log.info("%s already completed with this config; nothing to do", run_dir)
        return run_dir
    cc = cfg.classify
    if int(cc.epochs) < 1:
        raise runtime.EmbclfError(f"classify.epochs={cc.epochs} must be at least 1.")
    summary = runs.base_summary(cfg, "classify", overrides)
    ckpt_path = (Path(encoder) / "checkpoints" / "best.pt") if encoder else resolve_encoder(cfg)
    encoder_run = ckpt_path.parent.parent
    log.info("encoder: %s", ckpt_path)
    # read onto the CPU (weights_only: a checkpoint is data, never code); a file of another kind fails here
    ck = runs.load_checkpoint(ckpt_path, ("model", "config", "state"),
                              "classify.encoder" if cfg.classify.encoder else "encoder checkpoint")
    ds = data_mod.load(cfg.data)
    # bad input has failed by now; only from here on does the run dir hold a config and a summary
    runs.write_config(run_dir, cfg)
    runs.write_json_atomic(run_dir / runs.SUMMARY, summary)

    env = runtime.setup(cfg)
    device = env["device"]
    enc_cfg = ck["config"]
    if (enc_cfg["model"]["name"], int(enc_cfg["latent"])) != (cfg.model.name, int(cfg.latent)):
        log.warning("classify.encoder is a model=%s latent=%d encoder; the command line's model=%s latent=%d "
                    "do not apply (summary.json records the encoder's)", enc_cfg["model"]["name"],
                    int(enc_cfg["latent"]), cfg.model.name, int(cfg.latent))
    model = build_model(OmegaConf.create(enc_cfg["model"]), int(enc_cfg["latent"]), int(enc_cfg["data"]["image_size"]))
    model.load_state_dict(ck["model"])  # CPU weights; then onto the device
    model.to(device, memory_format=runtime.memory_format(device)).eval().requires_grad_(False)
    summary.update(encoder_run=str(encoder_run.resolve()), encoder_checkpoint=str(ckpt_path.resolve()),
                   encoder_epoch=int(ck["state"]["epoch"]), model=enc_cfg["model"]["name"],
                   latent=int(enc_cfg["latent"]), device=str(device), device_name=env["name"],
                   device_fallback=env["fallback"], head=cfg.head.name,
                   provenance=tracking.provenance(cfg, ds.fingerprint, env["name"]))

    emb_path = run_dir / "embeddings.pt"
    summary["data_fingerprint"] = ds.fingerprint
    runs.write_json_atomic(run_dir / runs.SUMMARY, summary)  # a failure from here on keeps the encoder and provenance
    tracker = tracking.start(cfg, run_dir, "classify", encoder_cfg=enc_cfg)  # wandb (or nothing); closed by finish below
    if emb_path.is_file():  # computed once per run dir; a resumed job reuses them
        emb = runs.load_checkpoint(emb_path, ("train", "val", "test", "classes"), "embeddings")
    else:
        t0 = time.time()
        prec = enc_cfg.get("precision", "fp32")  # embed as the encoder was trained
        emb = {s: {"z": embed(model, ds.split(s), device, 1000, prec), "labels": ds.split(s).labels.clone()}
               for s in ("train", "val", "test")}
        emb["classes"] = ds.classes
        runs.save_atomic(emb, emb_path)
        log.info("embedded %d images in %.1fs", sum(len(emb[s]["z"]) for s in ("train", "val", "test")), time.time() - t0)
    z = {s: emb[s]["z"].to(device) for s in ("train", "val", "test")}
    y = {s: emb[s]["labels"].to(device) for s in ("train", "val", "test")}
    classes = list(emb["classes"])

    torch.manual_seed(int(cfg.seed))
    head = build_head(cfg.head, z["train"].shape[1], len(classes)).to(device)
    if hasattr(head, "fit_standardizer"):
        head.fit_standardizer(z["train"])
    opt = runtime.adam(head.parameters(), device, float(cc.lr), float(cc.weight_decay))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(cc.epochs))
    g = torch.Generator().manual_seed(int(cfg.seed))
    best_acc, best_epoch = -math.inf, 0
    ckpt_dir = run_dir / "checkpoints"
    for epoch in range(1, int(cc.epochs) + 1):
        t0 = time.time()
        lr = opt.param_groups[0]["lr"]
        tot_loss, tot_correct = train_head_epoch(head, opt, z["train"], y["train"], int(cc.batch_size), g).tolist()
        sched.step()
        n = len(z["train"])
        train_m = {"loss": tot_loss / n, "accuracy": tot_correct / n}
        val_m, _ = _eval(head, z["val"], y["val"], 4096)
        runs.append_metrics(run_dir, {"epoch": epoch, "split": "train", **train_m, "lr": lr, "seconds": time.time() - t0})
        runs.append_metrics(run_dir, {"epoch": epoch, "split": "val", **val_m, "lr": lr})
        tracker.log_epoch(epoch, train=train_m, val=val_m, lr=lr)
        log.info("epoch %d/%d  train ce %.4f acc %.4f | val ce %.4f acc %.4f", epoch, cc.epochs,
                 train_m["loss"], train_m["accuracy"], val_m["loss"], val_m["accuracy"])
        if val_m["accuracy"] > best_acc:
            best_acc, best_epoch = val_m["accuracy"], epoch
            runs.save_atomic({"head": head.state_dict(), "epoch": epoch, "val": val_m, "config": runs.resolved(cfg)},
                             ckpt_dir / "best.pt")
        runs.save_atomic({"head": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "epoch": epoch, "config": runs.resolved(cfg)}, ckpt_dir / "last.pt")

    final_m, _ = _eval(head, z["test"], y["test"], 4096)
    runs.append_metrics(run_dir, {"epoch": int(cc.epochs), "split": "test", **final_m})
    best = runs.load_checkpoint(ckpt_dir / "best.pt", ("head", "val"), "best head checkpoint")
    head.load_state_dict(best["head"])
    test_m, logits = _eval(head, z["test"], y["test"], 4096)
    pred = logits.argmax(1).cpu().numpy()
    true = y["test"].cpu().numpy()
    cm = confusion_matrix(true, pred, labels=list(range(len(classes))))
    per_class = {c: float(cm[i, i] / max(1, cm[i].sum())) for i, c in enumerate(classes)}
    save_confusion_png(cm, classes, run_dir / "images" / "confusion.png",
                       f"{enc_cfg['model']['name']} z{enc_cfg['latent']} {cfg.head.name}: test acc {test_m['accuracy']:.3f}")
    lc = cfg.logger
    images = plots.save_projections(emb["test"]["z"].numpy(), true, classes, run_dir / "images", list(lc.projections),
                                    int(lc.projection_points), f"{enc_cfg['model']['name']}-z{enc_cfg['latent']}",
                                    seed=int(cfg.seed))
    tracker.log_images(int(cc.epochs), confusion=run_dir / "images" / "confusion.png", **images)
    tracker.log_embeddings(emb["test"]["z"].numpy(), true, classes, int(lc.wandb.table_rows), seed=int(cfg.seed))
    tracker.log_confusion(true, pred, classes)
    summary.update(status="completed", best_epoch=best_epoch, test_accuracy=test_m["accuracy"], test_loss=test_m["loss"],
                   val_accuracy=best["val"]["accuracy"], final_test_accuracy=final_m["accuracy"],
                   per_class_accuracy=per_class, confusion_matrix=cm.tolist(), classes=classes, end_time=time.time())
    summary["wall_seconds"] = summary["end_time"] - summary["start_time"]
    runs.write_json_atomic(run_dir / runs.SUMMARY, summary)
    tracker.finish(summary)
    log.info("test accuracy %.4f (best epoch %d on val %.4f); final-epoch test accuracy %.4f",
             test_m["accuracy"], best_epoch, best_acc, final_m["accuracy"])
    return run_dir
