"""The framework-free training loop: epochs, gradient accumulation, validation, early stopping,
checkpoints, resume. It does not know whether it runs under Ray: data-parallel communication and
reporting come in through :class:`Hooks`.

Batches and reduction. The batch is a global quantity: one optimizer step consumes
``train.batch_size * train.grad_accum`` tasks (the *global step*) whatever the number of workers, so
adding workers changes the speed, never the experiment. Every epoch is a seeded permutation of the
training tasks cut into global steps of ``grad_accum`` micro-batches of ``batch_size`` tasks; worker
``r`` of ``n`` takes its own contiguous share of the global step's tasks (:func:`worker_tasks`),
in chunks of at most ``batch_size`` tasks. The outer loss is summed over tasks and scaled by
``1 / tasks in the global step``, the gradients are SUM-all-reduced, so any number of workers
computes the gradient of the same global mean loss: a worker count that does not divide the step
gives some workers one task more than others, each task weighing the same, and a worker with no
task adds zeros. The worker count may change when a run resumes (an elastic run); the data order
and the learning-rate schedule do not depend on it. Each validation's row records it (``workers``).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from reckoning_ray.core.checkpoint import (
    checkpoint_path,
    load_trainer_state,
    read_record,
    restore_method,
    save_checkpoint,
)
from reckoning_ray.core.config import metric_mode
from reckoning_ray.core.data.encode import normalize_label
from reckoning_ray.core.schema import EvalConfig, OuterConfig, TrainConfig
from reckoning_ray.core.method import Method
from reckoning_ray.core.metrics import hop_sums, summarize_sums
from reckoning_ray.core.plan import (
    COOLDOWN_METRICS,
    planned_steps,
    rounds_set_aside,
    steps_per_epoch,
    validation_points,
    validations_through,
)
from reckoning_ray.core.progress import Progress, ProgressBar
from reckoning_ray.core.schedules import build_lr_schedule, schedule_of


@dataclass
class Hooks:
    """What the loop needs from its host (plain process, Ray Train worker, test)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # In-place SUM all-reduce of a flat tensor across workers (identity for one worker).
    all_reduce: Optional[Callable[[torch.Tensor], None]] = None
    # Called on every rank after every validation with its metrics (checkpoint written already).
    report: Optional[Callable[[dict[str, Any]], None]] = None
    # A checkpoint directory to resume from (written by this loop), or None.
    resume_from: Optional[Path] = None
    # Print progress lines (rank 0 only by default).
    log: Callable[[str], None] = print
    # Called after every optimizer step with the global step (fault injection, profiling).
    on_step: Optional[Callable[[int], None]] = None
    # A progress bar of the run's optimizer steps on stderr (rank 0 only): tasks/s, ETA, train loss.
    progress: bool = True


def epoch_order(num_tasks: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(num_tasks, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def shard(items: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Contiguous, near-equal share of ``items`` for ``rank`` (earlier ranks get the remainder)."""
    n = len(items)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (1 if rank < extra else 0)])


def global_step_tasks(order: list[int], step: int, train: TrainConfig) -> list[list[int]]:
    """Micro-batches of task indices of global step ``step`` (``grad_accum`` lists of at most
    ``batch_size`` tasks, shared by all workers)."""
    per_micro = train.batch_size
    per_step = per_micro * train.grad_accum
    chunk = order[step * per_step : (step + 1) * per_step]
    return [chunk[i : i + per_micro] for i in range(0, len(chunk), per_micro)]


def worker_tasks(micro_batches: list[list[int]], rank: int, world_size: int, chunk: int) -> list[list[int]]:
    """Worker ``rank``'s share of a global step (its micro-batches' tasks in order, contiguous and
    near-equal, :func:`shard`), cut into chunks of at most ``chunk`` tasks (the memory of one
    micro-batch). With one worker these are the step's micro-batches."""
    share = shard([t for micro in micro_batches for t in micro], rank, world_size)
    return [share[i : i + chunk] for i in range(0, len(share), max(int(chunk), 1))]


def allreduce_gradients(params: list[torch.Tensor], all_reduce: Callable[[torch.Tensor], None],
                        bucket_bytes: int = 32 * 2**20) -> None:
    """SUM-all-reduce the ``.grad`` of ``params`` in flat buckets (one collective per bucket)."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:  # type: ignore[list-item]
        if g is not None and (not bucket or (size + g.numel() * g.element_size() <= bucket_bytes
                                             and g.dtype == bucket[0].dtype)):
            bucket.append(g)
            size += g.numel() * g.element_size()
            continue
        if bucket:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            all_reduce(flat)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
        bucket, size = ([g], g.numel() * g.element_size()) if g is not None else ([], 0)


def _rng_state() -> dict[str, Any]:
    """The random states as tensors, lists and numbers (what ``torch.load(weights_only=True)``
    reads back): numpy's legacy state tuple with its key array as an int64 tensor."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))


def _better(value: float, best: Optional[float], mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class Loop:
    """One training run of a method (RECKONING or an in-context baseline) on prepared records."""

    def __init__(self, train: TrainConfig, outer: OuterConfig, eval: EvalConfig, method: Method, tokenizer: Any,
                 encoder: Any, train_records: list[dict], val_records: list[dict], run_dir: Path,
                 hooks: Optional[Hooks] = None) -> None:
        self.train, self.outer, self.eval_config = train, outer, eval
        self.method = method
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.train_records = train_records
        self.val_records = val_records
        self.run_dir = Path(run_dir)
        self.hooks = hooks or Hooks()
        self.is_main = self.hooks.rank == 0
        self.steps_per_epoch = steps_per_epoch(len(train_records), train)
        self.total_steps = planned_steps(len(train_records), train)
        self.val_points = validation_points(self.steps_per_epoch, train.validations_per_epoch)
        self.optimizer = torch.optim.AdamW(method.parameter_groups(), eps=outer.eps)

        self.scheduler = build_lr_schedule(self.optimizer, outer.schedule, self.total_steps, outer.warmup_ratio,
                                         outer.cooldown_fraction)
        self.schedule = schedule_of(self.scheduler)
        self.progress = Progress()
        self.history: list[dict] = []
        # what a checkpoint keeps of the task (reckoning.json "task"): the question wording, and the
        # labels a prediction may answer with (anything else it generates is no label)
        self.task = {"family": train_records[0]["family"],
                     "labels": sorted({normalize_label(r["answer"]) for r in train_records})}
        self.mode = metric_mode(train.metric)
        self._bar: Optional[ProgressBar] = None  # during fit() on rank 0 with hooks.progress
        self._step_tasks = 0  # tasks (all workers) of the last optimizer step
        # validation rounds hosts with increasing rounds (Tune, W&B) already heard of: an extended
        # wsd run repeats those after its cooldown's start (see rounds_set_aside)
        self.rounds_heard = 0
        if self.hooks.resume_from is not None:
            self._resume(Path(self.hooks.resume_from))
        if self.is_main:
            self._drop_rows_after(self.progress.global_step)

    def _drop_rows_after(self, step: int) -> None:
        """Keep the rows of metrics.jsonl up to ``step``, where training goes on from. A process
        lost between a validation's row and its checkpoint (a node that dies) leaves a row whose
        step is redone; without this the redone validation would stand there twice."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                break  # a line cut by a killed writer ends what can be read
            if int(row.get("step", -1)) <= step:
                kept.append(line)
        if len(kept) < len(lines):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
            self.log(f"metrics.jsonl: {len(lines) - len(kept)} row(s) after step {step} dropped (written after the "
                     "checkpoint this run goes on from; those validations are redone)")

    # -- logging ---------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if not self.is_main:
            return
        if self._bar is None:
            self.hooks.log(message)
        else:
            with self._bar.around_print():
                self.hooks.log(message)

    # -- resume ----------------------------------------------------------------------------
    def _resume(self, path: Path) -> None:

        record = read_record(self.run_dir)
        extend = self._extension(record)
        if extend is not None:
            path = extend
        restore_method(self.method, path)
        state = load_trainer_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])  # restores the schedule's fields too
        # the run's length now (a longer run: the same warmup steps, the cooldown at the new end)
        self.schedule.extend_to(self.total_steps)
        _set_rng_state(state["rng"])
        self.progress = Progress(**state["progress"])
        self.history = list(state["history"])
        if extend is not None:
            latest = int(str(record.get("latest", "step-0")).rsplit("-", 1)[-1])
            self.rounds_heard = validations_through(len(self.train_records), self.train, latest)
            self._forget_cooldown(record)
        self.rounds_heard = max(self.rounds_heard, rounds_set_aside(self.run_dir))
        self.log(f"resumed from {path} at epoch {self.progress.epoch} step {self.progress.global_step}")

    def _extension(self, record: dict[str, Any]) -> Optional[Path]:
        """The stable checkpoint to continue from when a wsd run is resumed with more steps than it
        was planned for and its cooldown has begun; else None (resume from the latest)."""
        if self.outer.schedule != "wsd" or not record.get("stable"):
            return None
        planned = record.get("planned_steps")
        latest_step = int(str(record.get("latest", "step-0")).rsplit("-", 1)[-1])
        if planned is None or self.total_steps <= planned or latest_step <= int(record["stable_step"]):
            return None
        return self.run_dir / "checkpoints" / record["stable"]

    def _forget_cooldown(self, record: dict[str, Any]) -> None:
        """After continuing from the stable checkpoint: the earlier cooldown's validations leave
        metrics.jsonl (kept aside in metrics.cooldown-<step>.jsonl) and the best value stays the
        record's (a cooldown checkpoint may be the best so far, and it is kept)."""
        p = self.progress
        self.log(f"extending the run to {self.total_steps} steps from its state at the start of the cooldown "
                 f"(step {p.global_step}); the earlier cooldown's validations are set aside")
        p.stopped_early = False
        if record.get("best_metric") is not None and _better(record["best_metric"], p.best_metric, self.mode):
            p.best_metric, p.best_step = record["best_metric"], int(record.get("best_step", p.best_step))
        if self.is_main:
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.exists():
                rows = [r for r in metrics.read_text().splitlines() if r.strip()]
                after = [json.loads(r)["step"] > p.global_step for r in rows]
                keep = [r for r, a in zip(rows, after) if not a]
                rest = [r for r, a in zip(rows, after) if a]
                if rest:  # named after the length the earlier cooldown ended the run at
                    aside = self.run_dir / COOLDOWN_METRICS.format(steps=int(record["planned_steps"]))
                    aside.write_text("".join(r + "\n" for r in rest))
                metrics.write_text("".join(r + "\n" for r in keep))

    # -- one optimizer step -------------------------------------------------------------------
    def _train_step(self, order: list[int], step: int) -> dict[str, float]:
        hooks = self.hooks
        micro_batches = global_step_tasks(order, step, self.train)
        n_global = sum(len(m) for m in micro_batches)
        self._step_tasks = n_global
        self.method.train()
        self.optimizer.zero_grad(set_to_none=False)
        loss_sum, n_local = 0.0, 0
        for mine in worker_tasks(micro_batches, hooks.rank, hooks.world_size, self.train.batch_size):
            batch = self.encoder.collate([self.train_records[i] for i in mine]).to(hooks.device)
            out = self.method.forward_backward(batch, loss_scale=1.0 / n_global)
            loss_sum += float(out["loss"])
            n_local += len(mine)
        params = self.method.meta_parameters()
        stats = torch.tensor([loss_sum, float(n_local)], dtype=torch.float64)
        if hooks.all_reduce is not None and hooks.world_size > 1:
            allreduce_gradients(params, hooks.all_reduce)
            hooks.all_reduce(stats)
        if self.outer.clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.outer.clip))
        else:
            grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)))
        self.optimizer.step()
        self.scheduler.step()
        return {"train/loss": float(stats[0] / max(stats[1], 1.0)), "train/grad_norm": grad_norm}

    # -- validation -----------------------------------------------------------------------------
    def evaluate(self, records: list[dict], prefix: str = "val") -> dict[str, float]:
        """Sharded evaluation; sums are all-reduced so every rank returns the global metrics."""
        if self.eval_config.max_tasks:
            records = records[: self.eval_config.max_tasks]
        return evaluate_records(self.method, self.encoder, records, self.train.batch_size,
                                self.outer.multi_task, prefix, self.hooks)

    def _validate(self, epoch_float: float, train_stats: dict[str, float]) -> bool:
        """Validate, checkpoint, report; return True when early stopping says stop."""
        p = self.progress
        p.validations += 1
        t0 = time.time()
        metrics = self.evaluate(self.val_records, "val")
        metrics.update(train_stats)
        metrics.update(self.method.stats())
        metrics.update({"epoch": epoch_float, "step": p.global_step, "round": p.validations,
                        "val/seconds": time.time() - t0, "workers": self.hooks.world_size})
        value = metrics[self.train.metric]
        improved = _better(value, p.best_metric, self.mode)
        if improved:
            p.best_metric, p.best_step, p.bad_validations = value, p.global_step, 0
        else:
            p.bad_validations += 1
        patience = self.train.patience
        stop = bool(patience and p.bad_validations >= patience)
        metrics["best/" + self.train.metric] = p.best_metric
        if stop:
            p.stopped_early = True
        metrics["stopped_early"] = p.stopped_early
        self.history.append(metrics)
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            self._save_checkpoint(best=improved)
        per_hop = " ".join(f"h{k.rsplit('_', 1)[1]}={v:.3f}" for k, v in metrics.items()
                           if k.startswith("val/label_accuracy/hops_"))
        self.log(
            f"[validate {p.validations}] epoch {epoch_float:.2f} step {p.global_step}: "
            f"label_accuracy {metrics['val/label_accuracy']:.3f} ({per_hop}) "
            f"answer_loss {metrics['val/answer_loss']:.4f} train_loss {train_stats.get('train/loss', float('nan')):.4f}"
            + (" *best*" if improved else "") + (" -> early stop" if stop else "")
        )
        if self.hooks.report is not None:
            self.hooks.report(metrics)
        return stop

    def _save_checkpoint(self, best: bool, stable: bool = False) -> None:
        """This step's checkpoint with everything a resume needs (``checkpoint.save_checkpoint``)."""
        p = self.progress
        trainer_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "rng": _rng_state(), "progress": p.__dict__.copy(), "history": self.history}
        save_checkpoint(self.run_dir, p.global_step, self.method, trainer_state, best, self.train.metric,
                        p.best_metric, task=self.task, stable=stable,
                        planned_steps=self.total_steps)

    def _maybe_save_stable(self) -> None:
        """A wsd run's state at the start of its cooldown, kept as the record's ``stable``
        checkpoint: a longer run continues from here (after this step's validation, if any)."""
        p = self.progress
        start = self.schedule.cooldown_start
        if self.outer.schedule != "wsd" or p.global_step != start or start >= self.total_steps or not self.is_main:
            return
        self._save_checkpoint(best=False, stable=True)
        self.log(f"step {p.global_step}: cooldown starts; its starting state is kept (checkpoints.json \"stable\")")

    # -- the run ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        train, p = self.train, self.progress
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log(
            f"training {train.method}: {len(self.train_records)} train / {len(self.val_records)} val tasks, "
            f"{self.hooks.world_size} worker(s), {self.steps_per_epoch} steps/epoch x {train.epochs} epochs, "
            f"validation after steps {self.val_points} of each epoch"
        )
        done = self.finished
        if done:
            self.log(f"run already finished at step {p.global_step}")
        if self.is_main and self.hooks.progress and not done:
            # starts at the resumed step, so its count and ETA are the run's, not this process's
            self._bar = ProgressBar(self.total_steps, p.global_step, self._epoch_desc())
        try:
            self._epochs(done)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        return self._summary()

    @property
    def finished(self) -> bool:
        """The run has made all its steps or stopped early (e.g. resumed after its end)."""
        return self.progress.stopped_early or self.progress.global_step >= self.total_steps

    def _epoch_desc(self) -> str:
        # the run name tells apart the bars of a sweep's trials, whose workers share one console
        return f"{self.run_dir.name} epoch {min(self.progress.epoch + 1, self.train.epochs)}/{self.train.epochs}"

    def _epochs(self, done: bool) -> None:
        p = self.progress
        last_stats: dict[str, float] = {}
        while not done and p.epoch < self.train.epochs:
            order = epoch_order(len(self.train_records), self.train.seed, p.epoch)
            t_epoch, losses = time.time(), []
            if self._bar is not None:
                self._bar.describe(self._epoch_desc())
            while p.step_in_epoch < self.steps_per_epoch:
                t_step = time.perf_counter()
                last_stats = self._train_step(order, p.step_in_epoch)
                losses.append(last_stats["train/loss"])
                p.step_in_epoch += 1
                p.global_step += 1
                if self._bar is not None:
                    self._bar.step(self._step_tasks, time.perf_counter() - t_step, last_stats["train/loss"])
                if self.hooks.on_step is not None:
                    self.hooks.on_step(p.global_step)
                at_end = p.step_in_epoch == self.steps_per_epoch
                if p.step_in_epoch in self.val_points or p.global_step >= self.total_steps:
                    if at_end:
                        p.epoch += 1
                        p.step_in_epoch = 0
                    stats = dict(last_stats, **{"train/loss": float(np.mean(losses))})
                    losses = []
                    epoch_float = p.epoch + (p.step_in_epoch / self.steps_per_epoch if not at_end else 0.0)
                    stop = self._validate(epoch_float, stats)
                    self._maybe_save_stable()
                    if stop or p.global_step >= self.total_steps:
                        done = True
                        break
                    if at_end:
                        break
                else:
                    self._maybe_save_stable()
            if not done:
                self.log(f"epoch {p.epoch} took {time.time() - t_epoch:.1f}s")

    def _summary(self) -> dict[str, Any]:
        p = self.progress
        best = next((h for h in self.history if h["step"] == p.best_step), {})
        summary = {
            "metric": self.train.metric,
            "best_metric": p.best_metric,
            "best_step": p.best_step,
            "best_validation": {k: v for k, v in best.items() if k.startswith("val/")},
            "validations": p.validations,
            "steps": p.global_step,
            "stopped_early": p.stopped_early,
            "best_checkpoint": str(checkpoint_path(self.run_dir, "best") or ""),
        }
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def evaluate_records(method: Method, encoder: Any, records: list[dict], batch_size: int, multi_task: bool,
                     prefix: str, hooks: Optional[Hooks] = None) -> dict[str, float]:
    """Metrics of ``method`` on ``records``: label accuracy overall and per hop, answer loss and,
    with ``multi_task`` (the run trains the "<label> because <facts>" target), knowledge recall.

    Each rank of ``hooks`` evaluates its shard (micro-batches of ``batch_size`` tasks); the
    per-hop sums are SUM-all-reduced, so every rank returns the metrics of all ``records``. The
    keys are ``<prefix>/label_accuracy``, ``<prefix>/label_accuracy/hops_<k>``,
    ``<prefix>/answer_loss``, ``<prefix>/recall`` (multi-task only) and ``<prefix>/tasks``.
    """
    hooks = hooks or Hooks()
    mine = shard(list(range(len(records))), hooks.rank, hooks.world_size)
    method.eval()
    outputs: dict[str, list] = {}
    bs = max(int(batch_size), 1)
    for i in range(0, len(mine), bs):
        batch = encoder.collate([records[j] for j in mine[i : i + bs]]).to(hooks.device)
        for k, v in method.evaluate(batch).items():
            outputs.setdefault(k, []).extend(v)
    all_hops = sorted({int(r["hops"]) for r in records})
    sums = hop_sums(outputs, all_hops)
    if hooks.all_reduce is not None and hooks.world_size > 1:
        hooks.all_reduce(sums)
    return summarize_sums(sums, all_hops, prefix, recall=bool(multi_task))


__all__ = [
    "Hooks",
    "Loop",
    "Progress",
    "ProgressBar",
    "allreduce_gradients",
    "epoch_order",
    "evaluate_records",
    "shard",
    "steps_per_epoch",
    "validation_points",
    "worker_tasks",
]
