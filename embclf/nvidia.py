"""What the NVIDIA driver says about this machine's GPUs, without initialising CUDA in this process.

NVML (``nvidia-ml-py``'s ``pynvml``, when importable) or else ``nvidia-smi`` answers: which GPUs exist, their
UUIDs, names, compute modes and the driver's version. Neither touches the CUDA driver API (``cuInit``), so the
local launcher may ask before it forks its workers (``hydra_plugins/embclf_launcher/gpus.py``), and a job may ask
why CUDA is unusable (``runtime.setup``). Also here: the driver's device nodes and kernel module as the file
system shows them, and whether an MPS control daemon serves this process. No torch import.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional

SMI_TIMEOUT_S = 15  # nvidia-smi on a machine whose driver hangs must not hang the launcher
# NVML's nvmlComputeMode_t, named as nvidia-smi prints them
COMPUTE_MODES = {0: "Default", 1: "Exclusive_Thread", 2: "Prohibited", 3: "Exclusive_Process"}
# where the kernel module lists the GPUs it drives (visible inside containers too: /proc/driver is the host's)
PROC_GPUS = "/proc/driver/nvidia/gpus"
DEV = "/dev"


def smi(*args: str) -> Optional[str]:
    """``nvidia-smi ARGS``'s stdout, or None when it is not on the PATH, fails or hangs."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=SMI_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _pynvml():
    try:
        import pynvml  # nvidia-ml-py: optional

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 -- not installed, no driver, no GPU: ask nvidia-smi instead
        return None


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def gpus() -> List[Dict[str, str]]:
    """The GPUs the driver sees, in its (PCI bus) order: ``[{"index", "uuid", "name", "compute_mode",
    "driver_version"}]`` with every value a string (``compute_mode``: Default, Exclusive_Process, Prohibited or
    Exclusive_Thread). From NVML, else ``nvidia-smi --query-gpu``; [] when neither answers. MIG instances are
    not listed: a MIG-enabled GPU is one entry (its compute mode is the instances' too)."""
    nvml = _pynvml()
    if nvml is not None:
        try:
            out = []
            driver = _text(nvml.nvmlSystemGetDriverVersion())
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                out.append({"index": str(i), "uuid": _text(nvml.nvmlDeviceGetUUID(h)),
                            "name": _text(nvml.nvmlDeviceGetName(h)),
                            "compute_mode": COMPUTE_MODES.get(int(nvml.nvmlDeviceGetComputeMode(h)), "unknown"),
                            "driver_version": driver})
            return out
        except Exception:  # noqa: BLE001 -- a partial NVML: nvidia-smi's answer instead
            pass
        finally:
            try:
                nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
    text = smi("--query-gpu=index,uuid,name,compute_mode,driver_version", "--format=csv,noheader")
    out = []
    for line in (text or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 5 and parts[0].isdigit():
            out.append(dict(zip(("index", "uuid", "name", "compute_mode", "driver_version"), parts)))
    return out


@functools.lru_cache(maxsize=None)
def compute_capabilities() -> Optional[tuple]:
    """The compute capability of every GPU the driver sees, ``((8, 0), (9, 0))``, without initialising CUDA;
    ``()`` when the driver sees none, None when neither NVML nor ``nvidia-smi --query-gpu=compute_cap`` (driver
    510 and later) answers. Asked once per process (``precision=auto`` resolves once per job of a sweep)."""
    nvml = _pynvml()
    if nvml is not None:
        try:
            return tuple(tuple(int(x) for x in nvml.nvmlDeviceGetCudaComputeCapability(
                nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(nvml.nvmlDeviceGetCount()))
        except Exception:  # noqa: BLE001
            pass
    text = smi("--query-gpu=compute_cap", "--format=csv,noheader")
    if text is None:
        return None
    try:
        return tuple(tuple(int(x) for x in line.strip().split(".")[:2]) for line in text.splitlines() if line.strip())
    except ValueError:
        return None


def driver_cuda_version() -> Optional[str]:
    """The newest CUDA version the installed driver supports ("12.2"), or None when unknown: NVML's
    ``nvmlSystemGetCudaDriverVersion`` (e.g. 12020), else the "CUDA Version:" in ``nvidia-smi``'s header."""
    nvml = _pynvml()
    if nvml is not None:
        try:
            v = int(nvml.nvmlSystemGetCudaDriverVersion())
            return f"{v // 1000}.{(v % 1000) // 10}"
        except Exception:  # noqa: BLE001
            pass
    m = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", smi() or "")
    return m.group(1) if m else None


def device_nodes(dev: Optional[str] = None) -> List[str]:
    """The GPU device nodes present (``/dev/nvidia0``, ...; not ``nvidiactl``/``nvidia-uvm``): CUDA opens them."""
    return sorted(p for p in glob.glob(os.path.join(dev or DEV, "nvidia*"))
                  if re.fullmatch(r"nvidia[0-9]+", os.path.basename(p)))


def kernel_gpus(proc_gpus: Optional[str] = None) -> List[str]:
    """The PCI addresses of the GPUs the loaded NVIDIA kernel module drives (``/proc/driver/nvidia/gpus``)."""
    try:
        return sorted(os.listdir(proc_gpus or PROC_GPUS))
    except OSError:
        return []


def mps_pipe_dir() -> Optional[str]:
    """The pipe directory of an MPS control daemon serving this process, or None: ``CUDA_MPS_PIPE_DIRECTORY``
    (default ``/tmp/nvidia-mps``) holding the daemon's ``control`` pipe. CUDA clients connect to it on their
    own; then several processes share one Exclusive_Process GPU through the MPS server."""
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps"
    return pipe_dir if os.path.exists(os.path.join(pipe_dir, "control")) else None


def gpu_evidence() -> str:
    """What shows a GPU on this machine, as one phrase ("nvidia-smi lists NVIDIA H100 80GB HBM3; /dev/nvidia0"),
    or "" when nothing does: NVML/nvidia-smi, the kernel module's GPU list, the device nodes."""
    found = []
    listed = gpus()
    if listed:
        found.append("nvidia-smi lists " + ", ".join(g["name"] for g in listed))
    elif kernel_gpus():
        found.append(f"the NVIDIA kernel module drives {len(kernel_gpus())} GPU(s) ({PROC_GPUS})")
    nodes = device_nodes()
    if nodes:
        found.append(", ".join(nodes))
    return "; ".join(found)


def _version_tuple(v: Optional[str]):
    try:
        return tuple(int(x) for x in str(v).split(".")[:2])
    except ValueError:
        return None


def why_unusable(torch_cuda: Optional[str], torch_says: str = "") -> str:
    """The likely reason torch cannot use a GPU this machine has (``gpu_evidence``), with the fix, as sentences.

    ``torch_cuda``: ``torch.version.cuda`` (None: a CPU-only build); ``torch_says``: the warning
    ``torch.cuda.is_available()`` gave, if any. Checked in order: a CPU-only torch; a driver whose newest CUDA
    (``driver_cuda_version``) is older than the wheel's (a driver runs CUDA up to its own version; within one
    major version minor-version compatibility covers most but not all); no ``/dev/nvidia<N>`` nodes while the
    GPU exists (a container started without ``--gpus``, or nodes never created); else what CUDA reported."""
    if torch_cuda is None:
        return ("this torch is a CPU-only build (torch.version.cuda is None). Install a CUDA build, e.g. "
                "pip install torch --index-url https://download.pytorch.org/whl/cu128.")
    driver = driver_cuda_version()
    have, need = _version_tuple(driver), _version_tuple(torch_cuda)
    if have and need and have < need:
        how = "cannot run it" if have[0] < need[0] else "may not run it"
        return (f"the NVIDIA driver supports CUDA up to {driver}, older than the CUDA {torch_cuda} this torch was "
                f"built for, so it {how}. Update the driver, or install a torch build for CUDA {driver} or older "
                "(https://pytorch.org/get-started/locally/).")
    if not device_nodes():
        return ("the GPU's device nodes (/dev/nvidia0, ...) are missing. In a container, start it with the GPUs "
                "passed in (docker run --gpus all, the NVIDIA Container Toolkit; on Kubernetes a "
                "nvidia.com/gpu resource limit); on a host, create the nodes (nvidia-modprobe, or run nvidia-smi "
                "once as root).")
    said = " ".join(torch_says.split())
    return (f"CUDA said: {said}" if said else "CUDA reported no usable device.") + (
        " Check that nvidia-smi works as this user, that the GPU is not in compute mode Prohibited, and that "
        "CUDA_VISIBLE_DEVICES names a GPU that exists.")
