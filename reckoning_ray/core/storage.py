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

A node that is lost loses at most the files of the validation round in flight. A store that stops
answering stops nothing: the workers' and the driver's pushes wait in the background
(:mod:`reckoning_ray.core.uploads`), and a restart that cannot reach the store trains on from the
node's own newest checkpoint (:meth:`RunMirror.sync_down`). The driver's side of a sweep directory
is :mod:`reckoning_ray.core.sweep_store`. Files go through
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
# the files of a directory that wait for an unreachable store (reckoning_ray.core.uploads); never uploaded.
# A directory has one per writer: the run's own (JOURNAL), and the sweep driver's (".storage-backlog-<what>.json").
JOURNAL = ".storage-backlog.json"
JOURNALS = ".storage-backlog*.json"
DEFAULT_CACHE = "~/reckoning-ray-runs"
_CHUNK = 8 << 20  # bytes per write of an upload (pyarrow uploads large files in parts)

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


def read_journal(local: str | os.PathLike, name: str = JOURNAL) -> Optional[dict[str, Any]]:
    """The backlog journal ``name`` of the directory ``local`` (default: the run's own): the files
    not yet uploaded to its store (:mod:`reckoning_ray.core.uploads`); None when it has none."""
    import json

    try:
        return json.loads((Path(local) / name).read_text())
    except (OSError, ValueError):
        return None


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
            if path.is_file() and not path.name.endswith(".tmp") and ".tmp/" not in path.as_posix() \
                    and not fnmatch.fnmatchcase(path.name, JOURNALS):
                try:
                    out[path.relative_to(self.local).as_posix()] = path.stat()
                except FileNotFoundError:  # removed meanwhile (an older checkpoint)
                    pass
        return out

    def changed(self, include: Optional[Iterable[str]] = None, exclude: Iterable[str] = (),
                last: Iterable[str] = ()) -> list[str]:
        """The selected local files that changed since this mirror last pushed or pulled them, in
        upload order (``last`` at the end)."""
        include, exclude, last = (None if include is None else list(include)), list(exclude), list(last)
        changed = [rel for rel, st in self.local_files().items()
                   if (include is None or _matches(rel, include)) and not _matches(rel, exclude)
                   and self._known.get(rel) != (st.st_size, st.st_mtime_ns)]
        return sorted(changed, key=lambda rel: (rel in last, rel))

    def assume_uploaded(self, but: Iterable[str] = ()) -> None:
        """Take every local file but ``but`` as stored already (a directory whose backlog
        journal names what is not)."""
        but = set(but)
        for rel, st in self.local_files().items():
            if rel not in but:
                self._known[rel] = (st.st_size, st.st_mtime_ns)

    def remote_listing(self, under: str = "") -> tuple[dict[str, tuple[int, int]], set[str]]:
        """The remote files (``{relative path: (size, mtime_ns)}``) and directories under ``under``.
        A directory is listed without any file in it when an object store keeps its marker: it
        makes one when the last file of a directory is deleted."""
        from pyarrow import fs

        base = "/".join(p for p in (self.root, under.strip("/")) if p)
        try:
            infos = self.fs.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"storage {self.remote}: cannot list {base}: {exc}") from None
        prefix = self.root + "/" if self.root else ""
        infos = [info for info in infos if info.path.startswith(prefix)]
        return ({info.path[len(prefix):]: (info.size, int(info.mtime_ns or 0)) for info in infos
                 if info.type == fs.FileType.File},
                {info.path[len(prefix):] for info in infos if info.type == fs.FileType.Directory})

    def remote_files(self, under: str = "") -> dict[str, tuple[int, int]]:
        """``{relative path: (size, mtime_ns)}`` of the remote files (under ``under``)."""
        return self.remote_listing(under)[0]

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
    def _upload(self, rel: str, data: Optional[bytes] = None) -> bool:
        """Upload the local file ``rel`` (or ``data`` as it); False when the file is gone (an
        older checkpoint removed since the listing)."""
        from pyarrow import fs

        target = f"{self.root}/{rel}"
        try:
            src = open(self.local / rel, "rb") if data is None else None
        except FileNotFoundError:
            return False
        try:
            if isinstance(self.fs, fs.LocalFileSystem):  # object stores have no directories (and get no markers)
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(target) as dst:
                if data is None:
                    shutil.copyfileobj(src, dst, _CHUNK)
                else:
                    dst.write(data)
        finally:
            if src is not None:
                src.close()
        return True

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
        # The records are read before the listing: each names files that are in the listing
        # (a checkpoint is complete before the record names it), whatever is written meanwhile.
        records: dict[str, tuple[bytes, os.stat_result]] = {}
        for rel in last:
            try:
                st = (self.local / rel).stat()
                records[rel] = ((self.local / rel).read_bytes(), st)
            except FileNotFoundError:
                pass
        files = {rel: st for rel, st in self.local_files().items()
                 if (include is None or _matches(rel, include)) and not _matches(rel, exclude)}
        files = self.selected(files, {rel: data for rel, (data, _) in records.items()})
        for rel, (_, st) in records.items():
            if rel in files:
                files[rel] = st
        changed = [rel for rel, st in files.items() if self._known.get(rel) != (st.st_size, st.st_mtime_ns)]
        changed.sort(key=lambda rel: (rel in last, rel))
        try:
            for rel in changed:
                if self._upload(rel, records[rel][0] if rel in records else None):
                    self._known[rel] = (files[rel].st_size, files[rel].st_mtime_ns)
            if delete:
                listed, folders = self.remote_listing()
                remote = set(listed)
                gone = {rel for rel in remote if _matches(rel, delete) and rel not in files and not _matches(rel, exclude)}
                for rel in sorted(gone):
                    self.fs.delete_file(f"{self.root}/{rel}")
                    self._known.pop(rel, None)
                # a directory left without files goes too (an object store keeps a marker of it
                # otherwise), one left by an earlier push cut short after its files included
                left = remote - gone
                empty = {folder for folder in folders if _matches(folder, delete) and not _matches(folder, exclude)
                         and not any(rel.startswith(folder + "/") for rel in left)}
                for folder in sorted(empty, key=len, reverse=True):
                    self.fs.delete_dir(f"{self.root}/{folder}")
        except OSError as exc:
            raise StorageError(f"storage {self.remote}: cannot write: {exc}") from None
        return len(changed)

    def selected(self, files: dict[str, os.stat_result], records: dict[str, bytes]) -> dict[str, os.stat_result]:
        """The files a push takes, given the ``last`` files' contents as read before the listing."""
        return files

    def pull(self, include: Optional[Iterable[str]] = None, exclude: Iterable[str] = (),
             overwrite: bool = False, only_missing: bool = False, last: Iterable[str] = ()) -> int:
        """Download the selected remote files that are missing locally or newer than the local
        copy (by modification time; every selected one with ``overwrite``, only the missing ones
        with ``only_missing``: files never rewritten, such as a checkpoint's); returns how many.
        ``last``: files downloaded after all others (a record, after the files it names)."""
        include, exclude, last = (None if include is None else list(include)), list(exclude), list(last)
        count = 0
        try:
            for rel, (_, mtime_ns) in sorted(self.remote_files().items(), key=lambda kv: (kv[0] in last, kv[0])):
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


def _named(record_text: str) -> set[str]:
    """The checkpoints a record names (latest, best, a wsd run's stable)."""
    import json

    return {v for v in json.loads(record_text).values() if isinstance(v, str) and v.startswith("step-")}


def _latest_step(record_text: Optional[str]) -> int:
    import json

    if not record_text:
        return -1
    name = json.loads(record_text).get("latest") or ""
    return int(name.rsplit("-", 1)[-1]) if name.startswith("step-") else -1


class RunMirror(Mirror):
    """A training run directory mirrored by its rank-0 worker."""

    def sync_down(self, log: Any = print) -> bool:
        """Make the local run directory the storage's when the storage holds a later checkpoint
        (or the local one has none); returns whether it pulled. A storage that does not answer
        leaves the node's own newest checkpoint to train on, when it has one (its files not yet
        uploaded, listed in the backlog journal, go with the run's first push)."""

        local_record = self.local / RECORD
        backlog = set((read_journal(self.local) or {}).get("files") or ())
        local_step = _latest_step(local_record.read_text() if local_record.is_file() else None)
        try:
            record_text = self.read_text(RECORD)
            remote_step = _latest_step(record_text)
            remote = self.remote_files() if remote_step >= 0 else {}
        except OSError as exc:
            if local_step < 0:
                raise StorageError(f"storage {self.remote}: cannot read: {exc}") from None
            log(f"[storage] {self.remote} unreachable ({' '.join(str(exc).split())[:200]}); training on from this "
                f"node's own checkpoint (step {local_step}); what it lacks is uploaded when the store answers")
            self.assume_uploaded(but=backlog)
            return False
        if remote_step < 0 or remote_step <= local_step:
            # the local directory is current: what the storage holds already need not go again
            for rel, st in self.local_files().items():
                if rel in remote and remote[rel][0] == st.st_size and rel not in backlog:
                    self._known[rel] = (st.st_size, st.st_mtime_ns)
            return False
        (self.local / JOURNAL).unlink(missing_ok=True)  # the storage is ahead: this node's backlog is stale
        named = _named(record_text or "{}")
        unnamed = {rel.split("/")[1] for rel in remote if rel.startswith(CHECKPOINTS + "/")} - named
        self.pull(exclude=(*RUN_OWNED_BY_WRITER, *(f"{CHECKPOINTS}/{name}" for name in unnamed)), overwrite=True,
                  last=self.PUSH["last"])
        if (self.local / CHECKPOINTS).is_dir():  # this node's checkpoints the record no longer names
            for path in (self.local / CHECKPOINTS).iterdir():
                if path.name not in named:
                    shutil.rmtree(path, ignore_errors=True)
        return True

    def prune(self) -> list[str]:
        """Delete the stored checkpoints that the stored record does not name; returns their
        names. A worker killed while it uploads (ASHA stops a trial, a node is lost) can leave one:
        a checkpoint's files go before the record that names it. Called once no worker writes."""
        text = self.read_text(RECORD)
        if text is None:
            return []
        named = _named(text)
        files, folders = self.remote_listing(CHECKPOINTS)
        # a directory without files counts: a push cut short between deleting a checkpoint's files
        # and its directory leaves the directory's marker
        stale = sorted({rel.split("/")[1] for rel in (*files, *folders) if rel.count("/") >= 1} - named)
        try:
            for name in stale:  # the directory and everything in it
                self.fs.delete_dir(f"{self.root}/{CHECKPOINTS}/{name}")
        except OSError as exc:
            raise StorageError(f"storage {self.remote}: cannot write: {exc}") from None
        return stale

    # how the rank-0 worker pushes the run directory (reckoning_ray.core.uploads.Uploader takes them)
    PUSH = {"exclude": RUN_OWNED_BY_WRITER, "delete": (CHECKPOINTS,), "last": (RECORD, "summary.json")}

    def sync_up(self) -> int:
        return self.push(**self.PUSH)

    def selected(self, files: dict[str, os.stat_result], records: dict[str, bytes]) -> dict[str, os.stat_result]:
        """The checkpoints the record names, and nothing of the others: a checkpoint written after
        the record was read goes with the next push, with the record that names it (a push that
        runs while the loop writes, as a backlog does, never leaves a checkpoint no record names)."""
        if RECORD not in records:
            return files
        named = _named(records[RECORD].decode())
        return {rel: st for rel, st in files.items()
                if not rel.startswith(CHECKPOINTS + "/") or rel.split("/")[1] in named}


def pull_checkpoint(run_dir: str | os.PathLike, remote: str, which: str = "best") -> Optional[Path]:
    """Download the run's ``which`` checkpoint (and its record and config) from ``remote`` into
    ``run_dir`` unless it is there; returns its local directory (None when the run has none)."""

    mirror = Mirror(run_dir, remote)
    mirror.pull(include=(RECORD, "config.yaml"))
    path = checkpoint_path(run_dir, which)
    if path is not None:
        mirror.pull(include=(f"{CHECKPOINTS}/{path.name}",), only_missing=True)
    return path


__all__ = ["CACHE_ENV", "JOURNAL", "JOURNALS", "Mirror", "RunMirror", "StorageError", "cache_root", "is_uri", "join",
           "local_path", "pull_checkpoint", "read_journal"]
