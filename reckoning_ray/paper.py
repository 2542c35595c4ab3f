"""The paper's tables from the command line: run every cell on the cluster, then report.

    python -m reckoning_ray.paper run TABLE [--seeds N] [--proofwriter DIR] [--clutrr-sg DIR] [key=value ...] [--resume]
    python -m reckoning_ray.paper report RUN_DIR

``run`` is one Ray Tune experiment: the grid of the table's cells (:mod:`reckoning_ray.core.paper`)
times the seeds, every trial run to its end (no early stopping across cells), RECKONING cells on
``a100`` nodes and in-context cells on ``rtx3090`` nodes (``resources.node_type=auto``), resumable
with ``--resume`` like any sweep, under ``<tune.storage_path>/paper-<TABLE>``. ``report`` prints
the tables in the paper's layout with the paper's numbers beside our mean over seeds, writes them
as Markdown and CSV into the run directory, and logs them to the run's W&B as tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from reckoning_ray.core.config import flatten
from reckoning_ray.core.errors import InputError
from reckoning_ray.core.paper import (
    REPORTS,
    ROWS,
    TABLES,
    Cell,
    cell_config,
    cells,
    markdown,
    paper_numbers,
    report_rows,
    trial_results,
    write_csv,
)

# keys of the sweep itself: every cell runs to its end and reports its own test metrics
SWEEP_KEYS = ["tune.scheduler=none", "tune.num_samples=1", "tune.metric=val/label_accuracy", "tune.mode=max",
              "tune.extend=false", "resources.node_type=auto"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reckoning_ray.paper",
        description="Run the paper's tables (Table 1, Section 4.2, Figure 5) as one Ray Tune experiment each, "
                    "and report them beside the paper's numbers (and Section 4.5's recall).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every cell of a table times the seeds (one Tune experiment)",
                         description="Run every cell of TABLE times --seeds seeds as one Ray Tune experiment. "
                                     "key=value overrides apply to every cell (e.g. model.name_or_path=/models/gpt2, "
                                     "tune.storage_path=s3://bucket/paper); each cell's own keys (method, data, "
                                     "inner steps) come last.")
    run.add_argument("table", choices=[*TABLES, "all"])
    run.add_argument("overrides", nargs="*", help="config overrides key=value, for every cell")
    run.add_argument("--seeds", type=int, default=3, help="runs per cell, seeds 0..N-1 (the paper averages 3)")
    run.add_argument("--proofwriter", metavar="DIR", help="the OWA release's depth directories "
                     "(python -m reckoning_ray.data fetch proofwriter --to DIR)")
    run.add_argument("--clutrr-sg", metavar="DIR", help="CLUTRR-SG's text files "
                     "(python -m reckoning_ray.data fetch clutrr-sg --archive FILE --to DIR)")
    run.add_argument("--rows", metavar="ROW,...", help=f"only these rows ({', '.join(ROWS)})")
    run.add_argument("--columns", metavar="COLUMN,...", help="only these columns (e.g. pw-3,csg-2)")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run of this table")
    report = sub.add_parser("report", help="the tables of a paper run beside the paper's numbers",
                            description="Print the tables of a paper run (RUN_DIR = <tune.storage_path>/paper-<TABLE>) "
                                        "beside the paper's numbers; write paper_report.md and paper_report.csv "
                                        "into RUN_DIR and log the tables to W&B.")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--no-wandb", action="store_true", help="do not log the tables to W&B")
    return parser


def sweep_space(table_cells: list[Cell], configs: list[Any], seeds: int) -> tuple[Any, dict[str, tuple[str, list]]]:
    """The experiment's base config (the first cell's) and its space: a grid over the cells (their
    ``configs``), each as the keys where it differs from the base, times a grid over the seeds."""
    from reckoning_ray.on_ray.trials import CELL  # heavy: keeps ray off `paper report` and --help

    base = configs[0]
    flat_base = flatten(base)
    diffs = []
    for cell, cfg in zip(table_cells, configs):
        flat = flatten(cfg)
        diff = {k: v for k, v in flat.items() if flat_base.get(k) != v and not k.startswith(("tune.", "preset"))}
        diff["tracking.group"] = cell.name  # names the cell even where it equals the base
        diffs.append(diff)
    return base, {CELL: ("grid", diffs), "train.seed": ("grid", list(range(seeds)))}


def run(args: argparse.Namespace) -> int:
    from reckoning_ray.core.runs import check_inputs  # heavy: torch, only when a table runs
    from reckoning_ray.on_ray.sweep import run as run_sweep  # heavy: Ray Tune, only when a table runs

    data = {"proofwriter": args.proofwriter, "clutrr-sg": args.clutrr_sg}
    table_cells = cells(args.table, {k: v for k, v in data.items() if v},
                        args.rows.split(",") if args.rows else None, args.columns.split(",") if args.columns else None)
    overrides = [*SWEEP_KEYS, f"tune.name=paper-{args.table}", *args.overrides]
    configs = [cell_config(cell, overrides) for cell in table_cells]
    base, space = sweep_space(table_cells, configs, args.seeds)
    checked = set()
    for cell, cfg in zip(table_cells, configs):  # every data set once, on the driver, before any trial starts
        key = (cfg.data.source, cfg.data.path, tuple(cfg.data.hops))
        if key not in checked:
            checked.add(key)
            sizes = check_inputs(cfg)
            print(f"{cell.dataset} {cell.column}: {sizes['train']} train / {sizes['validation']} validation / "
                  f"{sizes['test']} test tasks ({cfg.data.path})")
    print(f"paper {args.table}: {len(table_cells)} cells x {args.seeds} seed(s) = "
          f"{len(table_cells) * args.seeds} runs")
    print(OmegaConf.to_yaml(base))
    out = run_sweep(base, resume=args.resume, space=space)
    run_dir = Path(out["best_config"]).parent
    print(f"\nreport: python -m reckoning_ray.paper report {run_dir}")
    return 0


def report(args: argparse.Namespace, out: Any = print) -> dict[str, list[dict[str, Any]]]:
    run_dir = Path(args.run_dir).expanduser()
    results = trial_results(run_dir)
    numbers = paper_numbers()
    tables = {t: report_rows(t, results, numbers) for t in REPORTS}
    tables = {t: rows for t, rows in tables.items() if any(r["runs"] for r in rows)}
    if not tables:
        raise InputError(f"{run_dir} holds no run of a paper table's cell (no trial's tracking.group names one)")
    text = "\n".join(markdown(t, rows) for t, rows in tables.items())
    out(text)
    (run_dir / "paper_report.md").write_text(text)
    write_csv(run_dir / "paper_report.csv", [r for rows in tables.values() for r in rows])
    out(f"written: {run_dir / 'paper_report.md'}, {run_dir / 'paper_report.csv'}")
    if not args.no_wandb:
        from reckoning_ray.tracking.writer import log_tables  # heavy: wandb, only when logging

        where = log_tables(run_dir, {f"paper/{t}": rows for t, rows in tables.items()})
        out(f"W&B: {where}")
    return tables


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return run(args)
        report(args)
        return 0
    except (InputError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
