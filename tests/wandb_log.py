"""Read what wandb wrote for an offline run: its transaction log ``<run dir>/wandb/offline-run-*/run-<id>.wandb``.

In offline mode wandb 0.2x/0.3x writes no config.yaml or wandb-summary.json; everything it would upload is in
this file, in LevelDB's log format (32 KiB blocks of records with a 7-byte header: crc32, length, type) after
a 7-byte ``:W&B`` header, each record a ``wandb_internal_pb2.Record`` protobuf. ``wandb sync`` reads the same
file. Test helper, not product code: the product never needs to read wandb's files back.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List

if TYPE_CHECKING:  # imported where a log is read: wandb costs each test worker ~1 s at collection
    from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[pb.Record]:
    """Every Record in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer too small for a header: zero padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:  # preallocated zeros at the end of a block
            pos += left - 7
            continue
        buf += data[pos:pos + n]
        pos += n
        if kind in (FULL, LAST):
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            yield r


def _items(items) -> Dict[str, object]:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def _user_config(items) -> Dict[str, object]:
    # wandb keeps its own bookkeeping under _wandb (e.g. _wandb/visualize/... for logged charts)
    return {k: v for k, v in _items(items).items() if not k.split("/")[0] == "_wandb"}


def read_run(run_dir: Path) -> Dict[str, object]:
    """The one offline wandb run under ``run_dir/wandb``: id, group, job_type, name, tags, config (dict),
    history (list of dicts, one per ``log`` call), summary (dict), exit_code. Fails if there is not exactly one."""
    files: List[Path] = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline wandb run under {run_dir}/wandb, found {files}"
    out = {"file": files[0], "history": [], "summary": {}, "exit_code": None, "config": {}}
    for r in records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, group=r.run.run_group, job_type=r.run.job_type, name=r.run.display_name,
                       tags=list(r.run.tags))
            out["config"].update(_user_config(r.run.config.update))
        elif kind == "config":
            out["config"].update(_user_config(r.config.update))
        elif kind == "history":
            out["history"].append(_items(r.history.item))
        elif kind == "summary":
            out["summary"].update(_items(r.summary.update))
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out
