"""report.md's protocol card: the protocol the table's numbers follow, read from the reported runs.

The probe (the main head and its settings, classify epochs, learning rate and grid, early stopping, what is
selected on val), the autoencoder's checkpoint selection, the PSNR and objective conventions (fixed by
``embclf/losses.py``), the data (source, root, sizes, the SHA-1 of the decoded pixels) and the code version
(the git commit in each summary's ``provenance``). When the used runs differ in any protocol key, the card
names the keys and their values (``protocol_differences``), e.g. ``classify.epochs`` (20, 50): numbers from
different protocols are not directly comparable, although each row is correct for its own."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List

from .rows import _short

# settings that define how a number is measured (the rest of a row's settings are what is compared)
PREFIXES = ("head.", "classify.", "data.")
KEYS = ("autoencode.select_on",)
CODE, DATA = "code version", "data fingerprint"


def _used(rows: List[dict]) -> List[dict]:
    return [r for r in rows if r.get("status") == "completed" and r.get("used", True)]


def protocol_values(rows: List[dict]) -> Dict[str, List[str]]:
    """Every protocol key of the used, completed rows (``rows.collect``) -> its distinct values in first-seen
    order, as a row label writes them (``rows._short``; strings such as paths in full): the ``head.*``,
    ``classify.*`` and ``data.*`` settings, ``autoencode.select_on``, and ``code version`` (``rows.code_version`` of both stages' summaries)
    and ``data fingerprint`` (the first 12 hex digits of each summary's data SHA-1). A row that lacks a key (no
    classify run: no ``head.*``) adds no value; a run that did not record its code or data adds none."""
    vals: Dict[str, Dict[str, None]] = OrderedDict()
    for r in _used(rows):
        c = r.get("config") or {}
        for k in sorted(c):
            if k.startswith(PREFIXES) or k in KEYS:
                # paths in full (two data roots of one basename differ), the rest as a label writes them
                vals.setdefault(k, OrderedDict())[c[k] if isinstance(c[k], str) else _short(k, c[k])] = None
        for name, fields, width in ((CODE, ("code_version", "classify_code_version"), None),
                                    (DATA, ("data_fingerprint", "classify_data_fingerprint"), 12)):
            for f in fields:
                if r.get(f):
                    vals.setdefault(name, OrderedDict())[str(r[f])[:width]] = None
    return {k: list(v) for k, v in vals.items()}


def protocol_differences(rows: List[dict]) -> Dict[str, List[str]]:
    """The protocol keys (``protocol_values``) with more than one value among the used, completed rows -> their
    values. Empty when every reported run follows one protocol."""
    return {k: v for k, v in protocol_values(rows).items() if len(v) > 1}


def protocol_card(rows: List[dict]) -> List[str]:
    """report.md's "Protocol" section (markdown lines) for the rows of ``rows.collect``; empty when no run
    completed (no number to describe). Values that differ between runs are joined by " / " and listed again
    at the end with their keys."""
    if not _used(rows):
        return []
    vals = protocol_values(rows)

    def v(key: str, default: str = "—") -> str:
        return " / ".join(f"`{x}`" for x in vals[key]) if vals.get(key) else default

    cfgs = [r.get("config") or {} for r in _used(rows)]
    vae = [c for c in cfgs if c.get("model.variational")]
    betas = " / ".join(OrderedDict((_short("model.beta", c.get("model.beta")), None) for c in vae))
    extra = []
    if any(c.get("model.ce_weight") for c in cfgs):
        extra.append("γ·CE of a joint linear head (`model.ce_weight`)")
    if any(c.get("model.decorrelation_weight") for c in cfgs):
        extra.append("λ·R, the decorrelation penalty (`model.decorrelation_weight`)")
    if any(c.get("model.kl_warmup_epochs") for c in vae):
        extra.append("β ramped up over `model.kl_warmup_epochs`")
    sizes = OrderedDict((f"{r.get('n_train')} / {r.get('n_val')} / {r.get('n_test')}", None) for r in _used(rows)
                        if r.get("n_train") is not None)
    has_head = "head.name" in vals
    md = ["## Protocol", "", "What every number in the tables follows (read from the runs' config.yaml and "
          "summary.json):", ""]
    mlp = "head.hidden" in vals and "mlp" in vals.get("head.name", [])
    if has_head:
        md += [f"- **probe** (the `test acc` column): head {v('head.name')}"
               + (f" (hidden {v('head.hidden')}, dropout {v('head.dropout')})" if mlp else "")
               + " on the frozen codes of the encoder's best-on-val checkpoint. Trainable heads: "
               f"`classify.epochs` {v('classify.epochs')}, `classify.batch_size` {v('classify.batch_size')}, "
               f"Adam `classify.lr` {v('classify.lr')}, `classify.weight_decay` {v('classify.weight_decay')}, "
               f"`classify.lr_grid` {v('classify.lr_grid')} (`[]`: `classify.lr` alone), `classify.patience` "
               f"{v('classify.patience')} (`null`: no early stopping). **Selected on val**: the epoch (and the "
               "grid's lr) with the best val accuracy; its test accuracy is reported (knn is fitted once; logreg's "
               "C is chosen on val from `head.C`)"
               + (f"; more probes on the same codes: {v('classify.probes')}" if vals.get("classify.probes")
                  and vals["classify.probes"] != ["[]"] else "") + "."]
    md += [f"- **autoencoder checkpoint**: the epoch with the lowest val `autoencode.select_on` "
           f"({v('autoencode.select_on')}); its test MSE, PSNR and KL are reported.",
           "- **PSNR**: the mean over test images of each image's PSNR, 10·log10(1 / MSE_image) dB with data range 1 "
           "(pixels in [0, 1]; `embclf.losses.psnr_from_sse`). Not the PSNR of the MSE pooled over all images "
           "(torchmetrics' `peak_signal_noise_ratio(data_range=1.0)` with its default `dim=None`), which is lower: "
           "by 0.49 dB on the quick preset's AE and VAE at latent 64 (`benchmarks/psnr_conventions.py`; "
           "docs/report.md, \"Why the PSNR convention matters\").",
           "- **objective** (`embclf.losses`): per image, the squared error summed over its C·H·W values (SSE)"
           + (f", plus β·KL for a VAE (KL in nats per image, summed over latent dims; β = `model.beta`: {betas})"
              if vae else "")
           + (f", plus {', '.join(extra)}" if extra else "") + "; averaged over the batch.",
           f"- **data**: {v('data.source')} from {v('data.root')}; train / val / test images "
           f"{', '.join(sizes) or '?'} (`data.train_size` {v('data.train_size')}, `data.val_size` "
           f"{v('data.val_size')}, `data.test_size` {v('data.test_size')}, `data.subset_seed` "
           f"{v('data.subset_seed')}); decoded pixels' SHA-1 {v(DATA, 'not recorded')}.",
           f"- **code**: {v(CODE, 'not recorded in the summaries')} (embclf's git commit; `+dirty`: with "
           "uncommitted changes)."]
    diff = protocol_differences(rows)
    if diff:
        md += ["- **the reported runs differ in protocol**: "
               + "; ".join(f"`{k}` ({', '.join(vs)})" for k, vs in diff.items())
               + ". Rows measured under different protocols are not directly comparable."]
    else:
        md += ["- All reported runs follow one protocol: every key above has one value in every run."]
    return md + [""]
