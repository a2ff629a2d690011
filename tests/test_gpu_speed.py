"""The GPU speed and honesty options, exercised on a CPU-only machine (issue #19, part 2):

- CUDA graphs: ``compile_mode`` (its gate rules; a ``reduce-overhead`` step compiled for real by inductor on the
  CPU agrees with the eager step), and a step that reuses its output buffers as a CUDA-graph step does
  (simulated: each call writes into the same static tensors) leaves ``engine.evaluate`` and
  ``engine.train_epoch`` exact.
- ``deterministic=true``: deterministic algorithms, cuDNN without autotuning, ``CUBLAS_WORKSPACE_CONFIG`` in
  effect in a run and recorded in its summary.
- The agreement tolerance of ``embclf.evaluate``'s self-check scales with device, precision and compile.
"""
import json
import logging
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from conftest import MINI
from embclf import data as data_mod
from embclf import engine, evaluate, runs, runtime
from embclf.config import conf_dir
from embclf.models import build_model
from embclf.stages import autoencode
from embclf.validation import problems


def _cfg(*overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=["logger=none", "threads=1", *overrides])


def _vae_and_split(n=40, size=8, latent=6):
    torch.manual_seed(0)
    cfg = _cfg("model=vae", "model.channels=[4,8]", "model.strides=[2,2]")
    model = build_model(cfg.model, latent, size)
    with torch.no_grad():  # an untrained encoder's mu barely varies: widen it, so active units are counted
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(20)
    g = torch.Generator().manual_seed(1)
    split = data_mod.Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                           torch.randint(0, 10, (n,), generator=g))
    return model, split


def _static_outputs(step):
    """``step`` as a CUDA-graph step behaves: every call copies its outputs into the same static tensors
    (one set per batch shape) and returns those, so the next call overwrites what the last one returned."""
    buffers = {}

    def graphed(x, y=None):
        loss, sums, mu = step(x, y)
        key = tuple(x.shape)
        if key not in buffers:
            buffers[key] = (torch.empty_like(sums), torch.empty_like(mu))
        s_buf, mu_buf = buffers[key]
        s_buf.copy_(sums)
        mu_buf.copy_(mu)
        return loss, s_buf, mu_buf

    return graphed


def test_evaluate_keeps_no_reference_to_a_steps_outputs():
    """A step that reuses its output buffers (CUDA graphs) gives the eager step's metrics, active units included
    (the old code kept each batch's mu by reference: every entry became the last batch's, 16 -> 0 units)."""
    model, split = _vae_and_split()
    split.images[30:] = split.images[30]  # the last batch: one image 10 times (its mu has no variance)
    beta = torch.tensor(0.1)

    def step(x, y=None):
        return engine.batch_step(model, x, beta)

    eager = engine.evaluate(step, model, split, 10)
    graphed = engine.evaluate(_static_outputs(step), model, split, 10)
    assert eager["active_units"] > 0
    assert graphed == eager


def test_train_epoch_is_exact_under_output_buffer_reuse():
    """The training loop consumes each step's outputs before the next step: reused buffers change nothing."""
    sums = []
    for wrap in (lambda f: f, _static_outputs):
        model, split = _vae_and_split()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        beta = torch.tensor(0.1)
        step = wrap(lambda x, y=None: engine.batch_step(model, x, beta))
        sums.append(engine.train_epoch(step, model, opt, split.images, 10, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(sums[0], sums[1], rtol=0, atol=0)


def test_compile_mode_gate():
    """compile_mode is one of torch.compile's modes and needs compile=true; compile stays a boolean."""
    assert problems(_cfg("model=ae", "compile=true", "compile_mode=reduce-overhead")) == []
    assert problems(_cfg("model=ae", "compile=true", "compile_mode=max-autotune")) == []
    bad = problems(_cfg("model=ae", "compile=true", "compile_mode=fast"))
    assert bad and bad[0].startswith("compile_mode=fast is invalid: it must be one of default, reduce-overhead")
    bad = problems(_cfg("model=ae", "compile_mode=reduce-overhead"))
    assert bad == ["compile_mode=reduce-overhead is invalid with compile=false: the mode is torch.compile's, so it "
                   "applies to a compiled step only; add compile=true (or leave compile_mode out)."]
    with pytest.raises(runtime.EmbclfError, match="compile_mode=cudagraphs is invalid"):
        runtime.maybe_compile(lambda x: x, True, "cudagraphs")


@pytest.mark.slow
def test_reduce_overhead_step_agrees_with_eager_on_cpu(monkeypatch):
    """compile_mode=reduce-overhead compiled by inductor for real (on the CPU no graph is captured): the same
    metrics as the eager step within the compiled tolerance, the same active units, and every call starts a
    new CUDA-graph step (torch.compiler.cudagraph_mark_step_begin)."""
    model, split = _vae_and_split()
    beta = torch.tensor(0.1)
    marks = []
    real_mark = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1) or real_mark())

    def core(x, y, b):
        return engine.batch_step(model, x, b)

    compiled = runtime.maybe_compile(core, True, "reduce-overhead")
    eager = engine.evaluate(lambda x, y=None: core(x, y, beta), model, split, 10)
    got = engine.evaluate(lambda x, y=None: compiled(x, y, beta), model, split, 10)
    tol = runtime.agreement_tolerance("cpu", "fp32", compiled=True)
    assert got["active_units"] == eager["active_units"]
    for k, v in eager.items():
        assert abs(got[k] - v) <= tol * max(1.0, abs(v)), (k, got[k], v)
    assert len(marks) == 4  # 40 images in batches of 10


@pytest.fixture
def restore_determinism():
    """Put torch's process-wide determinism switches back as they were."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
             torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
    if saved[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[3]
    torch.set_float32_matmul_precision(saved[4])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[5], saved[6]


def _stage_cfg(tmp_path, *overrides):
    cfg = _cfg(*MINI, "model=vae", "latent=8", "model.channels=[8,16]", "model.strides=[2,2]",
               "data.image_size=16", "autoencode.epochs=1", "autoencode.batch_size=90", "logger.projections=[]",
               f"output_dir={tmp_path}", *overrides)
    with open_dict(cfg):
        cfg.data.cache_dir = str(tmp_path / "cache")
    return cfg


def test_deterministic_is_in_effect_in_a_run_and_recorded(tmp_path, monkeypatch, restore_determinism):
    """deterministic=true: during the run deterministic algorithms are on and cuBLAS's workspace is set (before
    the model's first matmul); the summary records it. The next job with deterministic=false turns them off.
    On CUDA, cuDNN autotuning is off with it (a torch.device("cuda") needs no GPU)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    real_build = autoencode.build_model

    def build_and_look(*a, **k):  # the model is built after runtime.setup, before the first matmul
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                     torch.backends.cudnn.deterministic))
        return real_build(*a, **k)

    monkeypatch.setattr(autoencode, "build_model", build_and_look)
    run_dir = autoencode.run(_stage_cfg(tmp_path, "deterministic=true"), tmp_path / "det", [])
    s = runs.read_summary(run_dir)
    assert s["status"] == "completed" and s["deterministic"] is True
    assert seen == [(True, ":4096:8", True)]
    run_dir = autoencode.run(_stage_cfg(tmp_path), tmp_path / "not-det", [])
    assert runs.read_summary(run_dir)["deterministic"] is False and seen[-1][0] is False
    assert runtime.configure_backends(torch.device("cuda"), True, deterministic=True)["cudnn_benchmark"] is False
    assert torch.backends.cudnn.benchmark is False
    assert runtime.configure_backends(torch.device("cuda"), True)["cudnn_benchmark"] is True


def test_agreement_tolerance_scales():
    t = runtime.agreement_tolerance
    assert t("cpu", "fp32") == 1e-5
    assert t("cpu", "fp32", compiled=True) == 1e-4
    assert t("cuda", "fp32") == 1e-3 and t("cuda", "fp32", deterministic=True) == 1e-5
    assert t("cpu", "bf16") == t("cuda", "bf16") == 1e-2


def test_evaluate_self_check_tolerance_follows_the_runs_device(tmp_path, caplog, restore_determinism):
    """embclf.evaluate warns when the run's own numbers differ beyond 1e-5 on the CPU in fp32, but not when the
    run ran on a GPU, where 5e-4 relative is within what two processes give (runtime.agreement_tolerance)."""
    run_dir = autoencode.run(_stage_cfg(tmp_path, "model=ae"), tmp_path / "run", [])
    path = run_dir / runs.SUMMARY
    s = json.loads(path.read_text())
    s["test_mse"] *= 1 + 5e-4
    for device, warns in (("cpu", True), ("cuda:0", False)):
        s["device"] = device
        path.write_text(json.dumps(s))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="embclf.evaluate"):
            assert evaluate.main([str(run_dir), "threads=1", "device=cpu", f"name={device.replace(':', '')}"]) == 0
        warned = any("differ from this evaluation's" in r.getMessage() for r in caplog.records)
        assert warned is warns, (device, caplog.text)
