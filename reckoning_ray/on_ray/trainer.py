"""One training run: on Ray Train workers (``TorchTrainer``), or in this process without Ray.

Every worker runs the inner and outer loop on its own shard of tasks; the meta-gradients (weights
and learned inner learning rates) are SUM-all-reduced in flat buckets before the optimizer step
(DDP cannot differentiate twice, so the model is not wrapped in it). Rank 0 writes each
validation's checkpoint into the run directory (:mod:`reckoning_ray.core.checkpoint`) and every
rank reports the metrics through ``ray.train.report``; the W&B run is written by the Ray Train
controller (:class:`reckoning_ray.on_ray.callbacks.TrainTracking`). A crashed worker is restarted
from the latest checkpoint (``resources.max_failures``); an input error is not retried.
Placement: a run asks for its node type's custom resource (``a100`` / ``rtx3090``) and fails at
once when no node or autoscaler node type offers it. ``resources.num_workers=0`` runs the same
loop in this process (:func:`run_in_process`), W&B written from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from reckoning_ray.core.checkpoint import read_record
from reckoning_ray.core.config import flatten, from_container, group, node_type_for
from reckoning_ray.core.elastic import append_event, elastic_bounds
from reckoning_ray.core.errors import ConfigError, InputError
from reckoning_ray.core.evaluate import evaluate_best
from reckoning_ray.core.plan import planned_validations, steps_per_epoch
from reckoning_ray.core.runs import build_loop, summary_values
from reckoning_ray.core.storage import RunMirror
from reckoning_ray.core.uploads import Uploader
from reckoning_ray.tracking.writer import RunWriter, run_names


def input_error(error: BaseException) -> Optional[BaseException]:
    """The input error behind a failed Ray Train run (a worker raised an :class:`InputError`), or
    None for a crash (a killed process, a lost node) that a retry may get past."""
    kinds = InputError
    candidates = [error, *getattr(error, "worker_failures", {}).values()]
    for exc in candidates:
        for candidate in (exc, getattr(exc, "cause", None), exc.__cause__):
            if isinstance(candidate, kinds):
                return candidate
    return None


def run_in_process(cfg: DictConfig, run_dir: Path, test: bool = True) -> dict[str, Any]:
    """The run in this process, without Ray (``resources.num_workers=0``): the same loop, one
    device, W&B written from here. Returns the run's summary."""
    import torch

    # heavy: imported here to keep numpy off this module's import
    from reckoning_ray.core.loop import Hooks

    device = torch.device("cuda" if cfg.resources.use_gpu else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("resources.use_gpu=true but this process sees no CUDA device; set "
                          "resources.use_gpu=false or run on a GPU machine")
    writer = RunWriter(cfg.tracking, run_dir, run_names(cfg), config=flatten(cfg))
    hooks = Hooks(device=device, report=writer.log, log=lambda m: print(m, flush=True), on_step=fault_injection(0))
    with writer:
        loop = build_loop(cfg, run_dir, hooks)
        writer.backfill()  # validations of an earlier process that W&B did not get
        summary = loop.fit()
        writer.summary(summary_values(summary))
        if test:
            writer.summary(evaluate_best(run_dir, device))
    return summary


# -- the Ray Train worker ---------------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: ``config = {"cfg": resolved config dict, "run_dir": str,
    "test": bool, "storage": URI or None}``. Reports every validation's metrics; with ``test``,
    rank 0 evaluates the best checkpoint at the end and every rank reports once more,
    ``{"final": 1, "summary": {...}}``. With ``storage`` (the run directory's copy in an object
    store, :mod:`reckoning_ray.core.storage`), the first worker of each node brings the node's run
    directory up to the stored one before the loop starts, and rank 0 pushes the run directory
    after every validation and at the end."""
    import ray.train
    import torch
    import torch.distributed as dist

    # heavy: imported here to keep numpy off this module's import
    from reckoning_ray.core.loop import Hooks

    quiet_worker_logs()
    cfg = from_container(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.resources.use_gpu else torch.device("cpu")
    run_dir = Path(config["run_dir"])
    planned: list[int] = []
    mirror = node_run_dir(run_dir, config["storage"], ctx) if config.get("storage") else None
    uploads = Uploader(mirror, log=lambda m: print(m, flush=True), **RunMirror.PUSH) \
        if mirror is not None and rank == 0 else None
    elastic = config.get("elastic")
    if rank == 0:
        append_event(run_dir, "launch", world, t=config.get("launched_at"))

    def report(metrics: dict[str, Any]) -> None:
        if uploads is not None:
            # this validation's metrics and checkpoint, stored before anyone hears of them while the
            # store answers; while it does not, uploaded in the background when it does again
            uploads.flush(while_answering=True)
        if rank == 0:
            append_event(run_dir, "round", world, round=metrics.get("round"), step=metrics.get("step"))
        # An extended wsd run repeats the rounds after its cooldown's start; Tune and W&B heard of
        # them already and take increasing rounds only (metrics.jsonl has the repeated ones).
        if int(metrics.get("round") or 0) <= loop.rounds_heard:
            return
        # the validation rounds a full run makes: Tune's trial status reads it
        metrics = dict(metrics, rounds_planned=planned[0])
        ray.train.report({k: v for k, v in metrics.items() if v is not None})
        if elastic and not (metrics.get("stopped_early") or int(metrics["step"]) >= loop.total_steps):
            resize_after_validation(elastic, rank, world, int(metrics["step"]))

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    hooks = Hooks(rank=rank, world_size=world, device=device, all_reduce=all_reduce if world > 1 else None,
                  report=report, log=lambda m: print(m, flush=True), on_step=fault_injection(rank))
    loop = build_loop(cfg, run_dir, hooks)
    planned.append(planned_validations(len(loop.train_records), loop.train))
    if rank == 0:
        append_event(run_dir, "ready", world, step=loop.progress.global_step)
    if loop.finished and loop.history:
        # resumed after the run had finished: report its last result again, so that a host
        # that lost it (a Tune trial restored from an interrupted sweep) still sees it
        report(dict(loop.history[-1], replayed=True))
    try:
        summary = loop.fit()
    except Resize as resize:
        # this validation's checkpoint is written (and stored, below): the run goes on from it
        # with the new worker count, started by fit()
        if rank == 0:
            append_event(run_dir, "end", world, why=f"resize to {resize.workers}", step=resize.step)
        if uploads is not None:
            uploads.close(float(cfg.tune.storage_wait_s))
        return
    if rank == 0:
        append_event(run_dir, "end", world, why="done", step=loop.progress.global_step)
    if config.get("test", True):
        values = summary_values(summary)
        if rank == 0:
            values.update(evaluate_best(run_dir, device))
    if uploads is not None:  # summary.json (with the test metrics), and any backlog
        uploads.close(float(cfg.tune.storage_wait_s))
    if config.get("test", True):
        ray.train.report({"final": 1, "summary": values if rank == 0 else {}})


class Resize(Exception):
    """Ends an elastic run's worker group right after a validation's checkpoint: the run goes on
    from it with ``workers`` workers."""

    def __init__(self, workers: int, step: int) -> None:
        super().__init__(f"resize to {workers} workers after step {step}")
        self.workers, self.step = workers, step


def resize_after_validation(elastic: dict[str, Any], rank: int, world: int, step: int) -> None:
    """Rank 0 asks the run's worker pool for the count to go on with and tells every rank; a new
    count raises :class:`Resize` on all of them (the group ends; ``fit`` starts the next)."""
    import torch
    import torch.distributed as dist

    # heavy: imported here to keep ray off this module's import
    from reckoning_ray.on_ray.elastic import placeable, worker_pool

    count = torch.full((1,), world, dtype=torch.int64)
    if rank == 0:
        try:
            pool = worker_pool(elastic["pool"])
            wanted = int(pool.resize(elastic["run"], world, int(elastic["least"]), int(elastic["most"])))
            if wanted > world:  # grow only by the workers that can be placed now besides this group's
                wanted = world + placeable(wanted - world, 0, elastic["per_worker"], timeout_s=5.0, log=lambda m: None)
                if wanted == world:
                    pool.hold(elastic["run"], world)
            count[0] = wanted
        except Exception as exc:  # the pool's driver is away: training goes on as it is
            print(f"{elastic['run']}: the worker pool {elastic['pool']} did not answer ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200]}); going on with {world} worker(s)", flush=True)
    if world > 1:
        dist.broadcast(count, src=0)
    if int(count[0]) != world:
        if rank == 0:
            print(f"{elastic['run']}: {'growing' if int(count[0]) > world else 'shrinking'} from {world} to "
                  f"{int(count[0])} worker(s) after the validation at step {step} (its checkpoint is where the "
                  "run goes on)", flush=True)
        raise Resize(int(count[0]), step)


def quiet_worker_logs() -> None:
    """Ray workers log INFO from every library; keep the loop's own progress lines readable."""
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    names = ["dill", "ray.train", "datasets"]
    try:  # Ray Train V2 logs every report at INFO under a logger named after its file
        # Private API (ray==2.60.0): that logger is named by the path of a private module, and
        # neither ray.train.LoggingConfig nor Ray's logging settings reach it.
        from ray.train.v2._internal.execution import context as train_context

        names.append(train_context.__file__)
    except ImportError:
        pass
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)


def node_run_dir(run_dir: Path, storage: str, ctx: Any) -> RunMirror:
    """The run directory's mirror in the object store ``storage``; the first worker of each node
    (``ctx``: the Ray Train context) brings the node's run directory up to the stored one, and
    every rank waits for all nodes to have it."""
    import torch.distributed as dist

    mirror = RunMirror(run_dir, storage)
    if ctx.get_local_rank() == 0 and mirror.sync_down(log=lambda m: print(m, flush=True)):
        print(f"[storage] {run_dir.name}: continuing from the run directory in {mirror.remote}", flush=True)
    if ctx.get_world_size() > 1:
        dist.barrier()  # every node has the run directory before any rank reads it
    return mirror


def fault_injection(rank: int) -> Optional[Callable[[int], None]]:
    """Fail this worker at a given step, for fault-tolerance tests and drills.

    ``RECKONING_RAY_CRASH_AT=<step>:<marker file>``: rank 0 exits abruptly (``os._exit``, like a
    killed process) after optimizer step <step> if the marker file does not exist yet, creating it
    first, so the restarted run passes that step.
    ``RECKONING_RAY_INPUT_ERROR_AT=<step>:<marker file>``: rank 0 raises a ``ConfigError`` after
    step <step> every time, appending a line to the marker file (one line per attempt).
    """
    crash = os.environ.get("RECKONING_RAY_CRASH_AT")
    error = os.environ.get("RECKONING_RAY_INPUT_ERROR_AT")
    if rank != 0 or not (crash or error):
        return None

    def on_step(step: int) -> None:
        if crash:
            step_text, marker = crash.split(":", 1)
            if step == int(step_text) and not os.path.exists(marker):
                Path(marker).write_text(f"crashed at step {step}\n")
                print(f"RECKONING_RAY_CRASH_AT: worker exits at step {step}", flush=True)
                os._exit(1)
        if error:
            step_text, marker = error.split(":", 1)
            if step == int(step_text):
                with open(marker, "a") as f:
                    f.write(f"input error at step {step}\n")
                raise ConfigError(f"RECKONING_RAY_INPUT_ERROR_AT: an input error at step {step}")

    return on_step


# -- the driver ------------------------------------------------------------------------------------

def worker_resources(cfg: DictConfig, node_type: Optional[str] = None) -> dict[str, float]:
    """What each worker asks Ray for; ``node_type`` overrides the config's (placement checks)."""
    res = cfg.resources
    per_worker: dict[str, float] = {"CPU": float(res.cpus_per_worker)}
    if res.use_gpu:
        per_worker["GPU"] = float(res.gpus_per_worker)
    node = node_type_for(cfg) if node_type is None else node_type
    if node:
        per_worker[node] = float(res.gpus_per_worker) if res.use_gpu else 1.0
    return per_worker


def scaling_config(cfg: DictConfig, node_type: Optional[str] = None, workers: Optional[int] = None):
    """``workers`` workers (default ``resources.num_workers``) and what each asks for."""
    from ray.train import ScalingConfig

    res = cfg.resources
    return ScalingConfig(num_workers=int(workers or res.num_workers), use_gpu=bool(res.use_gpu),
                         resources_per_worker=worker_resources(cfg, node_type))


def check_placement(cfg: DictConfig) -> str:
    """The node type to ask for, after checking the running cluster can place the workers.

    A node type the cluster has no node of (and its autoscaler cannot add) is dropped with a
    printed explanation, so the same config runs on a laptop; a worker shape no node can hold is
    an error naming the keys to change.
    """
    import ray

    node = node_type_for(cfg)
    totals = ray.cluster_resources()
    autoscaler_types = autoscaler_node_resources()
    available = [totals] + autoscaler_types
    if node and not any(r.get(node, 0) > 0 for r in available):
        print(f"note: resources.node_type asks for '{node}' nodes but this cluster has none "
              f"(resources: {sorted(k for k in totals if not k.startswith('node:'))}); running on any node")
        node = ""
    res = cfg.resources
    if res.use_gpu and not any(r.get("GPU", 0) >= res.gpus_per_worker for r in available):
        raise ConfigError(
            f"resources.use_gpu=true but no node of this cluster has {res.gpus_per_worker} GPU(s) "
            f"(cluster: {dict((k, v) for k, v in totals.items() if k in ('CPU', 'GPU'))}); set resources.use_gpu=false "
            f"or start a GPU cluster (cluster/README.md)"
        )
    if not any(r.get("CPU", 0) >= res.cpus_per_worker for r in available):
        raise ConfigError(
            f"resources.cpus_per_worker={res.cpus_per_worker} is more than any node of this cluster has "
            f"(largest: {max(r.get('CPU', 0) for r in available)}); lower it"
        )
    if not autoscaler_types:
        # a fixed cluster: Ray would wait forever for workers it cannot place
        need = {"CPU": res.num_workers * res.cpus_per_worker}
        if res.use_gpu:
            need["GPU"] = res.num_workers * res.gpus_per_worker
        for kind, amount in need.items():
            if amount > totals.get(kind, 0):
                per = "cpus_per_worker" if kind == "CPU" else "gpus_per_worker"
                raise ConfigError(
                    f"resources.num_workers={res.num_workers} x resources.{per}={res[per]} needs {amount:g} "
                    f"{kind}s but this cluster has {totals.get(kind, 0):g}; lower resources.num_workers "
                    f"(the batch stays the same: train.batch_size is global) or join a larger cluster (RAY_ADDRESS)")
    return node


AUTOSCALER_CONFIG_ENV = "RECKONING_AUTOSCALER_CONFIG"


def autoscaler_node_resources() -> list[dict[str, float]]:
    """Resources of the node types the cluster's autoscaler may add (empty without autoscaler).

    Ray keeps the launcher's config on the head node at ``~/ray_bootstrap_config.yaml``; a cluster
    started by hand with ``--autoscaling-config`` names its file in RECKONING_AUTOSCALER_CONFIG.
    """
    import yaml

    path = os.environ.get(AUTOSCALER_CONFIG_ENV) or os.path.expanduser("~/ray_bootstrap_config.yaml")
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            conf = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return []
    return [dict(t.get("resources", {})) for t in (conf.get("available_node_types") or {}).values()]


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: Optional[list] = None,
                  node_type: Optional[str] = None, storage_path: Optional[str] = None, test: bool = True,
                  mirror_to: Optional[str] = None, workers: Optional[int] = None,
                  elastic: Optional[dict[str, Any]] = None):
    """A ``TorchTrainer`` for one training run named ``run_dir.name``.

    The run's files (metrics, checkpoints and their record) are written by rank 0 into
    ``run_dir`` and, with ``mirror_to`` (a storage URI), mirrored there as they are written; Ray
    keeps its own run state under ``storage_path`` (default ``run_dir``'s parent). ``callbacks``:
    Ray Train callbacks (W&B: ``wandb_callbacks.TrainTracking``; a Tune
    trial: Tune's report callback). ``test``: rank 0 evaluates the best checkpoint on the test
    split at the end and all ranks report once more (``{"final": 1, "summary": ...}``); a Tune
    sweep evaluates its trials after the sweep instead (ASHA may stop a trial before its end).
    ``workers``: this worker group's size (default ``resources.num_workers``); ``elastic``: the
    run's worker pool (``{"pool", "run", "least", "most"}``), asked after every validation.
    """
    import time

    from ray.train import FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {"WANDB_MODE": os.environ.get("WANDB_MODE", cfg.tracking.mode), "WANDB_SILENT": "true",
           "TOKENIZERS_PARALLELISM": "false",
           # Ray Train tees print() into its logger too, which doubles every progress line
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    for name in ("RECKONING_RAY_CRASH_AT", "RECKONING_RAY_INPUT_ERROR_AT"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "run_dir": str(run_dir),
                           "test": test, "storage": mirror_to, "elastic": elastic, "launched_at": time.time()},
        torch_config=TorchConfig(backend="nccl" if cfg.resources.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg, node_type, workers),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=storage_path or str(run_dir.parent),
            # the driver decides (train.run): crashes are retried, input errors are not
            failure_config=FailureConfig(max_failures=0),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": env},
            # Ray Train's per-report INFO lines would drown the loop's own progress lines
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def fit(cfg: DictConfig, run_dir: Path, pool: Optional[str] = None, **trainer_args: Any) -> None:
    """Fit the run's ``TorchTrainer`` (:func:`build_trainer` with ``trainer_args``). A worker that
    raised an input error (:class:`InputError`) ends it at once with that error as a
    ``ConfigError``; a crash (a killed worker, a lost node) is retried from the run's latest
    checkpoint, up to ``resources.max_failures`` times.

    An elastic run (:func:`elastic_bounds`) takes its worker count from the worker pool ``pool``
    (a sweep's; by default one of its own, :mod:`reckoning_ray.on_ray.elastic`): at its start, after
    a resize its workers decided right after a validation (the group ended there; the next starts
    from that checkpoint), and after a crash (the workers left: a lost node shrinks the run)."""
    from ray.train import TrainingFailedError

    # heavy: imported here to keep ray off this module's import
    from reckoning_ray.on_ray.elastic import placeable, pool_name, worker_pool

    bounds = elastic_bounds(cfg)
    elastic, client = None, None
    if bounds is not None:
        name, per_worker = pool or pool_name("run", run_dir.name), worker_resources(cfg, trainer_args.get("node_type"))
        client = worker_pool(name, per_worker, 1) if pool is None else worker_pool(name)
        elastic = {"pool": name, "run": run_dir.name, "least": bounds[0], "most": bounds[1], "per_worker": per_worker}
    failures, workers = 0, None
    try:
        while True:
            if client is not None:
                workers = int(client.start(run_dir.name, *bounds))
                if workers > bounds[0]:  # as many as can be placed now (a node just lost is still listed)
                    workers = client.hold(run_dir.name, placeable(
                        workers, bounds[0], per_worker, log=lambda m: print(f"{run_dir.name}: {m}", flush=True)))
            try:
                build_trainer(cfg, run_dir, workers=workers, elastic=elastic, **trainer_args).fit()
                if client is None or client.next_start(run_dir.name) is None:
                    return
                continue  # resized: the next group starts from the validation's checkpoint
            except TrainingFailedError as exc:
                cause = input_error(exc)
                if cause is not None:
                    raise ConfigError(f"{type(cause).__name__}: {cause}") from None
                failures += 1
                if failures > int(cfg.resources.max_failures):
                    raise
                print(f"training failed ({str(exc).strip().splitlines()[-1][:200]}); restart {failures} of "
                      f"resources.max_failures={cfg.resources.max_failures} from the latest checkpoint"
                      + (" with the workers there are now" if client is not None else ""), flush=True)
    finally:
        if client is not None:
            client.release(run_dir.name)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all bound at once before any is released (one socket at a
    time, the system may hand out the same port twice)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for sock in socks:
            sock.bind(("", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


# Where Ray's own processes find the cluster's HTTP API (the state API). Ray reads it before
# RAY_ADDRESS; without either it looks for running Ray instances and fails with "Found multiple
# active Ray instances" when another command on the machine has started one.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def init_ray(**local: Any) -> None:
    """Join the cluster at RAY_ADDRESS, or start a local one (``local``: more ``ray.init``
    arguments for it, e.g. ``num_cpus``).

    A local instance is this command's own, even beside another command's on the same machine:
    its dashboard gets a free port, and its processes are told that address
    (``RAY_API_SERVER_ADDRESS``). Ray Train's placement-group cleaner asks the state API whether
    a run's controller is alive; left to find the cluster by itself, it finds two and its monitor
    thread dies ("Found multiple active Ray instances"), leaving placement groups behind."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"WANDB_MODE": os.environ.get("WANDB_MODE", ""), "TOKENIZERS_PARALLELISM": "false"}}
    if not env["env_vars"]["WANDB_MODE"]:
        del env["env_vars"]["WANDB_MODE"]
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # Private API (ray==2.60.0): an undocumented Ray Train setting, read by each run's
        # controller. Train starts a PreemptionWatcher actor per worker group (it relays a cloud
        # node's preemption notice to the workers); creating it logs a core_worker.cc error line
        # ("has constructor arguments in the object store and max_restarts > 0") to the terminal,
        # once per run or trial. A local Ray instance (started here, on one machine) has no node
        # that can be preempted, so its runs go without one. Runs on a cluster keep it. The
        # local instance's processes inherit this process's environment.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        port = free_ports(1)[0]
        api = f"http://127.0.0.1:{port}"
        env["env_vars"][API_SERVER_ENV] = api  # this job's workers and actors
        local = {"dashboard_host": "127.0.0.1", "dashboard_port": port, **local}
    elif local:
        raise ValueError(f"init_ray: {sorted(local)} apply to a local Ray instance, not to the one at {address}")
    before = os.environ.get(API_SERVER_ENV)
    if address is None:
        os.environ[API_SERVER_ENV] = api  # the local instance's own processes, started by ray.init
    try:
        ray.init(address=address, runtime_env=env, log_to_driver=True,
                 configure_logging=True, logging_level="WARNING", **local)
    finally:  # a later command of this process (a test's) may join another cluster
        if before is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = before


def extend(cfg: DictConfig, run_dir: Path, steps: int, train_tasks: int) -> None:
    """Make ``cfg`` the config of the wsd run in ``run_dir`` extended to ``steps`` optimizer steps
    (``train.max_steps``, and ``train.epochs`` raised to hold them); refuse what cannot be extended."""

    record = read_record(run_dir)
    if cfg.outer.schedule != "wsd":
        raise ConfigError(f"--extend-to: the run's outer.schedule is {cfg.outer.schedule}, whose rate has decayed "
                          "along the whole run; only outer.schedule=wsd runs (constant rate, then a cooldown) extend")
    if not record:
        raise ConfigError(f"--extend-to: {run_dir} has no checkpoint yet; start the run with train.max_steps={steps}")
    planned = int(record.get("planned_steps") or 0)
    if steps <= planned:
        raise ConfigError(f"--extend-to {steps}: the run was planned for {planned} steps; give more steps than that")
    set_length(cfg, steps, train_tasks)


def set_length(cfg: DictConfig, steps: int, train_tasks: int) -> None:
    """``train.max_steps = steps``, with ``train.epochs`` raised to hold them."""

    per_epoch = steps_per_epoch(train_tasks, group(cfg, "train"))
    cfg.train.max_steps = int(steps)
    cfg.train.epochs = max(int(cfg.train.epochs), -(-int(steps) // per_epoch))
