"""Checkpoints: one record per run, one copy of the model per kept checkpoint.

A run directory keeps its checkpoints as::

    <run_dir>/checkpoints.json               the record: {"latest": "step-000012", "best": "step-000008",
                                             "metric": ..., "best_metric": ..., "planned_steps": 16,
                                             "stable": "step-000010" (wsd schedules only)}
    <run_dir>/checkpoints/step-000012/       a checkpoint (below)

Only the latest and the best checkpoint are kept (one directory when they are the same step), and
only the latest keeps ``trainer_state.pt`` (the outer optimizer's moments are twice the model);
resume reads ``latest``, test evaluation and prediction read ``best``, both from the same record.
A run with a warmup-stable-decay schedule also keeps ``stable``, its state at the start of the
cooldown (with ``trainer_state.pt``): a longer run continues from there (``reckoning_ray.schedules``).
The record is replaced atomically after the checkpoint directory is complete, so a process killed
while saving leaves the previous record and checkpoints intact.

A checkpoint directory is a trained model that needs nothing else::

    config.json, model.safetensors, ...      the model (``save_pretrained``; HF loads it as is)
    tokenizer.json, tokenizer_config.json, ... its tokenizer
    reckoning.json                           the method's settings (method name, inner loop:
                                             optimizer, steps per hop count, betas, eps, ...;
                                             encoder: target format, max length; generation length)
    meta_parameters.safetensors              meta-parameters besides the weights (RECKONING's
                                             learned inner learning rates)
    fact_pool.json                           the random-facts methods only (icr_random_facts,
                                             reckoning_random_facts): the sentences their random
                                             knowledge is drawn from (the training knowledge), so
                                             the checkpoint alone draws as the run did
    README.md                                its model card (``reckoning_ray.core.card``): what it is,
                                             its validation and, once evaluated, test metrics
    trainer_state.pt                         outer optimizer, scheduler, random state, progress and
                                             validation history (the latest checkpoint only: to
                                             resume training)

Nothing here imports Ray.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from reckoning_ray.core.card import write_card
from reckoning_ray.core.errors import InputError

if TYPE_CHECKING:
    import torch

RECORD = "checkpoints.json"
CHECKPOINTS = "checkpoints"
SETTINGS = "reckoning.json"
META_PARAMETERS = "meta_parameters.safetensors"
FACT_POOL = "fact_pool.json"
TRAINER_STATE = "trainer_state.pt"
FORMAT_VERSION = 1


class CheckpointError(InputError, FileNotFoundError):
    """A path that is not a checkpoint or a run directory with one; the message says what is there."""


def save_pretrained(method: Any, directory: str | os.PathLike, task: Optional[dict[str, Any]] = None,
                    card: bool = True) -> Path:
    """Write ``method`` (model, tokenizer, settings, meta-parameters) to ``directory``: a model
    :func:`load_pretrained` and :class:`reckoning_ray.core.predict.ReckoningModel` load alone.

    ``task``: what the model was trained on, kept in ``reckoning.json`` (``{"family": ...}``: the
    question wording prediction uses by default). ``card``: write its model card (a run's
    checkpoint gets it from :func:`save_checkpoint`, once the record says whether it is the best)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    method.model.save_pretrained(directory)
    method.tokenizer.save_pretrained(directory)
    settings = dict(method.settings(), format=FORMAT_VERSION, task=dict(task or {}))
    (directory / SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    extra = {k: v.detach().to("cpu").contiguous() for k, v in method.extra_state().items()}
    save_file(extra, str(directory / META_PARAMETERS))
    pool = _fact_pool_to_keep(method)
    if pool is not None:
        (directory / FACT_POOL).write_text(json.dumps(pool) + "\n")
    if card:
        write_card(directory)
    return directory


def _fact_pool_to_keep(method: Any) -> Optional[list[str]]:
    """The encoder's fact pool when the method draws random knowledge from it, else None."""
    # heavy: imported here to keep torch off this module's import (the encoder module imports it)
    from reckoning_ray.core.data.encode import RANDOM_FACTS_METHODS

    encoder = getattr(method, "encoder", None)
    if encoder is None or encoder.method not in RANDOM_FACTS_METHODS or encoder.fact_pool is None:
        return None
    return list(encoder.fact_pool)


def read_fact_pool(directory: str | os.PathLike) -> Optional[list[str]]:
    """The fact pool a random-facts checkpoint keeps (:data:`FACT_POOL`), None when it has none."""
    path = Path(directory) / FACT_POOL
    if not path.is_file():
        return None
    pool = json.loads(path.read_text())
    if not isinstance(pool, list) or not all(isinstance(s, str) for s in pool):
        raise CheckpointError(f"{path} is not a list of sentences")
    return pool


def read_settings(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / SETTINGS
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a RECKONING checkpoint: {SETTINGS} is missing")
    return json.loads(path.read_text())


def load_meta_parameters(directory: str | os.PathLike) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / META_PARAMETERS))


def load_pretrained(directory: str | os.PathLike, device: Optional["torch.device"] = None,
                    dtype: Optional["torch.dtype"] = None) -> Any:
    """The method saved by :func:`save_pretrained` in ``directory`` (a checkpoint directory, or a
    run directory: its best checkpoint), in evaluation mode on ``device``.

    The checkpoint alone: the method is built from its own settings (``reckoning.json``) around
    its model and tokenizer, then :func:`restore_method` loads its meta-parameters, as for a
    method built from a run's config (:func:`reckoning_ray.core.runs.prepare`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # heavy: imported here to keep tokenizers, torch, transformers off this module's import
    from reckoning_ray.core.baseline import build_method_from_settings

    directory = resolve(directory, "best")
    settings = read_settings(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, **({"dtype": dtype} if dtype else {}))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    method = build_method_from_settings(settings, model, tokenizer, fact_pool=read_fact_pool(directory))
    restore_method(method, directory, weights=False)
    if device is not None:
        method.to(device)
    return method.eval()


def restore_method(method: Any, directory: str | os.PathLike, weights: bool = True) -> None:
    """Load checkpoint ``directory``'s meta-parameters (and, with ``weights``, its model weights)
    into ``method`` in place (resume reads the trainer state with :func:`load_trainer_state`).

    ``weights=False``: the model was already built from ``directory``.

    The one place a checkpoint's state enters a method. A method is built from a checkpoint in
    two ways that differ only in where its shape comes from: :func:`load_pretrained` (prediction,
    a checkpoint on its own) builds it from the checkpoint's ``reckoning.json``;
    :func:`reckoning_ray.core.runs.prepare` with ``model_dir`` (resume, test evaluation, model
    soups) builds it from the run's config, whose encoder knows the run's data (the fact pool of
    ``icr_random_facts`` and ``reckoning_random_facts``, which :func:`load_pretrained` reads from
    the checkpoint's ``fact_pool.json`` instead) and whose model loader keeps a resumed run exact. Both then call this,
    and resume calls it again with the weights (the latest checkpoint, or a wsd run's stable one). It
    lives here, not in the training loop, because this module owns the checkpoint's layout
    (``meta_parameters.safetensors``, ``trainer_state.pt``) and nothing about restoring needs the
    loop.
    """
    directory = Path(directory)
    if weights:
        from transformers import AutoModelForCausalLM

        model = method.model
        loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=model.dtype)
        model.load_state_dict(loaded.state_dict(), strict=False)
    method.load_extra_state(load_meta_parameters(directory))


# -- the run's record ------------------------------------------------------------------------------

def read_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's record (``{}`` before its first checkpoint)."""
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def checkpoint_path(run_dir: str | os.PathLike, which: str = "latest") -> Optional[Path]:
    """The run's ``latest``, ``best`` (or ``stable``: a wsd run's start of cooldown) checkpoint
    directory, or None when the record names none."""
    if which not in ("latest", "best", "stable"):
        raise ValueError(f"which={which!r}: choose 'latest', 'best' or 'stable'")
    name = read_record(run_dir).get(which)
    return Path(run_dir) / CHECKPOINTS / name if name else None


# What a checkpoint needs to resume a run.
RESUME_FILES = ("config.json", SETTINGS, "model.safetensors", META_PARAMETERS, TRAINER_STATE)


def checkpoint_problem(directory: str | os.PathLike) -> Optional[str]:
    """Why the checkpoint ``directory`` cannot resume a run (a missing file, a truncated or corrupt
    safetensors file), or None when it is complete."""
    from safetensors import safe_open

    directory = Path(directory)
    for name in RESUME_FILES:
        if not (directory / name).is_file():
            return f"{name} is missing"
    for name in ("model.safetensors", META_PARAMETERS):
        try:
            with safe_open(str(directory / name), "pt") as f:
                list(f.keys())
        except Exception as exc:  # safetensors raises its own error type for a truncated or corrupt file
            return f"{name} is damaged ({' '.join(str(exc).split())[:160]})"
    return None


def resume_checkpoint(run_dir: str | os.PathLike, log: Any = print) -> Optional[Path]:
    """The newest complete checkpoint of ``run_dir`` to resume from: the record's latest, else a
    wsd run's stable one (the only others that keep a trainer state), or None before the first.

    Names what it skips: checkpoint writes cut short (``step-*.tmp``, removed) and a damaged
    latest. CheckpointError naming the file when the record names checkpoints and none is complete.
    """
    run_dir = Path(run_dir)
    folder = run_dir / CHECKPOINTS
    for partial in sorted(folder.glob("*.tmp")) if folder.is_dir() else []:
        log(f"skipping {partial}: a checkpoint write cut short (removed)")
        shutil.rmtree(partial, ignore_errors=True)
    record = read_record(run_dir)
    names = [n for n in dict.fromkeys([record.get("latest"), record.get("stable")]) if n]
    problems = []
    for name in names:
        problem = checkpoint_problem(folder / name)
        if problem is None:
            return folder / name
        problems.append(f"{folder / name}: {problem}")
        log(f"skipping checkpoint {folder / name}: {problem}")
    if problems:
        raise CheckpointError(f"no complete checkpoint to resume {run_dir} from ({'; '.join(problems)}); restore "
                              f"the file, or move {run_dir} away to start the run afresh")
    return None


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / SETTINGS).is_file() and (Path(path) / "config.json").is_file()


def resolve(path: str | os.PathLike, which: str = "best") -> Path:
    """``path`` itself when it is a checkpoint directory, else the ``which`` checkpoint of the run
    directory ``path``; a clear error otherwise."""
    path = Path(path).expanduser()
    if is_checkpoint(path):
        return path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a run directory (<train.output_dir>/<run name>) "
                              f"or one of its checkpoints/step-* directories")
    found = checkpoint_path(path, which)
    if found is None or not is_checkpoint(found):
        raise CheckpointError(f"{path} holds no {which} checkpoint (no {RECORD} naming one): pass a run "
                              f"directory that has validated at least once, or a checkpoints/step-* directory")
    return found


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _disk_full(exc: BaseException) -> bool:
    """A write that failed for want of space (a full disk, a quota, a file-size limit): an OSError
    with that errno, or safetensors' error, which carries the OS error's number in its message."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    return any(f"(os error {number})" in str(exc) for number in _FULL)


def save_checkpoint(run_dir: str | os.PathLike, step: int, method: Any, trainer_state: dict[str, Any],
                    best: bool, metric: str, value: Optional[float], task: Optional[dict[str, Any]] = None,
                    stable: bool = False, planned_steps: Optional[int] = None) -> Path:
    """Write the checkpoint of optimizer step ``step`` and make it the run's latest (and, with
    ``best``, its best; with ``stable``, the state at the start of a wsd cooldown); delete the
    checkpoints the record no longer names. ``planned_steps``: the run's length the schedule was
    made for. Returns its directory."""
    import torch

    run_dir = Path(run_dir)
    name = f"step-{step:06d}"
    final = run_dir / CHECKPOINTS / name
    tmp = final.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(method, tmp, task, card=False)
        # serialized in memory, then written by Python: a full disk is then an OSError with its errno
        # (torch's own file writer reports it as a RuntimeError without one)
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        (tmp / TRAINER_STATE).write_bytes(buffer.getbuffer())
        del buffer
    except Exception as exc:
        if not _disk_full(exc):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the partial write; the checkpoints before it are untouched
        kept = read_record(run_dir).get("latest")
        raise CheckpointError(f"no space left to write checkpoint {final} under {run_dir}: free space there or "
                              f"set train.output_dir elsewhere, then rerun to resume"
                              + (f" from {kept} (intact)" if kept else "")) from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    record = read_record(run_dir)
    record.update(latest=name, metric=metric)
    if planned_steps is not None:
        record["planned_steps"] = int(planned_steps)
    if best or ("best" not in record and not stable):
        record.update(best=name, best_metric=value, best_step=step)
    if stable:
        record.update(stable=name, stable_step=step)
    tmp_record = run_dir / (RECORD + ".tmp")
    tmp_record.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp_record, run_dir / RECORD)
    write_card(final, run_dir)  # now that the record says whether it is the best
    keep = {record[k] for k in ("latest", "best", "stable") if record.get(k)}
    for old in (run_dir / CHECKPOINTS).iterdir():
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    if record.get("best") and record["best"] not in (record["latest"], record.get("stable")):
        # only the latest (and a wsd run's stable state) resumes: the best keeps the model, not
        # the outer optimizer's moments
        (run_dir / CHECKPOINTS / record["best"] / TRAINER_STATE).unlink(missing_ok=True)
    return final


def load_trainer_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of a checkpoint, read as data only (``weights_only=True``: tensors,
    lists, dicts and numbers; a pickle that would build other objects or run code is refused
    before anything of it runs). CheckpointError naming the file otherwise."""
    import pickle

    import torch

    path = Path(directory) / TRAINER_STATE
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{path} is not a trainer state this project wrote (it holds more than tensors, "
                              f"lists and numbers, or is damaged: {str(exc).strip().splitlines()[-1][:200]}); "
                              "it was not loaded. Resume from a run directory you trust, or start a fresh run") from None


__all__ = [
    "CheckpointError",
    "checkpoint_path",
    "is_checkpoint",
    "load_pretrained",
    "load_trainer_state",
    "read_fact_pool",
    "read_record",
    "read_settings",
    "resolve",
    "restore_method",
    "save_checkpoint",
    "save_pretrained",
]
