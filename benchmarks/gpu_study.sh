#!/usr/bin/env bash
# The reference study at full size on one GPU, through the normal entrypoint and the local launcher:
# model=ae,vae x latent=32,64,128,256, stage=all, 80 autoencoder + 50 classifier epochs, all of CIFAR-10.
# Prints the wall time, training images/s, achieved TFLOP/s and the report table.
# PACKING=1 first runs the packing comparison: the conv AE (model=ae latent=64, stage=autoencode) as 1 job alone,
# PACK_JOBS jobs sharing GPU 0 time-sliced, the same under MPS (hydra.launcher.mps=on), each also with CUDA graphs
# (compile=true compile_mode=reduce-overhead); one line per variant, "VARIANT <name>: <aggregate img/s>" (from
# benchmarks/packing.py) or "VARIANT <name>: SKIP <why>" (MPS and CUDA graphs need a GPU). STUDY=0 skips the study.
#
#   bash benchmarks/gpu_study.sh                        # the study (defaults below)
#   PACKING=1 STUDY=0 bash benchmarks/gpu_study.sh      # the packing comparison only (~4-5 min on one H100, estimated)
#   MODELS=ae LATENTS=8 PRECISION=fp32 bash benchmarks/gpu_study.sh data.train_size=300 autoencode.epochs=1
#                                                       # a tiny end-to-end check (runs on a CPU too)
#
# Settings (environment): DATA (ImageFolder root; default data/cifar10 in the repo if present, else
# ../shared/data/cifar10), MODELS (ae,vae), LATENTS (32,64,128,256), JOBS_PER_GPU (8: all jobs share the
# GPU at once; one small conv AE leaves an H200 mostly idle), PRECISION (bf16), COMPILE (false), COMPILE_MODE
# (default; reduce-overhead: CUDA graphs, with COMPILE=true), PROBE_EVERY (10: autoencode.probe_every, the linear
# probe of the code during training, for figures/probe_vs_epoch.png; 0 = off), PY
# (python3), OUT (default outputs/gpu_study_<date>: the study's sweep dir is OUT/study, the packing runs are in
# OUT/packing, apart so that neither's summary or report counts the other's runs). Extra arguments are Hydra overrides
# passed to the sweep. Logging is logger=none (the GPU machine may have no wandb and no network).
# Packing (environment): PACKING (0), STUDY (1), PACK_JOBS (8), PACK_TRAIN_SIZE (20000 images), PACK_EPOCHS (3),
# PACK_GRAPHS (1: the CUDA-graph variants too). Extra arguments apply to the packing sweeps as well.
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
COMPILE_MODE=${COMPILE_MODE:-default}
OUT=${OUT:-outputs/gpu_study_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
echo "gpu_study: data $DATA, models $MODELS, latents $LATENTS, jobs_per_gpu $JOBS_PER_GPU, precision $PRECISION, compile $COMPILE -> $OUT"
# one torch start-up (~2 s of CPU) says both what runs and whether CUDA does (PACKING's variants ask)
TORCH=$("$PY" -c "import torch; c = torch.cuda.is_available(); print(int(c), 'torch', torch.__version__, '| cuda:', torch.cuda.get_device_name(0) if c else 'none')")
CUDA=${TORCH%% *}
echo "${TORCH#* }"

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

# 1b. the packing comparison (PACKING=1): aggregate training img/s per way of sharing one GPU
if [[ "${PACKING:-0}" == 1 ]]; then
  PACK_JOBS=${PACK_JOBS:-8}
  HAVE_MPS=0; command -v nvidia-cuda-mps-control >/dev/null 2>&1 && HAVE_MPS=1
  if [[ $CUDA == 1 ]]; then GPU_ARGS=("hydra.launcher.gpus=[0]"); else GPU_ARGS=("hydra.launcher.gpus=[]"); fi
  variant() {  # name, jobs, more overrides...
    local name=$1 n=$2 dir="$OUT/packing/$1"; shift 2
    local t0; t0=$(date +%s.%N)
    if "$PY" -m embclf -m model=ae latent=64 stage=autoencode data=folder "data.root=$DATA" logger=none \
        "precision=$PRECISION" "data.train_size=${PACK_TRAIN_SIZE:-20000}" "autoencode.epochs=${PACK_EPOCHS:-3}" \
        "autoencode.image_epochs=[]" "seed=$(seq -s, 1 "$n")" "${GPU_ARGS[@]}" "hydra.launcher.jobs_per_gpu=$n" \
        "hydra.launcher.max_parallel=$n" "hydra.sweep.dir=$dir" "output_dir=$dir" "$@" "${EXTRA[@]}" >"$dir.log" 2>&1; then
      local wall; wall=$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { print a - b }')
      # the ratio to the variant "alone" once it has run (one packing.py each: a failure of it is not hidden)
      local base=(); [[ $name != alone && -f "$OUT/packing/alone.json" ]] && base=(--baseline "$OUT/packing/alone.json")
      "$PY" benchmarks/packing.py "$dir" --label "$name" --wall "$wall" ${base[@]+"${base[@]}"} >"$dir.json"
      echo "VARIANT $name: $(head -1 "$dir.json" | sed "s/^[^:]*: //")"
    else
      echo "VARIANT $name: FAIL (log $dir.log)"; PACK_FAILED=1
    fi
  }
  EXTRA=("$@"); PACK_FAILED=0
  mkdir -p "$OUT/packing"
  GRAPHS=(compile=true compile_mode=reduce-overhead)
  variant alone 1 hydra.launcher.mps=off
  variant "$PACK_JOBS-time-sliced" "$PACK_JOBS" hydra.launcher.mps=off
  if [[ $CUDA == 1 && $HAVE_MPS == 1 ]]; then variant "$PACK_JOBS-mps" "$PACK_JOBS" hydra.launcher.mps=on
  else echo "VARIANT $PACK_JOBS-mps: SKIP (needs a GPU and nvidia-cuda-mps-control)"; fi
  for v in alone-graphs:1:off "$PACK_JOBS-time-sliced-graphs:$PACK_JOBS:off" "$PACK_JOBS-mps-graphs:$PACK_JOBS:on"; do
    IFS=: read -r name n m <<<"$v"
    if [[ $CUDA != 1 ]]; then echo "VARIANT $name: SKIP (CUDA graphs need a GPU)"
    elif [[ "${PACK_GRAPHS:-1}" != 1 ]]; then echo "VARIANT $name: SKIP (PACK_GRAPHS=0)"
    elif [[ $m == on && $HAVE_MPS != 1 ]]; then echo "VARIANT $name: SKIP (needs nvidia-cuda-mps-control)"
    else variant "$name" "$n" "hydra.launcher.mps=$m" "${GRAPHS[@]}"; fi
  done
fi
[[ "${STUDY:-1}" == 1 ]] || exit "${PACK_FAILED:-0}"

# 2. the sweep
"$PY" -m embclf -m "model=$MODELS" "latent=$LATENTS" stage=all data=folder "data.root=$DATA" logger=none \
  "precision=$PRECISION" "compile=$COMPILE" "compile_mode=$COMPILE_MODE" "hydra.launcher.jobs_per_gpu=$JOBS_PER_GPU" \
  "autoencode.probe_every=${PROBE_EVERY:-10}" "output_dir=$OUT/study" "hydra.sweep.dir=$OUT/study" "$@"
t2=$(date +%s.%N)

# 3. what it achieved, and the table
"$PY" benchmarks/study_summary.py "$OUT/study" --times "$t0" "$t1" "$t2"
"$PY" -m embclf.report "$OUT/study" --no-figures
