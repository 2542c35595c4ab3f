"""The storage path: one home for everything a sweep writes.

``tune.storage_path`` is a local path, a path every node mounts (NFS), or an object store URI
(``s3://bucket/prefix``, ``gs://bucket/prefix``). With a path, every process writes there
directly. With a URI, Ray Tune keeps its own experiment state there, and the project's files are
written into a node-local cache (:func:`cache_root`) and mirrored to the URI as they are produced,
by the process that wrote them:

- a trial's rank-0 training worker pushes its run directory (``config.yaml``, ``metrics.jsonl``,
  ``checkpoints.json``, ``checkpoints/step-*``, ``summary.json``) after every validation and at the
  end, and pulls it back first when the storage holds a later checkpoint than its node (a trial
  restarted on another node, or a sweep resumed on a new cluster);
- the sweep's driver pushes each trial's W&B files (``wandb/``, ``wandb_run.json``) as results
  come in, and the sweep's own files (``sweep_config.yaml``, ``asha_state.json``, ``wandb_sweep.*``,
  ``best_config.yaml``, ``sweep_summary.json``); ``--resume`` and ``publish`` pull them first.

A node that is lost loses at most the files of the validation round in flight. Files go through
``pyarrow.fs`` (what Ray's own storage uses): credentials and endpoints come from the usual
environment (``AWS_*`` variables, an instance profile; ``AWS_ENDPOINT_URL`` for an S3-compatible
server such as MinIO), never from the config.

Nothing here imports Ray.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

CACHE_ENV = "RECKONING_RUNS_CACHE"
DEFAULT_CACHE = "~/reckoning-ray-runs"
_CHUNK = 8 << 20  # bytes per write of an upload (pyarrow uploads large files in parts)
from omegaconf import DictConfig

from reckoning_ray.core.checkpoint import CHECKPOINTS, RECORD, checkpoint_path


def is_uri(path: str) -> bool:
    return "://" in str(path)


def join(root: str, *parts: str) -> str:
    """``root`` (a path or URI) joined with ``parts`` by ``/``."""
    return "/".join([str(root).rstrip("/"), *(p.strip("/") for p in parts if p)])


def cache_root() -> Path:
    """This node's cache for files mirrored to an object store: ``$RECKONING_RUNS_CACHE``, else
    ``~/reckoning-ray-runs``. Resolved in the process that uses it, so each node uses its own."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def local_path(root: str) -> Path:
    """The sweep directory ``root`` (path or URI) on this machine: the path itself, else this
    node's cache of the URI (``<cache_root()>/<last part of the URI>``)."""
    return cache_root() / root.rstrip("/").rsplit("/", 1)[-1] if is_uri(root) else Path(root)


class StorageError(OSError):
    """The storage path cannot be read or written; the message names it and the likely fix."""


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    """``rel`` (a relative path with ``/``) is ``pattern`` or lies under it; ``*`` globs."""
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(rel, p.rstrip("/") + "/*") for p in patterns)


class Mirror:
    """A local directory and its copy under a storage URI (``pyarrow.fs``).

    ``push`` uploads the local files that changed since this mirror last pushed or pulled them
    (size and modification time), optionally limited by ``include`` / ``exclude`` patterns, and
    deletes remote files under ``delete`` patterns that no longer exist locally. ``pull``
    downloads remote files; by default only those missing locally. Patterns are relative paths
    (``wandb``, ``checkpoints/*``); a pattern also covers everything under it.
    """

    def __init__(self, local: str | os.PathLike, remote: str) -> None:
        from pyarrow import fs

        self.local = Path(local)
        self.remote = str(remote).rstrip("/")
        try:
            self.fs, self.root = fs.FileSystem.from_uri(self.remote)
        except Exception as exc:  # unknown scheme, bad URI, no credentials for the region lookup
            raise StorageError(f"storage {self.remote}: {type(exc).__name__}: {exc} (tune.storage_path must be a "
                               "local path or an s3:// / gs:// URI this machine can reach)") from None
        self.root = self.root.rstrip("/")
        self._known: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) last pushed / pulled

    def __repr__(self) -> str:
        return f"Mirror({str(self.local)!r} <-> {self.remote!r})"

    # -- listing -----------------------------------------------------------------------------------
    def local_files(self) -> dict[str, os.stat_result]:
        out: dict[str, os.stat_result] = {}
        if not self.local.is_dir():
            return out
        for path in self.local.rglob("*"):
            if path.is_file() and not path.name.endswith(".tmp") and ".tmp/" not in path.as_posix():
                out[path.relative_to(self.local).as_posix()] = path.stat()
        return out

    def remote_files(self, under: str = "") -> dict[str, tuple[int, int]]:
        """``{relative path: (size, mtime_ns)}`` of the remote files (under ``under``)."""
        from pyarrow import fs

        base = "/".join(p for p in (self.root, under.strip("/")) if p)
        try:
            infos = self.fs.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"storage {self.remote}: cannot list {base}: {exc}") from None
        prefix = self.root + "/" if self.root else ""
        return {info.path[len(prefix):]: (info.size, int(info.mtime_ns or 0)) for info in infos
                if info.type == fs.FileType.File and info.path.startswith(prefix)}

    def check_access(self) -> None:
        """Write, read back and delete a small probe object under the remote root; StorageError
        naming the storage and the likely fix when any of it fails (a bucket that does not exist,
        credentials that cannot write or read there)."""
        probe = f"{self.root}/.reckoning-ray-access-check-{os.getpid()}"
        step = "write"
        try:
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            step = "read"
            with self.fs.open_input_stream(probe) as f:
                if f.read() != b"ok":
                    raise OSError("the probe object read back differs from what was written")
            step = "delete"
            self.fs.delete_file(probe)
        except OSError as exc:
            reason = " ".join(str(exc).split())[:300]
            raise StorageError(f"tune.storage_path: cannot {step} under {self.remote} ({reason}); check that "
                               "the bucket exists and that the credentials at hand (AWS_* variables, "
                               "~/.aws, the instance profile) may read and write there") from None

    def exists(self, rel: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(f"{self.root}/{rel}").type == fs.FileType.File

    def read_text(self, rel: str) -> Optional[str]:
        """A small remote file's text, or None when it does not exist."""
        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(f"{self.root}/{rel}") as f:
            return f.read().decode()

    # -- copying -----------------------------------------------------------------------------------
    def _upload(self, rel: str) -> None:
        from pyarrow import fs

        target = f"{self.root}/{rel}"
        if isinstance(self.fs, fs.LocalFileSystem):  # object stores have no directories (and get no markers)
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(self.local / rel, "rb") as src, self.fs.open_output_stream(target) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)

    def _download(self, rel: str, mtime_ns: int) -> None:
        from pyarrow import fs

        path = self.local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        fs.copy_files(f"{self.root}/{rel}", str(tmp), source_filesystem=self.fs,
                      destination_filesystem=fs.LocalFileSystem())
        if mtime_ns:  # the stored copy's time: a later local write, or a later upload, is newer
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
        st = path.stat()
        self._known[rel] = (st.st_size, st.st_mtime_ns)

    def push(self, include: Optional[Iterable[str]] = None, exclude: Iterable[str] = (),
             delete: Iterable[str] = (), last: Iterable[str] = ()) -> int:
        """Upload changed local files; returns how many. ``last``: files uploaded after all others
        (a record naming other files, so that the remote record never names a missing file)."""
        include, exclude, delete, last = (None if include is None else list(include)), list(exclude), \
            list(delete), list(last)
        files = {rel: st for rel, st in self.local_files().items()
                 if (include is None or _matches(rel, include)) and not _matches(rel, exclude)}
        changed = [rel for rel, st in files.items() if self._known.get(rel) != (st.st_size, st.st_mtime_ns)]
        changed.sort(key=lambda rel: (rel in last, rel))
        try:
            for rel in changed:
                self._upload(rel)
                self._known[rel] = (files[rel].st_size, files[rel].st_mtime_ns)
            if delete:
                remote = set(self.remote_files())
                gone = {rel for rel in remote if _matches(rel, delete) and rel not in files and not _matches(rel, exclude)}
                for rel in sorted(gone):
                    self.fs.delete_file(f"{self.root}/{rel}")
                    self._known.pop(rel, None)
                # a directory left empty goes too (an object store keeps a marker of it otherwise)
                left = remote - gone
                for folder in sorted({rel.rsplit("/", 1)[0] for rel in gone if "/" in rel}, key=len, reverse=True):
                    if not any(rel.startswith(folder + "/") for rel in left):
                        self.fs.delete_dir(f"{self.root}/{folder}")
        except OSError as exc:
            raise StorageError(f"storage {self.remote}: cannot write: {exc}") from None
        return len(changed)

    def pull(self, include: Optional[Iterable[str]] = None, exclude: Iterable[str] = (),
             overwrite: bool = False, only_missing: bool = False) -> int:
        """Download the selected remote files that are missing locally or newer than the local
        copy (by modification time; every selected one with ``overwrite``, only the missing ones
        with ``only_missing``: files never rewritten, such as a checkpoint's); returns how many."""
        include, exclude = (None if include is None else list(include)), list(exclude)
        count = 0
        try:
            for rel, (_, mtime_ns) in sorted(self.remote_files().items()):
                if (include is not None and not _matches(rel, include)) or _matches(rel, exclude):
                    continue
                path = self.local / rel
                if overwrite or not path.exists() or (not only_missing and mtime_ns > path.stat().st_mtime_ns):
                    self._download(rel, mtime_ns)
                    count += 1
        except OSError as exc:
            raise StorageError(f"storage {self.remote}: cannot read: {exc}") from None
        return count


# -- a run directory -----------------------------------------------------------------------------

# What a training run's rank-0 worker writes (everything but the W&B writer's files, which the
# process hosting the W&B run mirrors), and the record pushed after the checkpoints it names.
RUN_OWNED_BY_WRITER = ("wandb", "wandb_run.json")


def _latest_step(record_text: Optional[str]) -> int:
    import json

    if not record_text:
        return -1
    name = json.loads(record_text).get("latest") or ""
    return int(name.rsplit("-", 1)[-1]) if name.startswith("step-") else -1


class RunMirror(Mirror):
    """A training run directory mirrored by its rank-0 worker."""

    def sync_down(self) -> bool:
        """Make the local run directory the storage's when the storage holds a later checkpoint
        (or the local one has none); returns whether it pulled."""

        local_record = self.local / RECORD
        remote_step = _latest_step(self.read_text(RECORD))
        local_step = _latest_step(local_record.read_text() if local_record.is_file() else None)
        if remote_step < 0 or remote_step <= local_step:
            # the local directory is current: what the storage holds already need not go again
            remote = self.remote_files() if remote_step >= 0 else {}
            for rel, st in self.local_files().items():
                if rel in remote and remote[rel][0] == st.st_size:
                    self._known[rel] = (st.st_size, st.st_mtime_ns)
            return False
        shutil.rmtree(self.local / "checkpoints", ignore_errors=True)
        self.pull(exclude=RUN_OWNED_BY_WRITER, overwrite=True)
        return True

    def sync_up(self) -> int:

        return self.push(exclude=RUN_OWNED_BY_WRITER, delete=(CHECKPOINTS,), last=(RECORD, "summary.json"))


def pull_checkpoint(run_dir: str | os.PathLike, remote: str, which: str = "best") -> Optional[Path]:
    """Download the run's ``which`` checkpoint (and its record and config) from ``remote`` into
    ``run_dir`` unless it is there; returns its local directory (None when the run has none)."""

    mirror = Mirror(run_dir, remote)
    mirror.pull(include=(RECORD, "config.yaml"))
    path = checkpoint_path(run_dir, which)
    if path is not None:
        mirror.pull(include=(f"{CHECKPOINTS}/{path.name}",), only_missing=True)
    return path


# -- a sweep directory ---------------------------------------------------------------------------

# The sweep's own files, written by its driver (Ray Tune keeps its experiment state beside them).
SWEEP_FILES = ("sweep_config.yaml", "asha_state.json", "curve_state.json", "wandb_sweep.yaml", "wandb_sweep.json",
               "best_config.yaml", "sweep_summary.json")
# Files a fresh sweep of the same name starts without (an earlier sweep's rungs and results).
SWEEP_RESULTS = ("asha_state.json", "curve_state.json", "best_config.yaml", "sweep_summary.json")
TRIAL_CHECKPOINTS = "trials/*/checkpoints"


class SweepStore:
    """The driver's side of a sweep directory kept in an object store: ``local`` (this machine's
    cache) and ``remote`` (``<storage URI>/<tune.name>``), laid out alike::

        sweep_config.yaml asha_state.json wandb_sweep.* best_config.yaml sweep_summary.json
        trials/<trial id>/   a trial's run directory (pushed by its rank-0 worker, W&B files by the driver)
    """

    def __init__(self, local: str | os.PathLike, remote: str) -> None:
        self.sweep = Mirror(local, remote)
        self.local, self.remote = self.sweep.local, self.sweep.remote
        self._trials: dict[str, Mirror] = {}

    def trial(self, trial_id: str) -> Mirror:
        if trial_id not in self._trials:
            self._trials[trial_id] = Mirror(self.local / "trials" / trial_id, join(self.remote, "trials", trial_id))
        return self._trials[trial_id]

    def push_sweep(self) -> int:
        """The sweep's own files; an earlier sweep's results gone here are deleted there too."""
        return self.sweep.push(include=SWEEP_FILES, delete=SWEEP_RESULTS)

    def push_trial(self, trial_id: str, files: Iterable[str] = ()) -> int:
        """A trial's files written here: its W&B run (and ``files``, e.g. ``summary.json`` once tested)."""
        return self.trial(trial_id).push(include=(*RUN_OWNED_BY_WRITER, *files))

    def pull_trial(self, trial_id: str) -> int:
        """A trial's metrics as its workers last stored them."""
        return self.trial(trial_id).pull(include=("metrics.jsonl",))

    def pull(self) -> int:
        """Everything of the sweep but the checkpoints (a resumed sweep, a summary, publish)."""
        return self.sweep.pull(include=(*SWEEP_FILES, "soups", "trials"), exclude=(TRIAL_CHECKPOINTS,))


def open_sweep(sweep_dir: str | os.PathLike, log: Any = print) -> "tuple[Path, Optional[SweepStore]]":
    """A finished sweep's directory on this machine, for commands that read it (``publish``,
    ``soup``): a path as it is; an object store URI fetched (all but the checkpoints) into this
    node's cache, with the :class:`SweepStore` to write results back through."""
    if not is_uri(str(sweep_dir)):
        return Path(sweep_dir).expanduser().resolve(), None
    store = SweepStore(local_path(str(sweep_dir)), str(sweep_dir))
    log(f"fetching {store.remote} (all but the checkpoints) into {store.local}")
    store.pull()
    return store.local.resolve(), store


__all__ = ["CACHE_ENV", "Mirror", "RunMirror", "StorageError", "SweepStore", "cache_root", "is_uri", "join",
           "local_path", "open_sweep", "pull_checkpoint"]

def sweep_dir(cfg: DictConfig) -> str:
    """Where Tune writes the sweep: a local absolute path or a storage URI (s3://, gs://, ...)."""
    storage = os.environ.get("RECKONING_STORAGE_PATH") if cfg.tune.storage_path == "" else cfg.tune.storage_path
    storage = storage or "runs/tune"
    if is_uri(storage):
        return storage.rstrip("/") + "/" + cfg.tune.name
    return str(Path(storage).expanduser().resolve() / cfg.tune.name)


def local_dir(cfg: DictConfig) -> Path:
    """The sweep directory on this machine: ``sweep_dir`` itself for a path, else this node's
    cache of it (``$RECKONING_RUNS_CACHE/<tune.name>``, default ``~/reckoning-ray-runs``),
    mirrored to the storage URI as it is written (:mod:`reckoning_ray.core.storage`)."""
    return local_path(sweep_dir(cfg))


def sweep_store(cfg: DictConfig) -> Optional[SweepStore]:
    """The mirror of the sweep directory in its object store (None for a path)."""
    root = sweep_dir(cfg)
    return SweepStore(local_dir(cfg), root) if is_uri(root) else None
