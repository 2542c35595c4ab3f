"""Evaluate a trained run on its test split (or validation) from the command line.

    python -m reckoning_ray.evaluate RUN_DIR [--checkpoint best|latest] [--split test|validation]

Every training run ends with this evaluation of its best checkpoint and a sweep runs it for every
trial; this command runs it on demand (:mod:`reckoning_ray.core.evaluate`). Test metrics are
written to the run's ``summary.json`` (key ``"test"``) and to the run's W&B summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from reckoning_ray.core.checkpoint import resolve
from reckoning_ray.core.config import load_config
from reckoning_ray.core.errors import ConfigError
from reckoning_ray.core.data.errors import DataFormatError
from reckoning_ray.core.evaluate import (
    SPLITS,
    evaluate_checkpoint,
    evaluate_run,
    format_metrics,
)
from reckoning_ray.tracking.writer import record_test


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reckoning_ray.evaluate",
        description="Evaluate a trained run's checkpoint on the test split (label accuracy overall and per "
                    "hop, recall) and record it in the run's summary.json and W&B summary.",
        epilog="RUN_DIR is a training run's directory (<train.output_dir>/<train.run_name>) or a sweep "
               "trial's (runs/tune/<tune.name>/trials/<trial id>). The data is the run's own "
               "(its config.yaml); --split validation re-checks the selection split without recording.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding config.yaml and checkpoints.json")
    parser.add_argument("--checkpoint", default="best", choices=("best", "latest"),
                        help="which checkpoint of the run (default: best, the one chosen on validation)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split to evaluate (default: test)")
    args = parser.parse_args(argv)

    run_dir = Path(args.run_dir)
    try:
        if args.split == "test":
            metrics = evaluate_run(run_dir, args.checkpoint)
            record_test(run_dir, metrics, args.checkpoint)
        else:
            if not (run_dir / "config.yaml").is_file():
                raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
            metrics = evaluate_checkpoint(load_config(str(run_dir / "config.yaml")),
                                          resolve(run_dir, args.checkpoint), args.split)
    except (ConfigError, DataFormatError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{resolve(run_dir, args.checkpoint)}: {format_metrics(metrics)}")
    if args.split == "test":
        print(f"recorded in {run_dir / 'summary.json'} (key \"test\") and the run's W&B summary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
