"""A sweep directory on this machine and in its storage: where a sweep writes
(:func:`sweep_dir`, :func:`local_dir`) and, for an object store, the driver's mirror of it
(:class:`SweepStore`).

The driver's uploads go through :class:`~reckoning_ray.core.uploads.Uploader`: while the store
answers, each push is done before the driver goes on; while it does not, the pushes wait in the
background and the sweep goes on. Pulls that find the store away leave the local copy as it is.
The sweep's end waits up to ``tune.storage_wait_s`` for the backlog (:meth:`SweepStore.close`).

Nothing here imports Ray.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from omegaconf import DictConfig

from reckoning_ray.core.storage import RUN_OWNED_BY_WRITER, Mirror, StorageError, is_uri, join, local_path
from reckoning_ray.core.uploads import Uploader

# The sweep's own files, written by its driver (Ray Tune keeps its experiment state beside them).
SWEEP_FILES = ("sweep_config.yaml", "asha_state.json", "curve_state.json", "wandb_sweep.yaml", "wandb_sweep.json",
               "best_config.yaml", "sweep_summary.json")
# Files a fresh sweep of the same name starts without (an earlier sweep's rungs and results).
SWEEP_RESULTS = ("asha_state.json", "curve_state.json", "best_config.yaml", "sweep_summary.json")
TRIAL_CHECKPOINTS = "trials/*/checkpoints"
REPORT = "report"


class SweepStore:
    """The driver's side of a sweep directory kept in an object store: ``local`` (this machine's
    cache) and ``remote`` (``<storage URI>/<tune.name>``), laid out alike::

        sweep_config.yaml asha_state.json wandb_sweep.* best_config.yaml sweep_summary.json report/
        trials/<trial id>/   a trial's run directory (pushed by its rank-0 worker, W&B files by the driver)
    """

    def __init__(self, local: str | os.PathLike, remote: str, log: Callable[[str], Any] = print) -> None:
        self.sweep = Mirror(local, remote)
        self.local, self.remote = self.sweep.local, self.sweep.remote
        self.log = log
        self._trials: dict[str, Mirror] = {}
        self._uploads: dict[tuple[str, tuple[str, ...]], Uploader] = {}
        self._unread_since: Optional[float] = None

    def trial(self, trial_id: str) -> Mirror:
        if trial_id not in self._trials:
            self._trials[trial_id] = Mirror(self.local / "trials" / trial_id, join(self.remote, "trials", trial_id))
        return self._trials[trial_id]

    def _upload(self, mirror: Mirror, what: str, include: Iterable[str], delete: Iterable[str] = ()) -> bool:
        include, delete = tuple(include), tuple(delete)
        key = (mirror.remote, include)
        if key not in self._uploads:
            self._uploads[key] = Uploader(mirror, log=self.log, journal=f".storage-backlog-{what}.json",
                                          include=include, delete=delete)
        return self._uploads[key].flush(while_answering=True)

    def push_sweep(self) -> bool:
        """The sweep's own files; an earlier sweep's results gone here are deleted there too.
        True when stored; False when the store does not answer (uploaded when it does)."""
        return self._upload(self.sweep, "sweep", SWEEP_FILES, delete=SWEEP_RESULTS)

    def push_trial(self, trial_id: str, files: Iterable[str] = ()) -> bool:
        """A trial's files written here: its W&B run (and ``files``, e.g. ``summary.json`` once tested)."""
        files = tuple(files)
        return self._upload(self.trial(trial_id), "driver" if files else "wandb", (*RUN_OWNED_BY_WRITER, *files))

    def push_report(self) -> bool:
        return self._upload(self.sweep, "report", (REPORT,))

    def pull_trial(self, trial_id: str) -> int:
        """A trial's metrics as its workers last stored them (none while the store does not
        answer: the local copy stays as it is)."""
        try:
            count = self.trial(trial_id).pull(include=("metrics.jsonl",))
        except StorageError as exc:
            if self._unread_since is None:
                self._unread_since = time.time()
                self.log(f"[storage] {self.remote} unreachable ({' '.join(str(exc).split())[:200]}); the sweep goes "
                         "on with the files it has here")
            return 0
        self._unread_since = None
        return count

    def pull(self, wait_s: float = 0.0) -> int:
        """Everything of the sweep but the checkpoints (a resumed sweep, a summary, publish).
        ``wait_s``: how long to wait for a store that does not answer (retrying with backoff)
        before StorageError."""
        deadline, delay = time.time() + wait_s, 1.0
        while True:
            try:
                return self.sweep.pull(include=(*SWEEP_FILES, "soups", "trials"), exclude=(TRIAL_CHECKPOINTS,))
            except StorageError as exc:
                if time.time() + delay > deadline:
                    raise
                self.log(f"[storage] {self.remote} unreachable ({' '.join(str(exc).split())[:200]}); retrying in "
                         f"{delay:.0f}s (up to tune.storage_wait_s)")
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def close(self, wait_s: float) -> list[str]:
        """Wait up to ``wait_s`` seconds in all for every upload's backlog; the files left (each
        directory's are listed in its journal, and named in one line)."""
        deadline, left = time.time() + wait_s, []
        for uploads in self._uploads.values():
            left += [f"{uploads.mirror.local / rel}" for rel in uploads.close(max(0.0, deadline - time.time()))]
        self._uploads.clear()
        return left


def open_sweep(sweep_dir: str | os.PathLike, log: Any = print) -> "tuple[Path, Optional[SweepStore]]":
    """A finished sweep's directory on this machine, for commands that read it (``publish``,
    ``soup``): a path as it is; an object store URI fetched (all but the checkpoints) into this
    node's cache, with the :class:`SweepStore` to write results back through."""
    if not is_uri(str(sweep_dir)):
        return Path(sweep_dir).expanduser().resolve(), None
    store = SweepStore(local_path(str(sweep_dir)), str(sweep_dir), log=log)
    log(f"fetching {store.remote} (all but the checkpoints) into {store.local}")
    store.pull()
    return store.local.resolve(), store


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


__all__ = ["REPORT", "SWEEP_FILES", "SWEEP_RESULTS", "SweepStore", "local_dir", "open_sweep", "sweep_dir",
           "sweep_store"]
