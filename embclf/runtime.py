"""Process-level setup shared by the stages: device choice, threads, seeding, user-facing errors, and
every device-dependent choice (TF32, cuDNN autotuning, bf16 autocast, channels-last, fused Adam,
torch.compile and its CUDA graphs, deterministic algorithms, the tolerance two processes' numbers agree to).

Each device-dependent function takes the ``torch.device`` and decides by its ``type``, so the CUDA branch
runs in tests on a CPU-only machine with ``torch.device("cuda")`` (constructing one needs no GPU).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import warnings
from typing import Callable

import numpy as np
import torch

from .errors import DataError, EmbclfError  # noqa: F401 (re-exported: runtime.EmbclfError)
from .validation import check_value

log = logging.getLogger(__name__)


def setup(cfg) -> dict:
    """Apply ``threads`` and ``seed``, choose the device. Returns {"device": torch.device, "fallback": bool, "name": str}.

    ``device=auto`` picks CUDA when usable, else CPU (``_cpu_instead_of_gpu``): with no GPU anywhere that is no
    fallback; a GPU that exists but CUDA cannot use stops the run (``EmbclfError`` naming the cause); GPUs
    a launcher or SLURM named in ``CUDA_VISIBLE_DEVICES`` on a machine that has none (fake GPUs in tests) run on
    the CPU with a warning, ``fallback`` True (summary.json's ``device_fallback``). Raises ``EmbclfError`` for
    ``device=cuda`` without CUDA, a GPU index this machine lacks, or a value the gate refuses
    (``validation.VALUE_RULES["device"]``, for direct callers). Also returns ``gpu`` (``cuda_info``, None on
    the CPU), and ``tf32`` as in effect: False before Ampere, whose tensor cores have no TF32.
    """
    check_value("device", cfg.device, EmbclfError)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed = cfg.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    want = cfg.device
    with warnings.catch_warnings(record=True) as caught:  # torch says why CUDA failed as a warning
        warnings.simplefilter("always")
        cuda = torch.cuda.is_available()
    fallback = False
    if want == "auto":
        dev = torch.device("cuda" if cuda else "cpu")
        if not cuda:
            fallback = _cpu_instead_of_gpu(" ".join(str(w.message) for w in caught))
    else:  # cpu, cuda or cuda:N (the gate allows nothing else)
        if want.startswith("cuda") and not cuda:
            raise EmbclfError(f"device={want} but torch sees no CUDA device (torch {torch.__version__}). "
                              "Use device=auto or device=cpu.")
        dev = torch.device(want)
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()  # before anything is written: .to(cuda:N) would fail in the stage
            raise EmbclfError(f"device={want}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}; use one "
                              "of them, or device=auto.")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    gpu = cuda_info(dev) if dev.type == "cuda" else None
    deterministic = set_deterministic(bool(cfg.get("deterministic", False)))
    backends = configure_backends(dev, cfg.tf32, deterministic)
    if gpu is not None and backends["tf32"] and not gpu["tf32_capable"]:
        backends["tf32"] = False  # the flags are set, but a pre-Ampere GPU has no TF32: fp32 is what runs
    prec = precision(cfg)
    if prec == "bf16" and dev.type == "cpu" and not cpu_has_fast_bf16():
        log.warning("precision=bf16 on a CPU without native bf16 (%s; no AVX512-BF16/AMX): the convolutions run "
                    "in emulated bf16, ~15-30x slower than fp32 (docs/performance.md). Use precision=fp32 or "
                    "precision=auto on this machine.", torch.backends.cpu.get_cpu_capability())
    chosen = f"precision {prec}"
    if _LAST_CHOICE.get("requested") == "auto":
        chosen = f"precision auto -> {prec} ({_LAST_CHOICE['why']})"
    log.info("device %s (%s), %d threads, seed %d, %s%s%s", dev, name, torch.get_num_threads(), seed, chosen,
             ", TF32" if backends["tf32"] else "", ", deterministic algorithms" if deterministic else "")
    _LAST_SETUP.clear()
    _LAST_SETUP.update(device=dev, fallback=fallback, gpu=gpu, tf32=backends["tf32"], precision=prec)
    return {"device": dev, "fallback": fallback, "name": name, "gpu": gpu, "deterministic": deterministic,
            **backends}


# what the last ``setup`` of this process chose (one job at a time per process), for provenance.py
_LAST_SETUP: dict = {}


def last_setup() -> dict:
    """``{"device", "fallback", "gpu", "tf32", "precision"}`` of this process's last ``setup`` ({} before one)."""
    return dict(_LAST_SETUP)


def _cpu_instead_of_gpu(torch_says: str = "") -> bool:
    """``device=auto`` found no usable CUDA device: decide between the CPU and stopping. Returns ``fallback``.

    - ``CUDA_VISIBLE_DEVICES`` empty or ``-1``: GPUs hidden on purpose (the local launcher's CPU slots): the
      CPU, no fallback.
    - a GPU on this machine (``nvidia.gpu_evidence``: NVML/nvidia-smi, the kernel module's
      /proc/driver/nvidia/gpus, /dev/nvidia*): raise ``EmbclfError`` naming the cause (``nvidia.why_unusable``:
      a CPU-only torch build, a driver older than the wheel's CUDA, missing device nodes such as a container
      started without ``--gpus``, or what CUDA said) instead of running for hours on the CPU; ``device=cpu``
      runs on the CPU on purpose.
    - no GPU anywhere but ``CUDA_VISIBLE_DEVICES`` names some (a launcher's GPU slots on a CPU-only node): the
      CPU with a warning, fallback True.
    - no GPU and nothing asked for one: the CPU, no fallback.
    """
    from . import nvidia

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.split(",")[0].strip() in ("", "-1"):
        return False
    seen = nvidia.gpu_evidence()
    if seen:
        raise EmbclfError(f"device=auto: this machine has a GPU ({seen}) but torch {torch.__version__} cannot use "
                          f"CUDA: {nvidia.why_unusable(torch.version.cuda, torch_says)} Nothing was run. To run on "
                          "the CPU on purpose, set device=cpu.")
    if visible not in (None, ""):
        log.warning("CUDA_VISIBLE_DEVICES=%s was given but no CUDA device is usable: falling back to CPU", visible)
        return True
    return False


def cuda_info(dev: torch.device) -> dict:
    """What a run on CUDA device ``dev`` depends on, for summary.json's provenance: ``cuda`` (the wheel's CUDA,
    ``torch.version.cuda``), ``cudnn`` (``torch.backends.cudnn.version()``), ``driver`` and ``driver_cuda`` (the
    driver's version and the newest CUDA it supports, from NVML/nvidia-smi), ``name``, ``capability``
    ("8.0"), ``uuid``, ``compute_mode`` (Default, Exclusive_Process, ...; None when NVML/nvidia-smi cannot say),
    ``tf32_capable`` and ``bf16_native`` (compute capability >= 8.0: Ampere and later). Initialises CUDA."""
    from . import nvidia

    major, minor = torch.cuda.get_device_capability(dev)
    try:
        uuid = str(torch.cuda.get_device_properties(dev).uuid)
    except (AttributeError, RuntimeError):
        uuid = None
    known = nvidia.gpus()
    rec = next((g for g in known if uuid and g["uuid"].removeprefix("GPU-") == uuid.removeprefix("GPU-")), None)
    return {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "driver": (rec or (known[0] if known else {})).get("driver_version"),
            "driver_cuda": nvidia.driver_cuda_version(), "name": torch.cuda.get_device_name(dev),
            "capability": f"{major}.{minor}", "uuid": uuid, "compute_mode": (rec or {}).get("compute_mode"),
            "tf32_capable": major >= 8, "bf16_native": major >= 8}


def cpu_has_fast_bf16() -> bool:
    """True when this CPU runs bf16 natively: AVX512-BF16 (``avx512_bf16``, Cooper Lake and later) or AMX
    (``amx_bf16``, Sapphire Rapids and later) among the flags of ``/proc/cpuinfo``. There oneDNN's bf16
    convolutions are faster than fp32 (1.77x for the conv AE, docs/performance.md); without them (AVX2, or
    AVX-512 without bf16) they are emulated and 15-30x slower. ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
    is no test: it is True on any AVX-512 CPU, emulated or not. Where /proc/cpuinfo cannot be read (macOS,
    Windows) the answer is False: fp32, the safe choice."""
    return bool(cpu_bf16_flags())


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list:
    """The native-bf16 flags of this CPU (``avx512_bf16``, ``amx_bf16``) as ``cpuinfo`` lists them; [] when
    it has none or the file cannot be read."""
    try:
        with open(cpuinfo) as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return []
    return sorted(set(line.split(":", 1)[-1].split()) & {"avx512_bf16", "amx_bf16"})


def _device_type(device) -> str:
    """``cuda`` or ``cpu``: what a ``device`` key value (auto, cpu, cuda, cuda:N) or a torch.device runs on."""
    if isinstance(device, torch.device):
        return device.type
    d = str(device or "auto")
    if d == "auto":
        return "cuda" if _cuda_present() else "cpu"
    return "cuda" if d.startswith("cuda") else "cpu"


def resolve_precision(requested, device) -> tuple:
    """``(precision, why)``: the precision a run of ``precision=requested`` uses on ``device`` (a ``device`` key
    value or a torch.device). ``fp32`` and ``bf16`` are themselves; ``auto`` is ``bf16`` where the device runs
    bf16 natively -- CUDA with ``torch.cuda.is_bf16_supported()`` (Ampere and later), a CPU with AVX512-BF16 or
    AMX (``cpu_has_fast_bf16``) -- else ``fp32``. ``why`` says which (for the log and summary.json)."""
    req = str(getattr(requested, "value", requested) or "fp32")
    if req != "auto":
        return req, "as requested"
    if _device_type(device) == "cuda":
        ok = _cuda_bf16_native()
        return ("bf16", "CUDA device with native bf16") if ok else ("fp32", "CUDA device without native bf16")
    flags = cpu_bf16_flags()
    if flags:
        return "bf16", f"CPU with native bf16: {', '.join(flags)}"
    return "fp32", f"CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}; no avx512_bf16/amx_bf16)"


def _cuda_present() -> bool:
    """Whether ``device=auto`` means CUDA here, without initialising CUDA in a process that has not yet: the
    sweep launcher resolves ``precision=auto`` for each job's identity before it forks the jobs, and a forked
    child cannot use a CUDA its parent initialised (``torch.cuda.is_available()`` runs ``cuInit``). So NVML or
    nvidia-smi is asked (``nvidia.compute_capabilities``); torch only where neither answers or CUDA is
    initialised already. A GPU that NVML sees but CUDA cannot use still stops the job in ``setup``."""
    from . import nvidia

    if not torch.cuda.is_initialized() and torch.backends.cuda.is_built():
        caps = nvidia.compute_capabilities()
        if caps is not None:
            return len(caps) > 0
    return torch.cuda.is_available()


def _cuda_bf16_native() -> bool:
    """bf16 in hardware on the CUDA device(s) here (compute capability >= 8.0: Ampere and later).
    ``torch.cuda.is_bf16_supported()`` alone also says True where bf16 is emulated (``including_emulation``, the
    default), i.e. slower than fp32. Before CUDA is initialised NVML/nvidia-smi answer, for every GPU of the
    machine (the launcher does not know which one a job gets; it and the job must agree): see ``_cuda_present``."""
    from . import nvidia

    if not torch.cuda.is_initialized():
        caps = nvidia.compute_capabilities()
        if caps is not None:
            return len(caps) > 0 and min(caps) >= (8, 0)
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the argument answered for hardware only
        return bool(torch.cuda.is_bf16_supported())


# the last ``resolve_precision_in`` of this process (one job at a time per process): what the log and the
# summary's provenance say was requested and why it was resolved so
_LAST_CHOICE: dict = {}


def resolve_precision_in(cfg) -> dict:
    """Replace ``precision=auto`` in the composed ``cfg`` (in place) by what it resolves to on this machine
    (``resolve_precision`` with ``cfg.device``), before the run dir's config and identity are written: a run
    dir always records the precision it ran at, so ``auto`` on an AVX2 machine is the same experiment as
    ``precision=fp32`` (docs/run-dirs.md). Returns ``{"requested", "resolved", "why"}`` (also kept for
    ``precision_choice``)."""
    from omegaconf import open_dict

    requested = precision_name(cfg)
    resolved, why = resolve_precision(requested, cfg.get("device", "auto"))
    if requested == "auto":
        with open_dict(cfg):
            cfg.precision = resolved
    _LAST_CHOICE.clear()
    _LAST_CHOICE.update(requested=requested, resolved=resolved, why=why)
    return dict(_LAST_CHOICE)


def precision_choice(cfg) -> dict:
    """``{"requested", "resolved", "why"}`` for ``cfg``'s precision: the job's own resolution when its config
    was resolved in this process (``resolve_precision_in``), else resolved now."""
    resolved = precision(cfg)
    if _LAST_CHOICE.get("resolved") == resolved:
        return dict(_LAST_CHOICE)
    req = precision_name(cfg)
    return {"requested": req, "resolved": resolved, "why": resolve_precision(req, cfg.get("device", "auto"))[1]}


def precision_name(cfg) -> str:
    """``cfg.precision`` as written (``fp32``, ``bf16`` or ``auto``); configs written before the key existed
    are fp32."""
    p = cfg.get("precision", "fp32") if hasattr(cfg, "get") else "fp32"
    return str(getattr(p, "value", p) or "fp32")


def precision(cfg) -> str:
    """The precision ``cfg`` runs at: ``fp32`` or ``bf16`` (``auto`` resolved by ``resolve_precision`` for
    ``cfg.device``; a run dir's stored config holds the resolved value already)."""
    return resolve_precision(precision_name(cfg), cfg.get("device", "auto") if hasattr(cfg, "get") else "cpu")[0]


def configure_backends(device: torch.device, tf32: bool = True, deterministic: bool = False) -> dict:
    """Process-wide CUDA settings for training; nothing on other devices.

    On CUDA: TF32 for float32 matmuls (``torch.set_float32_matmul_precision("high")``) and for cuDNN
    convolutions (``torch.backends.cudnn.allow_tf32``) when ``tf32`` -- ~8x the fp32 tensor-core rate on
    Ampere/Hopper with a 10-bit mantissa, the PyTorch default for convolutions since 1.7 -- and
    ``cudnn.benchmark`` (autotunes each conv shape once; our shapes are fixed per job) unless
    ``deterministic``: autotuning times candidate algorithms, so two processes may pick different ones.
    Returns {"tf32": bool, "cudnn_benchmark": bool}: what was applied (both False off CUDA), for summary.json.
    """
    if device.type != "cuda":
        return {"tf32": False, "cudnn_benchmark": False}
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = not deterministic
    return {"tf32": tf32, "cudnn_benchmark": not deterministic}


# cuBLAS's deterministic workspace settings (CUDA docs, "cuBLAS: Results reproducibility"); :4096:8 costs
# ~24 MiB of GPU memory per cuBLAS handle, :16:8 less memory but may be slower
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def set_deterministic(on: bool) -> bool:
    """The ``deterministic`` key, applied process-wide (each job sets it, on or off, so in-process jobs in turn
    never inherit the previous job's): ``torch.use_deterministic_algorithms(on)`` (an op without a
    deterministic implementation then raises, naming itself), ``cudnn.deterministic`` and, when on,
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless it holds a deterministic value already. cuBLAS reads that
    variable when a handle is created, at the process's first matmul on a GPU: ``setup`` calls this before
    the job's first CUDA operation (the launcher process never touches CUDA, so a forked job has no handle
    yet). ``configure_backends`` turns ``cudnn.benchmark`` off. Returns ``on``."""
    if on and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_DETERMINISTIC:
        if torch.cuda.is_initialized():
            log.warning("deterministic=true: CUDA was initialised in this process before CUBLAS_WORKSPACE_CONFIG "
                        "was set; a cuBLAS handle created earlier may not be deterministic. Export "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting python.")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC[0]
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    return on


def agreement_tolerance(device_type: str, precision_name: str, compiled: bool = False,
                        deterministic: bool = False) -> float:
    """The relative tolerance within which one metric (a mean over a split) computed twice, in two processes,
    must agree: ``embclf.evaluate``'s check against the run's own numbers, and what "exact resume" means.

    - CPU, fp32, eager: 1e-5. The same kernels in the same order, so only the float32 rounding of the
      host read-back and of thread-count dependent reductions (~1e-7 relative) differ.
    - ``compiled``: 1e-4. Inductor fuses ops and reorders reductions (float32: a few ulps per op, summed
      over a split), and ``embclf.evaluate`` runs the step eagerly.
    - bf16 (either device): 1e-2. The forward pass rounds to an 8-bit mantissa (2**-9 ~ 2e-3 relative per
      value); another thread count or algorithm flips some of those roundings, and the means move by ~1e-3.
    - CUDA, not ``deterministic``: at least 1e-3. cuDNN autotuning (``cudnn.benchmark``) and atomic adds
      pick other algorithms and summation orders in another process, and TF32 (10-bit mantissa) amplifies it.
      With ``deterministic`` every process runs the same algorithms: the CPU's numbers above apply.
    These are bounds reasoned from the mantissa widths, not measured on a GPU (none was at hand). Returns the
    tolerance relative to max(1, |value|).
    """
    tol = 1e-4 if compiled else 1e-5
    if device_type == "cuda" and not deterministic:
        tol = max(tol, 1e-3)
    if precision_name == "bf16":
        tol = max(tol, 1e-2)
    return tol


def autocast(device: torch.device, precision_name: str):
    """Context manager for forward passes: bf16 autocast on ``device.type`` (CUDA or CPU) when
    ``precision_name`` is ``bf16`` (or ``auto`` on a device with native bf16: ``resolve_precision``), else a
    no-op. Parameters, gradients and optimizer state stay fp32
    (mixed precision in the sense of Micikevicius et al. 2018; bf16 needs no loss scaling)."""
    if resolve_precision(precision_name, device)[0] == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """``torch.channels_last`` on CUDA (cuDNN's NHWC kernels use tensor cores without transposes), else
    ``torch.contiguous_format`` (NCHW is faster for these convs on the CPU). Apply it to the conv models
    and to each input batch."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def adam(params, device: torch.device, lr: float, weight_decay: float) -> torch.optim.Adam:
    """``torch.optim.Adam`` (Kingma & Ba 2015) with the fused CUDA kernel on CUDA: one kernel for all
    parameters instead of a per-parameter Python loop, and no host sync on the step count. Elsewhere
    PyTorch's default implementation."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=(device.type == "cuda") or None)


# torch.compile modes that capture the compiled step in CUDA graphs (``torch._inductor.list_mode_options``)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def maybe_compile(fn: Callable, enabled: bool, mode: str = "default") -> Callable:
    """``torch.compile(fn, mode=mode)`` when ``enabled`` (the ``compile`` and ``compile_mode`` keys), else ``fn``.
    Compiled once per job: the first call traces and compiles (tens of seconds), a batch of another size
    compiles once more. On the CPU, inductor needs a C++ compiler on the PATH.

    ``reduce-overhead`` and ``max-autotune`` capture the step in CUDA graphs on a GPU (one launch replays its
    ~200 kernels; the conv AE's step is host-bound: docs/performance.md); on the CPU they compile as
    ``default`` does. A graphed step returns static output buffers that its next call overwrites: callers
    copy what they keep across steps (``engine.evaluate``), and each call starts a new CUDA-graph step
    (``torch.compiler.cudagraph_mark_step_begin``), since a training loop alternates forward, backward and
    optimizer steps outside the compiled function. Raises ``EmbclfError`` for a mode the gate refuses."""
    if not enabled:
        return fn
    check_value("compile_mode", mode, EmbclfError)
    log.info("compiling the model's step with torch.compile, mode %s (the first batches take longer)", mode)
    compiled = torch.compile(fn, mode=None if mode == "default" else mode)
    if mode not in CUDA_GRAPH_MODES:
        return compiled

    def graphed_step(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return graphed_step
