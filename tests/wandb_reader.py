"""Read back an offline wandb run from its ``run-*.wandb`` file (a test helper).

The file is wandb's transaction log: a 7-byte header (``:W&B``, magic ``0xBEE1``, version) followed
by LevelDB-log-format records in 32 KiB blocks (4-byte checksum, 2-byte length, 1-byte type:
full / first / middle / last), each record a ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32768
_HEADER = 7


def read_records(path: str) -> list[Any]:
    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log")
    records, pending, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length:  # a record still being written
            break
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # full or last
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def read_history(run_dir: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The rows passed to ``wandb.log`` in the offline run at ``run_dir`` (JSON-decoded values).

    ``run.finish()`` can return before wandb's service process has written the whole log, so this
    waits (up to ``timeout`` seconds) for the run's ``exit`` record.
    """
    deadline = time.monotonic() + timeout
    while True:
        paths = glob.glob(os.path.join(run_dir, "run-*.wandb"))
        records = read_records(paths[0]) if paths else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not paths:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item})
    return rows
