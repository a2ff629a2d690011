#!/usr/bin/env bash
# The first check on any GPU machine (~3-5 minutes on one H100): one line per check, "CHECK <name> PASS|FAIL|SKIP
# <why>", then a count. Exit status 1 when a check FAILs, else 0.
#
#   1. compute_mode   every GPU's compute mode and MIG mode (nvidia-smi): Default and no MIG, or what to do
#   2. cuda           CUDA usable by torch when a GPU is present (a GPU that CUDA cannot use FAILs, naming why)
#   3. shared_sweep   a 2-job forked sweep sharing GPU 0 in bf16: both jobs report device cuda, no fallback
#   4. packing        one job alone vs JOBS jobs sharing GPU 0: aggregate training img/s of each, and the ratio
#   5. host_syncs     host syncs per epoch under torch.cuda.set_sync_debug_mode("warn"): the same count with
#                     10x the steps (no sync per step)
#
#   bash benchmarks/gpu_check.sh                       # on a GPU machine (the defaults below)
#   RUN_ON_CPU=1 JOBS=2 TRAIN_SIZE=300 EPOCHS=2 bash benchmarks/gpu_check.sh data.test_size=100
#                                                      # the whole script on a CPU (the sweeps run, their verdict is SKIP)
#
# Settings (environment): DATA (ImageFolder root, as gpu_study.sh), PY (python3), OUT (default
# outputs/gpu_check_<date>), PRECISION (bf16), JOBS (8), TRAIN_SIZE (20000 images), EPOCHS (3), RUN_ON_CPU (0:
# without a GPU the GPU checks SKIP without running; 1: they run on the CPU all the same, verdict SKIP). Extra
# arguments are Hydra overrides for every sweep. Checks 3-5 train the conv AE (model=ae, latent=64).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [[ -z "${DATA:-}" ]]; then
  if [[ -d data/cifar10/train ]]; then DATA=$PWD/data/cifar10; else DATA=$(cd .. && pwd)/shared/data/cifar10; fi
fi
PRECISION=${PRECISION:-bf16}
JOBS=${JOBS:-8}
TRAIN_SIZE=${TRAIN_SIZE:-20000}
EPOCHS=${EPOCHS:-3}
RUN_ON_CPU=${RUN_ON_CPU:-0}
OUT=${OUT:-outputs/gpu_check_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PASS=0; FAIL=0; SKIP=0
verdict() {  # name, PASS|FAIL|SKIP, why
  printf 'CHECK %-13s %-4s %s\n' "$1" "$2" "$3"
  case $2 in PASS) PASS=$((PASS + 1));; FAIL) FAIL=$((FAIL + 1));; *) SKIP=$((SKIP + 1));; esac
}
echo "gpu_check: data $DATA, precision $PRECISION, $JOBS jobs, $TRAIN_SIZE images x $EPOCHS epochs -> $OUT"
COMMON=(model=ae latent=64 stage=autoencode data=folder "data.root=$DATA" logger=none "precision=$PRECISION"
        "data.train_size=$TRAIN_SIZE" "autoencode.epochs=$EPOCHS" "autoencode.image_epochs=[]")

# 1. compute mode and MIG
GPUS=""
if command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi --query-gpu=index,name,compute_mode,mig.mode.current --format=csv,noheader 2>&1) || GPUS=""
fi
if [[ -z "$GPUS" ]]; then
  verdict compute_mode SKIP "no NVIDIA GPU (nvidia-smi absent or lists none)"
else
  bad=$(echo "$GPUS" | awk -F', *' '$3 != "Default" || $4 == "Enabled"')
  if [[ -z "$bad" ]]; then
    verdict compute_mode PASS "$(echo "$GPUS" | awk -F', *' '{printf "%sGPU %s %s: %s, MIG %s", sep, $1, $2, $3, $4; sep="; "}')"
  else
    verdict compute_mode FAIL "$(echo "$bad" | tr '\n' ';') -- Exclusive_Process takes one process per GPU: use hydra.launcher.jobs_per_gpu=1 or hydra.launcher.mps=on; Prohibited: no CUDA at all; MIG enabled: the launcher hands out whole GPUs, so disable MIG (nvidia-smi -mig 0) or list MIG UUIDs yourself"
  fi
fi

# 2. CUDA usable
CUDA_MSG=$("$PY" - <<'PY' 2>&1
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use CUDA")
x = torch.randn(256, 256, device="cuda")
(x @ x).sum().item()
print(f"{torch.cuda.get_device_name(0)}, capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))}, "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
PY
)
if [[ $? -eq 0 ]]; then CUDA=1; verdict cuda PASS "$CUDA_MSG"
else
  CUDA=0
  if [[ -n "$GPUS" ]]; then verdict cuda FAIL "nvidia-smi lists a GPU but ${CUDA_MSG##*$'\n'} (driver too old for the wheel's CUDA? a container without --gpus?)"
  else verdict cuda SKIP "no NVIDIA GPU: ${CUDA_MSG##*$'\n'}"; fi
fi
RUN=$CUDA; [[ "$RUN_ON_CPU" == 1 ]] && RUN=1
if [[ $CUDA == 1 ]]; then GPU_ARGS=("hydra.launcher.gpus=[0]"); else GPU_ARGS=("hydra.launcher.gpus=[]"); fi

sweep() {  # dir, jobs per GPU (CPU: parallel jobs), seeds, more overrides...; prints the wall seconds
  local dir=$1 per=$2 seeds=$3; shift 3
  local t0; t0=$(date +%s.%N)
  "$PY" -m embclf -m "${COMMON[@]}" "seed=$seeds" "${GPU_ARGS[@]}" "hydra.launcher.jobs_per_gpu=$per" \
    "hydra.launcher.max_parallel=$per" "hydra.sweep.dir=$dir" "output_dir=$dir" "$@" "${EXTRA[@]}" >"$dir.log" 2>&1
  local rc=$?
  awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { print a - b }'
  return $rc
}
EXTRA=("$@")

# 3. a 2-job forked sweep sharing GPU 0
if [[ $RUN == 0 ]]; then verdict shared_sweep SKIP "needs a usable GPU"
else
  ws=$(sweep "$OUT/shared" 2 1,2)
  rc=$?
  r=$("$PY" - "$OUT/shared" <<'PY'
import sys
from embclf import references, runs
s = [runs.read_summary(d) or {} for d in references.iter_run_dirs(sys.argv[1])]
print(len(s), sum(x.get("status") == "completed" for x in s), ",".join(sorted({str(x.get("device")) for x in s})),
      any(x.get("device_fallback") for x in s), ",".join(sorted({str(x.get("precision")) for x in s})))
PY
)
  read -r n ok devs fallback precs <<<"$r"
  forked=$(grep -c "workers forked from the launcher" "$OUT/shared.log")
  why="$ok/$n jobs completed on $devs ($precs), fallback $fallback, forked workers: $([[ $forked -gt 0 ]] && echo yes || echo no) (log $OUT/shared.log)"
  if [[ $CUDA == 0 ]]; then verdict shared_sweep SKIP "no GPU; ran on the CPU: $why"
  elif [[ $rc -eq 0 && "$n" == 2 && "$ok" == 2 && "$devs" == cuda* && "$fallback" == False && $forked -gt 0 ]]; then
    verdict shared_sweep PASS "$why"
  else verdict shared_sweep FAIL "$why"; fi
fi

# 4. one job alone vs JOBS jobs sharing GPU 0
if [[ $RUN == 0 ]]; then verdict packing SKIP "needs a usable GPU"
else
  w1=$(sweep "$OUT/alone" 1 1); rc1=$?
  # JOBS=2 (the CPU recipe above): that sweep is the shared one of check 3 (seeds 1,2, 2 per GPU); not run twice
  if [[ "$JOBS" == 2 ]]; then packed=$OUT/shared wn=$ws rcn=$rc
  else packed=$OUT/packed; wn=$(sweep "$packed" "$JOBS" "$(seq -s, 1 "$JOBS")"); rcn=$?; fi
  "$PY" benchmarks/packing.py "$OUT/alone" --label "1 job alone" --wall "$w1" >"$OUT/alone.json"
  "$PY" benchmarks/packing.py "$packed" --label "$JOBS jobs" --wall "$wn" --baseline "$OUT/alone.json" >"$OUT/packed.json"
  why="$(head -1 "$OUT/alone.json" | sed "s/^[^:]*: //"); $(head -1 "$OUT/packed.json" | sed "s/^[^:]*: //")"
  ratio=$("$PY" -c 'import json, sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["ratio"])' "$OUT/packed.json")
  if [[ $CUDA == 0 ]]; then verdict packing SKIP "no GPU; ran on the CPU: $why"
  elif [[ $rc1 -ne 0 || $rcn -ne 0 ]]; then verdict packing FAIL "a sweep failed (logs $OUT/alone.log, $packed.log): $why"
  elif awk -v r="$ratio" 'BEGIN { exit !(r >= 1.5) }'; then verdict packing PASS "$why"
  else verdict packing FAIL "$why -- packing gains little (time-sliced); compare hydra.launcher.mps=on and compile_mode=reduce-overhead with PACKING=1 bash benchmarks/gpu_study.sh"; fi
fi

# 5. host syncs per epoch
if [[ $CUDA == 0 ]]; then verdict host_syncs SKIP "needs CUDA (torch.cuda.set_sync_debug_mode)"
else
  r=$("$PY" - "$OUT/syncs" "$DATA" "$PRECISION" "${EXTRA[@]}" <<'PY' 2>"$OUT/syncs.log"
import sys, warnings
from pathlib import Path
import torch
from hydra import compose, initialize_config_dir
from embclf.config import conf_dir
from embclf.stages import autoencode

def syncs(name, batch):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", overrides=["model=ae", "data=folder", f"data.root={sys.argv[2]}", "logger=none",
                                           f"precision={sys.argv[3]}", "data.train_size=2000", "autoencode.epochs=2",
                                           f"autoencode.batch_size={batch}", f"autoencode.eval_batch_size={batch}",
                                           "autoencode.image_epochs=[]", f"output_dir={sys.argv[1]}",
                                           *[a for a in sys.argv[4:] if a.startswith("data.")]])
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        autoencode.run(cfg, Path(sys.argv[1]) / name, [])
    torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(x.message) for x in w) / 2  # per epoch

print(syncs("few", 200), syncs("many", 20))
PY
)
  if [[ $? -ne 0 ]]; then verdict host_syncs FAIL "the stage failed (log $OUT/syncs.log)"
  else
    read -r few many <<<"$r"
    if [[ "$few" == "$many" ]]; then verdict host_syncs PASS "$few syncs per epoch with 9 or 90 steps per epoch (none per step)"
    else verdict host_syncs FAIL "$few syncs per epoch with 9 steps, $many with 90: a sync per step (log $OUT/syncs.log)"; fi
  fi
fi

echo "gpu_check: $PASS PASS, $FAIL FAIL, $SKIP SKIP ($OUT)"
[[ $FAIL -eq 0 ]]
