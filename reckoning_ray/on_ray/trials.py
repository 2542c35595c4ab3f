"""One trial of a sweep: the sampled parameters on the sweep's base config, a ``TorchTrainer``
fitted inside the Tune trial, and, with ``tune.extend``, the trial extended to ASHA's next rung
when ASHA keeps it at the end of its planned rounds (decisions on the :class:`PromotionBoard`,
a named actor the driver holds for the whole sweep).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from reckoning_ray.core.checkpoint import RECORD, read_record
from reckoning_ray.core.config import (
    from_container,
    group,
    node_type_for,
    validate,
)
from reckoning_ray.core.plan import (
    planned_steps,
    planned_validations,
    steps_for_validations,
)
from reckoning_ray.core.storage import Mirror, StorageError, join
from reckoning_ray.core.sweep_store import local_dir
from reckoning_ray.on_ray.actors import on_this_node


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


# A search-space key whose values are sets of overrides ({config key: value}): one grid value that
# sets several keys at once, as a cell of the paper's tables does (method, preset keys, data).
CELL = "cell"


def trial_config(base: dict, params: dict[str, Any]) -> DictConfig:
    """The sweep's ``base`` config with a trial's sampled ``params`` ({config key: value}); a
    :data:`CELL` parameter's overrides are applied first, then the other keys."""
    cfg = from_container(base)
    overrides = dict(params.get(CELL) or {})
    overrides.update((k, v) for k, v in params.items() if k != CELL)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    validate(cfg)
    return cfg


def cell_name(value: Any) -> Any:
    """How a :data:`CELL` value is shown: its W&B group (the cell's name)."""
    return value.get("tracking.group", "cell") if isinstance(value, dict) else value


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

    # heavy: imported here to keep torch off this module's import
    from reckoning_ray.core.runs import check_inputs

    # heavy: imported here to keep torch off this module's import
    from reckoning_ray.on_ray.trainer import fit, set_length

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

        record, _ = _trial_files(run_dir, remote)
        if int(record.get("planned_steps") or 0) > planned_steps(train_tasks, group(cfg, "train")):
            set_length(cfg, int(record["planned_steps"]), train_tasks)
    while True:
        # W&B is written by the sweep's driver (TrackingCallback), which outlives the trial
        pool = f"{config['pool']}/{node}" if config.get("pool") else None  # the pool of its node type
        fit(cfg, run_dir, pool=pool, callbacks=[TuneReportCallback()], node_type=node,
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

    if remote:
        try:
            Mirror(run_dir, remote).pull(include=(RECORD, "summary.json"), overwrite=True)
        except StorageError as exc:  # the worker on this node wrote them; elsewhere they may be older
            print(f"[storage] {exc}; reading the trial's record on this node", flush=True)
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
        actor = ray.remote(num_cpus=0)(PromotionBoard).options(name=name, get_if_exists=True,
                                                               **on_this_node()).remote()
    else:
        actor = ray.get_actor(name)
    return _BoardClient(actor)


def board_name(cfg: DictConfig) -> str:
    return f"reckoning-ray-promotions/{cfg.tune.name}"
