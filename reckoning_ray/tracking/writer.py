"""W&B tracking: offline unless configured online, never in the way of training.

One writer: :class:`RunWriter`, the W&B run of one training run or Tune trial, fed with each
validation's metrics by a process that outlives the training workers (a worker that ASHA stops
or that crashes is killed, and a W&B writer inside it would lose its run): the Ray Train
controller for a single run (``reckoning_ray.on_ray.callbacks.TrainTracking``), the sweep's driver for a
sweep (``reckoning_ray.on_ray.callbacks.TrackingCallback``), the process itself for a run without Ray
(``resources.num_workers=0``). A single training run is one W&B run whose id is the run name; a
Ray Tune trial is one W&B run whose id is the trial id, grouped under the sweep name
(``run_names``). The writer keeps its own record beside the run (``wandb_run.json``: the steps
already logged, the summary values written, the W&B run directories), so a resumed run or a
restarted driver logs each validation once.

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
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

from reckoning_ray.core.config import load_config, metric_mode
from reckoning_ray.core.errors import ConfigError
from reckoning_ray.core.schema import METRICS, TRACKING_MODES
from reckoning_ray.core.evaluate import save_test
from reckoning_ray.tracking.secrets import has_api_key, scrub

log = logging.getLogger(__name__)

# wandb.init gives up after this long (its default is 90 s): offline starts take ~1 s here,
# an online start against an unreachable server fails after exactly this long.
INIT_TIMEOUT_S = 20.0
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
        ``train.metric`` (its direction from ``config.metric_mode``), when ``config`` has it.
        """
        mode = resolve_mode(cfg_tracking.mode)
        if mode == "disabled":
            return cls.disabled()
        directory = Path(dir).expanduser().resolve()
        group = cfg_tracking.group or group
        safe_config = scrub(dict(config))
        if best is None:
            metric = config.get("train.metric")
            best = {metric: metric_mode(metric)} if metric in METRICS else {}
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

    def log_values(self, values: Mapping[str, Any]) -> None:
        """Log ``values`` that belong to no training step (W&B tables of a report)."""
        if self._run is None:
            return
        try:
            self._run.log(dict(values))
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
    if not _wait_until_settled(run_file, FLUSH_WAIT_S):
        log.info("W&B: %s is still being written after %.0f s; wandb-core finishes it in the "
                 "background.", run_file, FLUSH_WAIT_S)


def _wait_until_settled(run_file: Path, timeout_s: float, quiet_s: float = 0.3) -> bool:
    """Wait until ``run_file`` has not grown for ``quiet_s`` (wandb-core writes the run's last
    records after ``run.finish()`` returns), at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        try:
            size = run_file.stat().st_size
        except OSError:
            size = -1
        if size != last:
            last, since = size, time.monotonic()
        elif size > 0 and time.monotonic() - since >= quiet_s:
            return True
        time.sleep(0.05)
    return False




# --------------------------------------------------------------------------------------------
# the writer


class RunWriter:
    """The W&B run of one training run or Tune trial whose files live in ``run_dir``.

    ``start()`` opens (or resumes) the run; ``log(metrics)`` writes one validation's metrics at
    their ``"step"`` unless that step (or a later one) is logged already; ``backfill()`` logs what
    ``run_dir/metrics.jsonl`` holds and W&B does not; ``summary(values)``; ``finish(exit_code)``.
    What was logged is recorded in ``run_dir/wandb_run.json`` (:data:`RECORD`)::

        {"run_id": "...", "steps": [0, 4, 8], "summary": {...values written...},
         "dirs": ["wandb/offline-run-20261201_120000-<run id>", ...]}   (in order of start)

    Like :class:`Tracker` (which it wraps), it never raises for a W&B problem.
    """

    RECORD = "wandb_run.json"
    # the keys of a validation's metrics that go to W&B besides the "<group>/<name>" metrics (workers: the
    # worker count that trained the round, which W&B charts by step)
    KEYS = ("epoch", "step", "round", "stopped_early", "workers")

    def __init__(self, cfg_tracking: Any, run_dir: str | os.PathLike, names: RunNames,
                 config: Optional[Mapping[str, Any]] = None, sweep_id: Optional[str] = None,
                 best: Optional[Mapping[str, str]] = None) -> None:
        self.cfg_tracking = cfg_tracking
        self.run_dir = Path(run_dir)
        self.names = names
        self.config = dict(config or {})
        self.sweep_id = sweep_id
        self.best = best
        self.tracker = Tracker.disabled()
        self.record = self._read_record()

    def _read_record(self) -> dict[str, Any]:
        path = self.run_dir / self.RECORD
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("run_id") != self.names.run_id:
            record = {}
        record.setdefault("run_id", self.names.run_id)
        for key, empty in (("steps", []), ("summary", {}), ("dirs", [])):
            record.setdefault(key, empty)
        return record

    def _write_record(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / (self.RECORD + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=str) + "\n")
        os.replace(tmp, self.run_dir / self.RECORD)

    @property
    def logged_steps(self) -> list[int]:
        return list(self.record["steps"])

    def start(self) -> "RunWriter":
        """Open (or resume) the W&B run; a no-op while it is open."""
        if self.tracker.active:
            return self
        self.tracker = Tracker.start(self.cfg_tracking, run_id=self.names.run_id, run_name=self.names.run_name,
                                     group=self.names.group, config=self.config, dir=self.run_dir,
                                     sweep_id=self.sweep_id, best=self.best)
        run_file = self.tracker.run_file
        if run_file is not None:
            try:
                where = str(run_file.parent.relative_to(self.run_dir.resolve()))
            except ValueError:
                where = str(run_file.parent)
            if where not in self.record["dirs"]:
                self.record["dirs"].append(where)
            self._write_record()
        return self

    @property
    def active(self) -> bool:
        return self.tracker.active

    def log(self, metrics: Mapping[str, Any]) -> bool:
        """Log one validation's metrics at ``metrics["step"]``; False when that step is logged
        already (or is older than the last logged one: W&B steps only go forward).

        The validations ``metrics.jsonl`` holds between the last logged step and this one go
        first: a worker lost right after writing a validation, before its host heard of it,
        leaves one there that only the file has (a later step would shut it out of W&B)."""
        step = int(metrics.get("step", -1))
        steps = self.record["steps"]
        if not self.tracker.active or step < 0 or (steps and step <= max(steps)):
            return False
        for row in self._rows_before(step):
            self._log_step(row)
        return self._log_step(metrics)

    def _rows_before(self, step: int) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl after the last logged step and before ``step``."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        last = max(self.record["steps"], default=-1)
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line) if line.strip() else {}
            except ValueError:
                break  # a line cut by a killed writer ends what can be read
            if last < int(row.get("step", -1)) < step:
                rows.append(row)
        return sorted(rows, key=lambda r: int(r["step"]))

    def _log_step(self, metrics: Mapping[str, Any]) -> bool:
        step = int(metrics["step"])
        steps = self.record["steps"]
        if steps and step <= max(steps):
            return False
        self.tracker.log({k: v for k, v in metrics.items() if "/" in k or k in self.KEYS}, step=step)
        if self.tracker.active:  # the log went through
            steps.append(step)
            self._write_record()
        return True

    def missing_steps(self) -> list[int]:
        """The steps of ``run_dir/metrics.jsonl`` that W&B has not got (and would still take)."""
        return [int(row["step"]) for row in self._rows_before(1 << 62)]  # every step after the last logged

    def backfill(self) -> int:
        """Log the validations of ``run_dir/metrics.jsonl`` that W&B has not got; returns how many."""
        if not self.tracker.active:
            return 0
        return sum(self._log_step(row) for row in self._rows_before(1 << 62))

    def summary(self, values: Mapping[str, Any]) -> None:
        if not self.tracker.active:
            return
        self.tracker.summary(values)
        self.record["summary"].update(_plain(dict(values)))
        self._write_record()

    def has_summary(self, values: Mapping[str, Any]) -> bool:
        """Whether these summary values were written already (a rerun may skip reopening the run)."""
        return all(self.record["summary"].get(k) == v for k, v in _plain(dict(values)).items())

    def finish(self, exit_code: int = 0) -> None:
        self.tracker.finish(exit_code=exit_code)

    def __enter__(self) -> "RunWriter":
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def run_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The W&B run directories of the run in ``run_dir``, in order of their start (from the
    writer's record); ``[]`` when it has none."""
    path = Path(run_dir) / RunWriter.RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [Path(run_dir) / d for d in record.get("dirs", [])]

def record_test(run_dir: str | Path, metrics: dict[str, float], checkpoint: str, writer: Any = None) -> dict:
    """Write test ``metrics`` into ``run_dir/summary.json`` (key ``"test"``) and the run's W&B
    summary; returns the updated summary.

    ``writer``: the run's open :class:`~reckoning_ray.tracking.writer.RunWriter`, or None to resume the
    run's W&B run (same run id, offline unless configured online) just long enough to write it.
    """
    run_dir = Path(run_dir)
    values = save_test(run_dir, metrics, checkpoint)
    if writer is not None:
        writer.summary(values)
    else:
        cfg = load_config(str(run_dir / "config.yaml"))
        with RunWriter(cfg.tracking, run_dir, run_names(cfg)) as resumed:
            resumed.summary(values)
    return json.loads((run_dir / "summary.json").read_text())


def log_tables(run_dir: str | Path, tables: Mapping[str, list[dict[str, Any]]]) -> str:
    """Log ``tables`` ({W&B key: rows as dicts}) as W&B Tables in a run of their own, ``report``,
    beside the sweep's trials (the sweep's saved config gives project, entity and mode: offline
    unless configured online). Returns where the run went, or why nothing was logged."""
    run_dir = Path(run_dir)
    saved = run_dir / "sweep_config.yaml"
    if not saved.is_file():
        return f"not logged ({saved} is missing)"
    cfg = load_config(str(saved))
    tracker = Tracker.start(cfg.tracking, f"{cfg.tune.name}-report", f"{cfg.tune.name} report",
                            cfg.tune.name, {"tune.name": cfg.tune.name}, run_dir, best={})
    if not tracker.active:
        return "not logged (tracking.mode=disabled or W&B did not start)"
    import wandb

    with tracker:
        for key, rows in tables.items():
            columns = list(dict.fromkeys(k for row in rows for k in row))
            data = [[json.dumps(row.get(c)) if isinstance(row.get(c), (dict, list)) else row.get(c)
                     for c in columns] for row in rows]
            tracker.log_values({key: wandb.Table(columns=columns, data=data)})
        where = str(tracker.run_file or run_dir / "wandb")
    return where
