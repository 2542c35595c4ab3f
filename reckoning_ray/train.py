"""Ray Train: run the bilevel loop data-parallel with a ``TorchTrainer``.

    python -m reckoning_ray.train [preset | --config FILE] [key=value ...]

Every worker runs the inner and outer loop on its own shard of tasks; the meta-gradients (weights
and learned inner learning rates) are SUM-all-reduced in flat buckets before the optimizer step
(DDP cannot differentiate twice, so the model is not wrapped in it). Validation reports metrics and
a checkpoint through ``ray.train.report``; rerunning with the same ``train.run_name`` resumes from
the last checkpoint, and a crashed worker is restarted from it (``resources.max_failures``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, get_type_hints

from omegaconf import DictConfig, OmegaConf

from .config import Config, ConfigError, available_presets, flatten, load_config, node_type_for, to_yaml
from .loop import metric_mode
from .tracking import run_names

EPILOG = """\
presets (reckoning_ray/conf/*.yaml): {presets}
  embedded           the default: small GPT-2 built offline, generated multi-hop tasks, CPU, minutes
  paper              Table 1: GPT-2 base, ProofWriter / CLUTRR files, the paper's hyper-parameters (GPU)
  paper-distractors  Section 4.2: the same with 6 drawn distractors per question
  paper-icr          the fine-tuned in-context baseline (FT-ICR): batch 16, validation once per epoch
  PAPER.md lists every Table 1 / Section 4.2 cell as a command.

overrides are key=value pairs of the typed config, e.g.
  python -m reckoning_ray.train embedded train.epochs=2 inner.lr_init=0.05
  python -m reckoning_ray.train paper data.path=/data/proofwriter/depth-3
  python -m reckoning_ray.train --config runs/tune/embedded-sweep/best_config.yaml
  python -m reckoning_ray.train paper train.epochs=2 --print-config   (check a config, run nothing)

the batch is global: an optimizer step takes train.batch_size x train.grad_accum tasks whatever
resources.num_workers is (the workers split each micro-batch).

outputs go to <train.output_dir>/<train.run_name>/: config.yaml, metrics.jsonl, summary.json (best
validation metrics, and "test": the test split's metrics of the best checkpoint), best/ and last/
checkpoints (model/ via save_pretrained + state.pt), and W&B run files under wandb/ (offline unless
tracking.mode=online). Rerunning with the same run name resumes.
Evaluate a run's checkpoint again: python -m reckoning_ray.evaluate <run dir>
Set RAY_ADDRESS to join an existing Ray cluster instead of starting a local one.
"""


def config_groups_help() -> str:
    """The ``--help`` block naming each config group and the dataclass documenting its keys, read
    from :class:`Config`'s fields so that it follows the schema."""

    def groups(cls: type, prefix: str) -> list[tuple[str, str]]:
        rows = []
        for f in dataclasses.fields(cls):
            kind = get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(kind):
                rows.append((f"{prefix}{f.name}.*", kind.__name__))
                rows.extend(groups(kind, f"{prefix}{f.name}."))
        return rows

    rows = groups(Config, "")
    width = max(len(key) for key, _ in rows) + 2
    return "\n".join(
        ["config groups: each key's type, default and meaning are documented in reckoning_ray/config.py, in"
         " the dataclass of its group:"]
        + [f"  {key:<{width}}{name}" for key, name in rows]
    ) + "\n"


def parse_args(argv: Optional[list[str]], prog: str, description: str, epilog: str,
               extra: Optional[Callable[[argparse.ArgumentParser], Any]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog=epilog.format(presets=", ".join(available_presets())) + "\n" + config_groups_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("preset", nargs="?", default=None,
                        help="preset name or YAML config path (default: embedded)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    parser.add_argument("--config", default=None, help="a saved config YAML (e.g. best_config.yaml)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (preset or --config, then overrides, validated) as "
                             "YAML and exit, starting nothing; the output is a valid --config file")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.preset is not None and "=" in args.preset:  # first positional was an override
        args.overrides.insert(0, args.preset)
        args.preset = None
    if args.config is not None:
        if args.preset is not None:
            parser.error("give either a preset or --config, not both")
        args.preset = args.config
    return args


def run_command(args: argparse.Namespace, job: Callable[[DictConfig], Any],
                check: Optional[Callable[[DictConfig], Any]] = None) -> int:
    """Load the config of ``args``, print it, run ``job(cfg)``; exit status 2 with the message of
    any :class:`ConfigError` (bad key, value or file, before or during the run), else 0.

    ``--print-config``: load and validate the config the same way, run ``check(cfg)`` (the
    command's own checks that need no work, e.g. a sweep's search space), print the resolved YAML
    and return 0 without running ``job``.
    """
    try:
        cfg = load_config(args.preset, args.overrides)
        if getattr(args, "print_config", False):
            if check is not None:
                check(cfg)
            print(to_yaml(cfg), end="")
            return 0
        print(OmegaConf.to_yaml(cfg))
        job(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_name(cfg: DictConfig) -> str:
    return cfg.train.run_name or cfg.preset


# -- the pure-PyTorch part ------------------------------------------------------------------------

def prepare(cfg: DictConfig, model_dir: Optional[Path] = None):
    """Data, model, tokenizer, encoder and method for ``cfg``.

    ``model_dir``: a checkpoint's model directory to build from (resume), else the config's model.
    Returns (method, tokenizer, encoder, splits) with splits a dict of record lists.
    """
    import torch

    from .baseline import build_method
    from .data import load_splits
    from .data.encode import Encoder
    from .modeling import load_model_and_tokenizer

    dataset = load_splits(cfg.data)
    splits = {name: dataset[name].to_list() for name in dataset}
    train_records = splits["train"]
    fact_pool = sorted({k for r in train_records for k in r["knowledge"]})
    encoder_args = dict(method=cfg.train.method, multi_task=cfg.outer.multi_task, max_length=cfg.model.max_length,
                        seed=cfg.train.seed, fact_pool=fact_pool)
    if model_dir is not None:
        model_cfg = OmegaConf.merge(cfg.model, {"name_or_path": str(model_dir)})
        model, tokenizer = load_model_and_tokenizer(model_cfg, seed=cfg.train.seed)
    else:
        corpus = None
        if cfg.model.name_or_path == "embedded":
            corpus = list(Encoder(None, **encoder_args).corpus([r for s in splits.values() for r in s]))
        model, tokenizer = load_model_and_tokenizer(cfg.model, corpus=corpus, seed=cfg.train.seed)
    encoder = Encoder(tokenizer, **encoder_args)
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg, model, tokenizer)
    return method, tokenizer, encoder, splits


# -- the Ray Train worker ---------------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: ``config = {"cfg": resolved config dict, "run_dir": str, ...}``."""
    import ray.train
    import torch
    import torch.distributed as dist

    from .loop import Hooks, Loop
    from .tracking import Tracker

    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    # Ray workers log INFO from every library; keep the loop's own progress lines readable
    names = ["dill", "ray.train", "datasets"]
    try:  # Ray Train V2 logs every report at INFO under a logger named after its file
        from ray.train.v2._internal.execution import context as train_context

        names.append(train_context.__file__)
    except ImportError:
        pass
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = OmegaConf.create(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.resources.use_gpu else torch.device("cpu")
    run_dir = Path(config["run_dir"])

    resume_dir = latest_checkpoint(ray.train.get_checkpoint(), run_dir / "last")
    method, tokenizer, encoder, splits = prepare(cfg, resume_dir / "model" if resume_dir else None)
    method.model.to(device)
    if hasattr(method, "inner_lrs"):
        method.inner_lrs.data = method.inner_lrs.data.to(device)

    tracker = None
    if rank == 0 and config.get("track", True):
        tracker = Tracker.start(cfg.tracking, run_id=config["wandb_id"], run_name=config["run_name"],
                                group=config["group"], config=flatten(cfg), dir=run_dir)

    def report(metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=ckpt)

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    hooks = Hooks(rank=rank, world_size=world, device=device,
                  all_reduce=all_reduce if world > 1 else None, report=report, resume_from=resume_dir,
                  log=lambda m: print(m, flush=True), on_step=fault_injection(rank),
                  track=tracker.log if tracker is not None else None)
    loop = Loop(cfg, method, tokenizer, encoder, splits["train"], splits["validation"], run_dir, hooks)
    try:
        summary = loop.fit()
        if rank == 0 and config.get("test", True):
            # the reported number: the best checkpoint (chosen on validation) on the test split
            from .evaluate import format_metrics, test_run

            test = test_run(run_dir, "best", tracker=tracker, device=device)
            print(f"[test] best checkpoint: {format_metrics(test)}", flush=True)
    except BaseException:
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    if tracker is not None:
        tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
        tracker.summary({f"best/{k}": v for k, v in summary["best_validation"].items()})
        tracker.finish()


def latest_checkpoint(ray_checkpoint: Any, local_last: Path) -> Optional[Path]:
    """The checkpoint to resume from: Ray's latest reported one or the run directory's ``last/``,
    whichever is further along.

    Ray registers a report asynchronously, so a worker killed right after reporting can restart
    without it; on a single node the local copy still has it. On another node only Ray's exists.
    """
    from .loop import load_checkpoint_state

    candidates: list[Path] = []
    if ray_checkpoint is not None:
        local = Path(tempfile.mkdtemp(prefix="reckoning-resume-"))
        ray_checkpoint.to_directory(str(local))
        candidates.append(local)
    if (local_last / "state.pt").exists():
        candidates.append(local_last)
    if not candidates:
        return None
    return max(candidates, key=lambda c: load_checkpoint_state(c)["progress"]["global_step"])


def fault_injection(rank: int) -> Optional[Callable[[int], None]]:
    """Crash this worker process once at a given step, for fault-tolerance tests and drills.

    ``RECKONING_RAY_CRASH_AT=<step>:<marker file>``: rank 0 exits abruptly (``os._exit``, like a
    killed process) after optimizer step <step> if the marker file does not exist yet, creating it
    first, so the restarted run passes that step.
    """
    spec = os.environ.get("RECKONING_RAY_CRASH_AT")
    if not spec or rank != 0:
        return None
    step_text, marker = spec.split(":", 1)
    crash_step = int(step_text)

    def on_step(step: int) -> None:
        if step == crash_step and not os.path.exists(marker):
            Path(marker).write_text(f"crashed at step {step}\n")
            print(f"RECKONING_RAY_CRASH_AT: worker exits at step {step}", flush=True)
            os._exit(1)

    return on_step


# -- the driver ------------------------------------------------------------------------------------

def scaling_config(cfg: DictConfig, node_type: Optional[str] = None):
    """Workers and what each asks for; ``node_type`` overrides the config's (placement checks)."""
    from ray.train import ScalingConfig

    res = cfg.resources
    per_worker: dict[str, float] = {"CPU": float(res.cpus_per_worker)}
    if res.use_gpu:
        per_worker["GPU"] = float(res.gpus_per_worker)
    node = node_type_for(cfg) if node_type is None else node_type
    if node:
        per_worker[node] = float(res.gpus_per_worker) if res.use_gpu else 1.0
    return ScalingConfig(num_workers=int(res.num_workers), use_gpu=bool(res.use_gpu), resources_per_worker=per_worker)


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


def build_trainer(cfg: DictConfig, run_dir: Path, group: str, wandb_run_id: str, callbacks: Optional[list] = None,
                  node_type: Optional[str] = None, storage_path: Optional[str] = None, track: bool = True,
                  test: bool = True):
    """A ``TorchTrainer`` for one training run named ``run_dir.name``.

    Ray stores its checkpoints under ``storage_path`` (a local dir or a URI such as s3://...;
    default ``run_dir``'s parent, so Ray's checkpoints and the loop's files share one directory).
    ``track``: rank 0 writes the W&B run (a Tune sweep writes it from its driver instead).
    ``test``: rank 0 evaluates the best checkpoint on the test split at the end (a Tune sweep
    evaluates its trials after the sweep instead: ASHA may stop a trial before its end).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {"WANDB_MODE": os.environ.get("WANDB_MODE", cfg.tracking.mode), "WANDB_SILENT": "true",
           "TOKENIZERS_PARALLELISM": "false",
           # Ray Train tees print() into its logger too, which doubles every progress line
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if os.environ.get("RECKONING_RAY_CRASH_AT"):
        env["RECKONING_RAY_CRASH_AT"] = os.environ["RECKONING_RAY_CRASH_AT"]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "run_dir": str(run_dir),
                           "run_name": run_dir.name, "group": group, "wandb_id": wandb_run_id,
                           "track": track, "test": test},
        torch_config=TorchConfig(backend="nccl" if cfg.resources.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg, node_type),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=storage_path or str(run_dir.parent),
            failure_config=FailureConfig(max_failures=int(cfg.resources.max_failures)),
            # the best checkpoint by the run's metric; Ray also always keeps the latest (resume)
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=cfg.train.metric,
                                               checkpoint_score_order=metric_mode(cfg.train.metric)),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": env},
            # Ray Train's per-report INFO lines would drown the loop's own progress lines
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def init_ray() -> None:
    """Join the cluster at RAY_ADDRESS, or start a local one."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"WANDB_MODE": os.environ.get("WANDB_MODE", ""), "TOKENIZERS_PARALLELISM": "false"}}
    if not env["env_vars"]["WANDB_MODE"]:
        del env["env_vars"]["WANDB_MODE"]
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, runtime_env=env, log_to_driver=True,
             configure_logging=True, logging_level="WARNING")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one training (starting or joining Ray); returns the run's summary."""
    import json

    name = run_name(cfg)
    run_dir = Path(cfg.train.output_dir).expanduser().resolve() / name
    init_ray()
    node = check_placement(cfg)
    print(f"run directory: {run_dir}" + (" (resuming)" if (run_dir / "last").exists() else ""))
    ids = run_names(cfg)
    trainer = build_trainer(cfg, run_dir, group=ids.group, wandb_run_id=ids.run_id, node_type=node)
    result = trainer.fit()
    if result.error:
        raise result.error
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"best {summary['metric']}: {summary['best_metric']} at step {summary['best_step']}; "
          f"best checkpoint: {summary['best_checkpoint']}")
    if "test" in summary:
        from .evaluate import format_metrics

        print(f"test (best checkpoint): {format_metrics({k: v for k, v in summary['test'].items() if '/' in k})}")
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv, "python -m reckoning_ray.train",
                      "Train RECKONING (or an in-context baseline) with Ray Train.", EPILOG)
    return run_command(args, run)


if __name__ == "__main__":
    sys.exit(main())
