"""Extending a run with a warmup-stable-decay schedule against training the longer run from
scratch: final validation and the optimizer steps each way costs.

A researcher trained for N steps and now wants 2N. With the paper's linear schedule the rate has
decayed along the whole run, so the only faithful 2N run starts over (N + 2N steps in all). With
``outer.schedule=wsd`` the run keeps its state at the start of its cooldown and
``train --resume RUN --extend-to 2N`` continues from there (N + (2N - cooldown start) steps). For
each seed in ``--seeds`` this runs, without Ray (resources.num_workers=0):

    wsd N -> 2N     a wsd run of N steps, then extended to 2N
    wsd 2N          a wsd run planned for 2N steps from the start
    linear 2N       the paper's schedule, 2N steps
    cosine 2N       cosine decay, 2N steps

and reports each one's final and best validation (answer loss, label accuracy), its test label
accuracy (best checkpoint), the steps computed to get there, and whether the extended run ended
on exactly the weights of the run planned for 2N.

Examples::

    python bench/wsd_extend.py                              # embedded preset, N = 96, seeds 0 1 2
    python bench/wsd_extend.py --steps 48 --seeds 0 data.num_train=512

Outputs under ``--out`` (default runs/bench-wsd): the runs and ``wsd_extend.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import argument_parser, format_table, print_header  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every run")
    p.add_argument("--preset", default="embedded", help="preset name or YAML path. Default: embedded")
    p.add_argument("--steps", type=int, default=96, help="N, the first run's optimizer steps. Default: 96")
    p.add_argument("--cooldown", type=float, default=0.2, help="outer.cooldown_fraction. Default: 0.2")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each repetition")
    p.add_argument("--out", default="runs/bench-wsd", help="output directory. Default: runs/bench-wsd")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2")
    return args


def train(args: argparse.Namespace, name: str, seed: int, extra: list[str], resume: Optional[Path] = None,
          extend_to: Optional[int] = None) -> dict[str, Any]:
    from reckoning_ray.train import main as train_main

    root = Path(args.out).expanduser().resolve() / f"s{seed}"
    started = time.perf_counter()
    if resume is None:
        argv = [args.preset, "resources.num_workers=0", "tracking.mode=disabled", "train.patience=0",
                "train.epochs=1000", f"train.seed={seed}", f"train.output_dir={root}", f"train.run_name={name}",
                *args.overrides, *extra]
    else:
        argv = ["--resume", str(resume), "--extend-to", str(extend_to)]
    code = train_main(argv)
    if code != 0:
        raise SystemExit(f"training {name} (seed {seed}) exited with {code}")
    return {"dir": root / name, "wall": time.perf_counter() - started}


def outcome(run_dir: Path, steps_computed: int, wall: float) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    final = rows[-1]
    return {"final_loss": final["val/answer_loss"], "final_acc": final["val/label_accuracy"],
            "best_loss": min(r["val/answer_loss"] for r in rows), "best_acc": max(r["val/label_accuracy"] for r in rows),
            "test_acc": summary["test"]["test/label_accuracy"], "steps": int(final["step"]),
            "steps_computed": steps_computed, "wall_s": wall}


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    from reckoning_ray.core.checkpoint import checkpoint_path

    wa = load_file(str(checkpoint_path(a, "latest") / "model.safetensors"))
    wb = load_file(str(checkpoint_path(b, "latest") / "model.safetensors"))
    return all(torch.equal(wa[k], wb[k]) for k in wb)


def one_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from reckoning_ray.core.checkpoint import read_record

    n, n2 = args.steps, 2 * args.steps
    shutil.rmtree(Path(args.out).expanduser().resolve() / f"s{seed}", ignore_errors=True)
    wsd = ["outer.schedule=wsd", f"outer.cooldown_fraction={args.cooldown}"]
    short = train(args, "wsd-short", seed, wsd + [f"train.max_steps={n}"])
    stable = int(read_record(short["dir"])["stable_step"])
    extended = train(args, "wsd-short", seed, [], resume=short["dir"], extend_to=n2)
    long = train(args, "wsd-long", seed, wsd + [f"train.max_steps={n2}"])
    linear = train(args, "linear-long", seed, ["outer.schedule=linear", f"train.max_steps={n2}"])
    cosine = train(args, "cosine-long", seed, ["outer.schedule=cosine", f"train.max_steps={n2}"])
    short_dir = short["dir"]
    out = {"seed": seed, "stable_step": stable, "runs": {
        f"wsd {n} -> {n2}": outcome(short_dir, n + (n2 - stable), short["wall"] + extended["wall"]),
        f"wsd {n2}": outcome(long["dir"], n2, long["wall"]),
        f"linear {n2}": outcome(linear["dir"], n2, linear["wall"]),
        f"cosine {n2}": outcome(cosine["dir"], n2, cosine["wall"]),
    }}
    out["extended_equals_planned"] = same_weights(short_dir, long["dir"])
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    print_header("WSD: a run extended from its cooldown start vs longer runs trained from scratch")
    results = [one_seed(args, seed) for seed in args.seeds]
    rows = []
    for r in results:
        for name, x in r["runs"].items():
            rows.append([r["seed"], name, x["steps_computed"], f"{x['wall_s']:.0f}", f"{x['final_loss']:.4f}",
                         f"{x['best_loss']:.4f}", f"{x['final_acc']:.3f}", f"{x['best_acc']:.3f}", f"{x['test_acc']:.3f}"])
    print(f"\n## N = {args.steps}, cooldown fraction {args.cooldown}; steps computed to reach 2N "
          f"(a fresh 2N run after the N run costs N + 2N = {3 * args.steps})")
    print(format_table(["seed", "run", "steps computed", "wall s", "final val loss", "best val loss",
                        "final val acc", "best val acc", "test acc (best ckpt)"], rows))
    for r in results:
        print(f"seed {r['seed']}: the extended run ends on the weights of the run planned for {2 * args.steps} "
              f"steps: {'yes, bit for bit' if r['extended_equals_planned'] else 'NO'} (cooldown of the first run "
              f"started at step {r['stable_step']})")
    names = list(results[0]["runs"])
    for name in names:
        losses = [r["runs"][name]["final_loss"] for r in results]
        accs = [r["runs"][name]["test_acc"] for r in results]
        print(f"{name}: mean final val loss {sum(losses) / len(losses):.4f}, mean test acc {sum(accs) / len(accs):.3f}")
    root = Path(args.out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "wsd_extend.json").write_text(json.dumps({"steps": args.steps, "results": results}, indent=2))
    print(f"\nruns under {root}; numbers in {root / 'wsd_extend.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
