"""What a finished sweep leaves: the table of trials (each trial's best value from its whole
validation history, its status and rounds from Tune's record), the test metrics of every trial's
best checkpoint (evaluated after the sweep as Ray tasks, since ASHA stops a trial by ending its
workers), the best config (``best_config.yaml``) and ``sweep_summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from reckoning_ray.core.card import CARD
from reckoning_ray.core.checkpoint import checkpoint_path
from reckoning_ray.core.config import (
    load_config,
)
from reckoning_ray.core.elastic import history_text
from reckoning_ray.core.evaluate import evaluate_checkpoint
from reckoning_ray.core.storage import RunMirror, StorageError, join, pull_checkpoint
from reckoning_ray.core.sweep_store import SweepStore, local_dir, sweep_store
from reckoning_ray.on_ray.trials import cell_name, trial_config
from reckoning_ray.tracking.sweeps import sweep_id_for
from reckoning_ray.tracking.writer import RunWriter, record_test, run_names


def trial_outcome(last: Optional[dict], error: bool, max_rounds: int, stopper: str = "ASHA",
                  extend: bool = False) -> tuple[str, int]:
    """A trial's status and validation rounds, as Ray Tune recorded them.

    ``last``: the last result Tune received for the trial (``Result.metrics``: the loop's
    ``round``, ``rounds_planned``, ``stopped_early``); ``error``: the trial failed. Rounds are
    the rounds Tune saw, the time ASHA judged (``round``); a trial that ASHA stopped may still
    have finished one more validation in its workers before they were ended (it is in
    ``metrics.jsonl`` and W&B), but Tune and ASHA never saw it, so it neither counts as a round
    nor makes the trial ``completed``. Status: ``error``; ``patience stop`` (the loop stopped
    early); ``completed`` (reached its planned rounds or ``tune.max_rounds``, where ASHA stops
    every trial; with ``extend`` (``tune.extend``), where a trial ASHA keeps goes on, only
    ``tune.max_rounds``); else ``<stopper> stop`` (``ASHA stop``, ``curve stop``: the scheduler
    stopped it).
    """
    last = last or {}
    rounds = int(last.get("round") or 0)
    if error:
        return "error", rounds
    if bool(last.get("stopped_early", False)):
        return "patience stop", rounds
    planned = max_rounds if extend else int(last.get("rounds_planned") or max_rounds)
    if rounds >= min(planned, max_rounds):
        return "completed", rounds
    return f"{stopper} stop", rounds


def summarize(cfg: DictConfig, results: Any, space: dict[str, tuple[str, list]],
              store: Optional[SweepStore] = None) -> dict[str, Any]:
    """Table of trials, best_config.yaml and the best checkpoint's path.

    Each trial's best value comes from its whole validation history (``trial_history``); its
    status and rounds from Tune's record (``trial_outcome``). Both go into the trial's W&B run
    summary (``trial/status``, ``trial/rounds``) with its test metrics (``record_trials``).
    ``store``: the sweep's object store (default: the config's).
    """
    root = local_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    store = store if store is not None else sweep_store(cfg)
    if store is not None:
        try:  # the trials' metrics and records, as their workers stored them
            store.pull(wait_s=float(cfg.tune.storage_wait_s))
        except StorageError as exc:
            print(f"[storage] {exc}; still unreachable after tune.storage_wait_s={cfg.tune.storage_wait_s:g}s: the "
                  "sweep's results come from the files on this machine", flush=True)
    metric, mode = cfg.tune.metric, cfg.tune.mode
    rows = [trial_row(cfg, result, root / "trials") for result in results]
    scored = [r for r in rows if r["best"] is not None]
    if not scored:
        raise RuntimeError(f"no trial of sweep {cfg.tune.name} reported {metric}")
    best = (max if mode == "max" else min)(scored, key=lambda r: r["best"])
    # An interrupted sweep (Ctrl-C) leaves trials unfinished whose workers may still hold the
    # CPUs: it is tested when `--resume` has finished it, not now.
    finished = getattr(results, "num_terminated", len(rows)) + getattr(results, "num_errors", 0) >= len(rows)
    if finished:
        if store is not None:
            prune_checkpoints(store, [r["trial"] for r in rows])
        tested = evaluate_trials(cfg, scored, root / "trials", store)
        record_trials(cfg, rows, root / "trials", tested, store)
    else:
        print("note: the sweep was interrupted; its trials are tested on the test split when "
              "`--resume` has finished it")
    table = trial_table(rows, list(space), metric)
    best_cfg_path = write_best_config(cfg, best, root / "best_config.yaml")

    best_ckpt = checkpoint_path(root / "trials" / best["trial"], "best")
    if best_ckpt is not None and store is not None:
        best_ckpt = join(store.remote, "trials", best["trial"], "checkpoints", best_ckpt.name)
    best_ckpt = str(best_ckpt or "")
    out = {"table": table, "best_trial": best["trial"], "best_value": best["best"],
           "best_test": best.get("test"), "best_config": str(best_cfg_path), "best_checkpoint": best_ckpt,
           "trials": [{k: v for k, v in r.items() if k != "_config"} for r in rows]}
    (root / "sweep_summary.json").write_text(json.dumps(out, indent=2, default=str))
    if store is not None:
        store.push_sweep()
    return out


def prune_checkpoints(store: SweepStore, trials: list[str]) -> None:
    """Once every trial has ended: each trial's stored checkpoints are exactly those its stored
    record names (``RunMirror.prune``); an upload cut short by a stopped trial leaves none behind."""
    for trial in trials:
        mirror = store.trial(trial)
        try:
            stale = RunMirror(mirror.local, mirror.remote).prune()
        except StorageError as exc:
            print(f"[storage] {exc}; trial {trial}'s stored checkpoints are left as they are", flush=True)
            continue
        if stale:
            print(f"[storage] {trial}: removed stored checkpoint(s) {', '.join(stale)} that its record does not name "
                  "(an upload cut short when the trial was stopped)", flush=True)


def trial_row(cfg: DictConfig, result: Any, trials_dir: Path) -> dict[str, Any]:
    """One trial's line of the sweep table: its best ``tune.metric`` (None without one), rounds,
    status, best validation accuracy and sampled parameters (``_config``: its Tune config)."""
    metric, mode = cfg.tune.metric, cfg.tune.mode
    trial_id = Path(result.path).name
    history = trial_history(result, trials_dir / trial_id)
    if history is None or metric not in history:
        return {"trial": trial_id, "best": None, "rounds": 0, "status": "error" if result.error else "no result",
                "_config": result.config}
    values = history[metric].dropna()
    best = float(values.max() if mode == "max" else values.min())
    tune_last = result.metrics if result.metrics and "round" in result.metrics else history.iloc[-1].to_dict()
    status, rounds = trial_outcome(tune_last, bool(result.error), cfg.tune.max_rounds,
                                   "curve" if cfg.tune.scheduler == "curve" else "ASHA", bool(cfg.tune.extend))
    params = dict(result.config)
    workers = history_text(history["workers"].tolist()) if "workers" in history else ""
    return {"trial": trial_id, "best": best, "rounds": rounds, "status": status,
            "label_accuracy": float(history["val/label_accuracy"].max()), "workers": workers or None, **params,
            "_config": result.config}


def trial_table(rows: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    """The sweep table: a trial a line, its sampled ``keys``, best value, accuracies, status and
    worker counts (``1x2 2x6``: 2 validation rounds with 1 worker, then 6 with 2)."""
    header = ["trial", *keys, metric, "best val acc", "test acc", "test recall", "rounds", "status", "workers"]
    lines = [header]
    for r in rows:
        test = r.get("test") or {}
        lines.append([r["trial"], *[_fmt(cell_name(r.get(k))) for k in keys], _fmt(r["best"]),
                      _fmt(r.get("label_accuracy")), _fmt(test.get("test/label_accuracy")),
                      _fmt(test.get("test/recall")), str(r["rounds"]), r["status"], _fmt(r.get("workers"))])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)


def write_best_config(cfg: DictConfig, best: dict[str, Any], path: Path) -> Path:
    """The best trial's full config at ``path``, a training run of its own (``<tune.name>-best``)."""
    best_cfg = trial_config(OmegaConf.to_container(cfg, resolve=True), best["_config"])
    best_cfg.train.run_name = f"{cfg.tune.name}-best"
    best_cfg.tracking.group = ""
    path.write_text("# Best trial " + best["trial"]
                    + f" of sweep {cfg.tune.name} ({cfg.tune.metric} = {best['best']:.4f}).\n"
                    f"# Re-run: python -m reckoning_ray.train --config {path}\n"
                    + OmegaConf.to_yaml(best_cfg))
    return path


def evaluate_trials(cfg: DictConfig, rows: list[dict[str, Any]], trials_dir: Path,
                store: Optional[SweepStore] = None) -> dict[str, dict[str, float]]:
    """Evaluate every trial's best checkpoint (chosen on validation) on the test split.

    Trials are tested after the sweep, not at their end, because ASHA stops a trial by ending its
    workers. Each evaluation is a Ray task with one training worker's resources (a GPU when the
    trials use one); the metrics go to ``row["test"]`` and are returned ``{trial: metrics}`` for
    ``record_trials`` to write. A trial tested before (a resumed sweep) keeps its recorded result.
    With ``store`` (an object store), the evaluating node fetches the checkpoint from it; else a
    trial whose best checkpoint is not on this machine is left untested and says so.
    """
    import ray


    res = cfg.resources
    options: dict[str, Any] = {"num_cpus": float(res.cpus_per_worker)}
    if res.use_gpu:
        options["num_gpus"] = float(res.gpus_per_worker)
    remote = ray.remote(evaluate_trial).options(**options)
    pending = {}
    for row in rows:
        run_dir = trials_dir / row["trial"]
        summary_file = run_dir / "summary.json"
        recorded = json.loads(summary_file.read_text()).get("test") if summary_file.exists() else None
        best = checkpoint_path(run_dir, "best")
        if recorded:
            row["test"] = recorded
        elif best is not None and (run_dir / "config.yaml").exists() and (store is not None or best.is_dir()):
            trial_cfg = load_config(str(run_dir / "config.yaml"))
            pending[row["trial"]] = remote.remote(trial_cfg, row["trial"],
                                                  store.trial(row["trial"]).remote if store else None)
        else:
            print(f"note: trial {row['trial']}: no best checkpoint under {run_dir} on this machine; not tested")
    if pending:
        print(f"testing the best checkpoints of {len(pending)} trial(s) on the test split")
    tested = {}
    for trial, ref in pending.items():
        tested[trial] = ray.get(ref)
        row = next(r for r in rows if r["trial"] == trial)
        row["test"] = dict(tested[trial], checkpoint="best")
    return tested


def evaluate_trial(cfg: DictConfig, trial_id: str, remote: Optional[str]) -> dict[str, float]:
    """The test metrics of a trial's best checkpoint, on the node this runs on (a Ray task):
    its run directory there, the checkpoint fetched from the object store ``remote`` first."""

    run_dir = local_dir(cfg) / "trials" / trial_id
    best = pull_checkpoint(run_dir, remote) if remote else checkpoint_path(run_dir, "best")
    return evaluate_checkpoint(cfg, str(best), "test")


def record_trials(cfg: DictConfig, rows: list[dict[str, Any]], trials_dir: Path,
                  tested: dict[str, dict[str, float]], store: Optional[SweepStore] = None) -> None:
    """Write each trial's outcome into its W&B run: ``trial/status`` and ``trial/rounds`` (the
    sweep table's columns), any validation of its metrics.jsonl that W&B has not got, and, for the
    trials just tested, the test metrics (``record_test``: also the trial's ``summary.json``). The
    run is resumed once per trial, from the driver, and only when something changed (a resumed
    sweep's finished trials are left alone).
    """

    for row in rows:
        trial = row["trial"]
        run_dir = trials_dir / trial
        outcome = {"trial/status": row["status"], "trial/rounds": int(row["rounds"])}
        trial_cfg = trial_config(OmegaConf.to_container(cfg, resolve=True), row.get("_config") or {})
        trial_cfg.train.run_name = trial
        writer = RunWriter(trial_cfg.tracking, run_dir, run_names(trial_cfg, trial_id=trial),
                           sweep_id=sweep_id_for(trials_dir.parent, trial_cfg.tracking))
        if trial not in tested and writer.has_summary(outcome) and not writer.missing_steps():
            continue  # a resumed sweep's finished trial: nothing changed
        with writer:
            # validations W&B has not got (a trial that ended while the object store was away:
            # its last rows reached this machine only with the pull above)
            writer.backfill()
            writer.summary(outcome)
            if trial in tested:
                record_test(run_dir, tested[trial], "best", writer=writer)
        if store is not None:
            store.push_trial(trial, files=("summary.json", f"checkpoints/*/{CARD}"))


def trial_history(result: Any, run_dir: Path) -> Any:
    """A trial's validation history as a DataFrame: the run directory's metrics.jsonl when this
    machine has it (complete across interruptions and resumes), else what Tune recorded."""
    import pandas as pd

    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.exists():
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        if rows:
            frame = pd.DataFrame(rows)
            last = result.metrics_dataframe
            if last is not None and "checkpoint_path" in last and "round" in last:
                frame = frame.merge(last[["round", "checkpoint_path"]], on="round", how="left")
            return frame
    return result.metrics_dataframe


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
