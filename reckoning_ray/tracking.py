"""W&B tracking: offline unless configured online, never in the way of training.

Training metrics go to W&B from the rank-0 training worker only. A single training run is one W&B
run whose id is the run name (so rerunning the same name resumes it); a Ray Tune trial is one W&B
run whose id is the trial id, grouped under the sweep name (``run_names``).

Mode: ``tracking.mode`` from the config, overridden by the ``WANDB_MODE`` environment variable
when that is set (W&B's own convention). ``online`` without an API key (``WANDB_API_KEY``,
``WANDB_IDENTITY_TOKEN_FILE`` or a ``wandb login`` entry in ``~/.netrc``) falls back to offline
with a warning. Any error from W&B at start, log or finish is logged once as a warning and the
tracker turns into a no-op: training never fails or blocks because of W&B.

On disk (wandb 0.31), ``Tracker.start(..., dir=D)`` writes::

    D/wandb/debug.log, debug-internal.log     logs of the latest run started in D
    D/wandb/latest-run -> offline-run-...     symlink to the latest run directory
    D/wandb/offline-run-<YYYYmmdd_HHMMSS>-<run_id>/
        run-<run_id>.wandb                    the run's records (config, history, summary)
        files/  logs/  tmp/                   requirements.txt, debug logs

(online runs use ``run-<...>`` directories). Starting the same run id again in offline mode
(a resumed run) creates a second ``offline-run-...-<run_id>`` directory (``...-<run_id>-1`` when
both starts fall in the same second); each file holds only what was logged during its start.
``wandb sync D/wandb`` (or the run directories, or the ``.wandb`` files) uploads them; files
of one run id are synced one after the other in order of their start time, so the uploaded run
holds the combined history. ``wandb sync --dry-run D/wandb`` lists what would be uploaded.
``read_offline_run_merged`` reads them back the same way, without a network.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Optional

from reckoning_ray.config import TRACKING_MODES, ConfigError

log = logging.getLogger(__name__)

# wandb.init gives up after this long (its default is 90 s): offline starts take ~1 s here,
# an online start against an unreachable server fails after exactly this long.
INIT_TIMEOUT_S = 20.0
# Seconds to wait for the wandb-core service process to come up.
SERVICE_WAIT_S = 30.0
# Online runs: stop waiting for uploads at finish after this long; the data stays on disk
# for `wandb sync` (the W&B default, 0, waits forever).
FINISH_TIMEOUT_S = 60.0
# run.finish() returns before the wandb-core service has flushed and closed the run's .wandb
# file (it only informs the service); Tracker.finish waits this long for the closed file.
FLUSH_WAIT_S = 10.0

# WANDB_MODE spellings W&B accepts, mapped onto our modes ("dryrun" and "run" are W&B's old
# names for offline and online).
_ENV_MODES = {"offline": "offline", "dryrun": "offline", "online": "online", "run": "online",
              "disabled": "disabled"}
_DEFAULT_BASE_URL = "https://api.wandb.ai"
# Whether a larger value of each validation metric is better (config.METRICS): the run summary
# keeps the best value of the tracked metric (define_metric summary "max" or "min").
METRIC_MODES = {"val/label_accuracy": "max", "val/answer_loss": "min"}


# --------------------------------------------------------------------------------------------
# secrets


# Words that make a config key name a secret. Key names are split into words (at non-letters
# and camelCase humps), so "eval.max_new_tokens" or "tokenizer" are kept while "hf_token",
# "wandb.api_key", "apiKey" or "aws_secret_access_key" are dropped.
_SECRET_WORDS = {"token", "password", "passwd", "secret", "secrets", "credential", "credentials",
                 "apikey", "auth"}
_SECRET_PAIRS = {("api", "key"), ("private", "key"), ("access", "key")}


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def looks_secret(name: str) -> bool:
    """True when a key name looks like it holds a secret (api_key, token, password, ...)."""
    words = _words(name)
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def _secret_env_values(environ: Mapping[str, str]) -> set[str]:
    # Values of environment variables that look secret (WANDB_API_KEY, HF_TOKEN, ...): a config
    # value equal to one of them is dropped too, whatever its key is called. Short values
    # ("1", "true") are not secrets and would drop unrelated entries.
    return {v for k, v in environ.items() if looks_secret(k) and len(v) >= 8}


def scrub(config: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """A copy of ``config`` without secrets, for W&B.

    Drops every entry (at any depth of nested dicts) whose key name looks like a secret
    (``looks_secret``) and every string value that contains the value of a secret-looking
    environment variable (``WANDB_API_KEY``, ``HF_TOKEN``, ...; ``environ`` defaults to
    ``os.environ``). The config passed to W&B is the resolved config, which holds no keys:
    this is defence in depth.
    """
    secrets = _secret_env_values(os.environ if environ is None else environ)

    def keep(value: Any) -> bool:
        return not (isinstance(value, str) and any(s in value for s in secrets))

    def walk(node: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if looks_secret(str(key)) or not keep(value):
                continue
            if isinstance(value, Mapping):
                value = walk(value)
            elif isinstance(value, (list, tuple)):
                value = [walk(v) if isinstance(v, Mapping) else v for v in value if keep(v)]
            out[key] = value
        return out

    return walk(config)


# --------------------------------------------------------------------------------------------
# mode and names


def has_api_key(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when W&B could authenticate without a prompt.

    Looks at ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE`` and the ``.netrc`` entry that
    ``wandb login`` writes for ``WANDB_BASE_URL`` (default https://api.wandb.ai; the file is
    ``$NETRC`` or ``~/.netrc``). Never contacts the server.
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth

        return bool(read_netrc_auth(host=env.get("WANDB_BASE_URL") or _DEFAULT_BASE_URL))
    except Exception as exc:  # unreadable netrc or a key in a bad format: W&B would fail too
        log.warning("W&B: cannot read a W&B API key from netrc (%s: %s)", type(exc).__name__, exc)
        return False


def resolve_mode(configured: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """The W&B mode to use: ``offline``, ``online`` or ``disabled``.

    ``configured`` is ``tracking.mode``; ``WANDB_MODE`` in ``environ`` (default ``os.environ``)
    overrides it when set. ``online`` without an API key (``has_api_key``) becomes ``offline``
    with a warning saying how to upload later.
    """
    if configured not in TRACKING_MODES:
        raise ConfigError(f"tracking.mode={configured!r} is invalid: choose one of {TRACKING_MODES}")
    env = os.environ if environ is None else environ
    mode = configured
    raw = env.get("WANDB_MODE", "").strip()
    if raw:
        if raw.lower() in _ENV_MODES:
            mode = _ENV_MODES[raw.lower()]
        else:
            log.warning("W&B: ignoring WANDB_MODE=%r (expected one of %s); using tracking.mode=%s",
                        raw, sorted(_ENV_MODES), configured)
    if mode == "online" and not has_api_key(env):
        log.warning(
            "W&B: mode is online but no API key was found (WANDB_API_KEY or `wandb login`); "
            "logging offline instead. Upload later with `wandb sync <dir>/wandb`.")
        mode = "offline"
    return mode


_RESERVED_ID_CHARS = re.compile(r"[:;,#?/'\s]+")


def safe_run_id(name: str) -> str:
    """``name`` as a valid W&B run id: W&B rejects ``: ; , # ? / '`` and whitespace."""
    cleaned = _RESERVED_ID_CHARS.sub("-", name.strip()).strip("-")
    if not cleaned:
        raise ValueError(f"cannot make a W&B run id from {name!r}: give the run a name "
                         "(train.run_name=<name>)")
    return cleaned


class RunNames(NamedTuple):
    run_id: str     # W&B run id: resuming uses the same id
    run_name: str   # display name
    group: str      # W&B group


def run_names(cfg: Any, trial_id: Optional[str] = None, trial_name: Optional[str] = None) -> RunNames:
    """W&B naming for a training run (``trial_id`` None) or a Ray Tune trial.

    Training run: id and name are ``train.run_name`` (or the preset name), so rerunning the same
    run name resumes the same W&B run; group is ``tracking.group`` or the run name.
    Tune trial: id is the trial id, name the trial name, group ``tracking.group`` or ``tune.name``.
    """
    if trial_id is not None:
        return RunNames(safe_run_id(trial_id), trial_name or trial_id,
                        cfg.tracking.group or cfg.tune.name)
    name = cfg.train.run_name or cfg.preset
    return RunNames(safe_run_id(name), name, cfg.tracking.group or name)


# --------------------------------------------------------------------------------------------
# the tracker


def _plain(value: Any) -> Any:
    # 0-d tensors and numpy scalars become Python numbers (W&B would treat a tensor as a
    # histogram); nested dicts are walked.
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "ndim", None) == 0:
        return item()
    return value


class Tracker:
    """One W&B run, or a no-op.

    Build it with ``Tracker.start`` (or ``Tracker.disabled``). ``log``, ``summary`` and ``finish``
    never raise: the first W&B error is logged as a warning and the tracker stops tracking.
    Usable as a context manager (``finish`` on exit, exit code 1 on an exception).
    """

    def __init__(self, run: Any = None, mode: str = "disabled") -> None:
        self._run = run
        self.mode = mode if run is not None else "disabled"

    @classmethod
    def disabled(cls) -> "Tracker":
        """A tracker that does nothing and writes nothing."""
        return cls()

    @classmethod
    def start(cls, cfg_tracking: Any, run_id: str, run_name: str, group: str,
              config: Mapping[str, Any], dir: str | os.PathLike, sweep_id: Optional[str] = None,
              best: Optional[Mapping[str, str]] = None) -> "Tracker":
        """Start (or resume) the W&B run ``run_id``; files go under ``<dir>/wandb/``.

        ``cfg_tracking``: the ``tracking`` config group (project, entity, mode, group);
        ``tracking.group``, when set, wins over ``group``. ``config``: the flattened resolved
        config (``config.flatten``), scrubbed of secrets before it is saved. Starting the same
        ``run_id`` again resumes the run (W&B ``resume="allow"``). A disabled mode returns a
        no-op tracker without touching ``dir``; a failing start returns one after a warning.
        ``sweep_id``: the W&B sweep the run belongs to (``wandb.Settings(sweep_id=...)``; an
        offline run keeps it and ``wandb sync`` sends it). ``best``: ``{metric: "min"|"max"}``
        whose run summary holds the best logged value instead of the last; default: the config's
        ``train.metric`` (the direction from ``METRIC_MODES``), when ``config`` has it.
        """
        mode = resolve_mode(cfg_tracking.mode)
        if mode == "disabled":
            return cls.disabled()
        directory = Path(dir).expanduser().resolve()
        group = cfg_tracking.group or group
        safe_config = scrub(dict(config))
        if best is None:
            metric = config.get("train.metric")
            best = {metric: METRIC_MODES[metric]} if metric in METRIC_MODES else {}
        extras = {"sweep_id": sweep_id, "best": dict(best)}
        try:
            run = cls._init(cfg_tracking, mode, run_id, run_name, group, safe_config, directory, **extras)
        except Exception as exc:
            if mode != "online":
                log.warning("W&B: could not start run %r (%s: %s); training continues without "
                            "W&B tracking.", run_id, type(exc).__name__, exc)
                return cls.disabled()
            # Online start failed (server unreachable, bad key, timeout): keep the metrics in an
            # offline run that `wandb sync` can upload later.
            log.warning("W&B: online start of run %r failed (%s: %s); logging offline instead. "
                        "Upload later with `wandb sync %s`.", run_id, type(exc).__name__, exc,
                        directory / "wandb")
            return cls._start_offline(cfg_tracking, run_id, run_name, group, safe_config, directory, **extras)
        return cls(run, mode)

    @classmethod
    def _start_offline(cls, cfg_tracking: Any, run_id: str, run_name: str, group: str,
                       config: dict[str, Any], directory: Path, **extras: Any) -> "Tracker":
        try:
            import wandb

            # The failed online start leaves its stream open in the wandb-core service, which
            # then refuses the same run id ("run ID ... is in use"): restart the service first.
            # This also ends other W&B runs of this process; a training worker has none.
            wandb.teardown()
            run = cls._init(cfg_tracking, "offline", run_id, run_name, group, config, directory, **extras)
        except Exception as exc:
            log.warning("W&B: could not start run %r offline either (%s: %s); training continues "
                        "without W&B tracking.", run_id, type(exc).__name__, exc)
            return cls.disabled()
        return cls(run, "offline")

    @staticmethod
    def _init(cfg_tracking: Any, mode: str, run_id: str, run_name: str, group: str,
              config: dict[str, Any], directory: Path, sweep_id: Optional[str] = None,
              best: Optional[Mapping[str, str]] = None) -> Any:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            init_timeout=INIT_TIMEOUT_S,
            x_service_wait=SERVICE_WAIT_S,
            finish_timeout=FINISH_TIMEOUT_S,
            # Ray already captures worker output; W&B's console capture would wrap it again.
            console="off",
            # the setting, not the WANDB_SWEEP_ID variable (which gives the run a random id)
            **({"sweep_id": sweep_id} if sweep_id else {}),
        )
        run = wandb.init(
            project=cfg_tracking.project,
            entity=cfg_tracking.entity or None,
            id=safe_run_id(run_id),
            name=run_name,
            group=group or None,
            config=config,
            dir=str(directory),
            mode=mode,
            resume="allow",
            # Leave runs the caller may have opened alone; this run is used through its object.
            reinit="create_new",
            settings=settings,
        )
        for metric, summary in (best or {}).items():
            try:
                run.define_metric(metric, summary=summary)
            except Exception as exc:  # the run is still good: its summary keeps the last value
                log.warning("W&B: define_metric(%r, summary=%r) failed (%s: %s)", metric, summary,
                            type(exc).__name__, exc)
        return run

    @property
    def active(self) -> bool:
        """True while a W&B run is being written."""
        return self._run is not None

    @property
    def run_file(self) -> Optional[Path]:
        """The run's ``.wandb`` file (``<dir>/wandb/<offline-run-...>/run-<id>.wandb``), or None."""
        if self._run is None:
            return None
        return Path(self._run.settings.sync_file)

    def _give_up(self, action: str, exc: BaseException) -> None:
        run, self._run = self._run, None
        self.mode = "disabled"
        log.warning("W&B: %s failed (%s: %s); W&B tracking is off for the rest of this run, "
                    "training continues.", action, type(exc).__name__, exc)
        try:
            _finish_run(run, exit_code=1)
        except Exception:
            pass  # already warned; the service may be gone

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log ``metrics`` (name -> number) at optimizer step ``step`` (>= 0, non-decreasing)."""
        if self._run is None:
            return
        try:
            # commit: write the row now rather than when a later step arrives, so a process
            # that is stopped or killed after a validation still leaves that validation on disk
            self._run.log(_plain(dict(metrics)), step=int(step), commit=True)
        except Exception as exc:
            self._give_up("log", exc)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Set run summary values (e.g. the best validation metric and its step)."""
        if self._run is None:
            return
        try:
            self._run.summary.update(_plain(dict(values)))
        except Exception as exc:
            self._give_up("summary update", exc)

    def finish(self, exit_code: int = 0) -> None:
        """End the run (exit code 0 = success). Safe to call more than once.

        Returns once the run's ``.wandb`` file is complete on disk (or after ``FLUSH_WAIT_S``),
        so it can be read or synced right away.
        """
        run, self._run = self._run, None
        if run is None:
            return
        try:
            _finish_run(run, exit_code)
        except Exception as exc:
            log.warning("W&B: finishing the run failed (%s: %s); its data stays on disk for "
                        "`wandb sync`.", type(exc).__name__, exc)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def _finish_run(run: Any, exit_code: int) -> None:
    run_file = Path(run.settings.sync_file)
    run.finish(exit_code=exit_code)
    if not _wait_until_closed(run_file, FLUSH_WAIT_S):
        log.info("W&B: %s is not complete yet after %.0f s; wandb-core finishes it in the "
                 "background.", run_file, FLUSH_WAIT_S)


def _wait_until_closed(run_file: Path, timeout_s: float) -> bool:
    """Wait until ``run_file`` holds its exit record (written last, when the run finishes)."""
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


def read_offline_run(path: str | os.PathLike) -> dict[str, Any]:
    """Read one ``.wandb`` file into plain Python.

    Returns ``{"path", "run_id", "project", "entity", "group", "name", "sweep_id" (the W&B sweep
    the run belongs to, ``wandb.Settings(sweep_id=...)``), "start_time" (Unix
    seconds), "resume" (True when the run asks ``wandb sync`` to append to an existing run of
    the same id, as ``Tracker`` runs do), "config" (dict), "history" (one dict per logged
    step, with "_step" and W&B's "_runtime"/"_timestamp" in seconds; nested logged dicts stay
    nested), "summary" (dict), "exit_code" (None when the run did not finish)}``.
    W&B's internal "_wandb" entries are left out.
    """
    path = Path(path)
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
