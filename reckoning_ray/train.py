"""Ray Train: run the bilevel loop data-parallel with a ``TorchTrainer``.

    python -m reckoning_ray.train [preset | --config FILE] [key=value ...]

Every worker runs the inner and outer loop on its own shard of tasks; the meta-gradients (weights
and learned inner learning rates) are SUM-all-reduced in flat buckets before the optimizer step
(DDP cannot differentiate twice, so the model is not wrapped in it). Rank 0 writes each
validation's checkpoint into the run directory (``reckoning_ray.checkpoint``: one record of the
latest and the best) and every rank reports the metrics through ``ray.train.report``; the W&B run
is written by the Ray Train controller (``wandb_callbacks.TrainTracking``). Rerunning with the same
``train.run_name`` resumes from the latest checkpoint, and a crashed worker is restarted from it
(``resources.max_failures``). ``resources.num_workers=0`` runs the same loop without Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, get_type_hints

from omegaconf import DictConfig, OmegaConf

from .config import Config, ConfigError, InputError, available_presets, flatten, load_config, node_type_for, to_yaml
from .checkpoint import checkpoint_path

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
validation metrics, and "test": the test split's metrics of the best checkpoint), checkpoints.json
(which of checkpoints/step-* is the latest and which the best; only those two are kept, each a
loadable model: save_pretrained files, reckoning.json, meta_parameters.safetensors, and
trainer_state.pt for resuming), W&B run files under wandb/ (offline unless tracking.mode=online)
and wandb_run.json (what the W&B writer logged). A run gets a fresh name, <preset>-<date>-<time>,
unless train.run_name names it; continue a run with --resume [RUN] (or its train.run_name): its
saved config must match, but for train.epochs / patience / max_steps, resources.* and tracking.*.
Inputs are checked before any worker starts (data read, model found, resources available); an
input error ends the run with exit status 2, a crashed worker is retried resources.max_failures
times from the latest checkpoint.
resources.num_workers=0 runs the same loop in this process, without Ray (debuggers, notebooks).
Evaluate a run's checkpoint again: python -m reckoning_ray.evaluate <run dir>
Answer a question with it:         python -m reckoning_ray.predict <run dir> --knowledge FILE --question TEXT
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
    except InputError as exc:  # config, data, model, checkpoint: the same every time
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


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


# -- checks on the driver, before any worker starts -----------------------------------------------

def check_inputs(cfg: DictConfig) -> dict[str, int]:
    """Read the data and find the model as a worker would, in seconds: a missing or malformed data
    file, a split left empty by the filters, a model directory without a model or a hub id that is
    neither cached nor reachable fail here with one line naming the key, not inside a worker.
    Returns the number of tasks per split."""
    from .data.sources import filter_splits, read_records

    try:
        splits = filter_splits(read_records(cfg.data), cfg.data)  # what load_splits reads, as records
    except (FileNotFoundError, ConnectionError) as exc:
        raise ConfigError(f"data.path={cfg.data.path!r}: {exc}") from None
    sizes = {name: len(splits[name]) for name in ("train", "validation", "test")}  # none is empty
    if cfg.model.name_or_path != "embedded":
        from .modeling import pretrained_source

        pretrained_source(str(cfg.model.name_or_path))
    return sizes


def run_dir_for(cfg: DictConfig, resume: Optional[str] = None) -> Path:
    """The run directory of ``cfg``, after naming the run; sets ``train.run_name``.

    A fresh run gets a fresh name, ``<preset>-<date>-<time>``, so runs never mix. ``resume`` (the
    ``--resume [RUN]`` flag: a run name under ``train.output_dir``, a run directory, or "" for the
    latest run of this preset) or an explicit ``train.run_name`` continue a run, after
    :func:`check_resumable` found the saved config to be the requested one.
    """
    import time

    out = Path(cfg.train.output_dir).expanduser().resolve()
    if resume is not None:
        run_dir = _find_run(out, cfg, resume)
    elif cfg.train.run_name:
        run_dir = out / cfg.train.run_name
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir, n = out / f"{cfg.preset}-{stamp}", 1
        while run_dir.exists():
            n += 1
            run_dir = out / f"{cfg.preset}-{stamp}-{n}"
    cfg.train.run_name = run_dir.name
    cfg.train.output_dir = str(run_dir.parent)
    if (run_dir / "config.yaml").is_file():
        check_resumable(load_config(str(run_dir / "config.yaml")), cfg, run_dir)
    return run_dir


def _find_run(out: Path, cfg: DictConfig, resume: str) -> Path:
    if resume:
        path = Path(resume).expanduser()
        run_dir = path if (path / "config.yaml").is_file() else out / resume
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume}: no run there ({run_dir} has no config.yaml); pass a run "
                              f"directory or the name of a run under train.output_dir={out}")
        return run_dir.resolve()
    runs = sorted((p for p in out.glob(f"{cfg.preset}-*") if (p / "config.yaml").is_file()),
                  key=lambda p: (p / "config.yaml").stat().st_mtime)
    if not runs:
        raise ConfigError(f"--resume: no run of preset {cfg.preset!r} under train.output_dir={out}; name one "
                          f"(--resume RUN) or start a fresh run without --resume")
    return runs[-1]


# keys that may differ between a run and its continuation: how long and where it runs
RESUMABLE = ("train.epochs", "train.patience", "train.max_steps", "train.run_name", "train.output_dir",
             "resources.", "tracking.", "tune.", "preset")


def check_resumable(saved: DictConfig, requested: DictConfig, run_dir: Path) -> None:
    """Refuse to continue ``run_dir`` with a config that differs from the one it was started with,
    naming the keys, unless only :data:`RESUMABLE` keys differ."""
    before, after = flatten(saved), flatten(requested)
    changed = sorted(k for k in set(before) | set(after)
                     if before.get(k) != after.get(k) and not k.startswith(RESUMABLE))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} (run) -> {after.get(k)!r} (now)" for k in changed[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        raise ConfigError(
            f"train.run_name={run_dir.name!r} is a run of another config ({shown}{more}); a run continues "
            f"only with its own config (only {', '.join(k.rstrip('.') + ('*' if k.endswith('.') else '') for k in RESUMABLE[:3])}, "
            f"resources.* and tracking.* may change): start a fresh run (leave train.run_name empty) or "
            f"continue it with `python -m reckoning_ray.train --resume {run_dir}`")


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
    method = build_method(cfg, model, tokenizer, encoder)
    return method, tokenizer, encoder, splits


# -- one training process ----------------------------------------------------------------------------

def build_loop(cfg: DictConfig, run_dir: Path, hooks: Any) -> Any:
    """The :class:`~reckoning_ray.loop.Loop` of the run in ``run_dir``, continuing from the latest
    checkpoint of the run's record when there is one (a rerun, or a worker Ray restarted)."""
    from .config import group, save_config
    from .loop import Loop

    resume_dir = checkpoint_path(run_dir, "latest")
    method, tokenizer, encoder, splits = prepare(cfg, resume_dir)
    method.to(hooks.device)
    hooks.resume_from = resume_dir
    if hooks.rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    return Loop(group(cfg, "train"), group(cfg, "outer"), group(cfg, "eval"), method, tokenizer, encoder,
                splits["train"], splits["validation"], run_dir, hooks)


def summary_values(summary: dict[str, Any]) -> dict[str, Any]:
    """The run summary's values for W&B: its scalars and the best validation's metrics."""
    values = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
    values.update({f"best/{k}": v for k, v in summary["best_validation"].items()})
    return values


def test_best(run_dir: Path, device: Any) -> dict[str, Any]:
    """Evaluate the run's best checkpoint (chosen on validation) on the test split: the reported
    number. Writes it into summary.json; returns the W&B summary values."""
    from .evaluate import format_metrics, save_test, test_run

    metrics = test_run(run_dir, "best", device=device, record=False)
    print(f"[test] best checkpoint: {format_metrics(metrics)}", flush=True)
    return save_test(run_dir, metrics, "best")


def run_in_process(cfg: DictConfig, run_dir: Path, test: bool = True) -> dict[str, Any]:
    """The run in this process, without Ray (``resources.num_workers=0``): the same loop, one
    device, W&B written from here. Returns the run's summary."""
    import torch

    from .loop import Hooks
    from .tracking import RunWriter, run_names

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
            writer.summary(test_best(run_dir, device))
    return summary


# -- the Ray Train worker ---------------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: ``config = {"cfg": resolved config dict, "run_dir": str,
    "test": bool, "storage": URI or None}``. Reports every validation's metrics; with ``test``,
    rank 0 evaluates the best checkpoint at the end and every rank reports once more,
    ``{"final": 1, "summary": {...}}``. With ``storage`` (the run directory's copy in an object
    store, :mod:`reckoning_ray.storage`), the first worker of each node brings the node's run
    directory up to the stored one before the loop starts, and rank 0 pushes the run directory
    after every validation and at the end."""
    import logging

    import ray.train
    import torch
    import torch.distributed as dist
    import transformers

    from .config import from_container
    from .loop import Hooks, planned_validations

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
    cfg = from_container(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.resources.use_gpu else torch.device("cpu")
    run_dir = Path(config["run_dir"])
    planned: list[int] = []
    mirror = None
    if config.get("storage"):
        from .storage import RunMirror

        mirror = RunMirror(run_dir, config["storage"])
        if ctx.get_local_rank() == 0 and mirror.sync_down():
            print(f"[storage] {run_dir.name}: continuing from the run directory in {mirror.remote}", flush=True)
        if world > 1:
            dist.barrier()  # every node has the run directory before any rank reads it

    def report(metrics: dict[str, Any]) -> None:
        if mirror is not None and rank == 0:
            mirror.sync_up()  # this validation's metrics and checkpoint, before anyone hears of them
        # An extended wsd run repeats the rounds after its cooldown's start; Tune and W&B heard of
        # them already and take increasing rounds only (metrics.jsonl has the repeated ones).
        if int(metrics.get("round") or 0) <= loop.rounds_heard:
            return
        # the validation rounds a full run makes: Tune's trial status reads it
        metrics = dict(metrics, rounds_planned=planned[0])
        ray.train.report({k: v for k, v in metrics.items() if v is not None})

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    hooks = Hooks(rank=rank, world_size=world, device=device, all_reduce=all_reduce if world > 1 else None,
                  report=report, log=lambda m: print(m, flush=True), on_step=fault_injection(rank))
    loop = build_loop(cfg, run_dir, hooks)
    planned.append(planned_validations(len(loop.train_records), loop.train))
    if loop.finished and loop.history:
        # resumed after the run had finished: report its last result again, so that a host
        # that lost it (a Tune trial restored from an interrupted sweep) still sees it
        report(dict(loop.history[-1], replayed=True))
    summary = loop.fit()
    if config.get("test", True):
        values = summary_values(summary)
        if rank == 0:
            values.update(test_best(run_dir, device))
    if mirror is not None and rank == 0:
        mirror.sync_up()  # summary.json (with the test metrics)
    if config.get("test", True):
        ray.train.report({"final": 1, "summary": values if rank == 0 else {}})


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
                  mirror_to: Optional[str] = None):
    """A ``TorchTrainer`` for one training run named ``run_dir.name``.

    The run's files (metrics, checkpoints and their record) are written by rank 0 into
    ``run_dir`` and, with ``mirror_to`` (a storage URI), mirrored there as they are written; Ray
    keeps its own run state under ``storage_path`` (default ``run_dir``'s parent). ``callbacks``:
    Ray Train callbacks (W&B: ``wandb_callbacks.TrainTracking``; a Tune
    trial: Tune's report callback). ``test``: rank 0 evaluates the best checkpoint on the test
    split at the end and all ranks report once more (``{"final": 1, "summary": ...}``); a Tune
    sweep evaluates its trials after the sweep instead (ASHA may stop a trial before its end).
    """
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
                           "test": test, "storage": mirror_to},
        torch_config=TorchConfig(backend="nccl" if cfg.resources.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg, node_type),
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


def fit(cfg: DictConfig, run_dir: Path, **trainer_args: Any) -> None:
    """Fit the run's ``TorchTrainer`` (:func:`build_trainer` with ``trainer_args``). A worker that
    raised an input error (:class:`InputError`) ends it at once with that error as a
    ``ConfigError``; a crash (a killed worker, a lost node) is retried from the run's latest
    checkpoint, up to ``resources.max_failures`` times."""
    from ray.train import TrainingFailedError

    failures = 0
    while True:
        try:
            build_trainer(cfg, run_dir, **trainer_args).fit()
            return
        except TrainingFailedError as exc:
            cause = input_error(exc)
            if cause is not None:
                raise ConfigError(f"{type(cause).__name__}: {cause}") from None
            failures += 1
            if failures > int(cfg.resources.max_failures):
                raise
            print(f"training failed ({str(exc).strip().splitlines()[-1][:200]}); restart {failures} of "
                  f"resources.max_failures={cfg.resources.max_failures} from the latest checkpoint", flush=True)


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


def extend(cfg: DictConfig, run_dir: Path, steps: int, train_tasks: int) -> None:
    """Make ``cfg`` the config of the wsd run in ``run_dir`` extended to ``steps`` optimizer steps
    (``train.max_steps``, and ``train.epochs`` raised to hold them); refuse what cannot be extended."""
    from .checkpoint import read_record

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
    from .config import group
    from .loop import steps_per_epoch

    per_epoch = steps_per_epoch(train_tasks, group(cfg, "train"))
    cfg.train.max_steps = int(steps)
    cfg.train.epochs = max(int(cfg.train.epochs), -(-int(steps) // per_epoch))


def run(cfg: DictConfig, resume: Optional[str] = None, extend_to: Optional[int] = None) -> dict[str, Any]:
    """Run one training (starting or joining Ray; without Ray for ``resources.num_workers=0``);
    returns the run's summary. ``resume``: see :func:`run_dir_for`; ``extend_to``: continue the
    wsd run being resumed to that many optimizer steps (:func:`extend`).

    Inputs are checked here before any worker starts (:func:`check_inputs`). Ray does not retry a
    failed run by itself: a worker that raised an input error ends the run (``ConfigError``, exit
    status 2); a crash is retried from the run's latest checkpoint, ``resources.max_failures``
    times.
    """
    import json

    from .tracking import run_names

    run_dir = run_dir_for(cfg, resume)
    print(f"run directory: {run_dir}" + (" (resuming)" if checkpoint_path(run_dir) else ""))
    sizes = check_inputs(cfg)
    print(f"data: {sizes['train']} train / {sizes['validation']} validation / {sizes['test']} test tasks")
    if extend_to:
        extend(cfg, run_dir, extend_to, sizes["train"])
        print(f"extending to {cfg.train.max_steps} steps ({cfg.train.epochs} epochs at most) from the start of "
              "the cooldown")
    if int(cfg.resources.num_workers) == 0:
        run_in_process(cfg, run_dir)
    else:
        from .wandb_callbacks import TrainTracking

        init_ray()
        node = check_placement(cfg)
        tracking = TrainTracking(cfg.tracking, run_dir, run_names(cfg), flatten(cfg))
        fit(cfg, run_dir, callbacks=[tracking], node_type=node)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"best {summary['metric']}: {summary['best_metric']} at step {summary['best_step']}; "
          f"best checkpoint: {summary['best_checkpoint']}")
    if "test" in summary:
        from .evaluate import format_metrics

        print(f"test (best checkpoint): {format_metrics({k: v for k, v in summary['test'].items() if '/' in k})}")
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(
        argv, "python -m reckoning_ray.train", "Train RECKONING (or an in-context baseline) with Ray Train.", EPILOG,
        extra=lambda p: (p.add_argument(
            "--resume", nargs="?", const="", default=None, metavar="RUN",
            help="continue a run: RUN is a run directory or a run name under train.output_dir (without RUN: "
                 "the latest run of the preset); without a preset or --config the run's own config.yaml is "
                 "used, and overrides may change only train.epochs, train.patience, train.max_steps, "
                 "resources.* and tracking.* (write --resume=RUN or put --resume last)"),
            p.add_argument(
            "--extend-to", type=int, default=None, metavar="STEPS",
            help="with --resume: extend an outer.schedule=wsd run to STEPS optimizer steps in all. It continues "
                 "from its state at the start of the cooldown (checkpoints.json \"stable\") at the constant rate "
                 "and cools down again at the new end, making exactly the steps of a run planned for STEPS")))
    if args.extend_to is not None and args.resume is None:
        print("error: --extend-to continues a run: give it with --resume RUN", file=sys.stderr)
        return 2
    if args.resume and args.preset is None:
        for candidate in (Path(args.resume).expanduser(), Path("runs") / args.resume):
            if (candidate / "config.yaml").is_file():
                args.preset = str(candidate / "config.yaml")  # the run's own config
                break
    return run_command(args, lambda cfg: run(cfg, resume=args.resume, extend_to=args.extend_to))


if __name__ == "__main__":
    sys.exit(main())
