"""The Ray Tune driver: one sweep over a search space, resumable (``--resume``).

Each trial is a function that builds and fits a ``TorchTrainer`` (:mod:`.trials`, :mod:`.trainer`)
with Ray's ``TuneReportCallback``: the current Train + Tune pattern. Trials are named by their
trial id, so a resumed sweep finds its runs; every trial logs to W&B (run id = trial id, group =
sweep name) from the sweep's driver (:class:`.callbacks.TrackingCallback`), offline unless
``tracking.mode=online``. The sweep is also a W&B sweep (:mod:`reckoning_ray.tracking.sweeps`):
created at the start when online, or afterwards by ``tune publish``.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from reckoning_ray.core.config import load_config, save_config
from reckoning_ray.core.elastic import elastic_bounds
from reckoning_ray.core.errors import ConfigError
from reckoning_ray.core.spaces import load_space
from reckoning_ray.core.storage import StorageError, is_uri, join
from reckoning_ray.core.sweep_store import SWEEP_RESULTS, local_dir, sweep_dir, sweep_store
from reckoning_ray.on_ray.callbacks import TrackingCallback
from reckoning_ray.on_ray.elastic import ElasticCallback, pool_name, worker_pool
from reckoning_ray.on_ray.report import publish_report
from reckoning_ray.on_ray.results import summarize
from reckoning_ray.on_ray.schedulers import build_trial_scheduler
from reckoning_ray.on_ray.trials import (
    CELL,
    board_name,
    promotion_board,
    run_trial,
    to_tune_space,
    trial_dirname,
)
from reckoning_ray.tracking.sweeps import (
    read_sweep_file,
    start_online_sweep,
    sweep_config_of,
    sweep_description,
    write_sweep_file,
)
from reckoning_ray.tracking.writer import resolve_mode

# -- the driver ------------------------------------------------------------------------------------

def placement(cfg: DictConfig, space: dict[str, tuple[str, list]]) -> tuple[list[str], int]:
    """Node types the sweep's trials may ask for, and how many trials the cluster can hold at once.

    A node type no node has (and no autoscaler node type offers) is reported at once and dropped,
    so the sweep runs on the nodes there are instead of waiting forever.
    """
    import ray

    # heavy: imported here to keep torch off this module's import
    from reckoning_ray.on_ray.trainer import autoscaler_node_resources, check_placement

    methods = {cfg.train.method}
    if "train.method" in space:
        methods |= set(space["train.method"][1])
    if CELL in space:
        methods |= {cell["train.method"] for cell in space[CELL][1] if "train.method" in cell}
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



def build_tuner(cfg: DictConfig, space: dict[str, tuple[str, list]], resume: bool = False):
    """The sweep's Tuner, and with elastic trials (``resources.max_workers``) the handles of their
    worker pools (:mod:`.elastic`; one per node type the trials ask for, counting that type's
    places), which live as long as the handles do (else None)."""
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
        # elastic trials (resources.max_workers): the sweep's worker pools (<name>/<node type>),
        # which the driver holds
        "pool": None,
    }
    callbacks, pool = [TrackingCallback(setup["base"], root)], None
    if elastic_bounds(cfg) is not None:
        setup["pool"] = pool_name("sweep", cfg.tune.name)
        # heavy: imported here to keep torch off this module's import
        from reckoning_ray.on_ray.trainer import worker_resources

        names = {node: f"{setup['pool']}/{node}" for node in sorted({"", *node_types})}  # "": any node
        pool = [worker_pool(name, worker_resources(cfg, node), concurrent) for node, name in names.items()]
        callbacks.append(ElasticCallback(list(names.values())))
        print(f"elastic trials: each starts with at least resources.num_workers={cfg.resources.num_workers} "
              f"worker(s) and grows up to resources.max_workers={cfg.resources.max_workers} onto the workers "
              "other trials free, after a validation")
    # the trial function only drives its TorchTrainer: it needs memory but no CPU of its own, so
    # the CPUs go to the training workers (Ray rejects a request with no resource at all)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"CPU": 0, "memory": 256 * 2**20})
    if resume:
        if not tune.Tuner.can_restore(root):
            raise ConfigError(f"--resume: no sweep to resume at {root} (tune.storage_path / tune.name)")
        return tune.Tuner.restore(root, trainable=trainable, resume_unfinished=True, resume_errored=True), pool
    param_space = to_tune_space(space)
    scheduler = build_trial_scheduler(cfg, root)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=scheduler,
                                    num_samples=cfg.tune.num_samples, max_concurrent_trials=concurrent,
                                    trial_dirname_creator=trial_dirname, trial_name_creator=trial_dirname),
        run_config=tune.RunConfig(name=cfg.tune.name, storage_path=root.rsplit("/", 1)[0],
                                  callbacks=callbacks),
    ), pool


def start_wandb_sweep(cfg: DictConfig, space: dict[str, tuple[str, list]], fresh: bool) -> Optional[str]:
    """The sweep as a W&B sweep: its translated config in ``<sweep dir>/wandb_sweep.yaml`` (a fresh
    sweep writes it and forgets an earlier sweep's W&B id) and, when W&B runs online, the W&B
    sweep itself, created now so that the trials' runs join it live. Returns its id or None;
    never fails the sweep (an unreachable W&B is a warning; ``publish`` attaches the runs later).
    """

    root = local_dir(cfg)
    config = None if fresh else read_sweep_file(root)
    if config is None:
        config = sweep_config_of(cfg, space, sweep_description(cfg.tune.name))
        write_sweep_file(root, config)
    if resolve_mode(cfg.tracking.mode) != "online":
        return None
    return start_online_sweep(cfg, root, config)


def run(cfg: DictConfig, resume: bool = False, space: Optional[dict[str, tuple[str, list]]] = None) -> dict[str, Any]:
    """Run (or with ``resume`` continue) the sweep of ``cfg`` over ``space``, by default the search
    space file ``tune.space`` names; returns the summary (table, best trial, config, checkpoint)."""
    # heavy: imported here to keep torch off this module's import
    from reckoning_ray.core.runs import check_inputs, lock_sweep

    # heavy: imported here to keep torch off this module's import
    from reckoning_ray.on_ray.trainer import init_ray

    if not cfg.tune.storage_path:  # every node reads the sweep's storage from the config, not its environment
        cfg.tune.storage_path = sweep_dir(cfg).rsplit("/", 1)[0]
    lock = lock_sweep(local_dir(cfg))  # one driver per sweep: held until this process ends  # noqa: F841
    try:  # an object store that cannot be reached stops the sweep here, before Ray starts
        store = sweep_store(cfg)  # opening it resolves the bucket's region
        if store is not None:
            store.sweep.check_access()
    except StorageError as exc:
        raise ConfigError(str(exc)) from None
    if resume and store is not None:
        print(f"fetching the sweep's files from {store.remote} into {store.local}")
        store.pull()  # all but the checkpoints: the trials' workers fetch theirs
    saved = local_dir(cfg) / "sweep_config.yaml"
    if resume and saved.exists():
        print(f"resuming with the sweep's saved config {saved}")
        cfg = load_config(str(saved))
    space = space if space is not None else load_space(cfg.tune.space, cfg)  # fails before any work starts
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
    tuner, pool = build_tuner(cfg, space, resume=resume)
    results = tuner.fit()
    del board, pool
    out = summarize(cfg, results, space, store)
    print("\n" + out["table"])
    print(f"\nbest trial {out['best_trial']}: {cfg.tune.metric} = {out['best_value']:.4f}"
          + (f"; test label_accuracy {out['best_test']['test/label_accuracy']:.3f}" if out.get("best_test") else ""))
    print(f"best config: {out['best_config']}  (python -m reckoning_ray.train --config {out['best_config']})")
    print(f"best checkpoint: {out['best_checkpoint']}")
    out["report"] = [str(f) for f in publish_report(local_dir(cfg), store, title=f"sweep {cfg.tune.name}")]
    if store is not None:  # the driver's uploads still waiting for the store, if any
        store.close(float(cfg.tune.storage_wait_s))
    print(f"sweep took {time.time() - t0:.0f}s")
    return out
