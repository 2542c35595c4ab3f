"""Tasks per second and peak memory of one RECKONING outer step: the project's two engines against
`higher` and TorchOpt.

One outer step = for every task of the batch, ``inner_steps`` differentiable optimizer steps on the
task's knowledge (learned per-tensor rates), the answer loss with the fast weights, and the backward
pass into the initial weights and the learned rates. Implementations compared:

    fused      reckoning_ray.core.bilevel.ReckoningMethod, inner.engine=fused (the default): fused optimizer
               nodes, all tasks in one vmapped pass
    reference  reckoning_ray.core.bilevel.ReckoningMethod, inner.engine=reference: the plain functional
               inner loop, task by task, op by op (reckoning_ray/bilevel/reference.py)
    higher     higher 0.2.1, innerloop_ctx per task (bench/references.py)
    torchopt   TorchOpt 0.7.3 functional optimizers + torch.func.functional_call, per task

Before timing anything, every implementation's meta-gradient (on the weights and on the learned
rates) is compared in float64 with the reference engine's, for every inner optimizer / order / number
of inner steps that will be timed. If any differs by more than ``--tolerance`` (relative L2 per
tensor), the benchmark prints the errors and exits with status 2 without printing a ratio.

Timing runs all implementations of one configuration in this process, interleaved round by round
(so a change in machine load hits all of them alike); the reported time is the median round. On
the CPU with one torch thread (the default) the clock is this process's CPU time, which equals wall
time on an idle core and leaves out the time other processes take on a shared machine; otherwise
wall time. Peak memory runs each (configuration, implementation) in a fresh subprocess (torch's
allocations are invisible to tracemalloc): on CPU the peak resident set size during one outer step
minus the resident size just before it (VmHWM of /proc/self/status, glibc told to give every block
of 64 KiB or more back at once, so the peak follows the live tensors); on GPU
``torch.cuda.max_memory_allocated``.

Examples::

    python bench/bilevel_step.py                                   # defaults: a few minutes on 2 cores
    python bench/bilevel_step.py --models tiny --batch 8,32 --inner-steps 4 --orders second
    python bench/bilevel_step.py --models small --big-batch 1,2,8 --big-inner-steps 1,4,5,8
    python bench/bilevel_step.py --models gpt2 --device cuda --big-batch 1,2,8 --big-inner-steps 4
    python bench/bilevel_step.py --check-only                      # the gradient agreement only
    python bench/bilevel_step.py --profile fused --models tiny --batch 8 --inner-steps 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    argument_parser,
    comma_list,
    positive_ints,
    MODEL_SHAPES,
    build_setup,
    current_rss_bytes,
    encode,
    fmt_mib,
    format_table,
    peak_rss_bytes,
    print_header,
    reckoning_method,
    synthetic_records,
)

IMPLS = ("fused", "reference", "higher", "torchopt")
ENGINE_IMPLS = ("fused", "reference")  # inner.engine
REFERENCE = "reference"  # what every meta-gradient is checked against
ORDERS = ("second", "first")
OPTIMIZERS = ("adamw", "sgd")
# Inner learning rates: timing uses the presets' values (paper AdamW 3e-5, embedded SGD 0.1); the
# gradient check uses larger AdamW rates so that the inner steps move the weights visibly.
TIMING_LR = {"adamw": 3e-5, "sgd": 0.1}
CHECK_LR = {"adamw": 1e-3, "sgd": 0.1}
EXIT_DISAGREE = 2


class Disagreement(RuntimeError):
    """Two implementations computed different meta-gradients."""


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    model: str
    order: str
    optimizer: str
    inner_steps: int
    tasks: int

    def overrides(self, lr: float) -> list[str]:
        return [
            f"inner.optimizer={self.optimizer}", f"inner.steps={self.inner_steps}",
            f"inner.first_order={'true' if self.order == 'first' else 'false'}", f"inner.lr_init={lr}",
        ]


# ------------------------------------------------------------------------------------------------
# Building implementations
# ------------------------------------------------------------------------------------------------


def make_impl(name: str, setup: Any, lrs: torch.Tensor) -> Any:
    """An object with ``forward_backward(batch)`` and ``meta_parameters()`` (weights, then the
    learned rates ``[steps, tensors]``), its learned rates set to ``lrs``."""
    if name in ENGINE_IMPLS:
        method = reckoning_method(setup, engine=name)
        if tuple(lrs.shape) != tuple(method.inner_lrs.shape):  # inner.params adapts other tensors (LoRA)
            lrs = seeded_lrs(float(lrs.mean()), method.inner_lrs.shape, method.inner_lrs.dtype)
        with torch.no_grad():
            method.inner_lrs.copy_(lrs)
        return method
    from references import REFERENCES

    return REFERENCES[name](setup.model, setup.cfg, lrs)


def initial_lrs(setup: Any, lr: float, seed: int = 0) -> torch.Tensor:
    """Learned rates ``[steps, tensors]``: ``lr`` times a seeded factor in [0.5, 1.5) per entry, so
    that a rate applied to the wrong tensor or step changes the gradient."""
    n_tensors = sum(1 for p in setup.model.parameters() if p.requires_grad)
    return seeded_lrs(lr, (int(setup.cfg.inner.steps), n_tensors), next(setup.model.parameters()).dtype, seed)


def seeded_lrs(lr: float, shape: Sequence[int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """:func:`initial_lrs` of any shape (the tensors LoRA adapts are not the model's)."""
    g = torch.Generator().manual_seed(seed)
    return (lr * (0.5 + torch.rand(*shape, generator=g, dtype=torch.float64))).to(dtype)


def reset_attention(setup: Any) -> None:
    """Back to the model's default attention path; second order and the fused engine switch it to eager."""
    setup.model.set_attn_implementation("sdpa")


def zero_grad(impl: Any) -> None:
    for p in impl.meta_parameters():
        p.grad = None


# ------------------------------------------------------------------------------------------------
# Gradient agreement
# ------------------------------------------------------------------------------------------------


def check_records(seed: int = 0) -> list[dict[str, Any]]:
    """Two tasks with different numbers of facts, so padded knowledge rows are exercised."""
    records = synthetic_records(2, 5, seed=seed, prefix="check")
    records[1]["knowledge"] = records[1]["knowledge"][:3]
    records[1]["facts"] = [f for f in records[1]["facts"] if f in records[1]["knowledge"]]
    if records[1]["answer"] == "yes" and not records[1]["facts"]:
        records[1]["facts"] = [records[1]["knowledge"][0]]
        records[1]["question"] = records[1]["knowledge"][0][:-2] + "."
    records[1]["distractors"] = [f for f in records[1]["knowledge"] if f not in records[1]["facts"]]
    return records


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (absolute when ``b`` is zero); inf when ``a`` is not finite."""
    if not bool(torch.isfinite(a).all()):
        return math.inf
    scale = float(b.norm())
    diff = float((a - b).norm())
    return diff / scale if scale > 0 else diff


def meta_gradients(impl: Any, batch: Any) -> list[torch.Tensor]:
    zero_grad(impl)
    impl.forward_backward(batch)
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in impl.meta_parameters()]


def check_gradients(
    optimizer: str,
    order: str,
    inner_steps: int,
    impls: Sequence[str],
    tolerance: float,
    factories: Optional[dict[str, Callable[[Any, torch.Tensor], Any]]] = None,
) -> list[list[Any]]:
    """Meta-gradients of ``impls`` against the reference engine, tiny model, float64, two tasks.

    Returns table rows ``[optimizer, order, steps, impl, weight error, lr error]``; raises
    :class:`Disagreement` (after filling the rows) when an error exceeds ``tolerance``.
    ``factories`` replaces how an implementation is built (name -> f(setup, lrs)), for tests.
    """
    factories = factories or {}
    previous = torch.get_default_dtype()
    # TorchOpt computes Adam's bias correction as pow(beta, step tensor) in the DEFAULT dtype:
    # with float32 there, its float64 meta-gradient is off by ~2e-5 relative. The check is a float64
    # check, so the default dtype is float64 while it runs.
    torch.set_default_dtype(torch.float64)
    try:
        return _check_gradients(optimizer, order, inner_steps, impls, tolerance, factories)
    finally:
        torch.set_default_dtype(previous)


def _check_gradients(
    optimizer: str, order: str, inner_steps: int, impls: Sequence[str], tolerance: float,
    factories: dict[str, Callable[[Any, torch.Tensor], Any]],
) -> list[list[Any]]:
    records = check_records()
    case = Case("tiny", order, optimizer, inner_steps, len(records))
    setup = build_setup("tiny", records, case.overrides(CHECK_LR[optimizer]), dtype="float64", max_length=64)
    batch = encode(setup, records)
    lrs = initial_lrs(setup, CHECK_LR[optimizer])
    reset_attention(setup)

    def build(name: str) -> Any:
        return factories[name](setup, lrs) if name in factories else make_impl(name, setup, lrs)

    # Build every implementation first: second order and the fused engine switch the model to
    # eager attention, and all of them must then run the same attention path.
    built = {name: build(name) for name in dict.fromkeys([REFERENCE, *impls])}
    reference = meta_gradients(built[REFERENCE], batch)
    rows, failed = [], []
    for name in impls:
        if name == REFERENCE:
            continue
        grads = meta_gradients(built[name], batch)
        weight_err = max(relative_error(g, r) for g, r in zip(grads[:-1], reference[:-1]))
        lr_err = relative_error(grads[-1], reference[-1])
        rows.append([optimizer, order, inner_steps, name, f"{weight_err:.1e}", f"{lr_err:.1e}"])
        if not (weight_err <= tolerance and lr_err <= tolerance):
            failed.append(f"{name} ({optimizer}, {order} order, {inner_steps} inner steps): weights "
                          f"{weight_err:.2e}, learned rates {lr_err:.2e}")
    if not all(torch.isfinite(g).all() for g in reference):
        failed.append(f"reference engine ({optimizer}, {order} order): non-finite meta-gradient")
    if failed:
        raise Disagreement("; ".join(failed), rows)
    return rows


def run_checks(args: argparse.Namespace, factories: Optional[dict] = None) -> None:
    """Every (optimizer, order, inner steps) to be timed; exits with EXIT_DISAGREE on failure."""
    rows: list[list[Any]] = []
    started = time.perf_counter()
    try:
        # The math does not depend on the model's size: the check runs the tiny model with every
        # number of inner steps that any timed configuration uses.
        all_steps = sorted({c.inner_steps for c in cases(args)})
        for optimizer, order, steps in itertools.product(args.optimizers, args.orders, all_steps):
            rows += check_gradients(optimizer, order, steps, args.impls, args.tolerance, factories)
    except Disagreement as exc:
        message, partial = exc.args
        print(format_table(["optimizer", "order", "steps", "impl", "weights rel. err", "lrs rel. err"],
                           rows + partial))
        print(f"\nREFUSED: meta-gradients disagree with the reference engine beyond {args.tolerance:g} "
              f"(relative L2 per tensor, float64): {message}. No timing is printed: a speed ratio "
              "between implementations that compute different things means nothing.", file=sys.stderr)
        raise SystemExit(EXIT_DISAGREE)
    print(f"## gradient agreement (float64, tiny model, 2 tasks, against the reference engine; "
          f"tolerance {args.tolerance:g}; {time.perf_counter() - started:.1f} s)")
    print(format_table(["optimizer", "order", "steps", "impl", "weights rel. err", "lrs rel. err"], rows))
    print(flush=True)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prepare(case: Case, args: argparse.Namespace, impls: Sequence[str]) -> tuple[Any, Any, dict[str, Any]]:
    records = synthetic_records(case.tasks, args.facts, seed=args.seed)
    setup = build_setup(case.model, records, case.overrides(TIMING_LR[case.optimizer]), dtype=args.dtype,
                        max_length=args.max_length)
    setup.model.to(args.device)
    batch = encode(setup, records).to(args.device)
    lrs = initial_lrs(setup, TIMING_LR[case.optimizer]).to(args.device)
    reset_attention(setup)
    built = {name: make_impl(name, setup, lrs) for name in impls}
    return setup, batch, built


def clock(args: argparse.Namespace) -> tuple[Callable[[], float], str]:
    """The timer and its name: this process's CPU time when torch runs one thread on the CPU (it
    equals wall time on an idle core and does not count the time other processes on a shared machine
    take), wall time otherwise."""
    if not args.device.startswith("cuda") and torch.get_num_threads() == 1:
        return time.process_time, "process CPU time, 1 thread"
    return time.perf_counter, f"wall time, {torch.get_num_threads()} threads"


def time_case(case: Case, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per outer step of each implementation, measured round-robin."""
    setup, batch, built = prepare(case, args, args.impls)
    timer, _ = clock(args)

    def one_step(name: str) -> float:
        zero_grad(built[name])
        synchronize(args.device)
        start = timer()
        built[name].forward_backward(batch)
        synchronize(args.device)
        return timer() - start

    # Warm-up round (lazy initialisation, allocator growth), then choose how many steps make one
    # timed sample: at least --min-time seconds, so millisecond steps are not timer noise.
    warm = {name: one_step(name) for name in args.impls}
    inner = {name: max(1, math.ceil(args.min_time / max(warm[name], 1e-6))) for name in args.impls}
    samples: dict[str, list[float]] = {name: [] for name in args.impls}
    for _ in range(args.repeats):
        for name in args.impls:
            samples[name].append(sum(one_step(name) for _ in range(inner[name])) / inner[name])
    return {name: statistics.median(values) for name, values in samples.items()}


# ------------------------------------------------------------------------------------------------
# Memory (fresh subprocess per configuration and implementation)
# ------------------------------------------------------------------------------------------------


def memory_worker(spec: dict[str, Any]) -> dict[str, float]:
    """Run in a fresh process: build one implementation, run one outer step, report peak memory."""
    args = argparse.Namespace(**spec["args"])
    case = Case(**spec["case"])
    setup, batch, built = prepare(case, args, [spec["impl"]])
    impl = built[spec["impl"]]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss_bytes()
    zero_grad(impl)
    impl.forward_backward(batch)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    return {"step_peak": float(peak - before), "peak": float(peak)}


def measure_memory(case: Case, impl: str, args: argparse.Namespace) -> Optional[dict[str, float]]:
    spec = {"case": asdict(case), "impl": impl, "args": vars(args)}
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-worker", json.dumps(spec)],
        capture_output=True, text=True,
        # A fixed glibc mmap threshold: every tensor of 64 KiB or more gets its own mapping, returned
        # to the system when freed, so the resident peak follows the live tensors instead of
        # whatever the heap kept from earlier allocations (run-to-run spread ~30% without it).
        env={**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    print(f"memory worker failed for {case} {impl} (exit {proc.returncode}):\n{proc.stderr[-2000:]}",
          file=sys.stderr)
    return None


# ------------------------------------------------------------------------------------------------
# Profile
# ------------------------------------------------------------------------------------------------


def matmul_rate(args: argparse.Namespace, n: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of one large matrix product on ``args.device``: the ceiling of the matmul work."""
    timer, _ = clock(args)
    dtype = getattr(torch, args.dtype)
    a, b = (torch.randn(n, n, dtype=dtype, device=args.device) for _ in range(2))
    a @ b
    synchronize(args.device)
    start = timer()
    for _ in range(repeats):
        a @ b
    synchronize(args.device)
    return 2 * n**3 * repeats / (timer() - start) / 1e9


def count_flops(case: Case, args: argparse.Namespace) -> dict[str, float]:
    """Matrix-multiplication FLOPs of one outer step of each implementation
    (``torch.utils.flop_counter``: mm, addmm, bmm and the attention products, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, batch, built = prepare(case, args, args.impls)
    flops = {}
    for name in args.impls:
        zero_grad(built[name])
        with FlopCounterMode(display=False) as counter:
            built[name].forward_backward(batch)
        flops[name] = float(counter.get_total_flops())
    return flops


def profile(case: Case, impl: str, args: argparse.Namespace) -> None:
    """torch.profiler table (top ops by self CPU time) of ``--repeats`` outer steps of ``impl``."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    setup, batch, built = prepare(case, args, [impl])
    method = built[impl]
    zero_grad(method)
    method.forward_backward(batch)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(args.repeats):
            zero_grad(method)
            method.forward_backward(batch)
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(f"## profile: {impl}, {case}")
    print(prof.key_averages().table(sort_by=key, row_limit=25))


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--models", type=comma_list(str, list(MODEL_SHAPES)), default=["tiny", "small"],
                   help="model shapes: tiny (1 x 64, the embedded preset), small (6 x 384), gpt2 "
                        "(12 x 768, vocabulary 50,257). Default: tiny,small")
    p.add_argument("--orders", type=comma_list(str, ORDERS), default=["second", "first"],
                   help="second and/or first (inner gradients held constant). Default: second,first")
    p.add_argument("--optimizers", type=comma_list(str, OPTIMIZERS), default=["adamw"],
                   help="inner optimizer(s): adamw (the paper's) and/or sgd. Default: adamw")
    p.add_argument("--inner-steps", type=positive_ints, default=[1, 4],
                   help="inner steps per task, e.g. 1,4,5,8. Default: 1,4")
    p.add_argument("--batch", type=positive_ints, default=[1, 8],
                   help="tasks per outer step, e.g. 1,2,8,32. Default: 1,8")
    p.add_argument("--impls", type=comma_list(str, IMPLS), default=list(IMPLS),
                   help=f"implementations to compare (subset of {','.join(IMPLS)}). Default: all")
    p.add_argument("--big-batch", type=positive_ints, default=[1, 2],
                   help="tasks per outer step for the models other than tiny: a second-order AdamW "
                        "inner step keeps ~14 copies of the weights per task alive (a 6 x 384 model: "
                        "~600 MB per task per step). Default: 1,2")
    p.add_argument("--big-inner-steps", type=positive_ints, default=[1],
                   help="inner steps for the models other than tiny. Default: 1")
    p.add_argument("--facts", type=int, default=8, help="knowledge sentences per task. Default: 8")
    p.add_argument("--max-length", type=int, default=64, help="model.max_length (tokens). Default: 64")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="timing dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda. Default: cuda when available")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per configuration (median). Default: 5")
    p.add_argument("--min-time", type=float, default=0.2,
                   help="seconds of outer steps per timed sample (fast steps are repeated). Default: 0.2")
    p.add_argument("--tolerance", type=float, default=1e-6,
                   help="largest relative L2 error of a meta-gradient tensor. Default: 1e-6")
    p.add_argument("--memory", choices=["largest", "all", "none"], default="largest",
                   help="peak memory (a fresh subprocess per cell, ~10 s each here) for: the largest batch "
                        "of each model / order / inner steps (default), every configuration, or none")
    p.add_argument("--memory-jobs", type=int, default=2,
                   help="peak-memory subprocesses run at once on CPU (after all timing). Default: 2")
    p.add_argument("--check-only", action="store_true", help="run the gradient agreement check and stop")
    p.add_argument("--flops", action="store_true",
                   help="also count each implementation's matrix-multiplication FLOPs per outer step and "
                        "print GFLOP per task and the GFLOP/s the timed step reached")
    p.add_argument("--profile", choices=IMPLS, default=None,
                   help="print a torch.profiler table of this implementation for the first configuration")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 0 keeps torch's choice. Default: 1 (with OpenMP threads on "
                        "every core, any other process on the machine makes timings jump 10-100x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.facts < 1:
        p.error("--facts must be >= 1")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def cases(args: argparse.Namespace) -> list[Case]:
    out = []
    for model in args.models:
        batches = args.batch if model == "tiny" else args.big_batch
        inner_steps = args.inner_steps if model == "tiny" else args.big_inner_steps
        for optimizer, order, steps, tasks in itertools.product(args.optimizers, args.orders, inner_steps, batches):
            out.append(Case(model, order, optimizer, steps, tasks))
    return out


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def main(argv: Optional[Sequence[str]] = None, factories: Optional[dict] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker is not None:
        spec = json.loads(args.memory_worker)
        if spec["args"].get("threads"):
            torch.set_num_threads(spec["args"]["threads"])
        print("MEMORY " + json.dumps(memory_worker(spec)), flush=True)
        return 0

    print_header("RECKONING outer step: the project's engines (fused, reference) vs higher vs TorchOpt")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    run_checks(args, factories)
    if args.check_only:
        return 0
    all_cases = cases(args)
    if args.profile:
        profile(all_cases[0], args.profile, args)
        return 0

    print(f"## speed: tasks per second of one outer step (median of {args.repeats} interleaved rounds, "
          f"{args.facts} facts per task, {args.dtype}, {args.device}, {clock(args)[1]})", flush=True)
    speed_rows, results = [], {}
    for case in all_cases:
        seconds = time_case(case, args)
        results[case] = seconds
        tps = {name: case.tasks / s for name, s in seconds.items()}
        row = [case.model, case.order, case.optimizer, case.inner_steps, case.tasks]
        row += [f"{tps[name]:,.1f}" if tps[name] >= 10 else f"{tps[name]:.2f}" for name in args.impls]
        for mine in [n for n in ENGINE_IMPLS if n in args.impls]:
            for ref in [n for n in ("higher", "torchopt") if n in args.impls]:
                row.append(ratio(tps[mine], tps[ref]))
        speed_rows.append(row)
        print(f"  {case}: " + ", ".join(f"{n} {s * 1e3:.1f} ms" for n, s in seconds.items()), flush=True)
    header = ["model", "order", "inner opt", "steps", "tasks"] + [f"{n} tasks/s" for n in args.impls]
    header += [f"{m}/{r}" for m in ENGINE_IMPLS if m in args.impls for r in ("higher", "torchopt") if r in args.impls]
    print()
    print(format_table(header, speed_rows))
    goal = [c for c in all_cases if c.model == "tiny" and c.order == "second" and c.tasks >= 8]
    if {"fused", "higher"} <= set(args.impls):
        for case in goal:
            speedup = results[case]["higher"] / results[case]["fused"]
            print(f"goal: fused engine >= 3x the tasks/s of higher (tiny model, second order, batch >= 8): "
                  f"{case.optimizer}, {case.inner_steps} inner steps, batch {case.tasks}: {speedup:.2f}x "
                  f"{'met' if speedup >= 3 else 'NOT met'}")
    print(flush=True)
    if args.flops:
        print("## matrix-multiplication work of one outer step (torch.utils.flop_counter) and the rate "
              "each timed step reached", flush=True)
        flop_rows = []
        for case in all_cases:
            flops = count_flops(case, args)
            row = [case.model, case.order, case.optimizer, case.inner_steps, case.tasks]
            row += [f"{flops[name] / case.tasks / 1e9:.3f}" for name in args.impls]
            row += [f"{flops[name] / results[case][name] / 1e9:.1f}" for name in args.impls]
            flop_rows.append(row)
        print(format_table(["model", "order", "inner opt", "steps", "tasks"]
                           + [f"{n} GFLOP/task" for n in args.impls] + [f"{n} GFLOP/s" for n in args.impls],
                           flop_rows))
        print(f"this {args.device}'s own rate on one large product (1024 x 1024 x 1024, {args.dtype}): "
              f"{matmul_rate(args):.1f} GFLOP/s", flush=True)
        print(flush=True)

    if args.memory != "none":
        unit = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
        print(f"## memory: MiB above the process's size before the outer step ({unit}, fresh "
              "process per cell; in brackets the process's whole peak)", flush=True)
        memory_cases = all_cases
        if args.memory == "largest":
            largest: dict[tuple, Case] = {}
            for case in all_cases:
                key = (case.model, case.order, case.optimizer, case.inner_steps)
                if key not in largest or case.tasks > largest[key].tasks:
                    largest[key] = case
            memory_cases = list(largest.values())
        jobs = [(case, name) for case in memory_cases for name in args.impls]
        # Peak RSS is per process, so workers may run side by side without touching each other's
        # figure; on a GPU they would compete for its memory, so they run one at a time there.
        workers = 1 if args.device.startswith("cuda") else args.memory_jobs
        with ThreadPoolExecutor(max_workers=workers) as pool:
            measured = dict(zip(jobs, pool.map(lambda job: measure_memory(job[0], job[1], args), jobs)))
        mem_rows = []
        for case in memory_cases:
            row = [case.model, case.order, case.optimizer, case.inner_steps, case.tasks]
            for name in args.impls:
                m = measured[(case, name)]
                row.append("failed" if m is None else f"{fmt_mib(m['step_peak'])} ({fmt_mib(m['peak'])})")
            mem_rows.append(row)
        print(format_table(["model", "order", "inner opt", "steps", "tasks"] + [f"{n} MiB" for n in args.impls],
                           mem_rows))
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
