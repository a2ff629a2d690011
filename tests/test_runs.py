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
