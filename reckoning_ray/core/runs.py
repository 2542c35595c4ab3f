"""A run's directory, its input checks and its parts, without Ray.

- :func:`check_inputs`: read the data and find the model as a worker would, in seconds, so a bad
  path or an empty split fails on the driver with one line naming the key;
- :func:`run_dir_for`: a fresh run's name, or the run to continue (``--resume``), refusing to
  continue a run with another config (:func:`check_resumable`);
- :func:`prepare`: data, model, tokenizer, encoder and method of a config (from a checkpoint
  when resuming); :func:`build_loop`: the training loop of a run directory;
- :func:`lock_sweep`: one driver per sweep directory at a time.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO, Any, Optional

from omegaconf import DictConfig, OmegaConf

from reckoning_ray.core.checkpoint import restore_method, resume_checkpoint
from reckoning_ray.core.config import flatten, group, load_config, save_config
from reckoning_ray.core.errors import ConfigError
from reckoning_ray.core.data.sources import filter_splits, load_splits, read_records

# -- one driver per sweep ------------------------------------------------------------------------------

SWEEP_LOCK = ".sweep.lock"


def lock_sweep(directory: Path, key: str = "tune.name") -> IO[str]:
    """Take the sweep directory's lock (``<directory>/.sweep.lock``, an exclusive ``flock``) for as
    long as the returned file stays open, i.e. the driver's life: a second driver of the same
    sweep on this machine gets ConfigError naming the running one. The operating system releases
    the lock of a driver that dies however it dies (SIGKILL too), so a stale lock file is simply
    taken over. The sweep's object store is not locked: two machines driving one bucket prefix
    are not detected."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / SWEEP_LOCK, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        try:
            holder = json.loads(handle.read() or "{}")
        except ValueError:
            holder = {}
        handle.close()
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
        raise ConfigError(f"{key}: the sweep {directory} is already running (pid {holder.get('pid', '?')} on "
                          f"{holder.get('host', '?')} since {since}); wait for it to end, stop it, or choose "
                          f"another {key}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
    handle.flush()
    return handle


# -- checks on the driver, before any worker starts -----------------------------------------------

def check_inputs(cfg: DictConfig) -> dict[str, int]:
    """Read the data and find the model as a worker would, in seconds: a missing or malformed data
    file, a split left empty by the filters, a model directory without a model or a hub id that is
    neither cached nor reachable fail here with one line naming the key, not inside a worker.
    Returns the number of tasks per split."""

    try:
        splits = filter_splits(read_records(cfg.data), cfg.data)  # what load_splits reads, as records
    except (FileNotFoundError, ConnectionError) as exc:
        raise ConfigError(f"data.path={cfg.data.path!r}: {exc}") from None
    sizes = {name: len(splits[name]) for name in ("train", "validation", "test")}  # none is empty
    if cfg.model.name_or_path != "embedded":
        # heavy: imported here to keep tokenizers, transformers off this module's import
        from reckoning_ray.core.modeling import pretrained_source

        pretrained_source(str(cfg.model.name_or_path))
    return sizes


def run_dir_for(cfg: DictConfig, resume: Optional[str] = None) -> Path:
    """The run directory of ``cfg``, after naming the run; sets ``train.run_name``.

    A fresh run gets a fresh name, ``<preset>-<date>-<time>``, so runs never mix. ``resume`` (the
    ``--resume [RUN]`` flag: a run name under ``train.output_dir``, a run directory, or "" for the
    latest run of this preset) or an explicit ``train.run_name`` continue a run, after
    :func:`check_resumable` found the saved config to be the requested one.
    """
    import time

    out = Path(cfg.train.output_dir).expanduser().resolve()
    if resume is not None:
        run_dir = _find_run(out, cfg, resume)
    elif cfg.train.run_name:
        run_dir = out / cfg.train.run_name
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir, n = out / f"{cfg.preset}-{stamp}", 1
        while run_dir.exists():
            n += 1
            run_dir = out / f"{cfg.preset}-{stamp}-{n}"
    cfg.train.run_name = run_dir.name
    cfg.train.output_dir = str(run_dir.parent)
    if (run_dir / "config.yaml").is_file():
        check_resumable(load_config(str(run_dir / "config.yaml")), cfg, run_dir)
    return run_dir


def _find_run(out: Path, cfg: DictConfig, resume: str) -> Path:
    if resume:
        path = Path(resume).expanduser()
        run_dir = path if (path / "config.yaml").is_file() else out / resume
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume}: no run there ({run_dir} has no config.yaml); pass a run "
                              f"directory or the name of a run under train.output_dir={out}")
        return run_dir.resolve()
    runs = sorted((p for p in out.glob(f"{cfg.preset}-*") if (p / "config.yaml").is_file()),
                  key=lambda p: (p / "config.yaml").stat().st_mtime)
    if not runs:
        raise ConfigError(f"--resume: no run of preset {cfg.preset!r} under train.output_dir={out}; name one "
                          f"(--resume RUN) or start a fresh run without --resume")
    return runs[-1]


# keys that may differ between a run and its continuation: how long and where it runs
RESUMABLE = ("train.epochs", "train.patience", "train.max_steps", "train.run_name", "train.output_dir",
             "resources.", "tracking.", "tune.", "preset")


def check_resumable(saved: DictConfig, requested: DictConfig, run_dir: Path) -> None:
    """Refuse to continue ``run_dir`` with a config that differs from the one it was started with,
    naming the keys, unless only :data:`RESUMABLE` keys differ."""
    before, after = flatten(saved), flatten(requested)
    changed = sorted(k for k in set(before) | set(after)
                     if before.get(k) != after.get(k) and not k.startswith(RESUMABLE))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} (run) -> {after.get(k)!r} (now)" for k in changed[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        raise ConfigError(
            f"train.run_name={run_dir.name!r} is a run of another config ({shown}{more}); a run continues "
            f"only with its own config (only {', '.join(k.rstrip('.') + ('*' if k.endswith('.') else '') for k in RESUMABLE[:3])}, "
            f"resources.* and tracking.* may change): start a fresh run (leave train.run_name empty) or "
            f"continue it with `python -m reckoning_ray.train --resume {run_dir}`")


# -- the pure-PyTorch part ------------------------------------------------------------------------

def prepare(cfg: DictConfig, model_dir: Optional[Path] = None):
    """Data, model, tokenizer, encoder and method for ``cfg``.

    ``model_dir``: a checkpoint directory to build from (resume, test evaluation, soups): the
    method is the run's, with the checkpoint's weights and meta-parameters
    (:func:`reckoning_ray.core.checkpoint.restore_method`); else the config's model.
    Returns (method, tokenizer, encoder, splits) with splits a dict of record lists.
    """
    import torch

    # heavy: imported here to keep tokenizers, transformers off this module's import
    from reckoning_ray.core.baseline import build_method

    # heavy: imported here to keep tokenizers, transformers off this module's import
    from reckoning_ray.core.modeling import load_model_and_tokenizer

    # heavy: imported here to keep torch off this module's import (train --help, input checks)
    from reckoning_ray.core.data.encode import Encoder

    dataset = load_splits(cfg.data)
    splits = {name: dataset[name].to_list() for name in dataset}
    train_records = splits["train"]
    fact_pool = sorted({k for r in train_records for k in r["knowledge"]})
    encoder_args = dict(method=cfg.train.method, multi_task=cfg.outer.multi_task, max_length=cfg.model.max_length,
                        seed=cfg.train.seed, fact_pool=fact_pool)
    if model_dir is not None:
        model_cfg = OmegaConf.merge(cfg.model, {"name_or_path": str(model_dir)})
        model, tokenizer = load_model_and_tokenizer(model_cfg, seed=cfg.train.seed)
    else:
        corpus = None
        if cfg.model.name_or_path == "embedded":
            corpus = list(Encoder(None, **encoder_args).corpus([r for s in splits.values() for r in s]))
        model, tokenizer = load_model_and_tokenizer(cfg.model, corpus=corpus, seed=cfg.train.seed)
    encoder = Encoder(tokenizer, **encoder_args)
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg, model, tokenizer, encoder)
    if model_dir is not None:
        restore_method(method, model_dir, weights=False)  # the model was built from model_dir
    return method, tokenizer, encoder, splits


# -- one training process ----------------------------------------------------------------------------

def build_loop(cfg: DictConfig, run_dir: Path, hooks: Any) -> Any:
    """The :class:`~reckoning_ray.core.loop.Loop` of the run in ``run_dir``, continuing from the latest
    checkpoint of the run's record when there is one (a rerun, or a worker Ray restarted)."""
    # heavy: imported here to keep numpy off this module's import
    from reckoning_ray.core.loop import Loop

    resume_dir = resume_checkpoint(run_dir, log=hooks.log if hooks.rank == 0 else (lambda message: None))
    method, tokenizer, encoder, splits = prepare(cfg, resume_dir)
    method.to(hooks.device)
    hooks.resume_from = resume_dir
    if hooks.rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    return Loop(group(cfg, "train"), group(cfg, "outer"), group(cfg, "eval"), method, tokenizer, encoder,
                splits["train"], splits["validation"], run_dir, hooks)


def summary_values(summary: dict[str, Any]) -> dict[str, Any]:
    """The run summary's values for W&B: its scalars and the best validation's metrics."""
    values = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}
    values.update({f"best/{k}": v for k, v in summary["best_validation"].items()})
    return values
