"""Data-parallel scaling of training: seconds per epoch with 1, 2, ... Ray Train workers, and the
share of the training time spent in the all-reduce of the meta-gradients.

Each worker count runs ``reckoning_ray.train.run`` (the real entry point: TorchTrainer, gloo, the
framework-free loop) for ``--epochs`` epochs of the given preset. A Ray ``worker_process_setup_hook``
wraps three functions in every worker process and records how long each call took:

    reckoning_ray.core.loop.Loop._train_step      one optimizer step (micro-batches, all-reduce, update)
    reckoning_ray.core.loop.Loop._validate        one validation round
    reckoning_ray.core.loop.allreduce_gradients   the SUM all-reduce of the weights' and the learned
                                             rates' gradients (inside _train_step), after a
                                             barrier: the time spent waiting at the barrier for
                                             the slower worker is reported apart from the
                                             all-reduce itself

The global batch stays the preset's (``train.batch_size`` is global): with n workers each takes
``train.batch_size / n`` tasks of every micro-batch, so every worker count runs the same optimizer steps on the same tasks and must train the same
model (the gradients are SUM-all-reduced). Before printing any speed-up the script checks that:
every validation round's ``val/answer_loss`` and ``train/loss`` must agree with the one-worker
run's within ``--tolerance`` (relative), else it prints the differences and exits with status 2.
The table gives the slowest worker's sums (the step ends when the slowest worker reaches the
all-reduce).

Examples::

    python bench/scaling.py                                     # embedded preset, 1 and 2 workers
    python bench/scaling.py --workers 1,2 --epochs 2 data.num_train=2048
    python bench/scaling.py --preset paper --workers 1,8 resources.use_gpu=true data.path=...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

EXIT_DISAGREE = 2  # the worker counts trained different models

from common import argument_parser, format_table, print_header  # noqa: E402

TIMINGS_ENV = "RECKONING_BENCH_TIMINGS"


def install_timers() -> None:
    """Ray worker setup hook: time the loop's train step, validation and gradient all-reduce.

    Appends ``{"kind", "seconds"}`` lines to ``$RECKONING_BENCH_TIMINGS/<pid>.jsonl``. Runs in every
    Ray worker process; processes that never train write nothing.
    """
    import functools
    import json
    import os
    import time
    from pathlib import Path

    out_dir = os.environ.get("RECKONING_BENCH_TIMINGS")
    if not out_dir:
        return
    import reckoning_ray.core.loop as loop

    path = Path(out_dir) / f"{os.getpid()}.jsonl"

    def record(kind, seconds):
        with path.open("a") as f:
            f.write(json.dumps({"kind": kind, "seconds": seconds}) + "\n")

    def timed(kind, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                record(kind, time.perf_counter() - start)
        return wrapper

    def timed_allreduce(fn):
        # A barrier first, so that the time a worker waits for a slower one ("wait") is not
        # counted as communication ("allreduce").
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            import torch.distributed as dist

            start = time.perf_counter()
            if dist.is_initialized():
                dist.barrier()
            arrived = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                record("wait", arrived - start)
                record("allreduce", time.perf_counter() - arrived)
        return wrapper

    loop.allreduce_gradients = timed_allreduce(loop.allreduce_gradients)
    loop.Loop._train_step = timed("train_step", loop.Loop._train_step)
    loop.Loop._validate = timed("validate", loop.Loop._validate)


def read_timings(directory: Path) -> list[dict[str, Any]]:
    """Per worker process: call counts and summed seconds of each timed function."""
    workers = []
    for path in sorted(directory.glob("*.jsonl")):
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for line in path.read_text().splitlines():
            record = json.loads(line)
            sums[record["kind"]] += record["seconds"]
            counts[record["kind"]] += 1
        if counts.get("train_step"):
            workers.append({"sums": dict(sums), "counts": dict(counts)})
    return workers


def require_agreement(histories: dict[int, list[dict[str, Any]]], tolerance: float) -> None:
    """Every worker count's validation rounds must match the first count's (same steps, same
    ``val/answer_loss`` and ``train/loss`` within ``tolerance`` relative); exits with status 2
    otherwise, before any speed-up is printed."""
    first = min(histories)
    problems = []
    for n, rows in histories.items():
        ref = histories[first]
        if [r["step"] for r in rows] != [r["step"] for r in ref]:
            problems.append(f"{n} workers validated at steps {[r['step'] for r in rows]}, "
                            f"{first} worker(s) at {[r['step'] for r in ref]}")
            continue
        for a, b in zip(rows, ref):
            for key in ("val/answer_loss", "train/loss"):
                if abs(a[key] - b[key]) > tolerance * max(abs(b[key]), 1e-12):
                    problems.append(f"step {a['step']}: {key} {a[key]:.8g} with {n} workers, {b[key]:.8g} "
                                    f"with {first}")
    if problems:
        print("\nREFUSED: the worker counts did not train the same model (relative tolerance "
              f"{tolerance:g}):\n  " + "\n  ".join(problems) + "\nNo speed-up is printed.", file=sys.stderr)
        raise SystemExit(EXIT_DISAGREE)
    worst = max((abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for n, rows in histories.items()
                 for a, b in zip(rows, histories[first]) for k in ("val/answer_loss", "train/loss")), default=0.0)
    print(f"\nagreement: every worker count trained the same model (largest relative difference of "
          f"val/answer_loss and train/loss over {len(histories[first])} validations: {worst:.1e})")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every run")
    p.add_argument("--preset", default="embedded", help="preset name or YAML path. Default: embedded")
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated. Default: 1,2")
    p.add_argument("--epochs", type=int, default=1, help="epochs per run. Default: 1")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest relative difference of a validation metric between worker counts. Default: 1e-4")
    p.add_argument("--output-dir", default=None, help="where the runs are written (default: a temporary directory)")
    args = p.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        p.error(f"--workers {args.workers!r}: expected comma-separated integers")
    if not args.workers or any(w < 1 for w in args.workers):
        p.error("--workers: every count must be >= 1")
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"override {bad[0]!r} is not key=value")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import ray

    from reckoning_ray.core.config import load_config
    from reckoning_ray.train import run

    print_header("Data-parallel scaling: Ray Train workers, seconds per epoch, all-reduce share")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("each worker runs resources.cpus_per_worker torch threads; times are wall clock inside the workers")
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="reckoning-scaling-")).resolve()
    timings_root = root / "timings"
    rows, summaries = [], {}
    base: Optional[float] = None
    global_batch = int(load_config(args.preset, list(args.overrides)).train.batch_size)
    uneven = [n for n in args.workers if global_batch % n]
    if uneven:
        raise SystemExit(f"train.batch_size={global_batch} does not split evenly over {uneven} workers: "
                         "choose worker counts that divide it (or set train.batch_size=...)")
    histories: dict[int, list[dict[str, Any]]] = {}
    for n in args.workers:
        out = timings_root / f"workers-{n}"
        out.mkdir(parents=True, exist_ok=True)
        cfg = load_config(args.preset, [
            *args.overrides, f"resources.num_workers={n}",
            f"train.epochs={args.epochs}",
            f"train.output_dir={root / 'runs'}", f"train.run_name=scaling-{n}-workers", "tracking.mode=disabled",
            "train.patience=0",
        ])
        started = time.perf_counter()
        # Ray is started here, before train.run (which joins it), so that every worker process
        # runs the timing hook; a fresh Ray per run gives the hook this run's directory.
        env = {TIMINGS_ENV: str(out), "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
        ray.init(runtime_env={"env_vars": env, "worker_process_setup_hook": install_timers},
                 log_to_driver=True, logging_level="WARNING", configure_logging=True)
        try:
            summary = run(cfg)
        finally:
            ray.shutdown()
        wall = time.perf_counter() - started
        workers = read_timings(out)
        if len(workers) != n:
            print(f"warning: timings from {len(workers)} worker processes, expected {n}", file=sys.stderr)
        if not workers:
            raise SystemExit(f"no timings were recorded for {n} worker(s) under {out}: the Ray worker setup "
                             "hook did not run in the training workers")
        slowest = max(workers, key=lambda w: w["sums"]["train_step"])
        train = slowest["sums"]["train_step"] / args.epochs
        validate = slowest["sums"].get("validate", 0.0) / args.epochs
        allreduce = slowest["sums"].get("allreduce", 0.0) / args.epochs
        # The fastest worker waits longest at the barrier: that is the load imbalance.
        wait = max(w["sums"].get("wait", 0.0) for w in workers) / args.epochs
        steps = slowest["counts"]["train_step"] / args.epochs
        base = base or train
        summaries[n] = summary
        run_dir = root / "runs" / f"scaling-{n}-workers"
        histories[n] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows.append([n, f"{steps:.0f}", f"{train:.1f}", f"{validate:.1f}", f"{allreduce:.2f}",
                     f"{100 * allreduce / train:.1f}%" if train else "-", f"{wait:.2f}",
                     f"{base / train:.2f}x", f"{wall:.0f}"])
        print(f"  {n} worker(s): {train:.1f} s training per epoch ({steps:.0f} steps), all-reduce {allreduce:.2f} s, "
              f"waiting for the slower worker {wait:.2f} s, validation {validate:.1f} s, run {wall:.0f} s", flush=True)
    require_agreement(histories, args.tolerance)
    print("\n## seconds per epoch (slowest worker) and all-reduce share")
    print(format_table(["workers", "steps/epoch", "train s/epoch", "validation s/epoch", "all-reduce s/epoch",
                        "all-reduce share of train", "max wait at barrier s/epoch", "speed-up (train)",
                        "run wall s"], rows))
    print(f"\nruns written under {root / 'runs'}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
