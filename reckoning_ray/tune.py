"""The sweep command line: Ray Tune with ASHA over RECKONING's settings (the project's main job).

    python -m reckoning_ray.tune [preset | --config FILE] [space=<name or path>] [key=value ...] [--resume]
    python -m reckoning_ray.tune publish SWEEP_DIR [--dry-run]
    python -m reckoning_ray.tune soup SWEEP_DIR [--top K]
    python -m reckoning_ray.tune report SWEEP_DIR
    python -m reckoning_ray.tune sync SWEEP_DIR

The driver is :mod:`reckoning_ray.on_ray.sweep`; ``publish`` sends a finished sweep to W&B as a
W&B sweep (:mod:`reckoning_ray.tracking.sweeps`); ``soup`` averages its trials' best checkpoints
(:mod:`reckoning_ray.core.soup`); ``report`` draws it (:mod:`reckoning_ray.on_ray.report`); ``sync`` uploads what this node's runs left
for an object store that did not answer (:mod:`reckoning_ray.core.uploads`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from reckoning_ray.cli import parse_args, run_command
from reckoning_ray.core.errors import InputError
from reckoning_ray.core.soup import make_soups
from reckoning_ray.core.spaces import SPACES_DIR, load_space
from reckoning_ray.core.storage import JOURNALS, StorageError, is_uri, local_path
from reckoning_ray.core.uploads import sync_journals
from reckoning_ray.on_ray.report import report
from reckoning_ray.on_ray.sweep import run
from reckoning_ray.tracking.sweeps import publish


def soup_main(argv: Optional[list[str]] = None) -> int:

    parser = argparse.ArgumentParser(
        prog="python -m reckoning_ray.tune soup",
        description="Average the best checkpoints of a finished sweep's trials (model soups, Wortsman et al. "
                    "2022): a uniform soup of every qualifying trial and a greedy soup that adds trials in "
                    "order of validation only while validation does not get worse. Weights and learned inner "
                    "learning rates are averaged.",
        epilog="SWEEP_DIR is <tune.storage_path>/<tune.name> (a path or s3://...). The soups are written as "
               "checkpoints under SWEEP_DIR/soups/{uniform,greedy}/ and compared with the best trial on "
               "validation and test in SWEEP_DIR/soups/soups.json and sweep_summary.json (key \"soups\").",
    )
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR")
    parser.add_argument("--top", type=int, default=None, metavar="K",
                        help="consider only the K best trials by validation (default: all)")
    args = parser.parse_args(argv)
    try:
        make_soups(args.sweep_dir, top=args.top)
    except (InputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def report_main(argv: list[str]) -> int:
    """``python -m reckoning_ray.tune report SWEEP_DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m reckoning_ray.tune report",
        description="Draw a finished sweep from its files alone (offline): the validation curves of every trial "
                    "with ASHA's rungs and how each trial ended, the swept keys against the metric, and the best "
                    "trial's test accuracy per hop; PNG files and one self-contained HTML page. Every sweep "
                    "also does this at its end.",
        epilog="SWEEP_DIR is <tune.storage_path>/<tune.name> (a path, or the object store URI itself: fetched into "
               "$RECKONING_RUNS_CACHE, and the report copied back beside the sweep). The files go to "
               "SWEEP_DIR/report/: curves.png keys.png test_by_hops.png report.html.",
    )
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep's directory (holds sweep_summary.json)")
    args = parser.parse_args(argv)
    try:
        report(args.sweep_dir)
    except (InputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def sync_main(argv: list[str]) -> int:
    """``python -m reckoning_ray.tune sync SWEEP_DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m reckoning_ray.tune sync",
        description="Upload what this node's runs of a sweep could not upload while its object store did not "
                    "answer: every directory of the sweep in this node's cache with a backlog journal "
                    f"({JOURNALS}) is pushed as its run would have pushed it (files, then the records that name "
                    "them). Run it on each node that said it finished from its local files; --resume does it too.",
        epilog="SWEEP_DIR is the sweep's object store URI (<tune.storage_path>/<tune.name>, s3://... or gs://...); "
               "this node's copy is $RECKONING_RUNS_CACHE/<tune.name> (default ~/reckoning-ray-runs).",
    )
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep's object store URI")
    args = parser.parse_args(argv)
    if not is_uri(args.sweep_dir):
        print(f"error: SWEEP_DIR={args.sweep_dir} is a path: a sweep on a path is written there directly and has "
              "nothing to sync; pass the sweep's object store URI (s3://bucket/prefix/<tune.name>)", file=sys.stderr)
        return 2
    local = local_path(args.sweep_dir)
    try:
        directories, files = sync_journals(local)
    except StorageError as exc:
        print(f"error: {exc} (the backlog journals stay; run this again when the store answers)", file=sys.stderr)
        return 2
    print(f"{args.sweep_dir}: {files} file(s) of {directories} director(y/ies) uploaded from {local}"
          if directories else f"{args.sweep_dir}: nothing waits to upload in {local}")
    return 0


def publish_main(argv: list[str]) -> int:
    """``python -m reckoning_ray.tune publish <sweep dir> [--dry-run]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m reckoning_ray.tune publish",
        description="Upload a Ray Tune sweep's offline W&B runs (wandb sync) and show them as one W&B sweep "
                    "(parallel coordinates, parameter importance, runs ranked by the sweep's metric).",
        epilog="SWEEP_DIR is <tune.storage_path>/<tune.name> (default runs/tune/<name>): a path, or the object "
               "store URI itself (s3://..., fetched into $RECKONING_RUNS_CACHE, default ~/reckoning-ray-runs). "
               "Running it again reuses the sweep recorded in SWEEP_DIR/wandb_sweep.json and adds new trials' runs.",
    )
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep's directory (holds sweep_config.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sync command and the sweep config with every trial id; send nothing")
    args = parser.parse_args(argv)
    return publish(args.sweep_dir, dry_run=args.dry_run)


EPILOG = """\
search spaces: tune_spaces/<name>.yaml (name without .yaml) or any YAML path: space=<name|path>
  {spaces}
  A space maps config keys to one distribution each, e.g.
    inner.steps: {{choice: [1, 2, 4]}}
    inner.lr_init: {{loguniform: [1.0e-5, 1.0e-4]}}
  distributions: choice [values], grid [values], uniform [low, high], loguniform [low, high],
  randint [low, high) , qloguniform [low, high, q]

ASHA stops weak trials early (tune.scheduler=asha; curve: learning-curve extrapolation, none: no
early stop), using validation rounds (tune.max_rounds) as time; it ranks by tune.metric
(tune.mode is the metric's direction: max for val/label_accuracy, min for val/answer_loss; every
tune.* key: --help-config tune). With outer.schedule=wsd and tune.extend=true, a trial ASHA keeps at
the end of its planned rounds continues from its cooldown's start to the next rung (up to
tune.max_rounds). At the end the sweep prints a table of trials and writes
<tune.storage_path>/<tune.name>/best_config.yaml, re-runnable with
  python -m reckoning_ray.train --config <that file>
W&B: runs are written offline under each trial's directory; upload them as one W&B sweep with
  python -m reckoning_ray.tune publish <tune.storage_path>/<tune.name> [--dry-run]
--resume continues an interrupted sweep (finished trials stay finished).

files, all under <tune.storage_path>/<tune.name>/ (default runs/tune/<name>):
  sweep_config.yaml asha_state.json wandb_sweep.yaml   at the start, the rungs after every result
                                                      (curve_state.json: the curves, tune.scheduler=curve)
  sweep_summary.json best_config.yaml                 the table and the best trial's config, at the end
  report/curves.png keys.png test_by_hops.png report.html   its pictures, at the end (`report` redraws them)
  trials/<trial id>/   config.yaml metrics.jsonl checkpoints.json checkpoints/step-*/ summary.json,
                       wandb/ wandb_run.json          after every validation
  Ray Tune's experiment state beside them, Ray Train's under ray_train/.
With an object store (tune.storage_path=s3://bucket/prefix, gs://...) each node writes into its
cache ($RECKONING_RUNS_CACHE, default ~/reckoning-ray-runs) and copies every file to the bucket as
it is written; --resume and publish read the bucket. Credentials and endpoints come from the
environment (AWS_* variables, an instance profile; AWS_ENDPOINT_URL for MinIO and the like).
A store that stops answering holds nothing up: uploads wait in the background (retried with
backoff) and a run's end waits tune.storage_wait_s for them, then names what is left for `sync`.
"""


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["publish"]:
        return publish_main(argv[1:])
    if argv[:1] == ["soup"]:
        return soup_main(argv[1:])
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    if argv[:1] == ["sync"]:
        return sync_main(argv[1:])
    # space=<name> is short for tune.space=<name>
    argv = [f"tune.{a}" if a.startswith("space=") else a for a in argv]
    names = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))) + f" (in {SPACES_DIR})"
    args = parse_args(
        argv, "python -m reckoning_ray.tune",
        "Sweep RECKONING's inner-loop settings with Ray Tune + ASHA (the project's main job). "
        "`python -m reckoning_ray.tune publish SWEEP_DIR [--dry-run]` uploads a sweep to W&B; "
        "`python -m reckoning_ray.tune soup SWEEP_DIR` averages its trials' best checkpoints (model soups); "
        "`python -m reckoning_ray.tune report SWEEP_DIR` draws it (every sweep does at its end); "
        "`python -m reckoning_ray.tune sync SWEEP_DIR` uploads what a node kept while the object store was away.",
        EPILOG.replace("{spaces}", names),
        extra=lambda p: p.add_argument("--resume", action="store_true",
                                       help="continue the interrupted sweep tune.storage_path/tune.name"),
    )
    return run_command(args, lambda cfg: run(cfg, resume=args.resume),
                       check=lambda cfg: load_space(cfg.tune.space, cfg))  # --print-config checks the space too


if __name__ == "__main__":
    sys.exit(main())
