"""GPU discovery for the local launcher: which GPU ids (and CPU cores) this process may hand out to jobs.

Counting GPUs must not initialise CUDA in the launcher (a forked worker could not use CUDA after that), so
:func:`visible_gpu_ids` asks NVML, and records when it had to fall back to the CUDA runtime
(:func:`cuda_runtime_used`, read by ``forked_job.fork_unsafe_reason``).
"""
import os
from typing import List


def usable_cores() -> int:
    """CPU cores this process may run on (affinity/cpuset aware, unlike os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def visible_gpu_ids() -> List[int]:
    """GPU ids this process may hand out: the parent's ``CUDA_VISIBLE_DEVICES`` when it is set
    (so a launcher started on GPUs 2,3 hands out 2 and 3, not 0 and 1), else every device
    ``torch.cuda.device_count()`` sees.  An empty ``CUDA_VISIBLE_DEVICES`` means no GPU.

    Raises ``ValueError`` when ``CUDA_VISIBLE_DEVICES`` holds non-integer ids (UUIDs, MIG names):
    submitit hands out integer ids only, so the user must list them in ``hydra.launcher.gpus``.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids: List[int] = []
        for item in (x.strip() for x in env.split(",")):
            if not item:
                continue
            try:
                value = int(item)
            except ValueError:
                raise ValueError(
                    f"CUDA_VISIBLE_DEVICES={env!r} holds a GPU id that is not an integer ({item!r}), "
                    "so the local launcher cannot split it into one GPU per job. Set "
                    "hydra.launcher.gpus=[0,1,...] to the integer ids to use, or unset "
                    "CUDA_VISIBLE_DEVICES."
                ) from None
            if value < 0:  # CUDA stops at the first invalid (negative) id
                break
            ids.append(value)
        return ids
    import torch  # only here: plugin discovery must not pay for importing torch

    # Count through NVML, which does not initialise CUDA in this process: forked workers (fork=true)
    # could not use CUDA after that.  torch.cuda.device_count() tries NVML first as well but falls
    # back to the CUDA runtime silently; do that fallback here, where it can be recorded.
    # (A CPU-only or ROCm build of torch: device_count() as before, counted as possibly initialising.)
    global _CUDA_RUNTIME_USED
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
