"""Hand-written run dirs for report tests: the files a real run writes (config.yaml, summary.json,
metrics.jsonl, images/), with chosen numbers and no training."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from embclf import runs
from embclf.config import Config

MODELS = {"ae": {"name": "ae", "variational": False}, "vae": {"name": "vae", "variational": True}}


def resolved_config(model: str = "ae", latent: int = 8, seed: int = 0, stage: str = "autoencode",
                    dotlist: Optional[List[str]] = None) -> dict:
    """A resolved config as runs.write_config stores it: the schema's defaults, the model group, overrides."""
    c = OmegaConf.structured(Config)
    c.model.name = model
    c.model.variational = MODELS[model]["variational"]
    c.latent, c.seed, c.stage = latent, seed, stage
    c.data.root = "/data/cifar10"
    c = OmegaConf.merge(c, OmegaConf.from_dotlist(dotlist or []))
    return runs.resolved(c)


def write_run(d: Path, cfg: dict, stage: str, summary: Dict, epochs: int = 3, end_time: Optional[float] = None,
              metrics: Optional[List[dict]] = None) -> Path:
    """One run dir: config.yaml, summary.json (status completed unless given) and metrics.jsonl."""
    d.mkdir(parents=True, exist_ok=True)
    (d / runs.CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    s = {"status": "completed", "stage": stage, "model": cfg["model"]["name"], "latent": cfg["latent"],
         "seed": cfg["seed"], "epochs": epochs, "wall_seconds": 10.0, "end_time": end_time or time.time(),
         "overrides": [], **summary}
    runs.write_json_atomic(d / runs.SUMMARY, s)
    if metrics is None:
        key = "psnr" if stage == "autoencode" else "accuracy"
        metrics = [{"epoch": e, "split": sp, key: 10.0 + e + (0.5 if sp == "val" else 0), "loss": 1.0 / e}
                   for e in range(1, epochs + 1) for sp in ("train", "val")]
    (d / runs.METRICS).write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return d


def ae_run(d: Path, model="ae", latent=8, seed=0, mse=0.02, dotlist=None, end_time=None) -> Path:
    cfg = resolved_config(model, latent, seed, "autoencode", dotlist)
    extra = {"test_kl": 5.0, "test_active_units": 8} if model == "vae" else {}
    return write_run(d, cfg, "autoencode", {"test_mse": mse, "test_psnr": 17.0, "final_test_mse": mse,
                                            "final_test_psnr": 17.0, "n_train": 270, "n_val": 30, "n_test": 100,
                                            **extra}, end_time=end_time)


def clf_run(d: Path, encoder: Path, acc: float, head: str = "mlp", dotlist=None, seed=None, end_time=None,
            probes: Optional[dict] = None, classes=("cat", "dog")) -> Path:
    enc_cfg = runs.read_config(encoder)
    cfg = resolved_config(enc_cfg["model"]["name"], enc_cfg["latent"], enc_cfg["seed"] if seed is None else seed,
                          "classify", [f"head.name={head}", *(dotlist or [])])
    extra = {"probes": probes} if probes else {}
    return write_run(d, cfg, "classify", {"encoder_run": str(encoder.resolve()), "head": head, "test_accuracy": acc,
                                          "val_accuracy": acc, "final_test_accuracy": acc,
                                          "per_class_accuracy": {c: acc for c in classes}, **extra},
                     end_time=end_time)
