"""The GPU environment on a CPU-only machine, with stubs where CUDA cannot run: a fake ``nvidia-smi`` on the PATH,
monkeypatched ``torch.cuda`` functions, fake ``/dev`` and ``/proc/driver/nvidia`` trees.

Compute modes (Exclusive_Process with jobs_per_gpu > 1, Prohibited), CUDA_VISIBLE_DEVICES with GPU-/MIG- names,
each job's environment (compile workers, CUDA_DEVICE_ORDER), device=auto with a GPU that CUDA cannot use, CUDA out
of memory, and the GPU's provenance.
"""
import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import MINI, embclf_env, run_embclf
from embclf import lifecycle, nvidia, provenance, runtime
from embclf.config import conf_dir
from hydra_plugins.embclf_launcher import forked_job, gpus
from hydra_plugins.embclf_launcher.outcomes import report
from hydra_plugins.embclf_launcher.slot_pool import plan_slots
from hydra_plugins.embclf_launcher.sweep_plan import PlannedJob
from slurm_fixture import tiny_args

H100 = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
V100 = "GPU-11112222-3333-4444-5555-666677778888"


def fake_smi(tmp: Path, rows, cuda="13.0", caps=None) -> Path:
    """A directory holding an ``nvidia-smi`` that lists ``rows`` (index, uuid, name, compute_mode, driver) for
    ``--query-gpu``, the compute capabilities ``caps`` ("8.0", ...; None: that query fails, as before driver 510)
    and prints a header saying the driver supports CUDA ``cuda``; put it first on the PATH."""
    d = tmp / "smi-bin"
    d.mkdir(exist_ok=True)
    (d / "rows.csv").write_text("".join(", ".join(r) + "\n" for r in rows))
    (d / "caps.csv").write_text("".join(c + "\n" for c in caps or ()))
    script = d / "nvidia-smi"
    script.write_text(f"""#!/bin/sh
case "$*" in
  *--query-gpu=index,uuid,name,compute_mode,driver_version*) cat "{d}/rows.csv" ;;
  *--query-gpu=compute_cap*) {"exit 6" if caps is None else f'cat "{d}/caps.csv"'} ;;
  "") echo "| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: {cuda}     |" ;;
  *) exit 6 ;;
esac
""")
    script.chmod(0o755)
    return d


@pytest.fixture(autouse=True)
def _fresh_capabilities():
    nvidia.compute_capabilities.cache_clear()  # asked once per process; each test has its own fake nvidia-smi
    yield
    nvidia.compute_capabilities.cache_clear()


@pytest.fixture
def smi(tmp_path, monkeypatch):
    """``smi(rows, cuda=...)``: install a fake nvidia-smi first on this process's PATH; no MPS daemon, no NVML."""
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no-mps"))
    monkeypatch.setattr(nvidia, "_pynvml", lambda: None)

    def install(rows, cuda="13.0", caps=None):
        d = fake_smi(tmp_path, rows, cuda, caps)
        nvidia.compute_capabilities.cache_clear()
        monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")
        return d
    return install


def _row(i, uuid, mode, name="NVIDIA H100 80GB HBM3"):
    return (str(i), uuid, name, mode, "580.65.06")


# --- CUDA_VISIBLE_DEVICES tokens --------------------------------------------------------------------------

def test_visible_devices_pass_uuid_and_mig_names_through():
    assert gpus.parse_visible_devices(f"{H100},{V100}") == [H100, V100]
    mig = "MIG-4f6e7b1c-0a2b-5c3d-9e8f-112233445566"
    assert gpus.parse_visible_devices(f"{mig}, MIG-GPU-{H100[4:]}/1/0") == [mig, f"MIG-GPU-{H100[4:]}/1/0"]
    assert gpus.parse_visible_devices("2,3,-1,4") == [2, 3]
    assert gpus.parse_visible_devices("") == []
    with pytest.raises(ValueError, match="mixes GPU indices with GPU-/MIG- names"):
        gpus.parse_visible_devices(f"0,{H100}")
    with pytest.raises(ValueError, match="neither a GPU index nor a GPU-<uuid>"):
        gpus.parse_visible_devices("gpu0")


def test_slot_pool_hands_out_uuid_names_one_per_job(smi, monkeypatch):
    smi([_row(0, H100, "Default"), _row(1, V100, "Default")])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{H100},{V100}")
    slots, _ = plan_slots({"gpus": None, "jobs_per_gpu": 2}, 4)
    assert slots == [H100, V100, H100, V100]


# --- compute modes ---------------------------------------------------------------------------------------

def test_exclusive_process_refuses_several_jobs_per_gpu_unless_mps(smi, tmp_path, monkeypatch):
    smi([_row(0, H100, "Exclusive_Process"), _row(1, V100, "Default")])
    with pytest.raises(ValueError) as e:
        plan_slots({"gpus": [0, 1], "jobs_per_gpu": 2}, 4)
    msg = str(e.value)
    assert "GPU 0 (NVIDIA H100 80GB HBM3) is in compute mode Exclusive_Process" in msg, msg
    assert "hydra.launcher.jobs_per_gpu=1" in msg and "MPS" in msg and "GPU 1" not in msg, msg
    assert plan_slots({"gpus": [0, 1], "jobs_per_gpu": 1}, 4)[0] == [0, 1]  # one job per GPU: fine
    assert plan_slots({"gpus": [0, 1], "jobs_per_gpu": 2}, 4, mps_active=True)[0] == [0, 1, 0, 1]  # the hook
    # hydra.launcher.mps=on starts a daemon for the sweep (mps.py): the check counts it, if the binary is there
    with pytest.raises(ValueError, match="Exclusive_Process"):
        plan_slots({"gpus": [0, 1], "jobs_per_gpu": 2, "mps": "on"}, 4)
    bin_dir = tmp_path / "mps-bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-cuda-mps-control").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "nvidia-cuda-mps-control").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert plan_slots({"gpus": [0, 1], "jobs_per_gpu": 2, "mps": "on"}, 4)[0] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="Exclusive_Process"):  # auto never starts one
        plan_slots({"gpus": [0, 1], "jobs_per_gpu": 2, "mps": "auto"}, 4)
    pipe = tmp_path / "mps-pipe"
    pipe.mkdir()
    (pipe / "control").touch()  # a running MPS control daemon's pipe
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipe))
    assert plan_slots({"gpus": [0, 1], "jobs_per_gpu": 2}, 4)[0] == [0, 1, 0, 1]
    # a UUID prefix names the GPU as CUDA reads it
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY")
    monkeypatch.setattr(nvidia, "mps_pipe_dir", lambda: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", H100[:12])
    with pytest.raises(ValueError, match=f"GPU {H100[:12]} .* Exclusive_Process"):
        plan_slots({"gpus": None, "jobs_per_gpu": 3}, 3)


def test_prohibited_gpu_is_refused(smi):
    smi([_row(0, H100, "Prohibited")])
    with pytest.raises(ValueError, match="GPU 0 .* compute mode Prohibited: no process may use it"):
        plan_slots({"gpus": [0], "jobs_per_gpu": 1}, 1)
    assert gpus.exclusive_gpus([0], 1, False, known=[]) == []  # modes unknown (no NVML, no nvidia-smi): no check


@pytest.mark.slow
def test_sweep_on_an_exclusive_gpu_stops_before_any_job(tmp_path):
    d = fake_smi(tmp_path, [_row(0, H100, "Exclusive_Process")])
    env = {**embclf_env(tmp_path), "PATH": f"{d}{os.pathsep}{os.environ['PATH']}",
           "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "no-mps")}
    proc = run_embclf(["-m", *tiny_args(tmp_path, small=True), "seed=1,2", "hydra.launcher.gpus=[0]",
                       "hydra.launcher.jobs_per_gpu=2", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path,
                      env=env, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "is in compute mode Exclusive_Process" in out and "hydra.launcher.jobs_per_gpu=1" in out, out[-3000:]
    assert "start #" not in out and "Traceback" not in out, out[-3000:]


# --- each job's environment ------------------------------------------------------------------------------

def test_each_job_gets_its_share_of_compile_workers_and_pci_order(monkeypatch):
    for k in ("TORCHINDUCTOR_COMPILE_THREADS", "CUDA_DEVICE_ORDER", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(k, raising=False)
    assert gpus.job_env(concurrent=8, cores=16) == {"TORCHINDUCTOR_COMPILE_THREADS": "2",
                                                    "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert gpus.job_env(concurrent=32, cores=16)["TORCHINDUCTOR_COMPILE_THREADS"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")  # the user's indices keep the order they meant
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "5")  # the user's own choice stays theirs
    assert gpus.job_env(concurrent=2, cores=16) == {}


def test_forked_worker_sets_inductor_compile_threads(monkeypatch):
    """In a fork the launcher's torch._inductor.config already read its environment: set the share directly."""
    import torch._inductor.config as inductor

    before_threads = torch.get_num_threads()
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("MKL_NUM_THREADS", os.environ.get("MKL_NUM_THREADS", "1"))
    # torch's own config patching, not monkeypatch: undoing monkeypatch.setattr on inductor's config module
    # hid compile_threads for the rest of the process (a later compile=true test failed on CI reading it)
    with inductor.patch(compile_threads=16):
        try:
            forked_job._limit_threads(before_threads)
        finally:
            torch.set_num_threads(before_threads)
        assert inductor.compile_threads == 3
    assert isinstance(inductor.compile_threads, int)  # readable again after the test, as inductor reads it


# --- device=auto with a GPU that CUDA cannot use -------------------------------------------------------------

def _cfg(*overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=["logger=none", "threads=1", *overrides])


@pytest.fixture
def no_cuda(monkeypatch, tmp_path):
    """torch cannot use CUDA; no /dev/nvidia*, no kernel module GPUs unless a test adds them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(nvidia, "DEV", str(tmp_path / "dev"))
    monkeypatch.setattr(nvidia, "PROC_GPUS", str(tmp_path / "proc-gpus"))
    (tmp_path / "dev").mkdir()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path


def test_a_gpu_cuda_cannot_use_stops_device_auto(no_cuda, smi, monkeypatch):
    smi([_row(0, H100, "Default")], cuda="11.8")
    with pytest.raises(runtime.EmbclfError) as e:
        runtime.setup(_cfg("device=auto"))
    msg = str(e.value)
    assert "device=auto: this machine has a GPU (nvidia-smi lists NVIDIA H100 80GB HBM3)" in msg, msg
    assert f"supports CUDA up to 11.8, older than the CUDA {torch.version.cuda}" in msg and "device=cpu" in msg, msg
    # a driver new enough, no device nodes: a container without --gpus
    smi([_row(0, H100, "Default")], cuda="99.0")
    with pytest.raises(runtime.EmbclfError, match=r"device nodes \(/dev/nvidia0, ...\) are missing.*--gpus all"):
        runtime.setup(_cfg("device=auto"))
    # nodes there too: what CUDA said
    (no_cuda / "dev" / "nvidia0").touch()
    with pytest.raises(runtime.EmbclfError, match="CUDA reported no usable device"):
        runtime.setup(_cfg("device=auto"))
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(runtime.EmbclfError, match="this torch is a CPU-only build"):
        runtime.setup(_cfg("device=auto"))
    # the opt-out, and GPUs hidden on purpose (the launcher's CPU slots): the CPU, no fallback
    assert runtime.setup(_cfg("device=cpu"))["device"] == torch.device("cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    env = runtime.setup(_cfg("device=auto"))
    assert env["device"] == torch.device("cpu") and env["fallback"] is False


def test_kernel_module_gpu_without_nvidia_smi_stops_device_auto(no_cuda, monkeypatch):
    monkeypatch.setattr(nvidia, "gpus", lambda: [])  # no nvidia-smi in this container
    (no_cuda / "proc-gpus").mkdir()
    (no_cuda / "proc-gpus" / "0000:3b:00.0").mkdir()
    with pytest.raises(runtime.EmbclfError, match="NVIDIA kernel module drives 1 GPU.*device nodes .* missing"):
        runtime.setup(_cfg("device=auto"))


def test_no_gpu_anywhere_is_cpu_and_a_given_gpu_is_a_recorded_fallback(no_cuda, monkeypatch):
    monkeypatch.setattr(nvidia, "gpus", lambda: [])
    env = runtime.setup(_cfg("device=auto"))
    assert env["device"] == torch.device("cpu") and env["fallback"] is False and env["gpu"] is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert runtime.setup(_cfg("device=auto"))["fallback"] is True


@pytest.mark.slow
def test_run_on_an_unusable_gpu_stops_with_one_paragraph(tmp_path):
    """A real run with a fake nvidia-smi whose driver is too old for this torch."""
    d = fake_smi(tmp_path, [_row(0, H100, "Default")], cuda="10.2")
    env = {**embclf_env(tmp_path), "PATH": f"{d}{os.pathsep}{os.environ['PATH']}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = run_embclf(["stage=autoencode", "model=ae", "latent=8", *MINI, "autoencode.epochs=1",
                       f"output_dir={tmp_path / 'out'}", "logger=none"], tmp_path, env=env, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "supports CUDA up to 10.2" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_results_table_shows_a_cpu_fallback(tmp_path, caplog):
    cfg = OmegaConf.create({"stage": "autoencode"})
    jobs = []
    for i, fell_back in enumerate((True, False)):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"status": "completed", "device_fallback": fell_back}))
        jobs.append(PlannedJob(idx=i, overrides=[f"seed={i}"], cfg=cfg, run_dir=run, status="completed"))
    with caplog.at_level(logging.INFO, logger="embclf.launcher"):
        report(jobs, tmp_path, "local")
    table = caplog.text
    assert re.search(r"seed=0 +completed \(CPU fallback\) ", table), table
    assert re.search(r"seed=1 +completed +- ", table), table


# --- CUDA out of memory --------------------------------------------------------------------------------------

def test_cuda_oom_is_recorded_with_its_hint(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "running"}))
    lifecycle.record_failure(tmp_path, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "failed" and s["reason"] == "out of memory", s
    assert "hydra.launcher.jobs_per_gpu" in s["error"] and "batch size" in s["error"], s


@pytest.mark.slow
def test_cuda_oom_inside_a_stage_is_recorded(tmp_path):
    env = {**embclf_env(tmp_path), "EMBCLF_KILL_AT": "autoencode.step:1:oom"}
    out_dir = tmp_path / "out"
    proc = run_embclf(["stage=autoencode", "model=ae", "latent=8", *MINI, "autoencode.epochs=1",
                       f"output_dir={out_dir}", "logger=none"], tmp_path, env=env, check=False)
    assert proc.returncode != 0
    (path,) = list(out_dir.rglob("summary.json"))
    s = json.loads(path.read_text())
    assert s["status"] == "failed" and s["reason"] == "out of memory", s
    assert "OutOfMemoryError" in s["error"] and "hydra.launcher.jobs_per_gpu" in s["error"], s


# --- provenance on CUDA ----------------------------------------------------------------------------------

@pytest.fixture
def fake_cuda(monkeypatch, smi):
    """torch "sees" a V100 (compute capability 7.0, no TF32, bf16 emulated only); nvidia-smi lists it."""
    smi([_row(0, V100, "Exclusive_Process", name="Tesla V100-SXM2-16GB")], cuda="12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(uuid=V100[4:]))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]
    torch.backends.cudnn.benchmark = saved[3]


def test_provenance_records_the_gpu_and_the_numerics_in_effect(fake_cuda):
    env = runtime.setup(_cfg("device=auto", "tf32=true", "precision=bf16"))
    assert env["device"].type == "cuda" and env["tf32"] is False  # asked for, but a V100 has no TF32
    gpu = env["gpu"]
    assert gpu == {"cuda": torch.version.cuda, "cudnn": 91002, "driver": "580.65.06", "driver_cuda": "12.4",
                   "name": "Tesla V100-SXM2-16GB", "capability": "7.0", "uuid": V100[4:],
                   "compute_mode": "Exclusive_Process", "tf32_capable": False, "bf16_native": False}, gpu
    p = provenance.provenance(_cfg("data=folder", "data.root=/nonexistent"), device_name=env["name"])
    assert p["gpu"] == gpu and p["numerics"] == {"tf32": False, "bf16": "emulated"}, p["numerics"]
    # precision=auto on a pre-Ampere GPU is fp32: is_bf16_supported() alone says True (emulation counts)
    assert runtime.resolve_precision("auto", torch.device("cuda"))[0] == "fp32"


def test_precision_auto_asks_nvidia_smi_not_cuda_before_cuda_is_initialised(smi, monkeypatch):
    """The launcher resolves precision=auto for each job's identity before forking: it must not run cuInit
    (torch.cuda.is_available() would). Every GPU Ampere or later: bf16; any older one: fp32, as in the job."""
    def no_cuda_calls(*a, **k):
        raise AssertionError("torch.cuda was asked before CUDA was initialised")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda_calls)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_cuda_calls)
    smi([_row(0, H100, "Default")], caps=["9.0", "8.0"])
    assert runtime.resolve_precision("auto", "auto") == ("bf16", "CUDA device with native bf16")
    smi([_row(0, H100, "Default"), _row(1, V100, "Default")], caps=["9.0", "7.0"])
    assert runtime.resolve_precision("auto", "auto")[0] == "fp32"
    smi([], caps=[])  # nvidia-smi, and no GPU: the CPU's answer
    assert runtime._device_type("auto") == "cpu"


def test_numerics_on_the_cpu_and_on_ampere():
    cpu = {"device": torch.device("cpu"), "gpu": None, "tf32": False, "precision": "fp32"}
    assert provenance.numerics_in_effect(cpu) == {"tf32": "n/a", "bf16": False}
    a100 = {"device": torch.device("cuda"), "gpu": {"bf16_native": True}, "tf32": True, "precision": "bf16"}
    assert provenance.numerics_in_effect(a100) == {"tf32": True, "bf16": "native"}
    assert provenance.numerics_in_effect({}) == {}
