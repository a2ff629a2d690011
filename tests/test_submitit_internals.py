"""The local launcher leans on submitit internals (``forked_job.SUBMITIT_INTERNALS``): a submitit upgrade that
removes or renames one must fail here, naming it and what it is for, not deep inside a sweep."""
import importlib
import inspect
import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "hydra_plugins" / "embclf_launcher"


def _resolve(module: str, path: str):
    """The object at ``module``.``path`` (``Class.attr``); an instance attribute set in the class's source
    (``self._process = ...``) counts. Raises AttributeError/ImportError when it is gone."""
    obj = importlib.import_module(module)
    parts = path.split(".")
    for i, part in enumerate(parts):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif i == len(parts) - 1 and inspect.isclass(obj) and f"self.{part} =" in inspect.getsource(obj):
            return obj
        else:
            raise AttributeError(f"{module}.{'.'.join(parts[:i + 1])}")
    return obj


def _gone_message(what: str, purpose: str) -> str:
    return (f"submitit {metadata.version('submitit')} no longer provides {what}, which "
            f"hydra_plugins/embclf_launcher/ (forked_job.py, local_launcher.py, slot_pool.py, slurm_launcher.py) uses for {purpose}. "
            "pyproject.toml pins submitit to the tested minor range: keep that pin, or adapt the launcher to the new "
            "submitit and widen the pin (see forked_job.SUBMITIT_INTERNALS).")


def test_every_submitit_internal_the_launcher_uses_still_exists():
    from hydra_plugins.embclf_launcher.forked_job import SUBMITIT_INTERNALS

    gone = []
    for module, path, purpose in SUBMITIT_INTERNALS:
        try:
            _resolve(module, path)
        except (ImportError, AttributeError):
            gone.append(_gone_message(f"{module}.{path}", purpose))
    assert not gone, "\n".join(gone)


def test_every_listed_internal_is_one_the_launcher_really_uses():
    """The list stays honest: each name it holds appears in the launcher's code (a dropped use drops its row)."""
    from hydra_plugins.embclf_launcher.forked_job import SUBMITIT_INTERNALS

    code = "".join(p.read_text() for p in PLUGIN.glob("*.py"))
    for _, path, _ in SUBMITIT_INTERNALS:
        assert path.split(".")[-1] in code, f"{path} is listed in SUBMITIT_INTERNALS but no longer used"


def test_the_environment_a_forked_worker_gets_is_what_submitit_reads():
    """A forked worker gets the SUBMITIT_* variables submitit's local controller would set (local_launcher._fork);
    submitit's local job environment must still read each of them."""
    import submitit.local.local as local

    ours = set(re.findall(r'"(SUBMITIT_\w+)"', (PLUGIN / "local_launcher.py").read_text()))
    assert {"SUBMITIT_EXECUTOR", "SUBMITIT_LOCAL_TIMEOUT_S"} <= ours, ours  # the pattern still finds them
    theirs = inspect.getsource(local)
    missing = sorted(v for v in ours if v not in theirs)
    assert not missing, _gone_message(f"the environment variable(s) {', '.join(missing)}",
                                      "the environment of a forked worker")


def test_the_installed_submitit_is_inside_the_pinned_range():
    """pyproject.toml pins submitit below the next minor version (the internals above are checked against the
    installed one); the environment the tests run in must be one the pin allows."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "submitit"]
    upper = [s for s in req.specifier if s.operator in ("<", "<=", "~=", "==")]
    assert upper, f"pyproject.toml's {req} has no upper bound: a submitit release could drop what the launcher uses"
    installed = metadata.version("submitit")
    assert req.specifier.contains(installed), (
        f"submitit {installed} is installed but pyproject.toml requires {req}; reinstall with pip install -e .")


def test_torch_counts_gpus_without_initialising_cuda():
    """gpus.visible_gpu_ids counts GPUs through torch's private NVML count so that forking stays safe; without it
    the launcher falls back to torch.cuda.device_count() (CUDA initialised: fresh interpreters per job)."""
    import torch

    assert hasattr(torch.cuda, "_device_count_nvml"), (
        f"torch {torch.__version__} has no torch.cuda._device_count_nvml: hydra_plugins/embclf_launcher/gpus.py "
        "then counts GPUs with the CUDA runtime, and on GPU machines every job starts a fresh interpreter "
        "(hydra.launcher.fork cannot be used). Adapt gpus.visible_gpu_ids.")
