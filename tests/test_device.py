"""Every device-dependent branch, exercised on a CPU-only machine.

Review of the calls that depend on the device (each has a test below):
- checkpoint reads: all go through ``runs.load_checkpoint`` (CPU first, ``weights_only=True``); the
  model/optimizer state then moves to the device. Stand-in for a GPU: the ``meta`` device, where, as on
  CUDA, RNG states must not land (``torch.set_rng_state`` takes CPU byte tensors only).
- ``runtime.setup``: ``device=auto|cpu|cuda``, the CUDA_VISIBLE_DEVICES fallback.
- ``runtime.configure_backends``: TF32 + cudnn.benchmark on CUDA only (``torch.device("cuda")`` needs no GPU).
- ``runtime.memory_format``: channels-last on CUDA only; ``runtime.adam``: fused Adam on CUDA only.
- ``runtime.autocast``: bf16 autocast on the CPU for real (``precision=bf16``), and ``compile=true``.
- CUDA RNG states in a checkpoint resumed where fewer CUDA devices exist.
- No host sync per optimizer step in any training or evaluation loop (counted, not timed).
"""
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from embclf import runs, runtime
from embclf.config import conf_dir
from embclf.models import build_model
from embclf import checkpoint, engine
from embclf.stages import autoencode, classify

from conftest import MINI


def _cfg(*overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", overrides=["logger=none", "threads=1", *overrides])
    return cfg


def _tiny_model_and_opt(device="cpu"):
    cfg = _cfg("model=vae", "model.channels=[4,8]", "model.strides=[2,2]")
    model = build_model(cfg.model, 4, 8).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    return model, opt, sched


def _trained_checkpoint(path: Path) -> dict:
    """A real last.pt written the way the autoencode stage writes it, after two optimizer steps on the CPU."""
    torch.manual_seed(0)
    model, opt, sched = _tiny_model_and_opt()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    for _ in range(2):
        loss, _, _ = engine.batch_step(model, x, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sched.step()
    torch.rand(3, generator=g)
    ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
          "rng": checkpoint.rng_state(), "batch_rng": g.get_state(), "state": {"epoch": 1, "best_val_mse": 0.1,
                                                                               "best_epoch": 1},
          "config": {"latent": 4}}
    runs.save_atomic(ck, path)
    return ck


def _all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _all_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _all_tensors(v)


def test_resume_onto_a_non_cpu_device(tmp_path):
    saved = _trained_checkpoint(tmp_path / "last.pt")
    # what the old loader did (map_location=<training device>) breaks the RNG restore on any non-CPU device
    moved = torch.load(tmp_path / "last.pt", map_location="meta", weights_only=True)
    with pytest.raises((TypeError, RuntimeError)):
        torch.set_rng_state(moved["rng"]["torch"])
    # the one loader: everything on the CPU, whatever the training device
    ck = runs.load_checkpoint(tmp_path / "last.pt")
    assert {t.device.type for t in _all_tensors(ck)} == {"cpu"}
    model, opt, sched = _tiny_model_and_opt("meta")  # the run continues on a non-CPU device
    g = torch.Generator()
    torch.manual_seed(123)  # scrambled, to see that the restore really sets it
    state = checkpoint.restore_training_state(ck, model, opt, sched, g)
    assert state["epoch"] == 1
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    assert torch.equal(g.get_state(), saved["batch_rng"])
    assert next(model.parameters()).device.type == "meta"
    adam_state = next(iter(opt.state.values()))
    assert adam_state["exp_avg"].device.type == "meta"  # optimizer state went to the parameters' device
    assert sched.last_epoch == 1


def test_checkpoint_holding_cuda_rng_states_resumes_on_cpu(tmp_path, caplog):
    ck = _trained_checkpoint(tmp_path / "last.pt")
    ck["rng"]["cuda"] = [torch.cuda.default_generators[0].get_state() if torch.cuda.is_available()
                         else torch.zeros(16, dtype=torch.uint8)] * 2  # written on a 2-GPU node
    runs.save_atomic(ck, tmp_path / "gpu.pt")
    model, opt, sched = _tiny_model_and_opt()
    with caplog.at_level("WARNING"):
        checkpoint.restore_training_state(runs.load_checkpoint(tmp_path / "gpu.pt"), model, opt, sched,
                                          torch.Generator())
    if not torch.cuda.is_available():
        assert "RNG states of 2 CUDA device(s), 0 are usable" in caplog.text


def test_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(runtime.EmbclfError, match="other than tensors and plain values"):
        runs.load_checkpoint(tmp_path / "evil.pt", what="classify.encoder")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(runtime.EmbclfError, match="junk.pt is not a readable torch checkpoint"):
        runs.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"head": torch.zeros(1)}, tmp_path / "head.pt")
    with pytest.raises(runtime.EmbclfError, match="missing model"):
        runs.load_checkpoint(tmp_path / "head.pt", ("model", "config"))


def test_setup_device_choice(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU-only branches")
    with pytest.raises(runtime.EmbclfError, match="device=cuda but torch sees no CUDA device"):
        runtime.setup(_cfg("device=cuda"))
    with pytest.raises(runtime.EmbclfError, match="device=tpu is invalid: it must be auto, cpu, cuda or cuda:N"):
        runtime.setup(_cfg("device=tpu"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # a launcher gave a GPU this node does not have
    env = runtime.setup(_cfg("device=auto"))
    assert env["device"] == torch.device("cpu") and env["fallback"] is True
    assert env["tf32"] is False and env["cudnn_benchmark"] is False


def test_cuda_backends_branch():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        assert runtime.configure_backends(torch.device("cpu")) == {"tf32": False, "cudnn_benchmark": False}
        assert torch.get_float32_matmul_precision() == saved[0]  # nothing changed off CUDA
        assert runtime.configure_backends(torch.device("cuda")) == {"tf32": True, "cudnn_benchmark": True}
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
        assert runtime.configure_backends(torch.device("cuda"), tf32=False)["tf32"] is False
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]
        torch.backends.cudnn.benchmark = saved[3]


def test_memory_format_and_fused_adam_branches():
    assert runtime.memory_format(torch.device("cuda")) == torch.channels_last
    assert runtime.memory_format(torch.device("cpu")) == torch.contiguous_format
    model, _, _ = _tiny_model_and_opt()
    model.to(memory_format=runtime.memory_format(torch.device("cuda")))  # what the stage does on CUDA
    x = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    loss, sums, _ = engine.batch_step(model.eval(), x, 0.1)
    assert torch.isfinite(loss) and sums.shape == (len(engine.SUMS),)
    # fused Adam on CUDA (PyTorch also has a fused CPU kernel, so the choice is testable here)
    assert runtime.adam(model.parameters(), torch.device("cuda"), 1e-3, 0.0).defaults["fused"] is True
    assert not runtime.adam(model.parameters(), torch.device("cpu"), 1e-3, 0.0).defaults["fused"]


def test_batch_step_matches_the_objectives():
    from embclf import losses

    torch.manual_seed(0)
    for variational in (False, True):
        model, _, _ = _tiny_model_and_opt()
        model.variational = variational
        if not variational:
            model.fc_logvar = None
        model.eval()
        x = torch.rand(5, 3, 8, 8)
        loss, sums, mu = engine.batch_step(model, x, 0.1)
        out = model(x)
        want = (losses.vae_loss(out["x_hat"], x, out["mu"], out["logvar"], 0.1) if variational
                else losses.ae_loss(out["x_hat"], x))
        assert torch.allclose(loss, want)
        assert torch.allclose(sums[1], losses.sse_per_image(out["x_hat"], x).sum())
        assert torch.allclose(sums[2], losses.psnr_per_image(out["x_hat"], x).sum())
        assert torch.allclose(sums[0], want * 5)
        assert mu.shape == (5, 4) and not mu.requires_grad


def test_bf16_autocast_on_cpu():
    model, _, _ = _tiny_model_and_opt()
    x = torch.rand(4, 3, 8, 8)
    with runtime.autocast(torch.device("cpu"), "bf16"):
        assert model.encode(x)[0].dtype == torch.bfloat16
    loss, sums, _ = engine.batch_step(model, x, 0.1, "bf16")
    assert loss.dtype == torch.float32 and sums.dtype == torch.float32  # losses and metrics in fp32
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    with runtime.autocast(torch.device("cpu"), "fp32"):
        assert model.encode(x)[0].dtype == torch.float32


SYNCS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


def _count_host_reads(monkeypatch):
    """Patch the tensor methods that read values back to the host; count calls made from embclf's code."""
    counts = {"n": 0}
    for name in SYNCS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, __orig=orig, **k):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(("embclf.stages", "embclf.engine")) or caller == "embclf.data":
                counts["n"] += 1
            return __orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


def _stage_syncs(tmp_path, monkeypatch, name, stage_fn, *overrides):
    cfg = _cfg(*MINI, "model=vae", "latent=8", "logger.projections=[]", f"output_dir={tmp_path}", *overrides)
    with open_dict(cfg):
        cfg.data.cache_dir = str(tmp_path / "cache")
    counts = _count_host_reads(monkeypatch)
    stage_fn(cfg, tmp_path / name)
    monkeypatch.undo()
    return counts["n"]


@pytest.mark.slow
def test_no_host_sync_per_step(tmp_path, monkeypatch):
    """The number of host reads in a stage does not grow with the number of optimizer/eval steps."""
    common = ("autoencode.epochs=1", "classify.epochs=2")
    ae = lambda cfg, d: autoencode.run(cfg, d, [])  # noqa: E731
    few = _stage_syncs(tmp_path, monkeypatch, "ae-few", ae, *common, "autoencode.batch_size=150",
                       "autoencode.eval_batch_size=100")
    many = _stage_syncs(tmp_path, monkeypatch, "ae-many", ae, *common, "autoencode.batch_size=15",
                        "autoencode.eval_batch_size=10")  # 10x the train and eval steps
    assert few == many, (few, many)
    clf = lambda cfg, d: classify.run(cfg, d, [], encoder=tmp_path / "ae-few")  # noqa: E731
    few = _stage_syncs(tmp_path, monkeypatch, "clf-few", clf, *common, "autoencode.batch_size=150",
                       "classify.batch_size=150")
    many = _stage_syncs(tmp_path, monkeypatch, "clf-many", clf, *common, "autoencode.batch_size=150",
                        "classify.batch_size=10")
    assert few == many, (few, many)


@pytest.mark.slow
def test_bf16_and_compile_run_a_stage_on_cpu(tmp_path):
    """precision=bf16 and compile=true through the whole autoencode stage (inductor on the CPU)."""
    cfg = _cfg(*MINI, "model=ae", "latent=8", "model.channels=[8,16]", "model.strides=[2,2]",
               "data.image_size=16", "autoencode.epochs=1", "autoencode.batch_size=90", "autoencode.eval_batch_size=10",
               "precision=bf16",
               "compile=true", f"output_dir={tmp_path}")
    with open_dict(cfg):
        cfg.data.cache_dir = str(tmp_path / "cache")
    import torch._inductor.config as inductor

    # inductor compiles in this process: a pool of compile workers (each importing torch) costs more CPU than it
    # saves on a graph this small (44 vs 38 s, cold cache, 2 cores). torch's own patch, not monkeypatch (see
    # test_gpu_env.py: undoing monkeypatch hid compile_threads from later compiles)
    with inductor.patch(compile_threads=1):
        run_dir = autoencode.run(cfg, tmp_path / "run", [])
    s = runs.read_summary(run_dir)
    assert s["status"] == "completed" and s["precision"] == "bf16" and s["compile"] is True
    assert s["tf32"] is False and s["channels_last"] is False  # CPU
    assert 8 < s["test_psnr"] < 30 and s["train_images_per_second"] > 0
    # checkpoints stay fp32 and load with weights_only
    ck = runs.load_checkpoint(run_dir / "checkpoints" / "best.pt", ("model",))
    assert all(v.dtype == torch.float32 for v in ck["model"].values() if v.is_floating_point())
