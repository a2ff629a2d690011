"""GPU discovery for the local launcher: which GPUs (and CPU cores) this process may hand out to jobs, whether
their compute modes allow the planned sharing, and whether forking a worker is still safe for CUDA.

Counting GPUs must not initialise CUDA in the launcher (a forked worker could not use CUDA after that), so
:func:`visible_gpu_ids` asks NVML, and records when it had to fall back to the CUDA runtime
(:func:`cuda_runtime_used`); :func:`cuda_driver_state` asks the CUDA driver itself whether anything in this
process initialised it (both read by ``forked_job.fork_unsafe_reason``).

GPU ids are handed to jobs as ``CUDA_VISIBLE_DEVICES`` tokens, as they are: integers (indices), or the strings
``GPU-<uuid>`` and ``MIG-<uuid>`` (or ``MIG-GPU-<uuid>/<gi>/<ci>``) when the launcher's own
``CUDA_VISIBLE_DEVICES`` names GPUs or MIG instances that way.
"""
import ctypes
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

GpuId = Union[int, str]  # an index, or a GPU-/MIG- token from CUDA_VISIBLE_DEVICES


def usable_cores() -> int:
    """CPU cores this process may run on (affinity/cpuset aware, unlike os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_visible_devices(env: str) -> List[GpuId]:
    """The devices a ``CUDA_VISIBLE_DEVICES`` value names, in order: integers for indices, the strings as given
    for ``GPU-...``/``MIG-...`` tokens. As CUDA does, a negative index ends the list (``-1``: no GPU).

    Raises ``ValueError`` (one paragraph) for any other token, and for a list mixing indices with UUIDs: the
    launcher could not tell whether two of them are one GPU, nor which GPU an index is."""
    ids: List[GpuId] = []
    for item in (x.strip() for x in env.split(",")):
        if not item:
            continue
        if item.startswith(("GPU-", "MIG-")):
            ids.append(item)
            continue
        try:
            value = int(item)
        except ValueError:
            raise ValueError(
                f"CUDA_VISIBLE_DEVICES={env!r} holds {item!r}, which is neither a GPU index nor a GPU-<uuid> or "
                "MIG-<uuid> name, so the local launcher cannot split it into one GPU per job. Fix "
                "CUDA_VISIBLE_DEVICES (nvidia-smi -L lists the names), or set hydra.launcher.gpus=[0,1,...]."
            ) from None
        if value < 0:  # CUDA stops at the first invalid (negative) id
            break
        ids.append(value)
    if len({type(i) for i in ids}) > 1:
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES={env!r} mixes GPU indices with GPU-/MIG- names; the local launcher cannot tell "
            "whether two of them are the same GPU. Name every GPU the same way (all indices, or all UUIDs from "
            "nvidia-smi -L)."
        )
    return ids


def visible_gpu_ids() -> List[GpuId]:
    """GPU ids this process may hand out: the parent's ``CUDA_VISIBLE_DEVICES`` when it is set
    (so a launcher started on GPUs 2,3 hands out 2 and 3, not 0 and 1; UUID and MIG names pass through as
    they are), else every GPU NVML counts (``torch.cuda.device_count()`` where NVML cannot). An empty
    ``CUDA_VISIBLE_DEVICES`` means no GPU. Raises ``ValueError`` for a value :func:`parse_visible_devices`
    refuses.

    Indices counted here are NVML's, in PCI bus order; :func:`job_env` then gives the jobs
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA numbers them the same way (its default, FASTEST_FIRST,
    may not).
    """
    global _CUDA_RUNTIME_USED
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return parse_visible_devices(env)
    import torch  # only here: plugin discovery must not pay for importing torch

    # Count through NVML, which does not initialise CUDA in this process: forked workers (fork=true)
    # could not use CUDA after that.  torch.cuda.device_count() tries NVML first as well but falls
    # back to the CUDA runtime silently; do that fallback here, where it can be recorded.
    # (A CPU-only or ROCm build of torch: device_count() as before, counted as possibly initialising.)
    n = -1
    if torch.backends.cuda.is_built() and not torch.version.hip:
        try:
            n = int(torch.cuda._device_count_nvml())  # private, hence the guard; < 0: NVML unavailable
        except Exception:  # noqa: BLE001
            n = -1
    if n < 0:
        n = torch.cuda.device_count()
        _CUDA_RUNTIME_USED = _CUDA_RUNTIME_USED or n > 0
    return list(range(n))


# True once the launcher asked the CUDA runtime (not NVML) how many GPUs there are: the CUDA driver is
# then initialised in this process, and a forked child could not use CUDA.
_CUDA_RUNTIME_USED = False


def cuda_runtime_used() -> bool:
    """True once :func:`visible_gpu_ids` asked the CUDA runtime (not NVML): forking is then unsafe."""
    return _CUDA_RUNTIME_USED


# --- the CUDA driver's own state in this process -------------------------------------------------------------

CUDA_ERROR_NOT_INITIALIZED = 3


def libcuda_mapped(maps: str = "/proc/self/maps") -> Optional[str]:
    """The path of the CUDA driver library (``libcuda.so*``) mapped into this process, or None: never loaded.
    (``libcudart``/``libcudnn`` are not the driver; only the driver holds the state a fork cannot inherit.)"""
    try:
        with open(maps) as f:
            for line in f:  # address perms offset dev inode [path]
                fields = line.split(None, 5)
                path = fields[5].strip() if len(fields) == 6 else ""
                if os.path.basename(path).startswith("libcuda.so"):
                    return path
    except OSError:
        return None
    return None


def cuda_driver_state(maps: str = "/proc/self/maps") -> Optional[str]:
    """Why the CUDA driver in this process makes a fork unsafe, or None when it cannot have been initialised.

    ``torch.cuda.is_initialized()`` sees only torch's own lazy init; ``torch.cuda.is_available()`` (without
    ``PYTORCH_NVML_BASED_CUDA_CHECK=1``), ``is_bf16_supported()``, cuDNN and triton's driver probe initialise
    the driver behind its back, and a forked child then fails with "initialization error". So ask the driver:
    a driver never loaded (no ``libcuda.so`` in ``/proc/self/maps``) was never initialised; a loaded one is
    asked ``cuCtxGetCurrent``, which returns ``CUDA_ERROR_NOT_INITIALIZED`` (3) exactly until ``cuInit`` ran in
    this process (it initialises nothing itself). The library is looked up with ``RTLD_NOLOAD`` (never loaded
    here). Any other answer, or no answer, counts as initialised: the launcher then starts fresh interpreters,
    which is only slower.
    """
    path = libcuda_mapped(maps)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        ctx = ctypes.c_void_p()
        rc = int(lib.cuCtxGetCurrent(ctypes.byref(ctx)))
    except (OSError, AttributeError) as e:
        return f"the CUDA driver ({os.path.basename(path)}) is loaded in the launcher process and cannot be asked " \
               f"whether it was initialised ({e})"
    if rc == CUDA_ERROR_NOT_INITIALIZED:
        return None
    return f"the CUDA driver ({os.path.basename(path)}) was initialised in the launcher process"


# --- compute modes and MPS --------------------------------------------------------------------------------

def _gpu_of(gpu: GpuId, known: Sequence[Mapping[str, str]]) -> Optional[Mapping[str, str]]:
    """The NVML/nvidia-smi record (``embclf.nvidia.gpus``) of a launcher GPU id, or None when unknown: an
    index is NVML's (PCI order, see :func:`visible_gpu_ids`), a ``GPU-`` name may be a UUID prefix (as CUDA
    accepts it), a ``MIG-GPU-<uuid>/..`` name is its parent GPU's; a ``MIG-<uuid>`` name is not resolved."""
    token = str(gpu)
    if isinstance(gpu, int):
        return next((g for g in known if g.get("index") == token), None)
    if token.startswith("MIG-GPU-"):
        token = token[len("MIG-"):].split("/")[0]
    if token.startswith("GPU-"):
        return next((g for g in known if g.get("uuid", "").startswith(token)), None)
    return None


def exclusive_gpus(gpu_ids: Sequence[GpuId], jobs_per_gpu: int, mps_active: bool,
                   known: Optional[Sequence[Mapping[str, str]]] = None) -> List[str]:
    """Problems with running ``jobs_per_gpu`` jobs at once on each of ``gpu_ids``, from each GPU's compute mode
    (``known``: ``embclf.nvidia.gpus()``, asked when None); [] when there are none or the modes are unknown.

    Prohibited: no CUDA context at all, so no job can run there. Exclusive_Process (and the old
    Exclusive_Thread): one CUDA context at a time, so with ``jobs_per_gpu > 1`` all but one job fail with "CUDA-
    capable device(s) is/are busy or unavailable" -- unless ``mps_active``: an MPS server then holds the one
    context and the jobs are its clients. ``mps_active`` is the caller's to decide: :func:`check_compute_modes`
    detects a running daemon (``embclf.nvidia.mps_pipe_dir``); a launcher that starts its own MPS daemon for the
    sweep passes True.
    """
    if known is None:
        from embclf.nvidia import gpus

        known = gpus()
    problems = []
    for gpu in gpu_ids:
        rec = _gpu_of(gpu, known)
        mode = (rec or {}).get("compute_mode", "")
        if mode == "Prohibited":
            problems.append(f"GPU {gpu} ({rec.get('name', '?')}) is in compute mode Prohibited: no process may use "
                            "it. Leave it out (hydra.launcher.gpus=[...] or CUDA_VISIBLE_DEVICES), or have an "
                            "administrator run `nvidia-smi -i <index> -c DEFAULT`.")
        elif mode.startswith("Exclusive") and jobs_per_gpu > 1 and not mps_active:
            problems.append(f"GPU {gpu} ({rec.get('name', '?')}) is in compute mode {mode}: one process at a time "
                            f"may use it, so with hydra.launcher.jobs_per_gpu={jobs_per_gpu} all but one of its "
                            "jobs would fail with \"CUDA-capable device(s) is/are busy or unavailable\". Set "
                            "hydra.launcher.jobs_per_gpu=1, or run the jobs under MPS (an MPS control daemon "
                            "serves every process of one Exclusive_Process GPU; docs/launchers.md).")
    return problems


def check_compute_modes(gpu_ids: Sequence[GpuId], jobs_per_gpu: int, mps_active: Optional[bool] = None) -> None:
    """Raise ``sweep_plan.SweepConfigError`` (a ``ValueError``; one paragraph, a sentence group per GPU) when a GPU's compute mode forbids the planned jobs
    (:func:`exclusive_gpus`). ``mps_active`` None: True when an MPS control daemon's pipe is present
    (``CUDA_MPS_PIPE_DIRECTORY``, default /tmp/nvidia-mps). Nothing is asked when ``gpu_ids`` is empty."""
    if not gpu_ids:
        return
    if mps_active is None:
        from embclf.nvidia import mps_pipe_dir

        mps_active = mps_pipe_dir() is not None
    problems = exclusive_gpus(gpu_ids, jobs_per_gpu, mps_active)
    if problems:
        from .sweep_plan import SweepConfigError  # a ValueError Hydra prints without a traceback

        raise SweepConfigError("Cannot run this sweep on the GPUs as planned, nothing was started: "
                               + " ".join(problems))


# --- each job's environment -----------------------------------------------------------------------------

def job_env(concurrent: int, cores: Optional[int] = None) -> Dict[str, str]:
    """Environment every job of a sweep gets on top of its slot's (``CUDA_VISIBLE_DEVICES``, threads), for
    ``concurrent`` jobs running at once; a variable the user set in the launcher's environment is left to them.

    ``TORCHINDUCTOR_COMPILE_THREADS``: ``compile=true`` compiles with as many worker processes as inductor's
    default (the machine's cores), each job at once: 8 jobs x 16 workers on 16 cores. Each job gets its share,
    ``cores // concurrent`` (at least 1). Inductor reads it when ``torch._inductor.config`` is imported
    (a forked worker whose launcher imported it already sets ``compile_threads`` directly:
    ``forked_job._limit_threads``).

    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` when the launcher's GPU indices are its own (NVML's count, or
    ``hydra.launcher.gpus``: PCI bus order, as nvidia-smi numbers them): CUDA's default order, FASTEST_FIRST, may
    number them differently, and job "GPU 1" would then run on another GPU than nvidia-smi's 1 (whose compute
    mode was checked). Not when the user set ``CUDA_VISIBLE_DEVICES`` or ``CUDA_DEVICE_ORDER``: their indices
    keep the meaning they gave them.
    """
    env = {}
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        env["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, (cores or usable_cores()) // max(1, concurrent)))
    if "CUDA_DEVICE_ORDER" not in os.environ and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env
