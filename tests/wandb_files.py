"""A reader of W&B's offline ``.wandb`` run files, for the tests: they check what a run, a sweep
or the W&B writer (``reckoning_ray.tracking.writer.RunWriter``) left on disk without a network. The
package itself never parses these files: the writer keeps its own record (``wandb_run.json``).
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional

# --------------------------------------------------------------------------------------------
# offline run reader
#
# A .wandb file is W&B's transaction log, written by wandb-core (Go): a 7-byte file header
# (":W&B", magic 0xBEE1 little-endian, version 0), then a LevelDB-style log of 32 KiB blocks.
# Each chunk is a 7-byte header (CRC-32 of the type byte followed by the payload, payload
# length, type: 1 full, 2 first, 3 middle, 4 last) and its payload; a block whose remaining
# space is shorter than a chunk header is zero-padded. Payloads are
# wandb.proto.wandb_internal_pb2.Record messages. wandb 0.31 has no Python reader for them.

_FILE_IDENT = b":W&B"
_FILE_MAGIC = 0xBEE1
_FILE_VERSION = 0
_FILE_HEADER_LEN = 7
_BLOCK_LEN = 32 * 1024
_CHUNK_HEADER_LEN = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _iter_payloads(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if len(data) < _FILE_HEADER_LEN or data[:4] != _FILE_IDENT:
        raise ValueError(f"{path}: not a W&B run file (starts with {data[:7]!r}, "
                         f"expected the {_FILE_IDENT!r} header of a .wandb file)")
    magic, version = struct.unpack_from("<HB", data, 4)
    if magic != _FILE_MAGIC or version != _FILE_VERSION:
        raise ValueError(f"{path}: unsupported .wandb header (magic {magic:#x}, version {version}); "
                         f"this reader knows magic {_FILE_MAGIC:#x} version {_FILE_VERSION}")
    pos = _FILE_HEADER_LEN
    pending: Optional[bytes] = None
    while pos < len(data):
        block_end = (pos // _BLOCK_LEN + 1) * _BLOCK_LEN
        if block_end - pos < _CHUNK_HEADER_LEN:
            pos = block_end  # zero padding at the end of a block
            continue
        if pos + _CHUNK_HEADER_LEN > len(data):
            return  # the writer stopped inside a chunk header (killed or still running)
        chunk_pos = pos
        crc, length, kind = struct.unpack_from("<IHB", data, chunk_pos)
        start, end = chunk_pos + _CHUNK_HEADER_LEN, chunk_pos + _CHUNK_HEADER_LEN + length
        if end > block_end:
            raise ValueError(f"{path}: corrupt chunk at byte {chunk_pos} (length {length} crosses "
                             f"a {_BLOCK_LEN}-byte block)")
        if end > len(data):
            return  # truncated last chunk: the writer stopped mid-write
        payload = data[start:end]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: checksum mismatch in the chunk at byte {chunk_pos}; "
                             "the file is corrupt")
        pos = end
        if kind == _FULL and pending is None:
            yield payload
        elif kind == _FIRST and pending is None:
            pending = payload
        elif kind == _MIDDLE and pending is not None:
            pending += payload
        elif kind == _LAST and pending is not None:
            yield pending + payload
            pending = None
        else:
            raise ValueError(f"{path}: unexpected chunk type {kind} at byte {chunk_pos}")


def iter_records(path: str | os.PathLike) -> Iterator[Any]:
    """Every ``wandb_internal_pb2.Record`` of a ``.wandb`` file, in the order written.

    A truncated tail (a run killed or still running) ends the iteration quietly; a bad header,
    checksum or chunk sequence raises ValueError naming the file and byte offset.
    """
    from wandb.proto import wandb_internal_pb2

    for payload in _iter_payloads(Path(path)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _item_value(item: Any) -> Any:
    # History items carry either a typed scalar (the `value` oneof) or JSON text.
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if kind == "none":
        return None
    if kind in ("boolean", "integer", "number", "text"):
        return getattr(item, kind)
    if kind == "json":
        return json.loads(item.json)
    return json.loads(item.value_json) if item.value_json else None


def _item_path(item: Any) -> list[str]:
    # Nested dicts are logged as a key path; "a.b" stays one key.
    return list(item.nested_key) if len(item.nested_key) else [item.key]


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = tree[key] = {}
        tree = node
    tree[path[-1]] = value


def _del_path(tree: dict[str, Any], path: list[str]) -> None:
    for key in path[:-1]:
        tree = tree.get(key)
        if not isinstance(tree, dict):
            return
    tree.pop(path[-1], None)


def read_offline_run(path: str | os.PathLike, wait_s: float = 5.0) -> dict[str, Any]:
    """Read one ``.wandb`` file into plain Python.

    Returns ``{"path", "run_id", "project", "entity", "group", "name", "sweep_id" (the W&B sweep
    the run belongs to, ``wandb.Settings(sweep_id=...)``), "start_time" (Unix
    seconds), "resume" (True when the run asks ``wandb sync`` to append to an existing run of
    the same id, as ``Tracker`` runs do), "config" (dict), "history" (one dict per logged
    step, with "_step" and W&B's "_runtime"/"_timestamp" in seconds; nested logged dicts stay
    nested), "summary" (dict), "exit_code" (None when the run did not finish)}``.
    W&B's internal "_wandb" entries are left out. Waits up to ``wait_s`` for the file's exit
    record (wandb-core writes it after ``finish()`` has returned).
    """
    path = Path(path)
    if wait_s > 0:
        wait_until_closed(path, wait_s)
    run: dict[str, Any] = {"path": path, "run_id": None, "project": None, "entity": None,
                           "group": None, "name": None, "sweep_id": None, "start_time": None,
                           "resume": False,
                           "config": {},
                           "history": [], "summary": {}, "exit_code": None}
    config, summary = run["config"], run["summary"]
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            for key, value in (("run_id", r.run_id), ("project", r.project), ("entity", r.entity),
                               ("group", r.run_group), ("name", r.display_name), ("sweep_id", r.sweep_id)):
                if value:
                    run[key] = value
            run["resume"] = r.resume
            if r.HasField("start_time"):
                run["start_time"] = r.start_time.seconds + r.start_time.nanos * 1e-9
            for item in r.config.update:
                _set_path(config, _item_path(item), _item_value(item))
            for item in r.summary.update:
                _set_path(summary, _item_path(item), _item_value(item))
        elif kind == "config":
            for item in record.config.update:
                _set_path(config, _item_path(item), _item_value(item))
            for item in record.config.remove:
                _del_path(config, _item_path(item))
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_path(row, _item_path(item), _item_value(item))
            row.setdefault("_step", record.history.step.num)
            run["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set_path(summary, _item_path(item), _item_value(item))
            for item in record.summary.remove:
                _del_path(summary, _item_path(item))
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    config.pop("_wandb", None)
    summary.pop("_wandb", None)
    return run


def wait_until_closed(run_file: str | os.PathLike, timeout_s: float = 10.0) -> bool:
    """Wait until ``run_file`` holds its exit record (wandb-core writes it last, after
    ``run.finish()`` has returned)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in iter_records(run_file)):
                return True
        except (OSError, ValueError):
            pass  # not there yet, or caught mid-write
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def find_offline_runs(root: str | os.PathLike) -> list[Path]:
    """All ``.wandb`` run files under ``root`` (any depth), sorted, each file once.

    The ``latest-run`` symlink W&B keeps beside the run directories is not followed.
    """
    found = {p.resolve() for p in Path(root).rglob("*.wandb")
             if p.is_file() and p.parent.name != "latest-run"}
    return sorted(found)


def read_offline_run_merged(root: str | os.PathLike, run_id: str) -> dict[str, Any]:
    """All files of run ``run_id`` under ``root`` read as one run, as ``wandb sync`` uploads them.

    Files are taken in order of their start time: histories are concatenated, config and
    summary updated in turn; name, group and exit code come from the last file. Same keys as
    ``read_offline_run`` with ``paths`` (the files read) instead of ``path``.
    Raises FileNotFoundError when no file under ``root`` holds that run id.
    """
    runs = [r for r in (read_offline_run(p) for p in find_offline_runs(root)) if r["run_id"] == run_id]
    if not runs:
        raise FileNotFoundError(f"no .wandb file of run {run_id!r} under {root}")
    runs.sort(key=lambda r: (r["start_time"] or 0.0, str(r["path"])))
    merged: dict[str, Any] = {"paths": [r["path"] for r in runs], "sweep_id": None, "history": [],
                              "config": {}, "summary": {}}
    for r in runs:
        for key in ("run_id", "project", "entity", "group", "name", "sweep_id", "resume"):
            if r[key] is not None:
                merged[key] = r[key]
        merged["exit_code"] = r["exit_code"]
        merged.setdefault("start_time", r["start_time"])
        merged["history"].extend(r["history"])
        merged["config"].update(r["config"])
        merged["summary"].update(r["summary"])
    return merged
