"""Uploads that wait out an object store's outage.

An :class:`Uploader` runs one :class:`~reckoning_ray.core.storage.Mirror`'s pushes in a
background thread: ``push()`` returns at once, so training never waits for the store. A push
that fails is retried with backoff (1 s, doubling up to 30 s) until the store answers; meanwhile
the files not yet uploaded are listed in a small journal beside them (``.storage-backlog.json``,
one per writer of a directory)
and a warning names the store and the backlog. When the store is back, the backlog goes in the
order every push keeps: files first, then the record that names them (``last``), then the
deletions.

``close(wait_s)`` ends a run: it waits up to ``wait_s`` seconds for the backlog, then leaves it in
the journal and says so; the run has finished from its local files. The next ``--resume`` (the
run's first push) or ``python -m reckoning_ray.tune sync SWEEP_DIR`` (:func:`sync_journals`)
uploads it.

Nothing here imports Ray.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from reckoning_ray.core.storage import JOURNAL, JOURNALS, Mirror, StorageError, read_journal

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
REPEAT_WARNING_S = 60.0  # a store still down is named again this often


class Uploader:
    """``mirror.push(**push_args)`` in a background thread, retried until the store answers."""

    def __init__(self, mirror: Mirror, log: Callable[[str], Any] = print, first_delay_s: float = FIRST_DELAY_S,
                 max_delay_s: float = MAX_DELAY_S, journal: str = JOURNAL, **push_args: Any) -> None:
        self.mirror, self.push_args, self.log = mirror, push_args, log
        self.journal = mirror.local / journal  # one per writer of the directory
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self.failing_since: Optional[float] = None
        self.uploaded = 0  # files uploaded by this uploader
        self._cond = threading.Condition()
        self._requested = self._done = 0
        self._closed = False
        self._warned_at = 0.0
        self._thread = threading.Thread(target=self._run, name=f"upload to {mirror.remote}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Uploader({self.mirror!r})"

    # -- the caller's side -------------------------------------------------------------------------
    def push(self) -> int:
        """Ask for a push of what has changed; returns at once (the request's number)."""
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            self._requested += 1
            self._cond.notify_all()
            return self._requested

    def flush(self, timeout_s: Optional[float] = None, while_answering: bool = False) -> bool:
        """Push, and wait up to ``timeout_s`` seconds for it; True when everything went. With
        ``while_answering``, stop waiting as soon as the store fails (the push goes on in the
        background): a store that answers is as current as the caller; one that does not never
        holds the caller up."""
        wanted = self.push()
        with self._cond:
            return self._cond.wait_for(
                lambda: self._done >= wanted or (while_answering and self.failing_since is not None),
                timeout=timeout_s) and self._done >= wanted

    def pending(self) -> list[str]:
        """The files a push would upload now, in upload order."""
        return self.mirror.changed(**{k: v for k, v in self.push_args.items() if k != "delete"})

    def close(self, wait_s: float) -> list[str]:
        """Wait up to ``wait_s`` seconds for the backlog, then stop; returns the files left
        (listed in the journal, and named in one line) or [] when everything went."""
        done = self.flush(wait_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        if done:
            return []
        left = self.pending()
        self._write_journal(left, "not uploaded when the run ended")
        self.log(f"[storage] {self.mirror.remote} did not answer for {wait_s:.0f}s (tune.storage_wait_s): the run "
                 f"finished from its local files; {len(left)} file(s) are not uploaded, listed in "
                 f"{self.journal}. `python -m reckoning_ray.tune sync <sweep dir>` on this node, "
                 "or the next --resume, uploads them")
        return left

    # -- the thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        delay = self.first_delay_s
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._done < self._requested)
                if self._closed:
                    return
                target = self._requested
            try:
                self.uploaded += self.mirror.push(**self.push_args)
            except StorageError as exc:
                self._failed(exc)
                with self._cond:  # the backoff; close() ends it
                    if self._cond.wait_for(lambda: self._closed, timeout=delay):
                        return
                delay = min(delay * 2, self.max_delay_s)
                continue
            delay = self.first_delay_s
            # a journal left by this run or an earlier process (a resumed run's) lists nothing now
            self.journal.unlink(missing_ok=True)
            if self.failing_since is not None:
                self.log(f"[storage] {self.mirror.remote} answers again after {time.time() - self.failing_since:.0f}s;"
                         " the backlog is uploaded")
                self.failing_since = None
            with self._cond:
                self._done = max(self._done, target)
                self._cond.notify_all()

    def _failed(self, exc: StorageError) -> None:
        now = time.time()
        left = self.pending()
        first = self.failing_since is None
        since = now if first else self.failing_since
        self._write_journal(left, str(exc), since)  # before anyone hears that the store is away
        if first:
            with self._cond:
                self.failing_since = now
                self._cond.notify_all()  # callers waiting while_answering go on
        if first or now - self._warned_at >= REPEAT_WARNING_S:
            self._warned_at = now
            lasted = "" if first else f" for {now - since:.0f}s"
            self.log(f"[storage] {self.mirror.remote} unreachable{lasted} ({' '.join(str(exc).split())[:200]}); "
                     f"training goes on, {len(left)} file(s) wait to upload (listed in {self.journal}), retried "
                     "with backoff")

    def _write_journal(self, files: list[str], error: str, since: Optional[float] = None) -> None:
        since = since or self.failing_since or time.time()
        journal = {"remote": self.mirror.remote, "files": files, "error": error[:500],
                   "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
                   "push": {k: list(v) if v is not None else None for k, v in self.push_args.items()}}
        path = self.journal
        if not self.mirror.local.is_dir():
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(journal, indent=1) + "\n")
        os.replace(tmp, path)


def sync_journals(local_root: str | os.PathLike, log: Callable[[str], Any] = print) -> tuple[int, int]:
    """Upload the backlog of every directory under ``local_root`` (this node's copy of a sweep)
    that has a journal, as its last push would have; returns (directories, files uploaded).
    Raises StorageError when the store still does not answer (the journals stay)."""
    directories = files = 0
    for journal_path in sorted(Path(local_root).rglob(JOURNALS)):
        journal = read_journal(journal_path.parent, journal_path.name)
        if not journal:
            continue
        mirror = Mirror(journal_path.parent, journal["remote"])
        mirror.assume_uploaded(but=journal["files"])
        push = {k: v for k, v in (journal.get("push") or {}).items() if k in ("include", "exclude", "delete", "last")}
        count = mirror.push(**push)
        journal_path.unlink(missing_ok=True)
        log(f"[storage] {journal_path.parent}: {count} file(s) uploaded to {journal['remote']}")
        directories, files = directories + 1, files + count
    return directories, files


__all__ = ["Uploader", "sync_journals"]
