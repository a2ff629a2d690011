"""precision=auto: bf16 where the device runs it natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX), else
fp32; resolved before the run dir is written, so identity, config and summary hold the precision used."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from embclf import identity, runtime
from embclf.config import Precision, conf_dir

AVX2 = "flags\t\t: fpu sse2 avx avx2 fma\n"
AMX = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def _cfg(*overrides):
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=["model=ae", "device=cpu", *overrides])


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """``cpu("avx2")`` / ``cpu("amx")``: this process reads that machine's /proc/cpuinfo flags."""
    def use(kind):
        f = tmp_path / f"cpuinfo-{kind}"
        f.write_text("processor\t: 0\n" + (AMX if kind == "amx" else AVX2))
        real = runtime.cpu_bf16_flags
        monkeypatch.setattr(runtime, "cpu_bf16_flags", lambda cpuinfo=str(f): real(cpuinfo))
    return use


def test_the_flags_are_read_from_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(AVX2)
    assert runtime.cpu_bf16_flags(str(f)) == []
    f.write_text(AMX)
    assert runtime.cpu_bf16_flags(str(f)) == ["amx_bf16", "avx512_bf16"]
    assert runtime.cpu_bf16_flags(str(tmp_path / "missing")) == []  # no /proc (macOS): fp32, the safe choice


def test_auto_resolves_per_device(cpu):
    cpu("avx2")
    assert runtime.resolve_precision("auto", "cpu")[0] == "fp32"
    assert "without native bf16" in runtime.resolve_precision("auto", "cpu")[1]
    assert runtime.resolve_precision("bf16", "cpu") == ("bf16", "as requested")  # asked for: kept (and warned)
    cpu("amx")
    assert runtime.resolve_precision("auto", torch.device("cpu")) == ("bf16", "CPU with native bf16: amx_bf16, avx512_bf16")
    assert runtime.resolve_precision(Precision.fp32, "cpu") == ("fp32", "as requested")
    if not torch.cuda.is_available():  # a CUDA device that torch cannot use has no bf16 to offer
        assert runtime.resolve_precision("auto", "cuda:0")[0] == "fp32"
        assert runtime.resolve_precision("auto", "auto")[0] == "bf16"  # device=auto is this CPU here


def test_autocast_follows_the_resolution(cpu):
    x = torch.ones(2, 2)
    cpu("amx")
    with runtime.autocast(torch.device("cpu"), "auto"):
        assert (x @ x).dtype == torch.bfloat16
    cpu("avx2")
    with runtime.autocast(torch.device("cpu"), "auto"):
        assert (x @ x).dtype == torch.float32


@pytest.mark.parametrize("kind,same_as", [("avx2", "fp32"), ("amx", "bf16")])
def test_identity_is_the_resolved_precision(cpu, kind, same_as):
    cpu(kind)
    auto = _cfg("precision=auto")
    assert identity.identity(auto, "autoencode") == identity.identity(_cfg(f"precision={same_as}"), "autoencode")
    other = "bf16" if same_as == "fp32" else "fp32"
    assert identity.identity(auto, "autoencode") != identity.identity(_cfg(f"precision={other}"), "autoencode")
    # the job writes the resolved value into its config: the stored config never says auto
    choice = runtime.resolve_precision_in(auto)
    assert auto.precision == Precision[same_as] and choice["requested"] == "auto" and choice["resolved"] == same_as
    assert runtime.precision_choice(auto) == choice  # what provenance.precision records
    assert identity.plain(auto)["precision"] == same_as
