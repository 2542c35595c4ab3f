"""Fixed against elastic trials: the same sweep on the same fake cluster, side by side.

A fake autoscaling cluster with cluster/a100.yaml's node types and a fixed node count (``--nodes``
a100 nodes kept from the start, 1 CPU each: one worker place each, standing in for one GPU) runs
the same sweep twice through ``python -m reckoning_ray.tune``: the embedded preset, a grid of
configurations (the same trials in both), ASHA, with fixed trials (``resources.num_workers=1``)
and with elastic ones (``resources.max_workers=--max-workers``: a trial grows onto the workers
that stopped trials free, after a validation).

From every trial's ``workers.jsonl`` (what each of its worker groups did:
:mod:`reckoning_ray.core.elastic`) and ``metrics.jsonl``:

- **busy**: worker-seconds in which a worker trained (from its group's checkpoint restored to its
  last validation; what a group trained after that and lost, as ASHA stops a trial, is not
  counted), over the worker-seconds available from the first trial's start to the last trial's
  end (places x seconds). The idle fraction is one minus that;
- **start-up**: worker-seconds from a group being asked for to its checkpoint restored (placing,
  starting the processes, loading, restoring), shown apart;
- the sweep's wall time, the steps redone by resizes, each trial's worker counts;
- agreement: every trial's rounds and status (ASHA's decisions), the best trial, and each trial's
  validation metric per round within ``--tolerance`` (the summation order changes with the worker
  count). A disagreement is printed and the script exits with status 2 after the tables.

**Replay.** On this CPU the speed does not grow with the number of fake GPUs, so the script also
replays the sweep in a simulation (:func:`replay`): the trials in the same order with the same
number of rounds each (as measured, ASHA's decisions), the same places and concurrency, and the
same worker pool (:class:`reckoning_ray.core.elastic.WorkerPool`), with a round taking
``round_s / (1 + (k - 1) * --efficiency)`` on ``k`` workers and each worker group start costing
``startup_s``. It is run twice: with the round and start-up times measured here (the embedded
sweep), and with the paper's setting (``--paper-round-min`` minutes per validation round on one
GPU, ``--paper-startup-s`` per group start, up to ``--paper-rounds`` rounds).

Example (about 20 minutes on 2 cores)::

    python bench/elastic_sweep.py --out runs/bench-elastic

Outputs under ``--out``: both sweeps and ``elastic_sweep.json`` with every number printed.
"""

from __future__ import annotations

import argparse
import json
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
from reckoning_ray.core.elastic import WorkerPool, read_events, steps_redone, timeline  # noqa: E402
from reckoning_ray.ops import fake_cluster as fc  # noqa: E402
from reckoning_ray.on_ray.trainer import AUTOSCALER_CONFIG_ENV  # noqa: E402

METRIC = "val/answer_loss"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--out", default="runs/bench-elastic", help="where the sweeps and the results go")
    p.add_argument("--nodes", type=int, default=2, help="a100 nodes of the fake cluster (one worker place each)")
    p.add_argument("--max-workers", type=int, default=2, help="resources.max_workers of the elastic sweep")
    p.add_argument("--grid", action="append", default=None, metavar="KEY=V1,V2",
                   help="a grid axis of the search space (default: outer.lr=1e-2,3e-3,3e-4 x inner.steps=1,2)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="relative agreement of the metrics per round")
    p.add_argument("--efficiency", type=float, default=0.9,
                   help="replay: each worker beyond the first adds this share of one worker's speed")
    p.add_argument("--paper-round-min", type=float, default=30.0,
                   help="replay of the paper-sized sweep: minutes per validation round on one GPU")
    p.add_argument("--paper-startup-s", type=float, default=90.0,
                   help="replay of the paper-sized sweep: seconds to start a worker group and restore")
    p.add_argument("--paper-rounds", type=int, default=12, help="paper: 6 epochs x 2 validations")
    p.add_argument("--tail-rounds", default="2,6,2,2,6,2,2,12",
                   help="replay also these rounds per trial, in start order: by default the embedded default "
                        "sweep's shape (8 trials, 7 stopped at round 2 or 6, the last to start runs alone to 12)")
    p.add_argument("--only", choices=("fixed", "elastic"), default=None, help="run one sweep only (no comparison)")
    p.add_argument("overrides", nargs="*", help="config overrides for both sweeps (key=value)")
    return p.parse_args(argv)


def cluster_yaml(out: Path, nodes: int) -> Path:
    """cluster/a100.yaml with ``nodes`` a100 nodes kept from the start (a fixed node count)."""
    conf = yaml.safe_load((REPO / "cluster" / "a100.yaml").read_text())
    a100 = conf["available_node_types"]["ray.worker.a100"]
    a100["min_workers"] = a100["max_workers"] = nodes
    for name, node_type in conf["available_node_types"].items():
        if name not in ("ray.worker.a100", conf["head_node_type"]):
            node_type["min_workers"] = node_type["max_workers"] = 0
    path = out / "a100-fixed.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def space_file(out: Path, grid: list[str]) -> Path:
    lines = []
    for axis in grid:
        key, values = axis.split("=", 1)
        lines.append(f"{key}: {{grid: [{', '.join(values.split(','))}]}}")
    path = out / "space.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for_nodes(address: str, nodes: int, timeout_s: float = 180.0) -> None:
    code = ("import ray, sys, time; ray.init(address=sys.argv[1], logging_level='ERROR'); t = time.time()\n"
            "while sum(n['Alive'] and n['Resources'].get('a100', 0) > 0 for n in ray.nodes()) < int(sys.argv[2]):\n"
            "    assert time.time() - t < float(sys.argv[3]), 'the a100 nodes did not start'; time.sleep(1)\n")
    subprocess.run([sys.executable, "-c", code, address, str(nodes), str(timeout_s)], check=True,
                   env=dict(os.environ, RAY_AUTH_MODE="disabled"))


def run_sweep(args: argparse.Namespace, mode: str, out: Path, space: Path) -> dict[str, Any]:
    root = out / mode
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    workers = ["resources.max_workers=%d" % args.max_workers] if mode == "elastic" else []
    command = [sys.executable, "-m", "reckoning_ray.tune", "embedded", f"space={space}",
               f"tune.storage_path={root / 'tune'}", "tune.name=sweep", "tune.num_samples=1",
               f"tune.max_concurrent={args.nodes}", "resources.node_type=auto", "resources.num_workers=1",
               "train.patience=0", "tracking.mode=disabled", *workers, *args.overrides]
    print(f"[{mode}] {' '.join(command[1:])}", flush=True)
    with fc.fake_cluster(cluster_yaml(out, args.nodes), cpus_per_node=1, max_workers_per_type=args.nodes,
                         env={"RAY_AUTH_MODE": "disabled"}) as cluster:
        wait_for_nodes(cluster.address, args.nodes)
        autoscaler = root / "autoscaler.yaml"
        autoscaler.write_text(yaml.safe_dump(cluster.config))
        env = dict(os.environ, RAY_ADDRESS=cluster.address, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled",
                   **{AUTOSCALER_CONFIG_ENV: str(autoscaler)})
        env.pop("WANDB_MODE", None)
        t0 = time.time()
        with open(root / "sweep.log", "w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env).returncode
        wall = time.time() - t0
    if code != 0:
        raise SystemExit(f"[{mode}] the sweep failed (exit {code}); see {root / 'sweep.log'}")
    return measure(root / "tune" / "sweep", args.nodes, wall)


def measure(sweep: Path, places: int, wall: float) -> dict[str, Any]:
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    trials, groups_all = {}, []
    for row in summary["trials"]:
        run_dir = sweep / "trials" / row["trial"]
        groups = timeline(read_events(run_dir))
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        config = {k: v for k, v in row.items() if "." in k}
        trials[row["trial"]] = {"config": config, "rounds": row["rounds"], "status": row["status"],
                                "workers": row.get("workers"), "best": row["best"],
                                "metric": [m[METRIC] for m in metrics], "groups": groups,
                                "redone": steps_redone(groups)}
        groups_all += groups
    start = min(g["launch"] for g in groups_all)
    end = max(g["end"] or g["last_round"] or g["ready"] or g["launch"] for g in groups_all)
    busy = sum(g["workers"] * (g["last_round"] - g["ready"]) for g in groups_all if g["ready"] and g["last_round"])
    startup = sum(g["workers"] * ((g["ready"] or g["launch"]) - g["launch"]) for g in groups_all)
    available = places * (end - start)
    # one worker's time per round and a group's start-up, for the replay
    round_s = [(g["last_round"] - g["ready"]) * g["workers"] / g["rounds"] for g in groups_all
               if g["ready"] and g["last_round"] and g["rounds"]]
    starts = [g["ready"] - g["launch"] for g in groups_all if g["ready"]]
    best = summary["best_trial"]
    return {"wall_s": wall, "span_s": end - start, "available_s": available, "busy_s": busy, "startup_s": startup,
            "busy_share": busy / available, "startup_share": startup / available, "idle": 1 - busy / available,
            "groups": len(groups_all), "steps_redone": sum(t["redone"] for t in trials.values()),
            "best_config": trials[best]["config"], "best_value": summary["best_value"], "trials": trials,
            "round_s": sorted(round_s)[len(round_s) // 2], "group_startup_s": sorted(starts)[len(starts) // 2],
            "order": sorted(trials, key=lambda t: trials[t]["groups"][0]["launch"])}


# -- the replay -----------------------------------------------------------------------------------

def replay(rounds: list[int], places: int, concurrency: int, least: int, most: int, round_s: float,
           startup_s: float, efficiency: float) -> dict[str, float]:
    """Simulate the sweep: trials (``rounds`` each, in order) start ``concurrency`` at a time; a
    group of ``k`` workers trains a round in ``round_s / (1 + (k - 1) * efficiency)`` seconds after
    ``startup_s``; after each round the trial asks the :class:`WorkerPool` (the one the runs use)
    and restarts with a new count when it says so. Returns the wall time, busy and start-up shares
    of the places x wall time, and the resizes."""
    pool = WorkerPool(places, concurrency)
    queue = list(enumerate(rounds))
    pool.set_pending(len(queue))
    running: dict[str, dict[str, Any]] = {}  # trial -> {left, workers, next (time of its next event), phase}
    now, busy, startup, resizes = 0.0, 0.0, 0.0, 0

    def launch(trial: str, left: int) -> None:
        nonlocal startup
        k = pool.start(trial, least, most)
        free = places - sum(r["workers"] for t, r in running.items() if t != trial)
        k = min(k, max(free, 0)) or 0
        if k < least:  # waits for its workers: retried when another trial frees some
            pool.release(trial)
            running[trial] = {"left": left, "workers": 0, "next": None, "phase": "waiting"}
            return
        pool.hold(trial, k)
        running[trial] = {"left": left, "workers": k, "next": now + startup_s, "phase": "starting"}
        startup += k * startup_s

    def admit() -> None:
        while queue and len(running) < concurrency:
            index, n = queue.pop(0)
            pool.set_pending(len(queue))
            launch(f"t{index:03d}", n)

    admit()
    while running:
        for trial in [t for t, r in running.items() if r["phase"] == "waiting"]:
            launch(trial, running[trial]["left"])
        active = {t: r for t, r in running.items() if r["next"] is not None}
        trial = min(active, key=lambda t: (active[t]["next"], t))
        r = running[trial]
        now = r["next"]
        if r["phase"] == "starting":
            r["phase"], r["next"] = "training", now + round_s / (1 + (r["workers"] - 1) * efficiency)
            continue
        busy += r["workers"] * (round_s / (1 + (r["workers"] - 1) * efficiency))
        r["left"] -= 1
        if r["left"] == 0:
            del running[trial]
            pool.release(trial)
            admit()
            continue
        k = pool.resize(trial, r["workers"], least, most)
        if k != r["workers"]:
            resizes += 1
            launch(trial, r["left"])  # the next group starts with the count decided (pool.start)
        else:
            r["next"] = now + round_s / (1 + (r["workers"] - 1) * efficiency)
    return {"wall_s": now, "busy_share": busy / (places * now), "startup_share": startup / (places * now),
            "idle": 1 - busy / (places * now), "resizes": resizes}


# -- the report -----------------------------------------------------------------------------------

def rounds_workers(trial: dict[str, Any]) -> list[int]:
    """The worker count of each validation round, from the trial's worker groups."""
    counts: list[int] = []
    for g in trial["groups"]:
        counts += [g["workers"]] * g["rounds"]
    return counts


def agreement(fixed: dict[str, Any], elastic: dict[str, Any], tolerance: float) -> tuple[list[str], list[list[Any]]]:
    """The checks, and a row per trial on its metrics. Checked: ASHA's decision on every trial
    (rounds and status), the best trial, and every round up to the first one after the trial's
    first resize within ``tolerance`` (relative): before it the computation is the fixed trial's
    (bit-identical on the CPU), in it only the summation order changed. After it the
    differences are shown, not checked: they grow with the training (a relative 1e-7 after the
    resized round can become 1e-2 rounds later at a high learning rate)."""
    problems, rows = [], []
    by_config = {json.dumps(t["config"], sort_keys=True): t for t in elastic["trials"].values()}
    for trial in fixed["trials"].values():
        name = " ".join(f"{k}={v}" for k, v in trial["config"].items())
        other = by_config.get(json.dumps(trial["config"], sort_keys=True))
        if other is None:
            problems.append(f"{name}: not in the elastic sweep")
            continue
        if (trial["rounds"], trial["status"]) != (other["rounds"], other["status"]):
            problems.append(f"{name}: ASHA decided {trial['rounds']} rounds ({trial['status']}) fixed, "
                            f"{other['rounds']} ({other['status']}) elastic")
        workers = rounds_workers(other)
        first = next((i for i, k in enumerate(workers) if k != workers[0]), None) if workers else None
        first = 0 if workers and workers[0] != 1 else first  # resized (or started larger) before round 1
        checked = len(trial["metric"]) if first is None else first + 1
        diffs = [abs(a - b) / max(abs(a), abs(b), 1e-12) for a, b in zip(trial["metric"], other["metric"])]
        for i, d in enumerate(diffs[:checked], 1):
            if d > tolerance:
                problems.append(f"{name}: round {i} {METRIC} {trial['metric'][i - 1]:.6g} fixed, "
                                f"{other['metric'][i - 1]:.6g} elastic")
        rows.append([name, other["workers"] or "-", checked, f"{max(diffs[:checked], default=0):.1e}",
                     f"{max(diffs[checked:], default=0):.1e}" if diffs[checked:] else "-",
                     f"{trial['best']:.4f}", f"{other['best']:.4f}"])
    if fixed["best_config"] != elastic["best_config"]:
        problems.append(f"best trial: {fixed['best_config']} fixed, {elastic['best_config']} elastic")
    return problems, rows


def draw(runs: dict[str, dict[str, Any]], path: Path) -> Path:
    """Each sweep's worker groups on one time axis: a row per trial, grey while a group starts
    and restores, coloured by its worker count while it trains, a gap where a trial's place was idle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {1: "#4c72b0", 2: "#dd8452", 3: "#55a868", 4: "#c44e52"}
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1.2 + 0.45 * max(len(r["trials"]) for r in runs.values())
                                                  * len(runs)), sharex=True, squeeze=False)
    for ax, (mode, run) in zip(axes[:, 0], runs.items()):
        t0 = min(g["launch"] for t in run["trials"].values() for g in t["groups"])
        for y, trial_id in enumerate(run["order"]):
            trial = run["trials"][trial_id]
            for g in trial["groups"]:
                ready = g["ready"] or g["end"] or g["launch"]
                ax.barh(y, ready - g["launch"], left=g["launch"] - t0, color="#cccccc", edgecolor="none")
                if g["ready"] and g["last_round"]:
                    ax.barh(y, g["last_round"] - g["ready"], left=g["ready"] - t0,
                            color=colours.get(g["workers"], "#8172b2"), edgecolor="none")
                    ax.text((g["ready"] + g["last_round"]) / 2 - t0, y, str(g["workers"]), ha="center",
                            va="center", fontsize=7, color="white")
        ax.set_yticks(range(len(run["order"])))
        ax.set_yticklabels([" ".join(f"{v}" for v in run["trials"][t]["config"].values()) for t in run["order"]],
                           fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{mode}: training {run['busy_share']:.0%}, starting/restoring {run['startup_share']:.0%}, "
                     f"unused {1 - run['busy_share'] - run['startup_share']:.0%} of {len(run['order'])} trials x "
                     "places", fontsize=9)
    axes[-1, 0].set_xlabel("seconds since the first trial's start (grey: starting/restoring; "
                           "colour and number: workers training)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    args.grid = args.grid or ["outer.lr=1.0e-2,3.0e-3,3.0e-4", "inner.steps=1,2"]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print_header("fixed against elastic trials on a fake cluster")
    space = space_file(out, args.grid)
    modes = [args.only] if args.only else ["fixed", "elastic"]
    runs = {mode: run_sweep(args, mode, out, space) for mode in modes}
    (out / "elastic_sweep.json").write_text(json.dumps(runs, indent=1, default=str))

    print("\n### measured on the fake cluster")
    header = ["trials", "sweep wall s", "first start to last end s", "training", "starting/restoring", "unused",
              "idle (1 - training)", "worker groups", "steps redone", f"best {METRIC}"]
    print(format_table(header, [[mode, f"{r['wall_s']:.0f}", f"{r['span_s']:.0f}", f"{r['busy_share']:.1%}",
                                 f"{r['startup_share']:.1%}", f"{1 - r['busy_share'] - r['startup_share']:.1%}",
                                 f"{r['idle']:.1%}", r["groups"], r["steps_redone"], f"{r['best_value']:.4f}"]
                                for mode, r in runs.items()]))
    print("\n### the trials")
    first = runs[modes[0]]
    rows = []
    for trial_id in first["order"]:
        t = first["trials"][trial_id]
        cells = [" ".join(f"{k}={v}" for k, v in t["config"].items())]
        for mode in modes:
            match = next(o for o in runs[mode]["trials"].values() if o["config"] == t["config"])
            cells += [f"{match['rounds']} ({match['status']})", match["workers"] or "-", f"{match['best']:.4f}"]
        rows.append(cells)
    print(format_table(["config"] + [f"{m} {c}" for m in modes for c in ("rounds", "workers", f"best {METRIC}")], rows))

    status = 0
    if len(modes) == 2:
        problems, rows = agreement(runs["fixed"], runs["elastic"], args.tolerance)
        print(f"\n### {METRIC} per round, elastic against fixed (relative differences)")
        print(format_table(["config", "elastic workers", "rounds checked (to the first resized one)",
                           f"largest there (<= {args.tolerance:g})", "largest after (shown)", "fixed best",
                           "elastic best"], rows))
        print("\nagreement (ASHA's decisions, best trial, rounds checked within %g): %s" % (
            args.tolerance, "yes" if not problems else "NO\n  " + "\n  ".join(problems)))
        status = 2 if problems else 0

    # the replays: the measured trial order and rounds (ASHA's decisions of the first sweep)
    rounds = [first["trials"][t]["rounds"] for t in first["order"]]
    fixed_round = first["round_s"]
    startup = first["group_startup_s"]
    tail = [int(n) for n in args.tail_rounds.split(",")]
    settings = []
    for label, order in (("this sweep", rounds), ("tail", tail)):
        paper_order = [max(1, round(n * args.paper_rounds / max(order))) for n in order]
        settings += [(f"embedded, {label} (measured times)", order, fixed_round, startup),
                     (f"paper-sized, {label}", paper_order, args.paper_round_min * 60, args.paper_startup_s)]
    replayed = []
    print(f"\n### replay at a per-worker speed-up of 1 + (k - 1) x {args.efficiency} on k workers")
    for name, trial_rounds, round_s, start_s in settings:
        for mode, most in (("fixed", 1), ("elastic", args.max_workers)):
            r = replay(trial_rounds, args.nodes, args.nodes, 1, most, round_s, start_s, args.efficiency)
            replayed.append([name, mode, " ".join(map(str, trial_rounds)), f"{round_s:.1f}", f"{start_s:.1f}",
                             f"{r['wall_s'] / 3600:.2f}" if round_s > 600 else f"{r['wall_s']:.0f}",
                             f"{r['busy_share']:.1%}", f"{r['startup_share']:.1%}", f"{r['idle']:.1%}", r["resizes"]])
    print(format_table(["sweep", "trials", "rounds per trial", "round s (1 worker)", "group start s",
                           "wall (s, or h for paper)", "busy", "starting/restoring", "idle", "resizes"], replayed))
    (out / "elastic_sweep.json").write_text(json.dumps({"runs": runs, "replay": replayed}, indent=1, default=str))
    print(f"\npicture of both sweeps' worker groups: {draw(runs, out / 'elastic_sweep.png')}")
    return status


if __name__ == "__main__":
    sys.exit(main())
