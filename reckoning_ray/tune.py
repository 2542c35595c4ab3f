"""Ray Tune sweep with ASHA over RECKONING's inner-loop settings: the project's main job.

    python -m reckoning_ray.tune [preset | --config FILE] [space=<name or path>] [key=value ...] [--resume]
    python -m reckoning_ray.tune publish SWEEP_DIR [--dry-run]
    python -m reckoning_ray.tune soup SWEEP_DIR [--top K]

Each trial is a function that builds and fits a ``TorchTrainer`` (``reckoning_ray.train``) with
Ray's ``TuneReportCallback``: the current Train + Tune pattern. Trials are named by their trial
id, so a resumed sweep finds its runs; every trial logs to W&B (run id = trial id, group = sweep
name) from the sweep's driver, offline unless ``tracking.mode=online``. The sweep is also a W&B
sweep (``reckoning_ray.wandb_sweep``): created at the start when online, or afterwards by ``publish``.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
# Ray folds log lines that differ only in numbers into one "[repeated Nx across cluster]" line,
# which hides trials' validation lines from the sweep's console; it reads this at import.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from ray.tune import Callback  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402

from .curve import CurveStopping  # noqa: E402

from .config import ConfigError, from_container, load_config, node_type_for, save_config, validate
from .storage import SWEEP_RESULTS, SweepStore, is_uri, join, local_path
from .tracking import run_names
from .train import parse_args, run_command

# The search spaces: the top-level tune_spaces/ directory ships in the wheel as the package data
# reckoning_ray/tune_spaces/ (pyproject.toml); a source checkout or an editable install (whose
# finder does not map that data-only package) reads the top-level directory itself.
_PACKAGE_DIR = Path(__file__).resolve().parent
SPACES_DIR = (_PACKAGE_DIR / "tune_spaces" if (_PACKAGE_DIR / "tune_spaces").is_dir()
              else _PACKAGE_DIR.parent / "tune_spaces")
# Distribution name -> (argument form, builder). Arguments come as a list in the YAML.
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "qloguniform")

EPILOG = """\
search spaces: tune_spaces/<name>.yaml (name without .yaml) or any YAML path: space=<name|path>
  {spaces}
  A space maps config keys to one distribution each, e.g.
    inner.steps: {{choice: [1, 2, 4]}}
    inner.lr_init: {{loguniform: [1.0e-5, 1.0e-4]}}
  distributions: choice [values], grid [values], uniform [low, high], loguniform [low, high],
  randint [low, high) , qloguniform [low, high, q]

ASHA stops weak trials early (tune.scheduler=asha; curve: learning-curve extrapolation, none: no
early stop), using validation rounds (tune.max_rounds) as time; it ranks by
tune.metric (tune.mode). With outer.schedule=wsd and tune.extend=true, a trial ASHA keeps at
the end of its planned rounds continues from its cooldown's start to the next rung (up to
tune.max_rounds). At the end the sweep prints a table of trials and writes
<tune.storage_path>/<tune.name>/best_config.yaml, re-runnable with
  python -m reckoning_ray.train --config <that file>
W&B: runs are written offline under each trial's directory; upload them as one W&B sweep with
  python -m reckoning_ray.tune publish <tune.storage_path>/<tune.name> [--dry-run]
--resume continues an interrupted sweep (finished trials stay finished).

files, all under <tune.storage_path>/<tune.name>/ (default runs/tune/<name>):
  sweep_config.yaml asha_state.pkl wandb_sweep.yaml   at the start, the rungs after every result
                                                      (curve_state.pkl: the curves, tune.scheduler=curve)
  sweep_summary.json best_config.yaml                 the table and the best trial's config, at the end
  trials/<trial id>/   config.yaml metrics.jsonl checkpoints.json checkpoints/step-*/ summary.json,
                       wandb/ wandb_run.json          after every validation
  Ray Tune's experiment state beside them, Ray Train's under ray_train/.
With an object store (tune.storage_path=s3://bucket/prefix, gs://...) each node writes into its
cache ($RECKONING_RUNS_CACHE, default ~/reckoning-ray-runs) and copies every file to the bucket as
it is written; --resume and publish read the bucket. Credentials and endpoints come from the
environment (AWS_* variables, an instance profile; AWS_ENDPOINT_URL for MinIO and the like).
"""


# -- search spaces ---------------------------------------------------------------------------------

def space_path(space: str) -> Path:
    """The file of a search space: ``space`` is a YAML path or the name of one in SPACES_DIR."""
    path = Path(space)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"tune.space={space!r}: file not found")
        return path
    candidate = SPACES_DIR / f"{space}.yaml"
    if not candidate.is_file():
        names = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise ConfigError(f"tune.space={space!r} is not a search space: choose one of {names} "
                          f"(the files of {SPACES_DIR}) or a YAML path")
    return candidate


def load_space(space: str, cfg: DictConfig) -> dict[str, tuple[str, list]]:
    """Read and check a space file: ``{config key: (distribution, args)}``.

    Every key must exist in the config, every distribution be known, its arguments well formed, and
    each value the distribution can produce must pass the config's validation.
    """
    path = space_path(space)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"search space {path}: expected a mapping of config keys to distributions")
    out: dict[str, tuple[str, list]] = {}
    for key, spec in raw.items():
        where = f"search space {path}, key {key!r}"
        if OmegaConf.select(cfg, str(key), default="__missing__") == "__missing__":
            raise ConfigError(f"{where}: not a config key (e.g. inner.steps, inner.lr_init, outer.lr)")
        if not (isinstance(spec, dict) and len(spec) == 1):
            raise ConfigError(f"{where}: expected one distribution, e.g. {{loguniform: [1.0e-5, 1.0e-4]}}; "
                              f"allowed: {list(DISTRIBUTIONS)}")
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution {dist!r}; allowed: {list(DISTRIBUTIONS)}")
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {dist} needs a non-empty list of arguments")
        if dist in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or args[0] >= args[1]:
                raise ConfigError(f"{where}: {dist} needs [low, high] numbers with low < high, got {args}")
            if dist == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {args}")
        if dist == "qloguniform" and (len(args) != 3 or args[0] <= 0 or args[0] >= args[1]):
            raise ConfigError(f"{where}: qloguniform needs [low, high, q] with 0 < low < high, got {args}")
        samples = list(args) if dist in ("choice", "grid") else [args[0], args[1] - (1 if dist == "randint" else 0)]
        for value in samples:
            try:
                trial = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={json.dumps(value)}"]))
                validate(trial)
            except ConfigError as exc:
                raise ConfigError(f"{where}: value {value!r} is not allowed: {exc}") from None
            except Exception as exc:  # type errors from the schema
                raise ConfigError(f"{where}: value {value!r} does not fit the config: {str(exc).splitlines()[0]}") from None
        out[str(key)] = (dist, list(args))
    return out


def to_tune_space(space: dict[str, tuple[str, list]]) -> dict[str, Any]:
    from ray import tune

    build = {
        "choice": lambda a: tune.choice(a),
        "grid": lambda a: tune.grid_search(a),
        "uniform": lambda a: tune.uniform(a[0], a[1]),
        "loguniform": lambda a: tune.loguniform(a[0], a[1]),
        "randint": lambda a: tune.randint(a[0], a[1]),
        "qloguniform": lambda a: tune.qloguniform(a[0], a[1], a[2]),
    }
    return {key: build[dist](args) for key, (dist, args) in space.items()}


def trial_config(base: dict, params: dict[str, Any]) -> DictConfig:
    cfg = from_container(base)
    for key, value in params.items():
        OmegaConf.update(cfg, key, value, merge=False)
    validate(cfg)
    return cfg


# -- the trial -------------------------------------------------------------------------------------

def trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


def run_trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """Tune trainable: the sampled ``params`` ({config key: value}) on top of the sweep's base
    config (``setup``, passed with ``tune.with_parameters``); fits a TorchTrainer that reports to
    Tune through ``TuneReportCallback``. With ``tune.extend``, a trial that ASHA keeps at the end
    of its planned rounds fits again, extended to the next rung (:func:`promoted_length`)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import check_inputs, fit, set_length

    config = setup
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(config["base"], params)
    cfg.train.run_name = trial_id
    cfg.tracking.group = cfg.tracking.group or config["sweep"]
    node = node_type_for(cfg)
    if node not in config["node_types"]:
        node = ""
    # the run directory on this node (with an object store, a cache the worker mirrors to it)
    run_dir = local_dir(cfg) / "trials" / trial_id
    remote = join(config["trials_remote"], trial_id) if config["trials_remote"] else None
    train_tasks = check_inputs(cfg)["train"] if cfg.tune.extend else 0
    if cfg.tune.extend:  # a trial started again (a resumed sweep) goes on at the length it had reached
        from .config import group
        from .loop import planned_steps

        record, _ = _trial_files(run_dir, remote)
        if int(record.get("planned_steps") or 0) > planned_steps(train_tasks, group(cfg, "train")):
            set_length(cfg, int(record["planned_steps"]), train_tasks)
    while True:
        # W&B is written by the sweep's driver (TrackingCallback), which outlives the trial
        fit(cfg, run_dir, callbacks=[TuneReportCallback()], node_type=node,
            storage_path=config["ray_train_storage"], test=False, mirror_to=remote)
        steps = promoted_length(cfg, trial_id, run_dir, remote, train_tasks, config["board"]) \
            if cfg.tune.extend else None
        if steps is None:
            return
        print(f"{trial_id}: ASHA keeps the trial at the end of its planned rounds; extending it to {steps} steps "
              "from the start of its cooldown", flush=True)
        set_length(cfg, steps, train_tasks)


def _trial_files(run_dir: Path, remote: Optional[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trial's checkpoint record and summary, fetched from the object store first when there
    is one (the workers may run on other nodes)."""
    from .checkpoint import RECORD, read_record
    from .storage import Mirror

    if remote:
        Mirror(run_dir, remote).pull(include=(RECORD, "summary.json"), overwrite=True)
    summary = run_dir / "summary.json"
    return read_record(run_dir), (json.loads(summary.read_text()) if summary.is_file() else {})


def next_rung(rounds: int, tune_cfg: Any) -> int:
    """The first ASHA rung (``grace_period x reduction_factor^k``) after ``rounds``, at most
    ``tune.max_rounds``."""
    rung = int(tune_cfg.grace_period)
    while rung <= rounds:
        rung *= int(tune_cfg.reduction_factor)
    return min(rung, int(tune_cfg.max_rounds))


def promoted_length(cfg: DictConfig, trial_id: str, run_dir: Path, remote: Optional[str], train_tasks: int,
                    board_name: str, wait_s: float = 600.0) -> Optional[int]:
    """The optimizer steps a finished wsd trial continues to, or None when it ends here.

    It ends when it stopped early (``train.patience``), when its planned rounds reach
    ``tune.max_rounds``, or when ASHA stopped it on its last round; otherwise the new length ends
    at the next rung. ASHA's decision on that round comes from the :class:`PromotionBoard` the
    scheduler writes it to (a trial ASHA stops is normally killed while it waits).
    """
    from .config import group
    from .loop import planned_validations, steps_for_validations

    _, summary = _trial_files(run_dir, remote)
    if summary.get("stopped_early"):
        return None
    train = group(cfg, "train")
    rounds = planned_validations(train_tasks, train)
    if rounds >= int(cfg.tune.max_rounds) or int(summary.get("validations") or 0) < rounds:
        return None
    if not promotion_board(board_name).wait(trial_id, rounds, wait_s):
        return None
    return steps_for_validations(train_tasks, train, next_rung(rounds, cfg.tune))


class PromotionBoard:
    """ASHA's decision on the last planned round of each trial (continue or stop), as a named
    Ray actor of the sweep's driver: with ``tune.extend`` a trial waits for it before it extends
    itself. Results reach the scheduler after the trial has moved on, so the trial cannot learn
    the decision from its own report."""

    def __init__(self) -> None:
        self._decisions: dict[tuple[str, int], bool] = {}

    def decide(self, trial_id: str, rounds: int, go: bool) -> None:
        self._decisions[(trial_id, int(rounds))] = bool(go)

    def decision(self, trial_id: str, rounds: int) -> Optional[bool]:
        return self._decisions.get((trial_id, int(rounds)))


class _BoardClient:
    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def decide(self, trial_id: str, rounds: int, go: bool) -> None:
        self.actor.decide.remote(trial_id, rounds, go)

    def wait(self, trial_id: str, rounds: int, timeout_s: float) -> bool:
        """ASHA's decision on ``rounds``; False when none came within ``timeout_s``."""
        import ray

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            go = ray.get(self.actor.decision.remote(trial_id, rounds))
            if go is not None:
                return bool(go)
            time.sleep(0.5)
        print(f"{trial_id}: no decision of ASHA on round {rounds} within {timeout_s:.0f}s; the trial ends here",
              flush=True)
        return False


def promotion_board(name: str, create: bool = False) -> _BoardClient:
    """The sweep's :class:`PromotionBoard` (``create``: started by the driver if not running)."""
    import ray

    if create:
        actor = ray.remote(num_cpus=0)(PromotionBoard).options(name=name, get_if_exists=True).remote()
    else:
        actor = ray.get_actor(name)
    return _BoardClient(actor)


def board_name(cfg: DictConfig) -> str:
    return f"reckoning-ray-promotions/{cfg.tune.name}"


class Resumable:
    """A scheduler whose state survives ``--resume``: mixed in before a Tune scheduler class.

    Tune restores trials and the searcher but rebuilds the scheduler empty, so after a resume
    ASHA would judge the remaining trials only against each other (and curve stopping would
    forget the other trials' curves). This saves the scheduler's state after every result, in
    the sweep directory where this process runs it (``STATE_FILE``), and reloads it before it
    schedules again.
    """

    STATE_FILE = ""
    _own = ("_sweep_root", "_loaded")

    def _init_state(self, sweep_root: str) -> None:
        self._sweep_root = sweep_root  # the sweep directory (path or URI): its file is found where it runs
        self._loaded = False

    @property
    def _state_path(self) -> str:
        return str(local_path(self._sweep_root) / self.STATE_FILE)

    def _load(self) -> None:
        if not self._loaded and os.path.exists(self._state_path):
            with open(self._state_path, "rb") as f:
                self.__dict__.update(pickle.load(f))
        self._loaded = True

    def _save(self) -> None:
        state = {k: v for k, v in self.__dict__.items() if k not in self._own}
        Path(self._state_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(state, f)
        os.replace(tmp, self._state_path)

    def _known(self, trial_id: str) -> bool:
        return False

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load()
        if not self._known(trial.trial_id):
            super().on_trial_add(tune_controller, trial)  # type: ignore[misc]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load()
        decision = super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]
        self._save()
        return decision


class ResumableASHA(Resumable, ASHAScheduler):
    """ASHA (the default ``tune.scheduler``) whose rungs survive ``--resume``. With ``board`` (the
    name of the sweep's :class:`PromotionBoard`, ``tune.extend``) it posts its decision on each
    trial's last planned round there."""

    STATE_FILE = "asha_state.pkl"
    _own = (*Resumable._own, "_board")

    def __init__(self, sweep_root: str, board: Optional[str] = None, **kwargs: Any) -> None:
        ASHAScheduler.__init__(self, **kwargs)
        self._init_state(sweep_root)
        self._board = board

    def _known(self, trial_id: str) -> bool:
        return trial_id in self._trial_info

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        planned, rounds = int(result.get("rounds_planned") or 0), int(result.get("round") or 0)
        if self._board and planned and rounds >= planned:
            promotion_board(self._board).decide(trial.trial_id, rounds, decision == ASHAScheduler.CONTINUE)
        return decision


class ResumableCurve(Resumable, CurveStopping):
    """Learning-curve stopping (``tune.scheduler=curve``) whose curves survive ``--resume``."""

    STATE_FILE = "curve_state.pkl"

    def __init__(self, sweep_root: str, **kwargs: Any) -> None:
        CurveStopping.__init__(self, **kwargs)
        self._init_state(sweep_root)


def build_scheduler(cfg: DictConfig, root: str) -> Any:
    """The Tune scheduler ``tune.scheduler`` names: ASHA, curve stopping, or FIFO (none stops)."""
    from ray.tune.schedulers import FIFOScheduler

    t = cfg.tune
    if t.scheduler == "asha":
        return ResumableASHA(root, board=board_name(cfg) if t.extend else None, time_attr="round",
                             max_t=t.max_rounds, grace_period=t.grace_period, reduction_factor=t.reduction_factor)
    if t.scheduler == "curve":
        return ResumableCurve(root, max_t=t.max_rounds, top_k=t.curve_top_k, confidence=t.curve_confidence,
                              min_rounds=t.curve_min_rounds)
    return FIFOScheduler()


class TrackingCallback(Callback):
    """W&B for every trial, from the sweep's driver process: one
    :class:`~reckoning_ray.tracking.RunWriter` per trial.

    Each run's summary keeps the best value of ``tune.metric`` (and ``train.metric``); when the
    sweep directory records a W&B sweep (``wandb_sweep.json``), every run joins it.

    A trial that ASHA stops is killed together with its training workers; the driver outlives
    every trial, so each trial's run is started, fed and finished here (run id = trial id, group =
    sweep name, config = the trial's flattened resolved config, files under the trial's
    directory). Results stream in as Tune receives them; validations Tune never passed on (the one
    that made ASHA stop a trial, those of a sweep interrupted while results were in flight) are
    filled in from the trial's metrics.jsonl when the trial starts again and when it ends.
    """

    def __init__(self, base: dict, sweep_root: str) -> None:
        self.base = base
        # the sweep directory (path or URI); a sweep resumed by another driver finds its own copy
        self.sweep_root = sweep_root
        self.writers: dict[str, Any] = {}
        self._store: Optional[SweepStore] = None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment
        return {"base": self.base, "sweep_root": self.sweep_root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["base"], state["sweep_root"])

    @property
    def trials_local(self) -> Path:
        return local_path(self.sweep_root) / "trials"

    @property
    def store(self) -> Optional[SweepStore]:
        """Mirrors the trials' W&B files and the sweep's files to an object store (None for a path)."""
        if self._store is None and is_uri(self.sweep_root):
            self._store = SweepStore(local_path(self.sweep_root), self.sweep_root)
        return self._store

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from .config import flatten
        from .tracking import METRIC_MODES, RunWriter
        from .wandb_sweep import sweep_id_for

        trial_id = trial.trial_id
        cfg = trial_config(self.base, dict(trial.config))
        cfg.train.run_name = trial_id
        # the run summary keeps the best value of the metric ASHA ranks by (and of train.metric)
        best = {cfg.train.metric: METRIC_MODES[cfg.train.metric], cfg.tune.metric: cfg.tune.mode}
        # the W&B sweep recorded in the sweep directory (created at the start of an online sweep, or
        # by an earlier publish): read at every trial start, so it holds after --resume too
        sweep_id = sweep_id_for(self.trials_local.parent, cfg.tracking)
        if self.store is not None:
            self.store.pull_trial(trial_id)  # the metrics its workers wrote, for the backfill
        writer = RunWriter(cfg.tracking, self.trials_local / trial_id, run_names(cfg, trial_id=trial_id),
                           config=flatten(cfg), sweep_id=sweep_id, best=best)
        self.writers[trial_id] = writer.start()
        writer.backfill()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        writer = self.writers.get(trial.trial_id)
        if writer is not None:
            writer.log(result)
        if self.store is not None:
            self.store.push_trial(trial.trial_id)
            self.store.push_sweep()  # the ASHA rungs

    def _finish(self, trial: Any, exit_code: int) -> None:
        writer = self.writers.pop(trial.trial_id, None)
        if writer is not None:
            if self.store is not None:
                self.store.pull_trial(trial.trial_id)
            writer.backfill()
            writer.finish(exit_code=exit_code)
            if self.store is not None:
                self.store.push_trial(trial.trial_id)
                self.store.push_sweep()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, 0)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, 1)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            self._finish(trial, 0)


# -- the driver ------------------------------------------------------------------------------------

def placement(cfg: DictConfig, space: dict[str, tuple[str, list]]) -> tuple[list[str], int]:
    """Node types the sweep's trials may ask for, and how many trials the cluster can hold at once.

    A node type no node has (and no autoscaler node type offers) is reported at once and dropped,
    so the sweep runs on the nodes there are instead of waiting forever.
    """
    import ray

    from .train import autoscaler_node_resources, check_placement

    methods = {cfg.train.method}
    if "train.method" in space:
        methods |= set(space["train.method"][1])
    usable = []
    for method in sorted(methods):
        trial_cfg = OmegaConf.merge(cfg, {"train": {"method": method}})
        node = check_placement(trial_cfg)  # prints why a missing node type is dropped
        if node:
            usable.append(node)
    res = cfg.resources
    totals = ray.cluster_resources()
    per_trial_cpu = res.num_workers * res.cpus_per_worker
    fit = int(totals.get("CPU", 0) // per_trial_cpu) if per_trial_cpu else cfg.tune.max_concurrent
    if res.use_gpu:
        fit = min(fit, int(totals.get("GPU", 0) // (res.num_workers * res.gpus_per_worker)))
    if autoscaler_node_resources():  # an autoscaler adds nodes: leave concurrency to the config
        fit = cfg.tune.max_concurrent
    # check_placement refused a trial this cluster cannot hold, so at least one fits
    return sorted(set(usable)), max(1, min(fit, cfg.tune.max_concurrent))


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
    mirrored to the storage URI as it is written (:mod:`reckoning_ray.storage`)."""
    return local_path(sweep_dir(cfg))


def sweep_store(cfg: DictConfig) -> Optional[SweepStore]:
    """The mirror of the sweep directory in its object store (None for a path)."""
    root = sweep_dir(cfg)
    return SweepStore(local_dir(cfg), root) if is_uri(root) else None


def build_tuner(cfg: DictConfig, space: dict[str, tuple[str, list]], resume: bool = False):
    from ray import tune

    root = sweep_dir(cfg)
    node_types, concurrent = placement(cfg, space)
    print(f"sweep {cfg.tune.name}: {cfg.tune.num_samples} sample(s) of {len(space)} key(s), "
          f"{concurrent} trial(s) at a time, ASHA on {cfg.tune.metric} ({cfg.tune.mode}); results in {root}")
    setup = {
        "base": OmegaConf.to_container(cfg, resolve=True),
        "sweep": cfg.tune.name,
        # Ray Train's own run state (no checkpoints: the run directories hold those)
        "ray_train_storage": join(root, "ray_train"),
        # with an object store, where each trial's rank-0 worker mirrors its run directory
        "trials_remote": join(root, "trials") if is_uri(root) else None,
        "node_types": node_types,
        "board": board_name(cfg),
    }
    # the trial function only drives its TorchTrainer: it needs memory but no CPU of its own, so
    # the CPUs go to the training workers (Ray rejects a request with no resource at all)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"CPU": 0, "memory": 256 * 2**20})
    if resume:
        if not tune.Tuner.can_restore(root):
            raise ConfigError(f"--resume: no sweep to resume at {root} (tune.storage_path / tune.name)")
        return tune.Tuner.restore(root, trainable=trainable, resume_unfinished=True, resume_errored=True)
    param_space = to_tune_space(space)
    scheduler = build_scheduler(cfg, root)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=scheduler,
                                    num_samples=cfg.tune.num_samples, max_concurrent_trials=concurrent,
                                    trial_dirname_creator=trial_dirname, trial_name_creator=trial_dirname),
        run_config=tune.RunConfig(name=cfg.tune.name, storage_path=root.rsplit("/", 1)[0],
                                  callbacks=[TrackingCallback(setup["base"], root)]),
    )


def trial_outcome(last: Optional[dict], error: bool, max_rounds: int, stopper: str = "ASHA",
                  extend: bool = False) -> tuple[str, int]:
    """A trial's status and validation rounds, as Ray Tune recorded them.

    ``last``: the last result Tune received for the trial (``Result.metrics``: the loop's
    ``round``, ``rounds_planned``, ``stopped_early``); ``error``: the trial failed. Rounds are
    the rounds Tune saw, the time ASHA judged (``round``); a trial that ASHA stopped may still
    have finished one more validation in its workers before they were ended (it is in
    ``metrics.jsonl`` and W&B), but Tune and ASHA never saw it, so it neither counts as a round
    nor makes the trial ``completed``. Status: ``error``; ``patience stop`` (the loop stopped
    early); ``completed`` (reached its planned rounds or ``tune.max_rounds``, where ASHA stops
    every trial; with ``extend`` (``tune.extend``), where a trial ASHA keeps goes on, only
    ``tune.max_rounds``); else ``<stopper> stop`` (``ASHA stop``, ``curve stop``: the scheduler
    stopped it).
    """
    last = last or {}
    rounds = int(last.get("round") or 0)
    if error:
        return "error", rounds
    if bool(last.get("stopped_early", False)):
        return "patience stop", rounds
    planned = max_rounds if extend else int(last.get("rounds_planned") or max_rounds)
    if rounds >= min(planned, max_rounds):
        return "completed", rounds
    return f"{stopper} stop", rounds


def summarize(cfg: DictConfig, results: Any, space: dict[str, tuple[str, list]]) -> dict[str, Any]:
    """Table of trials, best_config.yaml and the best checkpoint's path.

    Each trial's best value comes from its whole validation history (``trial_history``); its
    status and rounds from Tune's record (``trial_outcome``). Both go into the trial's W&B run
    summary (``trial/status``, ``trial/rounds``) with its test metrics (``record_trials``).
    """
    root = local_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    store = sweep_store(cfg)
    if store is not None:
        store.pull()  # the trials' metrics and records, as their workers stored them
    metric, mode = cfg.tune.metric, cfg.tune.mode
    rows = []
    for result in results:
        trial_id = Path(result.path).name
        history = trial_history(result, root / "trials" / trial_id)
        if history is None or metric not in history:
            rows.append({"trial": trial_id, "best": None, "rounds": 0, "status": "error" if result.error else "no result",
                         "_config": result.config})
            continue
        values = history[metric].dropna()
        best = float(values.max() if mode == "max" else values.min())
        tune_last = result.metrics if result.metrics and "round" in result.metrics else history.iloc[-1].to_dict()
        status, rounds = trial_outcome(tune_last, bool(result.error), cfg.tune.max_rounds,
                                       "curve" if cfg.tune.scheduler == "curve" else "ASHA", bool(cfg.tune.extend))
        params = dict(result.config)
        rows.append({"trial": trial_id, "best": best, "rounds": rounds, "status": status,
                     "label_accuracy": float(history["val/label_accuracy"].max()), **params,
                     "_config": result.config})
    scored = [r for r in rows if r["best"] is not None]
    if not scored:
        raise RuntimeError(f"no trial of sweep {cfg.tune.name} reported {metric}")
    best = (max if mode == "max" else min)(scored, key=lambda r: r["best"])
    # An interrupted sweep (Ctrl-C) leaves trials unfinished whose workers may still hold the
    # CPUs: it is tested when `--resume` has finished it, not now.
    finished = getattr(results, "num_terminated", len(rows)) + getattr(results, "num_errors", 0) >= len(rows)
    if finished:
        tested = test_trials(cfg, scored, root / "trials", store)
        record_trials(cfg, rows, root / "trials", tested, store)
    else:
        print("note: the sweep was interrupted; its trials are tested on the test split when "
              "`--resume` has finished it")
    keys = list(space)
    header = ["trial", *keys, metric, "best val acc", "test acc", "test recall", "rounds", "status"]
    lines = [header]
    for r in rows:
        test = r.get("test") or {}
        lines.append([r["trial"], *[_fmt(r.get(k)) for k in keys], _fmt(r["best"]),
                      _fmt(r.get("label_accuracy")), _fmt(test.get("test/label_accuracy")),
                      _fmt(test.get("test/recall")), str(r["rounds"]), r["status"]])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    table = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)
    best_cfg = trial_config(OmegaConf.to_container(cfg, resolve=True), best["_config"])
    best_cfg.train.run_name = f"{cfg.tune.name}-best"
    best_cfg.tracking.group = ""
    best_cfg_path = root / "best_config.yaml"
    best_cfg_path.write_text("# Best trial " + best["trial"] + f" of sweep {cfg.tune.name} ({metric} = {best['best']:.4f}).\n"
                             f"# Re-run: python -m reckoning_ray.train --config {best_cfg_path}\n"
                             + OmegaConf.to_yaml(best_cfg))
    from .checkpoint import checkpoint_path

    best_ckpt = checkpoint_path(root / "trials" / best["trial"], "best")
    if best_ckpt is not None and store is not None:
        best_ckpt = join(store.remote, "trials", best["trial"], "checkpoints", best_ckpt.name)
    best_ckpt = str(best_ckpt or "")
    out = {"table": table, "best_trial": best["trial"], "best_value": best["best"],
           "best_test": best.get("test"), "best_config": str(best_cfg_path), "best_checkpoint": best_ckpt,
           "trials": [{k: v for k, v in r.items() if k != "_config"} for r in rows]}
    (root / "sweep_summary.json").write_text(json.dumps(out, indent=2, default=str))
    if store is not None:
        store.push_sweep()
    return out


def test_trials(cfg: DictConfig, rows: list[dict[str, Any]], trials_dir: Path,
                store: Optional[SweepStore] = None) -> dict[str, dict[str, float]]:
    """Evaluate every trial's best checkpoint (chosen on validation) on the test split.

    Trials are tested after the sweep, not at their end, because ASHA stops a trial by ending its
    workers. Each evaluation is a Ray task with one training worker's resources (a GPU when the
    trials use one); the metrics go to ``row["test"]`` and are returned ``{trial: metrics}`` for
    ``record_trials`` to write. A trial tested before (a resumed sweep) keeps its recorded result.
    With ``store`` (an object store), the evaluating node fetches the checkpoint from it; else a
    trial whose best checkpoint is not on this machine is left untested and says so.
    """
    import ray

    from .checkpoint import checkpoint_path

    res = cfg.resources
    options: dict[str, Any] = {"num_cpus": float(res.cpus_per_worker)}
    if res.use_gpu:
        options["num_gpus"] = float(res.gpus_per_worker)
    remote = ray.remote(test_trial).options(**options)
    pending = {}
    for row in rows:
        run_dir = trials_dir / row["trial"]
        summary_file = run_dir / "summary.json"
        recorded = json.loads(summary_file.read_text()).get("test") if summary_file.exists() else None
        best = checkpoint_path(run_dir, "best")
        if recorded:
            row["test"] = recorded
        elif best is not None and (run_dir / "config.yaml").exists() and (store is not None or best.is_dir()):
            trial_cfg = load_config(str(run_dir / "config.yaml"))
            pending[row["trial"]] = remote.remote(trial_cfg, row["trial"],
                                                  store.trial(row["trial"]).remote if store else None)
        else:
            print(f"note: trial {row['trial']}: no best checkpoint under {run_dir} on this machine; not tested")
    if pending:
        print(f"testing the best checkpoints of {len(pending)} trial(s) on the test split")
    tested = {}
    for trial, ref in pending.items():
        tested[trial] = ray.get(ref)
        row = next(r for r in rows if r["trial"] == trial)
        row["test"] = dict(tested[trial], checkpoint="best")
    return tested


def test_trial(cfg: DictConfig, trial_id: str, remote: Optional[str]) -> dict[str, float]:
    """The test metrics of a trial's best checkpoint, on the node this runs on (a Ray task):
    its run directory there, the checkpoint fetched from the object store ``remote`` first."""
    from .checkpoint import checkpoint_path
    from .evaluate import evaluate_checkpoint
    from .storage import pull_checkpoint

    run_dir = local_dir(cfg) / "trials" / trial_id
    best = pull_checkpoint(run_dir, remote) if remote else checkpoint_path(run_dir, "best")
    return evaluate_checkpoint(cfg, str(best), "test")


def record_trials(cfg: DictConfig, rows: list[dict[str, Any]], trials_dir: Path,
                  tested: dict[str, dict[str, float]], store: Optional[SweepStore] = None) -> None:
    """Write each trial's outcome into its W&B run: ``trial/status`` and ``trial/rounds`` (the
    sweep table's columns) and, for the trials just tested, the test metrics (``record_test``:
    also the trial's ``summary.json``). The run is resumed once per trial, from the driver, and
    only when something changed (a resumed sweep's finished trials are left alone).
    """
    from .evaluate import record_test
    from .tracking import RunWriter
    from .wandb_sweep import sweep_id_for

    for row in rows:
        trial = row["trial"]
        run_dir = trials_dir / trial
        outcome = {"trial/status": row["status"], "trial/rounds": int(row["rounds"])}
        trial_cfg = trial_config(OmegaConf.to_container(cfg, resolve=True), row.get("_config") or {})
        trial_cfg.train.run_name = trial
        writer = RunWriter(trial_cfg.tracking, run_dir, run_names(trial_cfg, trial_id=trial),
                           sweep_id=sweep_id_for(trials_dir.parent, trial_cfg.tracking))
        if trial not in tested and writer.has_summary(outcome):
            continue  # a resumed sweep's finished trial: nothing changed
        with writer:
            writer.summary(outcome)
            if trial in tested:
                record_test(run_dir, tested[trial], "best", writer=writer)
        if store is not None:
            store.push_trial(trial, files=("summary.json",))


def trial_history(result: Any, run_dir: Path) -> Any:
    """A trial's validation history as a DataFrame: the run directory's metrics.jsonl when this
    machine has it (complete across interruptions and resumes), else what Tune recorded."""
    import pandas as pd

    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.exists():
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        if rows:
            frame = pd.DataFrame(rows)
            last = result.metrics_dataframe
            if last is not None and "checkpoint_path" in last and "round" in last:
                frame = frame.merge(last[["round", "checkpoint_path"]], on="round", how="left")
            return frame
    return result.metrics_dataframe


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def start_wandb_sweep(cfg: DictConfig, space: dict[str, tuple[str, list]], fresh: bool) -> Optional[str]:
    """The sweep as a W&B sweep: its translated config in ``<sweep dir>/wandb_sweep.yaml`` (a fresh
    sweep writes it and forgets an earlier sweep's W&B id) and, when W&B runs online, the W&B
    sweep itself, created now so that the trials' runs join it live. Returns its id or None;
    never fails the sweep (an unreachable W&B is a warning; ``publish`` attaches the runs later).
    """
    from .tracking import resolve_mode
    from .wandb_sweep import read_sweep_file, start_online_sweep, sweep_config_of, sweep_description, write_sweep_file

    root = local_dir(cfg)
    config = None if fresh else read_sweep_file(root)
    if config is None:
        config = sweep_config_of(cfg, space, sweep_description(cfg.tune.name))
        write_sweep_file(root, config)
    if resolve_mode(cfg.tracking.mode) != "online":
        return None
    return start_online_sweep(cfg, root, config)


def run(cfg: DictConfig, resume: bool = False) -> dict[str, Any]:
    from .train import check_inputs, init_ray

    if not cfg.tune.storage_path:  # every node reads the sweep's storage from the config, not its environment
        cfg.tune.storage_path = sweep_dir(cfg).rsplit("/", 1)[0]
    store = sweep_store(cfg)
    if resume and store is not None:
        print(f"fetching the sweep's files from {store.remote} into {store.local}")
        store.pull()  # all but the checkpoints: the trials' workers fetch theirs
    saved = local_dir(cfg) / "sweep_config.yaml"
    if resume and saved.exists():
        print(f"resuming with the sweep's saved config {saved}")
        cfg = load_config(str(saved))
    space = load_space(cfg.tune.space, cfg)  # fails before any work starts
    if int(cfg.resources.num_workers) == 0:
        raise ConfigError("resources.num_workers=0 runs one training without Ray; a sweep's trials are Ray Train "
                          "runs: set resources.num_workers >= 1")
    check_inputs(cfg)  # the data and the model, before any trial starts
    if not resume:
        save_config(cfg, saved)
        for name in SWEEP_RESULTS:  # the rungs and results of an earlier sweep of this name
            (local_dir(cfg) / name).unlink(missing_ok=True)
    start_wandb_sweep(cfg, space, fresh=not resume)
    if store is not None:
        store.push_sweep()
    init_ray()
    # ASHA's decisions on the trials' last planned rounds, for trials that extend (tune.extend); the
    # actor lives as long as this handle does
    board = promotion_board(board_name(cfg), create=True) if cfg.tune.extend else None
    t0 = time.time()
    tuner = build_tuner(cfg, space, resume=resume)
    results = tuner.fit()
    del board
    out = summarize(cfg, results, space)
    print("\n" + out["table"])
    print(f"\nbest trial {out['best_trial']}: {cfg.tune.metric} = {out['best_value']:.4f}"
          + (f"; test label_accuracy {out['best_test']['test/label_accuracy']:.3f}" if out.get("best_test") else ""))
    print(f"best config: {out['best_config']}  (python -m reckoning_ray.train --config {out['best_config']})")
    print(f"best checkpoint: {out['best_checkpoint']}")
    print(f"sweep took {time.time() - t0:.0f}s")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["publish"]:
        from .wandb_sweep import publish_main

        return publish_main(argv[1:])
    if argv[:1] == ["soup"]:
        from .soup import main as soup_main

        return soup_main(argv[1:])
    # space=<name> is short for tune.space=<name>
    argv = [f"tune.{a}" if a.startswith("space=") else a for a in argv]
    names = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))) + f" (in {SPACES_DIR})"
    args = parse_args(
        argv, "python -m reckoning_ray.tune",
        "Sweep RECKONING's inner-loop settings with Ray Tune + ASHA (the project's main job). "
        "`python -m reckoning_ray.tune publish SWEEP_DIR [--dry-run]` uploads a sweep to W&B; "
        "`python -m reckoning_ray.tune soup SWEEP_DIR` averages its trials' best checkpoints (model soups).",
        EPILOG.replace("{spaces}", names),
        extra=lambda p: p.add_argument("--resume", action="store_true",
                                       help="continue the interrupted sweep tune.storage_path/tune.name"),
    )
    return run_command(args, lambda cfg: run(cfg, resume=args.resume),
                       check=lambda cfg: load_space(cfg.tune.space, cfg))  # --print-config checks the space too


if __name__ == "__main__":
    sys.exit(main())
