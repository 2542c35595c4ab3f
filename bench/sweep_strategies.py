"""Sweep strategies side by side: the full grid, ASHA and learning-curve stopping on the same
configurations and seeds, and the model soups of each grid sweep against its best trial.

For every seed in ``--seeds`` (``train.seed``: the embedded model's initial weights and the data
order), the same grid of configurations runs three times through the project's sweep
(``reckoning_ray.on_ray.sweep.run``), differing only in ``tune.scheduler``:

    grid         none: every configuration runs all its validation rounds
    asha         asha: tune.grace_period, tune.reduction_factor (the preset's)
    curve        curve: learning-curve extrapolation (tune.curve_top_k, tune.curve_confidence)
    asha-extend  asha with outer.schedule=wsd, tune.extend=true and --extend-epochs planned epochs:
                 short trials that ASHA promotes extend themselves rung by rung (the others'
                 values differ from the grid's, whose schedule is the preset's)

and then ``reckoning_ray.core.soup.make_soups`` averages the grid sweep's best checkpoints (uniform
and greedy soups). Reported per seed and over all seeds:

- compute: trial-validation rounds (every trial's metrics.jsonl, and the cooldown rounds an
  extension set aside), optimizer steps (the last step of each trial, plus the steps each
  extension repeated) and trial seconds (Tune's time_total_s of each trial; one training worker
  of one CPU each), plus each sweep's wall seconds;
- what each strategy finds: the configuration it picks on validation, that configuration's rank
  in the full grid, and its test label accuracy (the sweep's own test of its best checkpoint);
- soups: test label accuracy of the best trial, the uniform soup and the greedy soup (and how
  many ingredients each kept).

Agreement first: a stopped trial's values must equal the grid run's values of the same
configuration and round (same seeds on CPU give the same numbers); otherwise the script prints
the differences and exits with status 2.

Examples::

    python bench/sweep_strategies.py                               # 4 configurations x 3 seeds
    python bench/sweep_strategies.py --seeds 0 data.num_train=256  # a quick look
    python bench/sweep_strategies.py --grid inner.lr_init=0.3,0.1,0.01 --grid outer.lr=3.0e-3,3.0e-4

Outputs under ``--out`` (default runs/bench-strategies): the sweeps (``<strategy>-s<seed>/``) and
``sweep_strategies.json`` with every number printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from asha_vs_grid import (  # noqa: E402
    ACCURACY, DEFAULT_GRID, EXIT_CONFIG, EXIT_DISAGREE, best_round, changed_sources, config_label,
    disagreements, parse_grid, read_jsonl, read_sweep, start,
)
from common import argument_parser, format_table  # noqa: E402

STRATEGIES = ("grid", "asha", "curve", "asha-extend")
SCHEDULER = {"grid": "none", "asha": "asha", "curve": "curve", "asha-extend": "asha"}
# strategies whose trials compute the grid's values (the agreement check covers them)
SAME_VALUES = ("asha", "curve")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every sweep")
    p.add_argument("--preset", default="embedded", help="preset name or YAML path. Default: embedded")
    p.add_argument("--grid", action="append", default=None, metavar="KEY=V1,V2,...",
                   help=f"one grid axis (repeat for more). Default: {' '.join('--grid ' + g for g in DEFAULT_GRID)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each repetition. "
                   "Default: 0 1 2")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated subset of {','.join(STRATEGIES)} (grid always runs). Default: all")
    p.add_argument("--extend-epochs", type=int, default=1,
                   help="train.epochs of the asha-extend trials' first plan. Default: 1")
    p.add_argument("--tolerance", type=float, default=1e-6, help="relative agreement required. Default: 1e-6")
    p.add_argument("--out", default="runs/bench-strategies", help="output directory. Default: runs/bench-strategies")
    args = p.parse_args(argv)
    try:
        args.grid = parse_grid(args.grid or DEFAULT_GRID)
    except ValueError as exc:
        p.error(str(exc))
    chosen = [x for x in args.strategies.split(",") if x]
    unknown = [x for x in chosen if x not in STRATEGIES]
    if unknown:
        p.error(f"--strategies {unknown[0]!r}: choose from {','.join(STRATEGIES)}")
    args.strategies = [x for x in STRATEGIES if x == "grid" or x in chosen]
    bad = [o for o in args.overrides if "=" not in o or o.split("=", 1)[0] in
           ("tune.space", "tune.name", "tune.storage_path", "tune.num_samples", "tune.scheduler", "train.seed")]
    if bad:
        p.error(f"override {bad[0]!r}: give key=value; the benchmark sets tune.space, tune.name, "
                "tune.storage_path, tune.num_samples, tune.scheduler and train.seed itself")
    return args


def sweep(args: argparse.Namespace, strategy: str, seed: int, space: Path, root: Path) -> dict[str, Any]:
    from reckoning_ray.core.config import load_config
    from reckoning_ray.on_ray.sweep import local_dir, run

    extra = ["outer.schedule=wsd", "tune.extend=true", f"train.epochs={args.extend_epochs}"] \
        if strategy == "asha-extend" else []
    cfg = load_config(args.preset, ["train.patience=0", "tracking.mode=disabled", *args.overrides,
                                    f"tune.space={space}", f"tune.name={strategy}-s{seed}", f"tune.storage_path={root}",
                                    "tune.num_samples=1", f"tune.scheduler={SCHEDULER[strategy]}",
                                    f"train.seed={seed}", *extra])
    shutil.rmtree(local_dir(cfg), ignore_errors=True)
    print(f"\n## seed {seed}, {strategy} (tune.scheduler={SCHEDULER[strategy]})", flush=True)
    started = time.perf_counter()
    out = run(cfg)
    return {"cfg": cfg, "out": out, "wall": time.perf_counter() - started, "root": local_dir(cfg)}


def repeated(trial_dir: Path, cfg: Any) -> tuple[int, int]:
    """(validation rounds, optimizer steps) a wsd trial's extensions made twice: the earlier
    cooldowns they set aside (``metrics.cooldown-<planned steps>.jsonl``) and the steps from each
    cooldown's start to that plan's end, which the extension ran again at the constant rate."""
    from reckoning_ray.core.schedules import LrSchedule

    plans = sorted(int(p.stem.rsplit("-", 1)[1]) for p in trial_dir.glob("metrics.cooldown-*.jsonl"))
    if not plans:
        return 0, 0
    warmup = int(float(cfg.outer.warmup_ratio) * plans[0])  # the warmup keeps the first plan's steps
    rounds = sum(len(read_jsonl(trial_dir / f"metrics.cooldown-{p:06d}.jsonl")) for p in plans)
    steps = sum(p - LrSchedule("wsd", p, warmup, float(cfg.outer.cooldown_fraction)).cooldown_start for p in plans)
    return rounds, steps


def compute(result: dict[str, Any], data: dict[tuple, dict[str, Any]]) -> dict[str, float]:
    seconds, rounds, steps = 0.0, 0, 0
    for entry in data.values():
        times = [r.get("time_total_s") for r in read_jsonl(result["root"] / entry["trial"] / "result.json")]
        seconds += max([t for t in times if t is not None] or [0.0])
        again = repeated(result["root"] / "trials" / entry["trial"], result["cfg"])
        rounds += len(entry["history"]) + again[0]
        steps += (int(entry["history"][-1]["step"]) if entry["history"] else 0) + again[1]
    return {"rounds": rounds, "steps": steps, "trial_s": seconds, "wall_s": result["wall"]}


def one_seed(args: argparse.Namespace, seed: int, space: Path, root: Path, keys: list[str]) -> dict[str, Any]:
    from reckoning_ray.core.soup import make_soups

    runs = {s: sweep(args, s, seed, space, root) for s in args.strategies}
    cfg = runs["grid"]["cfg"]
    metric, mode = cfg.tune.metric, cfg.tune.mode
    data = {s: read_sweep(runs[s]["out"], runs[s]["root"], keys) for s in args.strategies}
    checked = sorted({metric, ACCURACY, "train/loss"})
    for s in [x for x in SAME_VALUES if x in args.strategies]:
        problems = disagreements(data[s], data["grid"], checked, args.tolerance)
        if problems:
            print(f"REFUSED: seed {seed}: the {s} and grid runs disagree on {len(problems)} value(s): "
                  + "; ".join(f"{config_label(p['config'], keys)} round {p['round']} {p['metric']}: {p['why']}"
                              for p in problems[:5]), file=sys.stderr)
            raise SystemExit(EXIT_DISAGREE)
    ranking = sorted(data["grid"], key=lambda k: best_round(data["grid"][k]["history"], metric, mode)[metric]
                     * (-1 if mode == "max" else 1))
    rank_of = {k: i + 1 for i, k in enumerate(ranking)}
    out: dict[str, Any] = {"seed": seed, "strategies": {}}
    for s in args.strategies:
        by_trial = {v["trial"]: k for k, v in data[s].items()}
        pick = by_trial[runs[s]["out"]["best_trial"]]
        test = runs[s]["out"].get("best_test") or {}
        out["strategies"][s] = dict(compute(runs[s], data[s]), pick=config_label(pick, keys), grid_rank=rank_of[pick],
                                    val=float(runs[s]["out"]["best_value"]),
                                    test_label_accuracy=test.get("test/label_accuracy"),
                                    # ran fewer rounds than tune.max_rounds: stopped by the scheduler (an
                                    # asha-extend trial: not promoted beyond some plan)
                                    stopped=sum(1 for v in data[s].values()
                                                if v["tune_rounds"] < int(runs[s]["cfg"].tune.max_rounds)))
    print(f"\n## soups of the grid sweep, seed {seed}", flush=True)
    record = make_soups(runs["grid"]["root"])
    out["soups"] = {name: {"ingredients": len(e["ingredients"]), "val": e["validation"][metric],
                           "test_label_accuracy": e["test"]["test/label_accuracy"],
                           "test_answer_loss": e["test"]["test/answer_loss"]}
                    for name, e in record["soups"].items()}
    out["metric"], out["mode"], out["configs"] = metric, mode, len(ranking)
    return out


def report(results: list[dict[str, Any]]) -> None:
    metric = results[0]["metric"]
    rows = []
    for r in results:
        grid = r["strategies"]["grid"]
        for s in r["strategies"]:
            x = r["strategies"][s]
            rows.append([r["seed"], s, x["stopped"], x["rounds"], f"{x['rounds'] / grid['rounds']:.2f}", x["steps"],
                         f"{x['trial_s']:.0f}", f"{x['trial_s'] / grid['trial_s']:.2f}", f"{x['wall_s']:.0f}",
                         x["pick"], f"{x['grid_rank']} of {r['configs']}", f"{x['val']:.4f}",
                         "-" if x["test_label_accuracy"] is None else f"{x['test_label_accuracy']:.3f}"])
    print(f"\n## strategies ({metric}; compute relative to the full grid of the same seed)")
    print(format_table(["seed", "strategy", "trials stopped", "trial-rounds", "x grid", "optimizer steps",
                        "trial s", "x grid", "wall s", "pick", "grid rank", f"pick's {metric}", "pick's test acc"],
                       rows))
    totals = []
    for s in results[0]["strategies"]:
        rounds = sum(r["strategies"][s]["rounds"] for r in results)
        secs = sum(r["strategies"][s]["trial_s"] for r in results)
        found = sum(1 for r in results if r["strategies"][s]["grid_rank"] == 1)
        accs = [r["strategies"][s]["test_label_accuracy"] for r in results
                if r["strategies"][s]["test_label_accuracy"] is not None]
        grid_rounds = sum(r["strategies"]["grid"]["rounds"] for r in results)
        grid_secs = sum(r["strategies"]["grid"]["trial_s"] for r in results)
        totals.append([s, rounds, f"{rounds / grid_rounds:.2f}", f"{secs:.0f}", f"{secs / grid_secs:.2f}",
                       f"{found} of {len(results)}", f"{sum(accs) / len(accs):.3f}" if accs else "-"])
    print(f"\n## over {len(results)} seed(s)")
    print(format_table(["strategy", "trial-rounds", "x grid", "trial s", "x grid", "found the grid's best",
                        "mean test acc of the pick"], totals))
    soup_rows = []
    for r in results:
        for name, e in r["soups"].items():
            soup_rows.append([r["seed"], name, e["ingredients"], f"{e['val']:.4f}", f"{e['test_label_accuracy']:.3f}",
                              f"{e['test_answer_loss']:.4f}"])
    print("\n## model soups of each grid sweep")
    print(format_table(["seed", "model", "ingredients", f"val {metric}", "test acc", "test answer_loss"], soup_rows))
    for name in ("best trial", "uniform", "greedy"):
        accs = [r["soups"][name]["test_label_accuracy"] for r in results]
        print(f"{name}: mean test label accuracy {sum(accs) / len(accs):.3f} over {len(accs)} seed(s)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import ray

    started = start(args, "Sweep strategies: full grid, ASHA, learning-curve stopping; model soups of the grid")
    if started is None:
        return EXIT_CONFIG
    sources, keys, root, space = started
    print(f"seeds {args.seeds}; overrides {args.overrides}")
    try:
        results = [one_seed(args, seed, space, root, keys) for seed in args.seeds]
    finally:
        ray.shutdown()
    changed = changed_sources(sources)
    if changed:
        print(f"warning: the package's source changed while the sweeps ran: {', '.join(changed)}", file=sys.stderr)
    report(results)
    (root / "sweep_strategies.json").write_text(json.dumps({"results": results, "grid": args.grid,
                                                            "overrides": args.overrides,
                                                            "source_changed_during_run": changed}, indent=2))
    print(f"\nsweeps under {root}; numbers in {root / 'sweep_strategies.json'}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
