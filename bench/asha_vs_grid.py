"""Compute that the ASHA sweep spends against a full grid of the same configurations, and whether
it still finds the grid's best one.

The same finite grid of configurations runs twice through the project's sweep
(``reckoning_ray.on_ray.sweep.run``: the same trainable, the same ``ResumableASHA`` scheduler, the same
summary), with identical data and seeds:

    asha   the project's scheduler settings: tune.grace_period, tune.reduction_factor,
           tune.max_rounds; weak trials stop at the rungs
    grid   the same scheduler with tune.grace_period = tune.max_rounds: its only rung is
           max_rounds, so no trial stops before the end and every configuration's whole
           validation history is known

Compute is counted in trial-validation rounds (one round = one validation of one trial, the unit
ASHA's rungs count in), read from every trial's ``metrics.jsonl`` (the rounds the trial really
computed, including any a stopped trial ran before it was killed) and from Tune's ``result.json``
(the rounds Tune received), plus each sweep's wall seconds. Trials run with train.patience=0, so
only ASHA stops trials early.

Agreement first: every configuration's metric values in the ASHA run must equal the grid run's
values for the same rounds (same seeds on CPU give the same numbers). Where they differ beyond
``--tolerance`` (relative), the script prints the differences and exits with status 2 without
any compute ratio: a comparison of two runs that do not compute the same thing means nothing.
With one torch thread per worker (resources.cpus_per_worker=1) the CPU runs are bit-identical; the
script also fingerprints the package's source before and after, and names any file edited
meanwhile (trials started after an edit run the new code).

Examples::

    python bench/asha_vs_grid.py                                  # 4 configurations, embedded preset
    python bench/asha_vs_grid.py --grid inner.steps=1,2 --grid outer.lr=1.0e-3,1.0e-4
    python bench/asha_vs_grid.py tune.reduction_factor=3 data.num_train=512
    python bench/asha_vs_grid.py --preset paper data.path=... resources.use_gpu=true

Outputs under ``--out`` (default runs/bench-asha): the two sweeps (``asha/``, ``grid/``, replaced on
every run), the grid's space file and ``asha_vs_grid.json`` with every number printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, argument_parser, format_table, print_header  # noqa: E402

EXIT_DISAGREE = 2  # the two runs computed different numbers
EXIT_CONFIG = 1  # a bad config key or grid value (argparse's usage errors exit with 2)
# The default grid: initial inner learning rate x outer learning rate around the embedded
# preset's 0.1 / 1e-3, wide enough that the configurations really differ in answer loss; four
# configurations because every Ray Train trial costs about half a minute of start-up on 2 cores.
DEFAULT_GRID = ("inner.lr_init=0.3,0.01", "outer.lr=3.0e-3,3.0e-4")
ACCURACY = "val/label_accuracy"
# Values the two runs must agree on besides the sweep's metric, for every configuration and round.
CHECKED = (ACCURACY, "train/loss")
RUNS = ("asha", "grid")


# -- arguments ---------------------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """A grid value from the command line: int, float, true/false, else the string."""
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["key=v1,v2", ...]`` -> ``{key: [v1, v2]}`` (in the given order)."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"--grid {spec!r}: expected KEY=V1,V2,... e.g. --grid inner.steps=1,2")
        if key in grid:
            raise ValueError(f"--grid {spec!r}: key {key!r} given twice")
        parsed = [parse_value(v) for v in values.split(",") if v.strip()]
        if len(set(map(repr, parsed))) != len(parsed):
            raise ValueError(f"--grid {spec!r}: a value is repeated")
        grid[key] = parsed
    return grid


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied to both sweeps")
    p.add_argument("--preset", default="embedded", help="preset name or YAML path. Default: embedded")
    p.add_argument("--grid", action="append", default=None, metavar="KEY=V1,V2,...",
                   help="one grid axis (repeat the flag for more); the grid is their product. "
                        f"Default: {' '.join('--grid ' + g for g in DEFAULT_GRID)}")
    p.add_argument("--tolerance", type=float, default=1e-6,
                   help="largest relative difference allowed between the two runs' values of the same "
                        "configuration and round. Default: 1e-6")
    p.add_argument("--out", default="runs/bench-asha", help="output directory. Default: runs/bench-asha")
    args = p.parse_args(argv)
    try:
        args.grid = parse_grid(args.grid or DEFAULT_GRID)
    except ValueError as exc:
        p.error(str(exc))
    if args.tolerance < 0:
        p.error("--tolerance must be >= 0")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"override {bad[0]!r} is not key=value")
    reserved = [o for o in args.overrides if o.split("=", 1)[0] in ("tune.space", "tune.name", "tune.storage_path",
                                                                    "tune.num_samples")]
    if reserved:
        p.error(f"override {reserved[0]!r}: the benchmark sets tune.space, tune.name, tune.storage_path and "
                "tune.num_samples itself (use --grid and --out)")
    return args


# -- reading a finished sweep ---------------------------------------------------------------------------

def config_key(params: dict[str, Any], keys: Sequence[str]) -> tuple:
    return tuple(params[k] for k in keys)


def config_label(key: tuple, keys: Sequence[str]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in zip(keys, key))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_sweep(out: dict[str, Any], root: Path, keys: Sequence[str]) -> dict[tuple, dict[str, Any]]:
    """Per configuration of a finished sweep: its trial id, validation history (one dict per round,
    from the trial's metrics.jsonl), the rounds Tune received (lines of the trial's result.json)
    and the sweep's status for it.

    ``out``: what ``reckoning_ray.on_ray.sweep.run`` returned; ``root``: the sweep's local directory.
    """
    by_config: dict[tuple, dict[str, Any]] = {}
    for trial in out["trials"]:
        key = config_key(trial, keys)
        if key in by_config:
            raise RuntimeError(f"configuration {key} appears twice in sweep {root}")
        history = read_jsonl(root / "trials" / trial["trial"] / "metrics.jsonl")
        rounds = [int(h["round"]) for h in history]
        if rounds != list(range(1, len(rounds) + 1)):
            raise RuntimeError(f"{root / 'trials' / trial['trial'] / 'metrics.jsonl'}: rounds {rounds} are not "
                               "1, 2, ...: a resumed or mixed-up run directory")
        tune_results = [r for r in read_jsonl(root / trial["trial"] / "result.json") if "round" in r]
        by_config[key] = {"trial": trial["trial"], "status": trial["status"], "history": history,
                          "tune_rounds": len({int(r["round"]) for r in tune_results})}
    return by_config


def best_round(history: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """The validation with the best ``metric`` (the first one on ties, as the sweep's summary)."""
    scored = [h for h in history if h.get(metric) is not None and not math.isnan(h[metric])]
    if not scored:
        raise RuntimeError(f"no validation reported {metric}")
    return (max if mode == "max" else min)(scored, key=lambda h: h[metric])


# -- agreement --------------------------------------------------------------------------------------------

def disagreements(asha: dict[tuple, dict[str, Any]], grid: dict[tuple, dict[str, Any]], metrics: Sequence[str],
                  tolerance: float) -> list[dict[str, Any]]:
    """Every (configuration, round, metric) where the two runs differ by more than ``tolerance``
    relative (|a - g| > tolerance * max(|a|, |g|, 1e-12)), where a configuration is missing from
    one run, or where ASHA holds a round the grid run does not."""
    problems: list[dict[str, Any]] = []
    for key in sorted(set(asha) | set(grid), key=repr):
        if key not in asha or key not in grid:
            problems.append({"config": key, "round": None, "metric": None, "asha": key in asha, "grid": key in grid,
                             "why": "configuration missing from the " + ("grid" if key in asha else "ASHA") + " run"})
            continue
        grid_by_round = {int(h["round"]): h for h in grid[key]["history"]}
        for h in asha[key]["history"]:
            r = int(h["round"])
            if r not in grid_by_round:
                problems.append({"config": key, "round": r, "metric": None, "asha": None, "grid": None,
                                 "why": "round missing from the grid run"})
                continue
            for metric in metrics:
                a, g = h.get(metric), grid_by_round[r].get(metric)
                if a is None or g is None:
                    if a is not g:
                        problems.append({"config": key, "round": r, "metric": metric, "asha": a, "grid": g,
                                         "why": "reported by one run only"})
                    continue
                if abs(a - g) > tolerance * max(abs(a), abs(g), 1e-12) or math.isnan(a) != math.isnan(g):
                    problems.append({"config": key, "round": r, "metric": metric, "asha": a, "grid": g,
                                     "why": f"relative difference {abs(a - g) / max(abs(a), abs(g), 1e-12):.2e}"})
    return problems


def require_agreement(asha: dict[tuple, dict[str, Any]], grid: dict[tuple, dict[str, Any]], metrics: Sequence[str],
                      tolerance: float, keys: Sequence[str], changed: Sequence[str] = ()) -> int:
    """Check the two runs computed the same numbers; print what differs and exit with status 2 if
    not. ``changed``: package files edited while the sweeps ran (named in the refusal as the likely
    cause). Returns the number of (configuration, round, metric) values compared."""
    problems = disagreements(asha, grid, metrics, tolerance)
    if problems:
        print(f"REFUSED: the ASHA and grid runs disagree on {len(problems)} value(s) (tolerance {tolerance:g} "
              "relative); they do not compute the same thing, so no compute comparison is printed", file=sys.stderr)
        if changed:
            print(f"the package's source changed while the sweeps ran ({', '.join(changed)}): trials started "
                  "before and after the edit ran different code; rerun on an unchanging checkout", file=sys.stderr)
        rows = [[config_label(p["config"], keys), "-" if p["round"] is None else p["round"], p["metric"] or "-",
                 _num(p["asha"]), _num(p["grid"]), p["why"]] for p in problems]
        print(format_table(["config", "round", "metric", "asha", "grid", "why"], rows), file=sys.stderr)
        raise SystemExit(EXIT_DISAGREE)
    return sum(len(v["history"]) for v in asha.values()) * len(metrics)


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.9g}"
    return str(value)


# -- the code the trials run ------------------------------------------------------------------------------

def source_fingerprint() -> dict[str, str]:
    """SHA-256 of every source file of the package (path relative to the repository -> digest).

    Each trial imports the package when its worker starts, so an edit made while the sweeps run
    reaches only the trials started after it: the two runs then compute different numbers.
    """
    package = REPO / "reckoning_ray"
    return {str(path.relative_to(REPO)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(package.rglob("*.py"))}


def code_version() -> str:
    """The repository's commit and whether its package source differs from it (or "unknown")."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "reckoning_ray"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"git {commit}" + (" with uncommitted changes to reckoning_ray/" if dirty else "")


def changed_sources(before: dict[str, str]) -> list[str]:
    """Package files added, removed or edited since ``before`` was taken."""
    after = source_fingerprint()
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


# -- running the sweeps -------------------------------------------------------------------------------------

def write_space(grid: dict[str, list[Any]], path: Path) -> Path:
    """The grid as a search-space file of the project's format (``key: {grid: [values]}``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Written by bench/asha_vs_grid.py: every combination runs once in each sweep.\n"
    text += yaml.safe_dump({k: {"grid": v} for k, v in grid.items()}, sort_keys=False, default_flow_style=None)
    path.write_text(text)
    return path


def sweep(args: argparse.Namespace, name: str, space: Path, root: Path, grid_run: bool) -> dict[str, Any]:
    """Run one sweep through ``reckoning_ray.on_ray.sweep.run``; returns its summary and wall seconds."""
    from reckoning_ray.core.config import load_config
    from reckoning_ray.on_ray.sweep import local_dir, run

    # patience 0: only the scheduler stops trials, so the grid runs every configuration to the end
    cfg = load_config(args.preset, ["train.patience=0", "tracking.mode=disabled", *args.overrides,
                                    f"tune.space={space}", f"tune.name={name}", f"tune.storage_path={root}",
                                    "tune.num_samples=1"])
    if grid_run:
        cfg.tune.grace_period = cfg.tune.max_rounds
    shutil.rmtree(local_dir(cfg), ignore_errors=True)  # this benchmark's own earlier sweep
    print(f"\n## sweep '{name}': grace_period {cfg.tune.grace_period}, reduction_factor "
          f"{cfg.tune.reduction_factor}, max_rounds {cfg.tune.max_rounds}", flush=True)
    started = time.perf_counter()
    out = run(cfg)
    wall = time.perf_counter() - started
    return {"cfg": cfg, "out": out, "wall": wall, "root": local_dir(cfg)}


# -- the report ------------------------------------------------------------------------------------------------

def report(args: argparse.Namespace, runs: dict[str, dict[str, Any]], keys: Sequence[str],
           changed: Sequence[str] = ()) -> dict[str, Any]:
    """Check agreement, then print the tables; returns every number printed. ``changed``: package
    files edited while the sweeps ran."""
    cfg = runs["grid"]["cfg"]
    metric, mode = cfg.tune.metric, cfg.tune.mode
    data = {name: read_sweep(runs[name]["out"], runs[name]["root"], keys) for name in RUNS}
    asha, grid = data["asha"], data["grid"]
    checked = sorted({metric, *CHECKED})
    compared = require_agreement(asha, grid, checked, args.tolerance, keys, changed)
    print(f"\nagreement: {compared} values ({', '.join(checked)}) of {len(asha)} configurations agree between the "
          f"ASHA and grid runs within {args.tolerance:g} relative")

    planned = {int(h["rounds_planned"]) for v in grid.values() for h in v["history"]}
    full = min(min(planned), cfg.tune.max_rounds) if planned else 0
    short = [config_label(k, keys) for k, v in grid.items() if len(v["history"]) < full]
    if short:
        print(f"warning: grid trials that did not reach round {full}: {short}", file=sys.stderr)

    def ranked(results: dict[tuple, dict[str, Any]]) -> list[tuple]:
        return sorted(results, key=lambda k: best_round(results[k]["history"], metric, mode)[metric]
                      * (-1 if mode == "max" else 1))

    grid_ranking = ranked(grid)
    rank_of = {k: i + 1 for i, k in enumerate(grid_ranking)}
    # ASHA's pick is the sweep's own answer (best_config.yaml), not recomputed here
    by_trial = {v["trial"]: k for k, v in asha.items()}
    asha_pick = by_trial[runs["asha"]["out"]["best_trial"]]
    grid_best_value = float(runs["grid"]["out"]["best_value"])
    if best_round(grid[grid_ranking[0]]["history"], metric, mode)[metric] != grid_best_value:
        raise RuntimeError(f"the grid sweep's best {metric} {grid_best_value} is not the best of its trials' "
                           "metrics.jsonl: the sweep's summary and its run directories disagree")

    rounds = {name: sum(len(v["history"]) for v in data[name].values()) for name in RUNS}
    tune_rounds = {name: sum(v["tune_rounds"] for v in data[name].values()) for name in RUNS}
    summary_rows, picks = [], {}
    for name, pick in (("asha", asha_pick), ("grid", grid_ranking[0])):
        at = best_round(data[name][pick]["history"], metric, mode)
        picks[name] = {"config": dict(zip(keys, pick)), "trial": data[name][pick]["trial"], "metric": at[metric],
                       "label_accuracy": at[ACCURACY], "round": int(at["round"]), "grid_rank": rank_of[pick]}
        summary_rows.append([name, len(data[name]), rounds[name], tune_rounds[name], f"{runs[name]['wall']:.0f}",
                             config_label(pick, keys), f"{at[metric]:.4f}", f"{at[ACCURACY]:.3f}", int(at["round"]),
                             f"{rank_of[pick]} of {len(grid_ranking)}"])
    print(f"\n## ASHA vs the full grid: {len(grid)} configurations, {metric} ({mode}); ASHA grace_period "
          f"{runs['asha']['cfg'].tune.grace_period}, reduction_factor {cfg.tune.reduction_factor}, max_rounds "
          f"{cfg.tune.max_rounds}")
    print(format_table(["run", "trials", "validation rounds (metrics.jsonl)", "rounds Tune received", "wall s",
                        "best config", metric, "label accuracy at best round", "best round", "grid rank"],
                       summary_rows))

    config_rows, configs = [], []
    for key in grid_ranking:
        g, a = grid[key], asha.get(key)
        g_best = best_round(g["history"], metric, mode)
        a_best = best_round(a["history"], metric, mode) if a and a["history"] else None
        final = g["history"][-1]
        configs.append({"config": dict(zip(keys, key)), "grid_rank": rank_of[key],
                        "asha_rounds": len(a["history"]) if a else 0, "asha_tune_rounds": a["tune_rounds"] if a else 0,
                        "asha_status": a["status"] if a else "-", "asha_best": a_best[metric] if a_best else None,
                        "grid_rounds": len(g["history"]), "grid_best": g_best[metric],
                        "grid_best_round": int(g_best["round"]), "grid_best_label_accuracy": g_best[ACCURACY],
                        "grid_final": final[metric], "grid_final_label_accuracy": final[ACCURACY]})
        c = configs[-1]
        config_rows.append([rank_of[key], config_label(key, keys), c["asha_rounds"], c["asha_status"],
                            "-" if a_best is None else f"{a_best[metric]:.4f}", c["grid_rounds"],
                            f"{g_best[metric]:.4f}", c["grid_best_round"], f"{g_best[ACCURACY]:.3f}",
                            f"{final[metric]:.4f}", f"{final[ACCURACY]:.3f}"])
    print("\n## per configuration, in the grid's ranking")
    print(format_table(["grid rank", "config", "rounds ASHA", "ASHA status", f"best {metric} ASHA", "rounds grid",
                        f"best {metric} grid", "at round", "label acc there", f"final {metric} grid",
                        "final label acc grid"], config_rows))

    ratio = rounds["asha"] / rounds["grid"] if rounds["grid"] else float("nan")
    wall_ratio = runs["asha"]["wall"] / runs["grid"]["wall"] if runs["grid"]["wall"] else float("nan")
    found = asha_pick == grid_ranking[0]
    print(f"\ncompute: ASHA ran {rounds['asha']} of the grid's {rounds['grid']} trial-validation rounds "
          f"({ratio:.2f}x; Tune received {tune_rounds['asha']} vs {tune_rounds['grid']}), wall "
          f"{runs['asha']['wall']:.0f} s vs {runs['grid']['wall']:.0f} s ({wall_ratio:.2f}x)")
    grid_value_of_pick = best_round(grid[asha_pick]["history"], metric, mode)[metric]
    print(f"ASHA {'found' if found else 'did not find'} the grid's best configuration: its pick "
          f"({config_label(asha_pick, keys)}) ranks {rank_of[asha_pick]} of {len(grid_ranking)} in the full grid "
          f"(run to the end it reaches {metric} {grid_value_of_pick:.4f} vs the best {picks['grid']['metric']:.4f})")
    print(f"interpretation: ASHA spent {100 * ratio:.0f}% of the grid's validation rounds "
          f"({100 * wall_ratio:.0f}% of its wall time, trial start-up included) and "
          + ("picked the same configuration as the full grid" if found else
             f"picked the grid's number {rank_of[asha_pick]} of {len(grid_ranking)} ({metric} {grid_value_of_pick:.4f} "
             f"run to the end vs the grid's best {picks['grid']['metric']:.4f})")
          + ".")
    return {"metric": metric, "mode": mode, "grid_keys": list(keys), "rounds": rounds, "tune_rounds": tune_rounds,
            "wall_s": {name: runs[name]["wall"] for name in RUNS}, "rounds_ratio": ratio, "wall_ratio": wall_ratio,
            "asha_found_grid_best": found, "picks": picks, "configs": configs, "values_compared": compared,
            "scheduler": {k: int(runs["asha"]["cfg"].tune[k])
                          for k in ("grace_period", "reduction_factor", "max_rounds")}}


def start(args: argparse.Namespace, title: str) -> Optional[tuple[dict[str, str], list[str], Path, Path]]:
    """The common start of the sweep benchmarks: header, source fingerprint, the grid's space file
    (checked before Ray starts), W&B off, Ray up. Returns (fingerprint, grid keys, output root,
    space file), or None after printing a bad key or value."""
    from reckoning_ray.core.config import load_config
    from reckoning_ray.core.errors import ConfigError
    from reckoning_ray.on_ray.trainer import init_ray
    from reckoning_ray.core.spaces import load_space

    print_header(title)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    sources = source_fingerprint()
    print(f"package: reckoning_ray at {code_version()}")
    keys = list(args.grid)
    n_configs = math.prod(len(v) for v in args.grid.values())
    print(f"grid: {' x '.join(f'{k} {args.grid[k]}' for k in keys)} = {n_configs} configurations")
    root = Path(args.out).expanduser().resolve()
    space = write_space(args.grid, root / "grid_space.yaml")
    try:  # fails on a bad key or value before Ray starts
        load_space(str(space), load_config(args.preset, ["tracking.mode=disabled", *args.overrides]))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    os.environ["WANDB_MODE"] = "disabled"
    init_ray()
    return sources, keys, root, space


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import ray

    started = start(args, "ASHA vs the full grid: trial-validation rounds spent and the best configuration found")
    if started is None:
        return EXIT_CONFIG
    sources, keys, root, space = started
    try:
        runs = {name: sweep(args, name, space, root, grid_run=(name == "grid")) for name in RUNS}
    finally:
        ray.shutdown()
    changed = changed_sources(sources)
    if changed:
        print(f"warning: the package's source changed while the sweeps ran: {', '.join(changed)}", file=sys.stderr)
    result = report(args, runs, keys, changed)
    result["source_changed_during_run"] = changed
    result["grid"] = args.grid
    result["load_average_end"] = list(os.getloadavg())
    (root / "asha_vs_grid.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nsweeps under {root}; numbers in {root / 'asha_vs_grid.json'}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
