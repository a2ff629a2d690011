"""The benchmarks run end to end at a tiny size (their numbers are measured by `python benchmarks/run.py`,
not here: CI stays deterministic), and the GPU study script runs on a CPU with a tiny override."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, embclf_env

sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.slow
def test_row1_loops_and_row2_cached_embeddings_match(cifar_root):
    import run as bench

    r1 = bench.row1(cifar_root, repeats=1, n_images=100, batch=50)
    assert set(r1["images_per_second"]) == {"naive", "embclf", "compute"}
    assert all(v > 0 for v in r1["images_per_second"].values())
    r2 = bench.row2(cifar_root, repeats=1, n_train=100, n_val=100, epochs=3, batch=50)
    # cached embeddings are the same numbers as re-encoding each batch: the same head reaches the same accuracy
    assert r2["accuracy_diff_pt"] <= 0.5, r2
    assert r2["speedup"] > 1


def test_flops_per_image_of_the_reference_conv_ae():
    import run as bench

    # the reference conv AE costs ~0.46 GFLOP per image per training step (forward + backward)
    assert 0.44e9 < bench.train_flops_per_image("ae", 64) < 0.48e9


@pytest.mark.slow
def test_gpu_study_script_runs_end_to_end_on_cpu(tmp_path, cifar_root):
    env = embclf_env(tmp_path)
    env.update(MODELS="ae", LATENTS="8", PRECISION="fp32", PY=sys.executable, OUT=str(tmp_path / "study"),
               DATA=str(cifar_root))
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_study.sh"), "data.train_size=300",
                           "data.test_size=100", "autoencode.epochs=1", "autoencode.batch_size=50",
                           "classify.epochs=2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "TFLOP/s achieved" in out and "wall time" in out
    summary = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    assert summary["autoencode_runs"] == 1 and summary["classify_runs"] == 1 and summary["completed"] == 2
    assert summary["train_images"] == 270 and summary["achieved_tflops"] > 0
    assert "| ae-z8 " in out  # the report table
    # the study probes the code during training (PROBE_EVERY, default 10): here at its one (last) epoch
    records = [json.loads(line) for p in (tmp_path / "study").rglob("metrics.jsonl")
               for line in p.read_text().splitlines() if line.strip()]
    probed = [r for r in records if r.get("probe_accuracy") is not None]
    assert len(probed) == 1 and 0.0 <= probed[0]["probe_accuracy"] <= 1.0, records
