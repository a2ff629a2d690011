#!/usr/bin/env bash
# The reference study at full size on one GPU, through the normal entrypoint and the local launcher:
# model=ae,vae x latent=32,64,128,256, stage=all, 80 autoencoder + 50 classifier epochs, all of CIFAR-10.
# Prints the wall time, training images/s, achieved TFLOP/s and the report table.
#
#   bash benchmarks/gpu_study.sh                        # the study (defaults below)
#   MODELS=ae LATENTS=8 PRECISION=fp32 bash benchmarks/gpu_study.sh data.train_size=300 autoencode.epochs=1
#                                                       # a tiny end-to-end check (runs on a CPU too)
#
# Settings (environment): DATA (ImageFolder root; default data/cifar10 in the repo if present, else
# ../shared/data/cifar10), MODELS (ae,vae), LATENTS (32,64,128,256), JOBS_PER_GPU (8: all jobs share the
# GPU at once; one small conv AE leaves an H200 mostly idle), PRECISION (bf16), COMPILE (false), PY
# (python3), OUT (the sweep dir; default outputs/gpu_study_<date>). Extra arguments are Hydra overrides
# passed to the sweep. Logging is logger=none (the GPU machine may have no wandb and no network).
#
# On a machine without hydra-core & co. (the device tool's H200), install the carried wheels first:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [[ -z "${DATA:-}" ]]; then
  if [[ -d data/cifar10/train ]]; then DATA=$PWD/data/cifar10; else DATA=$(cd .. && pwd)/shared/data/cifar10; fi
fi
MODELS=${MODELS:-ae,vae}
LATENTS=${LATENTS:-32,64,128,256}
JOBS_PER_GPU=${JOBS_PER_GPU:-8}
PRECISION=${PRECISION:-bf16}
COMPILE=${COMPILE:-false}
OUT=${OUT:-outputs/gpu_study_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
echo "gpu_study: data $DATA, models $MODELS, latents $LATENTS, jobs_per_gpu $JOBS_PER_GPU, precision $PRECISION, compile $COMPILE -> $OUT"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"

# 1. decode the JPEG tree once into embclf's data cache, so the jobs do not all decode it at the same time
t0=$(date +%s.%N)
"$PY" - "$DATA" "$@" <<'PY'
import sys
from hydra import compose, initialize_config_dir
from embclf import data
from embclf.config import conf_dir
data_overrides = [a for a in sys.argv[2:] if a.startswith("data.")]
with initialize_config_dir(config_dir=conf_dir(), version_base=None):
    cfg = compose("config", overrides=["data=folder", f"data.root={sys.argv[1]}", *data_overrides])
ds = data.load(cfg.data)
print(f"data: train {len(ds.train)}, val {len(ds.val)}, test {len(ds.test)} images")
PY
t1=$(date +%s.%N)

# 2. the sweep
"$PY" -m embclf -m "model=$MODELS" "latent=$LATENTS" stage=all data=folder "data.root=$DATA" logger=none \
  "precision=$PRECISION" "compile=$COMPILE" "hydra.launcher.jobs_per_gpu=$JOBS_PER_GPU" \
  "output_dir=$OUT" "hydra.sweep.dir=$OUT" "$@"
t2=$(date +%s.%N)

# 3. what it achieved, and the table
"$PY" benchmarks/study_summary.py "$OUT" --times "$t0" "$t1" "$t2"
"$PY" -m embclf.report "$OUT" --no-figures
