"""Peak memory and time of one RECKONING outer step under each memory option of the fused engine.

Modes (``reckoning_ray.core.bilevel.ReckoningMethod``, fused engine, config keys of the ``inner`` group):

    second-order        the default: every inner step's activations and double-backward graph live
                        until the outer backward
    checkpoint          inner.checkpoint=true: only the inner gradients are kept; the backward
                        pass replays the optimizer from them and recomputes each step
    per-task            inner.tasks_per_pass=1: the tasks of a step one after another
    checkpoint+per-task both
    bf16                inner.autocast=bf16: forward passes in bfloat16
    checkpoint+bf16     both
    first-order         inner.first_order=true: no second-order terms
    higher              the reference library, task by task (bench/references.py)
    lora-r8, lora-r16   inner.params=[lora] on c_attn with rank 8 / 16, outer.params=[inner]: the
                        inner loop adapts the adapters, the base weights are frozen (another
                        parametrization, not the default's gradient); +checkpoint: with
                        inner.checkpoint=true

What must hold before any ratio is printed: the modes that claim the SAME meta-gradient as the
default (checkpoint, tasks per pass, higher) are first compared with the reference engine
(inner.engine=reference) in float64 on the tiny model (relative L2 per tensor <= --tolerance),
and each LoRA mode with the reference engine running the same adapters;
if one differs, the script prints the errors and exits with status 2. bf16 and first-order
compute a different gradient by design: their relative error against the default's float32
meta-gradient of the measured model is printed, and bf16 is marked "within tolerance" only below
--bf16-tolerance.

Each (model, tasks, mode) runs in a fresh subprocess: one warm-up outer step whose peak is the
memory figure (CPU: peak resident size above the size before the step, VmHWM; GPU:
torch.cuda.max_memory_allocated above the allocation before it), then --repeats timed steps
(median; CPU: process CPU time with one thread, GPU: wall time after synchronize; with
--repeats 0 the measured step's own time). Its meta-gradient goes to a temporary file for the
error column. On the CPU each process is capped at --cpu-memory-gib of address space, so a mode
too large for the machine is reported as OOM, as on a GPU, instead of swapping.

Examples::

    python bench/memory_modes.py                                # tiny and small model, CPU, a few minutes
    python bench/memory_modes.py --models small --tasks 1,2 --inner-steps 4
    python bench/memory_modes.py --models gpt2 --device cuda --tasks 1,2,8 --inner-steps 4
    python bench/memory_modes.py --models gpt2 --device cpu --tasks 1,8 --repeats 0 --threads 2 \
        --modes checkpoint+per-task,higher                      # GPT-2 base shape on a CPU, ~30 min
    python bench/memory_modes.py --models gpt2-medium,gpt2-large,gpt2-xl --tasks 1 --repeats 0 \
        --modes checkpoint,lora-r8,lora-r16,lora-r16+checkpoint  # all weights vs LoRA at scale
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bilevel_step  # noqa: E402
from bilevel_step import (  # noqa: E402
    EXIT_DISAGREE,
    Case,
    Disagreement,
    check_gradients,
    initial_lrs,
    make_impl,
    relative_error,
    reset_attention,
    zero_grad,
)
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
    synthetic_records,
)

# name -> (implementation, config overrides, what its meta-gradient is)
#   "same": must equal the default's (checked in float64 before anything is printed)
#   "bf16": bfloat16 forward passes, compared against --bf16-tolerance
#   "other": a different gradient by definition (first order); its distance is reported
LORA_KEYS = ["inner.params=[lora]", "inner.lora.alpha=32", "inner.lora.target_modules=[c_attn]", "outer.params=[inner]"]
MODES: dict[str, tuple[str, list[str], str]] = {
    "second-order": ("fused", [], "same"),
    "checkpoint": ("fused", ["inner.checkpoint=true"], "same"),
    "per-task": ("fused", ["inner.tasks_per_pass=1"], "same"),
    "checkpoint+per-task": ("fused", ["inner.checkpoint=true", "inner.tasks_per_pass=1"], "same"),
    "bf16": ("fused", ["inner.autocast=bf16"], "bf16"),
    "checkpoint+bf16": ("fused", ["inner.checkpoint=true", "inner.autocast=bf16"], "bf16"),
    "first-order": ("fused", ["inner.first_order=true"], "other"),
    "higher": ("higher", [], "same"),
    # the inner loop adapts LoRA adapters on c_attn (inner.params=[lora]); the outer loop trains them
    # and their rates only (outer.params=[inner]): another parametrization, checked against the
    # reference engine with the same adapters
    "lora-r8": ("fused", [*LORA_KEYS, "inner.lora.r=8"], "lora"),
    "lora-r16": ("fused", [*LORA_KEYS, "inner.lora.r=16"], "lora"),
    "lora-r8+checkpoint": ("fused", [*LORA_KEYS, "inner.lora.r=8", "inner.checkpoint=true"], "lora"),
    "lora-r16+checkpoint": ("fused", [*LORA_KEYS, "inner.lora.r=16", "inner.checkpoint=true"], "lora"),
}
REFERENCE = "second-order"
GIB = 2**30


def mode_overrides(mode: str, case: Case) -> list[str]:
    return [*case.overrides(bilevel_step.TIMING_LR[case.optimizer]), *MODES[mode][1]]


# ------------------------------------------------------------------------------------------------
# Gradient agreement (float64, tiny model)
# ------------------------------------------------------------------------------------------------


def mode_factory(mode: str):
    """A ``bilevel_step.check_gradients`` factory building ``mode`` on the check's setup."""
    impl, overrides, _ = MODES[mode]

    def build(setup: Any, lrs: torch.Tensor) -> Any:
        import copy

        from omegaconf import OmegaConf

        from reckoning_ray.core.config import validate

        cfg = copy.deepcopy(setup.cfg)
        for item in overrides:
            key, value = item.split("=", 1)
            OmegaConf.update(cfg, key, _value(value))
        validate(cfg)
        return make_impl(impl, type(setup)(cfg, setup.model, setup.tokenizer), lrs)

    return build


def _value(text: str) -> Any:
    """An override's value as YAML reads it ("true" -> True, "1" -> 1, "bf16" -> "bf16")."""
    import yaml

    return yaml.safe_load(text)


def reference_factory(mode: str):
    """The reference engine with ``mode``'s adapters (what a LoRA mode is checked against)."""
    _, overrides, _ = MODES[mode]
    plain = [o for o in overrides if not o.startswith("inner.checkpoint")]
    MODES["reference+" + mode] = ("reference", plain, "lora")
    return mode_factory("reference+" + mode)


def run_checks(args: argparse.Namespace) -> list[list[Any]]:
    """Float64 check of every "same" mode against the reference engine, and of every LoRA mode
    against the reference engine with the same adapters; exits on disagreement."""
    same = [m for m in args.modes if MODES[m][2] == "same"]
    factories = {m: mode_factory(m) for m in same}
    rows: list[list[Any]] = []
    try:
        for steps in sorted(set(args.inner_steps)):
            rows += check_gradients(args.optimizer, "second", steps, same, args.tolerance, factories)
            for mode in [m for m in args.modes if MODES[m][2] == "lora"]:
                rows += check_gradients(args.optimizer, "second", steps, [mode], args.tolerance,
                                        {mode: mode_factory(mode), bilevel_step.REFERENCE: reference_factory(mode)})
    except Disagreement as exc:
        message, partial = exc.args
        print(format_table(["optimizer", "order", "steps", "mode", "weights rel. err", "lrs rel. err"],
                           rows + partial))
        print(f"\nREFUSED: a memory option changes the meta-gradient beyond {args.tolerance:g}: {message}. "
              "No memory or time ratio is printed.", file=sys.stderr)
        raise SystemExit(EXIT_DISAGREE)
    return rows


# ------------------------------------------------------------------------------------------------
# One (model, tasks, mode) in a fresh process
# ------------------------------------------------------------------------------------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    args = argparse.Namespace(**spec["args"])
    case = Case(**spec["case"])
    mode = spec["mode"]
    device = args.device
    if not device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    records = synthetic_records(case.tasks, args.facts, seed=args.seed)
    setup = build_setup(case.model, records, mode_overrides(mode, case), dtype="float32", max_length=args.max_length)
    setup.model.to(device)
    batch = encode(setup, records).to(device)
    lrs = initial_lrs(setup, bilevel_step.TIMING_LR[case.optimizer]).to(device)
    reset_attention(setup)
    impl = make_impl(MODES[mode][0], setup, lrs)
    cuda = device.startswith("cuda")

    def step() -> None:
        zero_grad(impl)
        impl.forward_backward(batch)

    timer = time.perf_counter if cuda or torch.get_num_threads() > 1 else time.process_time
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss_bytes()
        limit_cpu_memory(args.cpu_memory_gib)
    start = timer()
    try:
        step()
    except (torch.OutOfMemoryError, MemoryError):
        return {"oom": True}
    except RuntimeError as exc:  # the CPU allocator past the address-space limit
        if "allocate" not in str(exc):
            raise
        return {"oom": True}
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    times = [timer() - start] if args.repeats == 0 else []  # --repeats 0: the measured step's own time
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        start = timer()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(timer() - start)
    grads = [p.grad.detach().float().cpu() if p.grad is not None else torch.zeros(p.shape)
             for p in impl.meta_parameters()]
    torch.save(grads, spec["grad_file"])
    return {"oom": False, "step_peak": float(peak - before), "peak": float(peak),
            "seconds": statistics.median(times), "params": sum(p.numel() for p in setup.model.parameters())}


def limit_cpu_memory(gib: float) -> None:
    """Cap this process's address space at ``gib`` GiB (0: no cap), so that a configuration too
    large for the machine fails its allocation (reported as OOM) instead of swapping or drawing
    the kernel's OOM killer onto other processes."""
    if gib > 0:
        import resource

        cap = int(gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def available_memory_gib() -> float:
    """``MemAvailable`` of /proc/meminfo in GiB (0 where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def measure(case: Case, mode: str, args: argparse.Namespace, grad_file: str) -> Optional[dict[str, Any]]:
    spec = {"case": asdict(case), "mode": mode, "args": vars(args), "grad_file": grad_file}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
        # Every block of 64 KiB or more gets its own mapping and goes back to the system when freed,
        # so the resident peak follows the live tensors (see bench/bilevel_step.py).
        env={**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"worker failed for {case} {mode} (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--models", type=comma_list(str, list(MODEL_SHAPES)), default=["tiny", "small"],
                   help=f"model shapes, comma-separated, of {list(MODEL_SHAPES)}. Default: tiny,small")
    p.add_argument("--tasks", type=positive_ints, default=None,
                   help="tasks per outer step, comma-separated. Default: 8 for tiny, 2 for the others")
    p.add_argument("--inner-steps", type=positive_ints, default=[4], help="inner steps, comma-separated. Default: 4")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="inner optimizer. Default: adamw")
    p.add_argument("--modes", type=comma_list(str, list(MODES)), default=[m for m in MODES if MODES[m][2] != "lora"],
                   help=f"modes, comma-separated, of {list(MODES)}. Default: all but the LoRA ones")
    p.add_argument("--facts", type=int, default=8, help="knowledge sentences per task. Default: 8")
    p.add_argument("--max-length", type=int, default=64, help="model.max_length (tokens). Default: 64")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda. Default: cuda when available")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed steps per mode after the measured one (median); 0: the time of the measured "
                        "step itself (includes first-call overheads; for slow CPU runs). Default: 3")
    p.add_argument("--cpu-memory-gib", type=float, default=None,
                   help="address-space cap of each CPU measurement process; a mode that needs more is "
                        "reported as OOM. 0: none. Default: 90%% of the memory available at start")
    p.add_argument("--tolerance", type=float, default=1e-6,
                   help="largest relative error (float64) of a mode that claims the default's gradient. Default: 1e-6")
    p.add_argument("--bf16-tolerance", type=float, default=0.05,
                   help="largest relative error of a bf16 mode's gradient to call it within tolerance. Default: 0.05")
    p.add_argument("--budget-gib", type=float, default=40.0,
                   help="memory budget for the tasks-per-budget column (GiB). Default: 40")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU. Default: 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 0:
        p.error("--repeats must be >= 0")
    if args.cpu_memory_gib is None:
        args.cpu_memory_gib = round(0.9 * available_memory_gib(), 1)
    if REFERENCE not in args.modes:
        args.modes = [REFERENCE, *args.modes]
    return args


def cell_summary(result: Optional[dict[str, Any]]) -> str:
    """One measured cell as a progress line (the tables follow once a model's cells are done)."""
    if result is None:
        return "failed"
    if result.get("oom"):
        return "OOM"
    return (f"peak {fmt_mib(result['step_peak'])} MiB above the step's start ({fmt_mib(result['peak'])} MiB in all), "
            f"{result['seconds']:.3g} s/step")


def tasks_per_budget(rows: dict[int, dict[str, Any]], budget: float) -> str:
    """Tasks that fit in ``budget`` bytes, from the peaks at the fewest and most tasks measured
    (peak = fixed + tasks * per-task, a straight line through the two points)."""
    done = {t: r for t, r in rows.items() if r and not r.get("oom")}
    if len(done) < 2:
        return "-"
    lo, hi = min(done), max(done)
    per_task = (done[hi]["peak"] - done[lo]["peak"]) / (hi - lo)
    if per_task <= 0:
        return "-"
    fixed = done[lo]["peak"] - lo * per_task
    return str(int((budget - fixed) // per_task))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    torch.set_num_threads(args.threads)
    print_header("memory options of the bilevel step: peak memory and time per outer step")
    started = time.perf_counter()
    check_rows = run_checks(args)
    print(f"## gradient agreement of the modes that claim the default's meta-gradient, and of the LoRA modes "
          f"(float64, tiny model, 2 tasks, against the reference engine, with the same adapters for LoRA; "
          f"tolerance {args.tolerance:g})")
    print(format_table(["optimizer", "order", "steps", "mode", "weights rel. err", "lrs rel. err"], check_rows))
    print(flush=True)

    cuda = args.device.startswith("cuda")
    unit = "GPU max_memory_allocated" if cuda else "resident set"
    # the worker times with perf_counter on a GPU or with several threads, else process CPU time
    clock = "wall time" if cuda else (f"wall time, {args.threads} threads" if args.threads > 1
                                      else "process CPU time, 1 thread")
    header = ["model", "steps", "tasks", "mode", "peak MiB", "x default", "x higher", "s/step", "time x default",
              "grad rel. err (fp32)", "verdict"]
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            task_counts = args.tasks or ([8] if model == "tiny" else [2])
            for steps in args.inner_steps:
                rows = []
                per_mode: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in args.modes}
                for tasks in task_counts:
                    case = Case(model, "second", args.optimizer, steps, tasks)
                    results: dict[str, Optional[dict[str, Any]]] = {}
                    for mode in args.modes:
                        results[mode] = measure(case, mode, args, str(Path(tmp) / f"{list(MODES).index(mode)}.pt"))
                        per_mode[mode][tasks] = results[mode]
                        print(f"  {model}, {steps} steps, {tasks} tasks, {mode}: {cell_summary(results[mode])}", flush=True)
                    ref = results.get(REFERENCE)
                    ref_ok = bool(ref and not ref.get("oom"))
                    base_grads = torch.load(Path(tmp) / f"{list(MODES).index(REFERENCE)}.pt") if ref_ok else None
                    hig = results.get("higher")
                    for mode in args.modes:
                        r = results[mode]
                        if r is None or r.get("oom"):
                            rows.append([model, steps, tasks, mode, "OOM" if r else "failed"] + ["-"] * 6)
                            continue
                        kind = MODES[mode][2]
                        err = "-"
                        verdict = {"same": "same gradient (checked)", "other": "other gradient",
                                   "lora": "adapters (checked)"}.get(kind, "")
                        if base_grads is not None and mode != REFERENCE and kind != "lora":
                            grads = torch.load(Path(tmp) / f"{list(MODES).index(mode)}.pt")
                            e = max(relative_error(g, b) for g, b in zip(grads, base_grads))
                            err = f"{e:.1e}"
                            if kind == "bf16":
                                verdict = "within tolerance" if e <= args.bf16_tolerance else "OUTSIDE tolerance"
                        rows.append([
                            model, steps, tasks, mode, fmt_mib(r["step_peak"]),
                            f"{r['step_peak'] / ref['step_peak']:.2f}x" if ref_ok else "-",
                            f"{r['step_peak'] / hig['step_peak']:.2f}x" if hig and not hig.get("oom") else "-",
                            f"{r['seconds']:.3g}", f"{r['seconds'] / ref['seconds']:.2f}x" if ref_ok else "-",
                            err, verdict,
                        ])
                params = next((r["params"] for m in per_mode.values() for r in m.values() if r and "params" in r), 0)
                print(f"## {model} ({params / 1e6:.1f} M weights), second order, {steps} inner "
                      f"{args.optimizer} steps, {args.facts} facts per task; peak = {unit} above the step's start; "
                      f"time: {clock}, "
                      + (f"median of {args.repeats}" if args.repeats else "of the measured step"))
                print(format_table(header, rows))
                if len(task_counts) > 1:
                    budget = args.budget_gib * GIB
                    fit = [[m, tasks_per_budget(per_mode[m], budget)] for m in args.modes]
                    print(f"\ntasks per {args.budget_gib:g} GiB (straight line through the peaks at "
                          f"{min(task_counts)} and {max(task_counts)} tasks)")
                    print(format_table(["mode", "tasks"], fit))
                print(flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
