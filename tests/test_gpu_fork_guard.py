"""The fork guard sees the CUDA driver's own state (``gpus.cuda_driver_state``), not only torch's flag.

CUDA cannot run here, so a stub driver stands in: a tiny ``libcuda.so.1`` built with gcc whose ``cuCtxGetCurrent``
answers as the real driver does (``CUDA_ERROR_NOT_INITIALIZED`` until ``cuInit`` ran). Each check runs in a fresh
interpreter: the stub must not stay mapped in the test process.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, embclf_env, run_embclf
from slurm_fixture import embclf_env as plain_env
from slurm_fixture import run_dirs, summary, tiny_args

STUB = r"""
static int inited = 0;
#ifdef INIT_AT_LOAD
__attribute__((constructor)) static void at_load(void) { inited = 1; }  /* as if something called cuInit */
#endif
int cuInit(unsigned int flags) { (void)flags; inited = 1; return 0; }
int cuCtxGetCurrent(void **ctx) { *ctx = 0; return inited ? 0 : 3; /* 3: CUDA_ERROR_NOT_INITIALIZED */ }
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("gcc") is None,
                                reason="needs Linux (/proc/self/maps, fork) and gcc for the stub driver")


@pytest.fixture(scope="module")
def stub_driver(tmp_path_factory):
    """{"plain": libcuda.so.1 that needs cuInit, "inited": one initialised as soon as it is loaded}."""
    root = tmp_path_factory.mktemp("stub_cuda")
    src = root / "stub.c"
    src.write_text(STUB)
    out = {}
    for name, flags in (("plain", []), ("inited", ["-DINIT_AT_LOAD"])):
        (root / name).mkdir()
        lib = root / name / "libcuda.so.1"
        subprocess.run(["gcc", "-shared", "-fPIC", *flags, "-o", str(lib), str(src)], check=True)
        out[name] = lib
    return out


def _python(code: str, env_extra=None) -> str:
    env = plain_env(env_extra)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # fresh interpreters with the stub driver preloaded
def test_guard_sees_a_driver_initialised_behind_torchs_back(stub_driver):
    """torch.cuda.is_initialized() stays False when something else ran cuInit (is_available(), cuDNN, triton's
    probe); the guard asks the driver. Loaded but never initialised is still safe to fork."""
    out = _python(f"""
        import ctypes, json
        import torch
        from hydra_plugins.embclf_launcher.forked_job import fork_unsafe_reason
        from hydra_plugins.embclf_launcher.gpus import libcuda_mapped
        res = {{"before": fork_unsafe_reason()}}
        lib = ctypes.CDLL({str(stub_driver['plain'])!r})
        res["mapped"] = libcuda_mapped()
        res["loaded"] = fork_unsafe_reason()
        assert lib.cuInit(0) == 0
        res["torch_flag"] = torch.cuda.is_initialized()
        res["inited"] = fork_unsafe_reason()
        print(json.dumps(res))
    """)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["before"] is None and res["loaded"] is None, res
    assert res["mapped"] == str(stub_driver["plain"]), res
    assert res["torch_flag"] is False, res  # torch's own flag is blind to it
    assert res["inited"] == "the CUDA driver (libcuda.so.1) was initialised in the launcher process", res


@pytest.mark.slow  # fresh interpreters with the stub driver preloaded
def test_launcher_imports_leave_cuda_untouched(stub_driver, tmp_path):
    """Everything ``python -m embclf -m`` imports before forking its first worker, imported in a fresh interpreter
    whose torch.cuda entry points record any call: none is made, and the (stub) driver is never initialised.
    Nor by what the launcher computes per job that asks about the device: the identity of a ``precision=auto``
    job (bf16 where native) on a machine whose nvidia-smi lists an Ampere GPU."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in *compute_cap*) echo 8.0 ;; *) exit 6 ;; esac\n')
    smi.chmod(0o755)
    out = _python(f"""
        import ctypes, json
        lib = ctypes.CDLL({str(stub_driver['plain'])!r})  # a driver present, as on a GPU machine
        import torch
        calls = []
        def spy(owner, name):
            real = getattr(owner, name)
            def wrapper(*a, **k):
                calls.append(name)
                return real(*a, **k)
            setattr(owner, name, wrapper)
        for name in ("is_available", "is_bf16_supported", "_lazy_init", "init", "current_device",
                     "get_device_properties", "get_device_capability", "get_device_name", "synchronize"):
            spy(torch.cuda, name)
        spy(torch.backends.cudnn, "version")
        spy(torch._C, "_cuda_getDeviceCount")
        import embclf.__main__, embclf.identity, embclf.runtime, embclf.provenance  # noqa: F401
        import hydra_plugins.embclf_launcher.local_launcher, hydra_plugins.embclf_launcher.slurm_launcher  # noqa
        import hydra_plugins.embclf_launcher.sweep_plan, hydra_plugins.embclf_launcher.slot_pool  # noqa: F401
        from hydra_plugins.embclf_launcher.forked_job import fork_unsafe_reason
        from hydra import compose, initialize_config_dir
        from embclf.config import conf_dir
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            cfg = compose("config", overrides=["precision=auto", "device=auto"])
        ident = embclf.identity.job_identity(cfg)
        assert ident["autoencode"]["precision"] == "bf16", ident
        ctx = ctypes.c_void_p()
        print(json.dumps({{"calls": calls, "initialised": torch.cuda.is_initialized(),
                          "driver": lib.cuCtxGetCurrent(ctypes.byref(ctx)), "guard": fork_unsafe_reason()}}))
    """, {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    res = json.loads(out.strip().splitlines()[-1])
    assert res == {"calls": [], "initialised": False, "driver": 3, "guard": None}, res


@pytest.mark.slow
def test_launcher_falls_back_to_fresh_interpreters_when_the_driver_is_initialised(stub_driver, tmp_path):
    """A launcher process whose CUDA driver is initialised (the stub, preloaded) does not fork: it says why in
    its start line and runs the job in a fresh interpreter, which completes."""
    env = {**embclf_env(tmp_path), "LD_PRELOAD": str(stub_driver["inited"])}
    sweep_dir = tmp_path / "sweep"
    proc = run_embclf(["-m", *tiny_args(tmp_path, train_size=100, small=True), "seed=1", "logger=none", "hydra.launcher.gpus=[]",
                       f"hydra.sweep.dir={sweep_dir}"], tmp_path, env=env, fresh=True, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert ("workers fresh python per job (the CUDA driver (libcuda.so.1) was initialised in the launcher process)"
            in out), out[-3000:]
    (run,) = run_dirs(sweep_dir)
    assert summary(run)["status"] == "completed"
    # the job ran in submitit's task process (fresh interpreter), whose exit-status record exists
    assert list(Path(sweep_dir, ".submitit").glob("*/*_0_exit.json")), out[-2000:]
