"""The training command line: one run, on Ray Train or (``resources.num_workers=0``) without Ray.

    python -m reckoning_ray.train [preset | --config FILE] [key=value ...] [--resume [RUN]] [--extend-to STEPS]

The run itself is :mod:`reckoning_ray.on_ray.trainer`. Rerunning with ``--resume`` continues a run
from its latest checkpoint; ``--extend-to`` lengthens a finished wsd run from its cooldown start.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from reckoning_ray.cli import parse_args, run_command
from reckoning_ray.core.checkpoint import checkpoint_path
from reckoning_ray.core.config import (
    flatten,
)
from reckoning_ray.core.evaluate import format_metrics
from reckoning_ray.core.runs import check_inputs, run_dir_for
from reckoning_ray.on_ray.trainer import (
    check_placement,
    extend,
    fit,
    init_ray,
    run_in_process,
)
from reckoning_ray.tracking.writer import run_names

EPILOG = """\
presets (reckoning_ray/conf/*.yaml): {presets}
  embedded           the default: small GPT-2 built offline, generated multi-hop tasks, CPU, minutes
  paper              Table 1: GPT-2 base, ProofWriter / CLUTRR files, the paper's hyper-parameters (GPU)
  paper-distractors  Section 4.2: the same with 6 drawn distractors per question
  paper-icr          the fine-tuned in-context baseline (FT-ICR): batch 16, validation once per epoch
  PAPER.md lists every Table 1 / Section 4.2 cell as a command.

overrides are key=value pairs of the typed config (--help-config [GROUP] lists every key with its
type, default and meaning), e.g.
  python -m reckoning_ray.train embedded train.epochs=2 inner.lr_init=0.05
  python -m reckoning_ray.train paper data.path=/data/proofwriter/depth-3
  python -m reckoning_ray.train --config runs/tune/embedded-sweep/best_config.yaml
  python -m reckoning_ray.train paper train.epochs=2 --print-config   (check a config, run nothing)
  python -m reckoning_ray.train --help-config inner                   (the inner loop's keys)

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
        # heavy: imported here to keep ray off this module's import
        from reckoning_ray.on_ray.callbacks import TrainTracking

        init_ray()
        node = check_placement(cfg)
        tracking = TrainTracking(cfg.tracking, run_dir, run_names(cfg), flatten(cfg))
        fit(cfg, run_dir, callbacks=[tracking], node_type=node)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"best {summary['metric']}: {summary['best_metric']} at step {summary['best_step']}; "
          f"best checkpoint: {summary['best_checkpoint']}")
    if "test" in summary:

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
