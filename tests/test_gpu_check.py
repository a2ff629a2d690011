"""benchmarks/gpu_check.sh (the first check on a GPU machine) and gpu_study.sh's packing comparison, on this CPU:
without a GPU every GPU check prints SKIP; with a fake ``nvidia-smi`` that lists a GPU CUDA cannot use, the
compute-mode and CUDA checks FAIL, naming why; with ``RUN_ON_CPU=1`` and a tiny override the sweeps run end to end.
The scripts' ``python`` (PY) is ``conftest.zygote_python``: each of their ~15 Python commands is a child of the test
zygote instead of a fresh interpreter (~4.5 s of CPU each for torch, torchvision and scikit-learn)."""
import json
import os
import re
import stat
import subprocess

import pytest

from conftest import REPO, embclf_env, zygote_python

TINY_MODEL = ["data.test_size=100", "autoencode.batch_size=50", "model.channels=[8,16]", "model.strides=[2,2]",
              "data.image_size=16"]


def _run(script, tmp_path, cifar_root, args=(), path_prefix=None, **env_vars):
    env = embclf_env(tmp_path)
    # the scripts' python: children of the test zygote (conftest.zygote_python), not ~15 fresh interpreters
    env.update(PY=zygote_python(tmp_path), OUT=str(tmp_path / "out"), DATA=str(cifar_root), PRECISION="fp32",
               **env_vars)
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(REPO / "benchmarks" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)


def _checks(out):
    return dict(re.findall(r"^CHECK (\S+)\s+(PASS|FAIL|SKIP)", out, re.M))


@pytest.mark.slow  # the bash script and its fresh interpreters
def test_gpu_check_without_a_gpu_skips_every_gpu_check(tmp_path, cifar_root):
    proc = _run("gpu_check.sh", tmp_path, cifar_root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _checks(proc.stdout) == dict.fromkeys(("compute_mode", "cuda", "shared_sweep", "packing", "host_syncs"),
                                                 "SKIP")
    assert "gpu_check: 0 PASS, 0 FAIL, 5 SKIP" in proc.stdout


@pytest.mark.slow  # the bash script and its fresh interpreters
def test_gpu_check_names_an_exclusive_mig_gpu_cuda_cannot_use(tmp_path, cifar_root):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, Exclusive_Process, Enabled'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    proc = _run("gpu_check.sh", tmp_path, cifar_root, path_prefix=bin_dir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = {ln.split()[1]: ln for ln in proc.stdout.splitlines() if ln.startswith("CHECK ")}
    assert "FAIL" in lines["compute_mode"] and "Exclusive_Process" in lines["compute_mode"]
    assert "hydra.launcher.mps=on" in lines["compute_mode"] and "MIG" in lines["compute_mode"]
    assert "FAIL" in lines["cuda"] and "nvidia-smi lists a GPU but" in lines["cuda"]
    assert "gpu_check: 0 PASS, 2 FAIL, 3 SKIP" in proc.stdout


@pytest.mark.slow
def test_gpu_check_runs_its_sweeps_end_to_end_on_cpu(tmp_path, cifar_root):
    proc = _run("gpu_check.sh", tmp_path, cifar_root, TINY_MODEL, RUN_ON_CPU="1", JOBS="2", TRAIN_SIZE="300",
                EPOCHS="2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = {ln.split()[1]: ln for ln in proc.stdout.splitlines() if ln.startswith("CHECK ")}
    assert "2/2 jobs completed on cpu (fp32), fallback False, forked workers: yes" in lines["shared_sweep"]
    assert re.search(r"1 job\(s\) on cpu, \d+ img/s aggregate.*2 job\(s\) on cpu, \d+ img/s aggregate = [\d.]+x 1 job "
                     r"alone", lines["packing"]), lines["packing"]
    assert all("SKIP" in ln for ln in lines.values())


@pytest.mark.slow
def test_gpu_study_packing_comparison_and_study_run_on_cpu(tmp_path, cifar_root):
    """gpu_study.sh with PACKING=1: the packing variants (the CUDA ones SKIP on a CPU), then the study itself (a
    stage=all sweep, its summary with achieved TFLOP/s, and the report table), in one run of the script."""
    proc = _run("gpu_study.sh", tmp_path, cifar_root, ["data.train_size=300", *TINY_MODEL, "autoencode.epochs=1",
                                                           "classify.epochs=2"],
                PACKING="1", PACK_JOBS="2", PACK_TRAIN_SIZE="300", PACK_EPOCHS="1", MODELS="ae", LATENTS="8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    variants = dict(re.findall(r"^VARIANT (\S+): (.*)$", out, re.M))
    assert list(variants) == ["alone", "2-time-sliced", "2-mps", "alone-graphs", "2-time-sliced-graphs",
                              "2-mps-graphs"], out
    assert re.fullmatch(r"1 job\(s\) on cpu, \d+ img/s aggregate.*", variants["alone"])
    assert re.fullmatch(r"2 job\(s\) on cpu, \d+ img/s aggregate = [\d.]+x alone.*", variants["2-time-sliced"])
    assert all(variants[k].startswith("SKIP") for k in list(variants)[2:])
    # the study: one stage=all job (an autoencode and a classify run), its summary line and the report table
    assert "TFLOP/s achieved" in out and "wall time" in out
    summary = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    assert summary["autoencode_runs"] == 1 and summary["classify_runs"] == 1 and summary["completed"] == 2
    assert summary["train_images"] == 270 and summary["achieved_tflops"] > 0
    assert "| ae-z8 " in out
    # the study probes the code during training (PROBE_EVERY, default 10): here at its one (last) epoch
    records = [json.loads(line) for p in (tmp_path / "out" / "study").rglob("metrics.jsonl")
               for line in p.read_text().splitlines() if line.strip()]
    probed = [r for r in records if r.get("probe_accuracy") is not None]
    assert len(probed) == 1 and 0.0 <= probed[0]["probe_accuracy"] <= 1.0, records
