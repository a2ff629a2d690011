"""Run-dir helpers: atomic writes, failure marking that never overwrites a completed run."""
import json

from embclf import identity, lifecycle, runs


def test_mark_failed_keeps_completed(tmp_path):
    runs.write_json_atomic(tmp_path / "summary.json", {"status": "completed", "test_mse": 0.01})
    lifecycle.mark_failed(tmp_path, "killed")
    assert runs.read_summary(tmp_path) == {"status": "completed", "test_mse": 0.01}


def test_mark_failed_records_error(tmp_path):
    runs.write_json_atomic(tmp_path / "summary.json", {"status": "running", "start_time": 1.0})
    lifecycle.mark_failed(tmp_path, "OOM")
    s = runs.read_summary(tmp_path)
    assert s["status"] == "failed" and s["error"] == "OOM" and s["wall_seconds"] > 0


def test_atomic_write_leaves_no_temp_files(tmp_path):
    runs.write_json_atomic(tmp_path / "a" / "x.json", {"k": 1})
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"k": 1}


def test_metrics_skip_torn_line_and_truncate(tmp_path):
    for e in (1, 2, 3):
        runs.append_metrics(tmp_path, {"epoch": e, "split": "train"})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "spl')  # a kill mid-write
    assert [r["epoch"] for r in runs.read_metrics(tmp_path)] == [1, 2, 3]
    runs.truncate_metrics(tmp_path, 2)
    assert [r["epoch"] for r in runs.read_metrics(tmp_path)] == [1, 2]


def test_json_files_never_hold_bare_nan(tmp_path):
    runs.append_metrics(tmp_path, {"epoch": 1, "mse": float("nan"), "kl": float("inf"), "psnr": 12.5})
    runs.write_json_atomic(tmp_path / "s.json", {"test_mse": float("nan"), "nested": [float("-inf"), 1.0]})
    strict = dict(parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert json.loads((tmp_path / "metrics.jsonl").read_text(), **strict) == {"epoch": 1, "mse": None, "kl": None,
                                                                              "psnr": 12.5}
    assert json.loads((tmp_path / "s.json").read_text(), **strict) == {"test_mse": None, "nested": [None, 1.0]}


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_leaves_no_temp_file(tmp_path):
    """Past the file-size limit (as on a full disk) torch.save fails mid-write: the error names the file,
    the previous checkpoint still loads, and no temporary file is left."""
    import resource
    import signal

    import pytest
    import torch

    path = tmp_path / "checkpoints" / "last.pt"
    runs.save_atomic({"model": {"w": torch.zeros(10)}, "state": {"epoch": 1}}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as embclf's main does: fail, do not die
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        with pytest.raises(runs.WriteError, match=r"cannot write .*last\.pt: the file-size limit") as e:
            runs.save_atomic({"model": {"w": torch.zeros(1_000_000)}, "state": {"epoch": 2}}, path)
        assert e.value.reason == "disk full"
        (tmp_path / "m").mkdir()
        runs.append_metrics(tmp_path / "m", {"epoch": 1, "split": "train"})
        with pytest.raises(runs.WriteError, match="metrics.jsonl"):
            runs.append_metrics(tmp_path / "m", {"epoch": 2, "split": "train", "pad": "x" * 300_000})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert runs.load_checkpoint(path, ("model", "state"))["state"]["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert runs.read_metrics(tmp_path / "m") == [{"epoch": 1, "split": "train"}]  # no torn line left


def test_a_run_written_before_a_key_existed_compares_equal_with_its_default():
    """Upgrading embclf must not turn finished runs into 'different configs': a key missing from a stored
    config counts as its schema default in every comparison (completed? resumable? the same encoder?)."""
    from hydra import compose, initialize_config_dir
    from embclf.config import conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose("config", overrides=["data=folder", "data.root=/d"])
    stored = runs.resolved(cfg)
    del stored["data"]["skip_corrupt"], stored["precision"], stored["model"]["beta"]
    for stage in ("autoencode", "classify"):
        assert identity.differences(identity.identity(stored, stage), identity.identity(cfg, stage)) == []
    stored["model"]["beta"] = 0.5  # a real difference still is one
    assert identity.differences(identity.identity(stored, "autoencode"), identity.identity(cfg, "autoencode")) \
        == ["model.beta"]


def _fill(d):
    """Fill the file system of ``d`` to the last byte."""
    import shutil
    with open(d / "fill", "wb") as f:
        f.write(b"x" * shutil.disk_usage(d).free)


def test_a_checkpoint_that_fills_the_disk_frees_its_space_so_the_failure_can_be_recorded(small_tmpfs):
    """A real full disk (tmpfs): the partial checkpoint's space is freed before the error reaches the caller,
    even while the caller still holds the exception (as the stage does while it records the failure), so the
    summary saying why can be written."""
    import shutil

    import pytest
    import torch

    d = small_tmpfs(1 << 20)
    runs.write_json_atomic(d / "summary.json", {"status": "running"})
    try:
        runs.save_atomic({"w": torch.zeros(1_000_000)}, d / "checkpoints" / "last.pt")  # 4 MB on 1 MB
        pytest.fail("the checkpoint fit")
    except runs.WriteError as e:
        assert e.reason == "disk full" and "last.pt: the disk is full" in str(e)
        assert list((d / "checkpoints").iterdir()) == []
        assert shutil.disk_usage(d).free > 900_000  # the partial file's blocks are free again
        lifecycle.mark_failed(d, str(e), reason=e.reason)
    assert runs.read_summary(d)["reason"] == "disk full"


def test_a_full_disk_that_reports_a_few_kib_free_is_still_a_full_disk(small_tmpfs, monkeypatch):
    """A real failed checkpoint write (a full tmpfs), with the file system reporting what an ext4 disk reported here
    after a checkpoint write failed: 16 KiB free, not 0 (torch said only "unexpected pos"). That is "the disk is
    full", not a bare write failure; 1 MiB free or more (beyond what the file had written) is not."""
    import shutil
    from collections import namedtuple

    import pytest
    import torch

    d = small_tmpfs(1 << 20)
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    for reported, reason in ((16 << 10, "disk full"), (64 << 20, "write failed")):
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(real(p).total, real(p).used, reported))
        with pytest.raises(runs.WriteError) as e:
            runs.save_atomic({"w": torch.zeros(1_000_000)}, d / "checkpoints" / "last.pt")  # 4 MB on 1 MB
        assert e.value.reason == reason, (reported, str(e.value))
        assert ("the disk is full" in str(e.value)) == (reason == "disk full")
        assert list((d / "checkpoints").iterdir()) == []


def test_metrics_and_summary_writes_on_a_full_disk_fail_as_write_errors_and_leave_the_files_valid(small_tmpfs):
    import pytest

    d = small_tmpfs(64 << 10)
    runs.write_json_atomic(d / "summary.json", {"status": "running"})
    _fill(d)
    with pytest.raises(runs.WriteError, match="metrics.jsonl: the disk is full") as e:
        runs.append_metrics(d, {"epoch": 1, "split": "train"})  # a new file: buffered, this raised a bare OSError
    assert e.value.reason == "disk full" and runs.read_metrics(d) == []
    with pytest.raises(runs.WriteError, match="summary.json: the disk is full"):
        runs.write_json_atomic(d / "summary.json", {"status": "failed", "pad": "x" * 10_000})
    assert runs.read_summary(d) == {"status": "running"}
    assert sorted(p.name for p in d.iterdir()) == ["fill", "metrics.jsonl", "summary.json"]
