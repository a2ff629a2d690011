"""Run-dir helpers: atomic writes, failure marking that never overwrites a completed run."""
import json

from embclf import runs


def test_mark_failed_keeps_completed(tmp_path):
    runs.write_json_atomic(tmp_path / "summary.json", {"status": "completed", "test_mse": 0.01})
    runs.mark_failed(tmp_path, "killed")
    assert runs.read_summary(tmp_path) == {"status": "completed", "test_mse": 0.01}


def test_mark_failed_records_error(tmp_path):
    runs.write_json_atomic(tmp_path / "summary.json", {"status": "running", "start_time": 1.0})
    runs.mark_failed(tmp_path, "OOM")
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
