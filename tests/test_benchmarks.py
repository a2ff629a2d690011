"""The benchmarks run end to end at a tiny size (their numbers are measured by `python benchmarks/run.py`,
not here: CI stays deterministic). The GPU scripts' own runs on a CPU: tests/test_gpu_check.py."""
import sys

import pytest

from conftest import REPO

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
