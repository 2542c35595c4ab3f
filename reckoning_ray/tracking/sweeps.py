"""A Ray Tune sweep as a W&B sweep: the search space translated, recorded, and published.

Ray Tune samples and schedules the trials (ASHA); W&B only shows them. The W&B sweep therefore
has ``controller: {type: local}`` (W&B's servers schedule nothing) and its runs are the trials'
own runs (run id = trial id), attached either live (``tracking.mode=online``: the sweep is created
when the Tune sweep starts and every trial's run starts with ``wandb.Settings(sweep_id=...)``) or
afterwards (``python -m reckoning_ray.tune publish <sweep dir>``: ``wandb sync`` of the offline
runs, then the sweep with ``prior_runs`` = the trial ids).

Files in the sweep directory (``<tune.storage_path>/<tune.name>``)::

    wandb_sweep.yaml   the translated sweep config, written when the sweep starts
    wandb_sweep.json   {"id", "entity", "project", "url"} of the W&B sweep once created (publish
                       and online sweeps); a second publish reuses it

Translation of ``tune_spaces/*.yaml`` (:func:`sweep_config`); parameter names are the flattened
config keys the runs log (``inner.lr_init``)::

    choice [v...] / grid [v...]   {values: [v...]}
    uniform [lo, hi]              {distribution: uniform, min: lo, max: hi}
    loguniform [lo, hi]           {distribution: log_uniform_values, min: lo, max: hi}
    randint [lo, hi)              {distribution: int_uniform, min: lo, max: hi - 1}
    qloguniform [lo, hi, q]       {distribution: q_log_uniform_values, min: lo, max: hi, q: q}

``method`` is ``grid`` when every key is a grid, else ``random`` (Tune's own search is random
sampling plus grid expansion); ``metric`` is ``{name: tune.metric, goal: minimize|maximize}``.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from reckoning_ray.core.config import load_config
from reckoning_ray.core.spaces import load_space
from reckoning_ray.core.sweep_store import open_sweep
from reckoning_ray.tracking.writer import RunWriter, run_dirs

log = logging.getLogger(__name__)


SWEEP_FILE = "wandb_sweep.yaml"


SWEEP_ID_FILE = "wandb_sweep.json"


GOALS = {"min": "minimize", "max": "maximize"}


# Creating the sweep at the start of an online Tune sweep: give up after this long (the W&B
# client retries an unreachable server for minutes) and carry on without it.
CREATE_TIMEOUT_S = 30.0


# -- translation -----------------------------------------------------------------------------------

def parameter(dist: str, args: list) -> dict[str, Any]:
    """One Tune distribution (a ``load_space`` entry) as a W&B sweep parameter."""
    if dist in ("choice", "grid"):
        return {"values": list(args)}
    if dist == "uniform":
        return {"distribution": "uniform", "min": float(args[0]), "max": float(args[1])}
    if dist == "loguniform":
        return {"distribution": "log_uniform_values", "min": float(args[0]), "max": float(args[1])}
    if dist == "randint":  # Tune's high is exclusive, W&B's inclusive
        return {"distribution": "int_uniform", "min": int(args[0]), "max": int(args[1]) - 1}
    if dist == "qloguniform":
        return {"distribution": "q_log_uniform_values", "min": float(args[0]), "max": float(args[1]),
                "q": args[2]}
    raise ValueError(f"no W&B sweep distribution for the Tune distribution {dist!r}")


def sweep_config(space: dict[str, tuple[str, list]], metric: str, mode: str, name: str,
                 description: str = "") -> dict[str, Any]:
    """The W&B sweep config of a Tune search space (``tune.load_space``'s result).

    ``metric``/``mode``: ``tune.metric``/``tune.mode``; ``name``: the sweep's display name
    (``tune.name``); ``description``: free text (the sweep start time makes it unique).
    """
    if mode not in GOALS:
        raise ValueError(f"mode={mode!r}: expected 'min' or 'max'")
    every_grid = bool(space) and all(dist == "grid" for dist, _ in space.values())
    config: dict[str, Any] = {
        "name": name,
        "method": "grid" if every_grid else "random",
        "metric": {"name": metric, "goal": GOALS[mode]},
        "parameters": {key: parameter(dist, args) for key, (dist, args) in space.items()},
        # Ray Tune schedules the trials: W&B's servers must not start or stop anything
        "controller": {"type": "local"},
    }
    if description:
        config["description"] = description
    return config


def sweep_config_of(cfg: Any, space: dict[str, tuple[str, list]], description: str = "") -> dict[str, Any]:
    """``sweep_config`` for the sweep config ``cfg`` (its ``tune`` group)."""
    return sweep_config(space, cfg.tune.metric, cfg.tune.mode, cfg.tune.name, description)


def violations(config: dict[str, Any]) -> list[str]:
    """What W&B's own sweep-config validator finds wrong with ``config`` (empty: valid).

    The validator is the ``sweeps`` package (``pip install wandb[sweeps]``), which ``wandb sweep``
    runs on configs with a local controller (``wandb.controller()._validate``); raises ImportError
    when it is not installed. ``sweeps.SweepConfig`` (the stricter check that also fills the
    defaults) must accept the config too.
    """
    import warnings

    with warnings.catch_warnings():  # sweeps 0.3 still uses pydantic v1 config names
        warnings.simplefilter("ignore")
        import sweeps

    found = list(sweeps.schema_violations_from_proposed_config(config))
    if not found:
        try:
            sweeps.SweepConfig(config)
        except Exception as exc:
            found.append(str(exc))
    return found


# -- files in the sweep directory ------------------------------------------------------------------

def write_sweep_file(sweep_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write the translated config to ``<sweep_dir>/wandb_sweep.yaml``; forget an earlier sweep's id."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / SWEEP_FILE
    path.write_text("# W&B sweep config of this Ray Tune sweep (controller: local; Ray Tune runs the trials).\n"
                    "# Publish: python -m reckoning_ray.tune publish " + str(sweep_dir) + "\n"
                    + yaml.safe_dump(config, sort_keys=False))
    (sweep_dir / SWEEP_ID_FILE).unlink(missing_ok=True)
    return path


def read_sweep_file(sweep_dir: str | Path) -> Optional[dict[str, Any]]:
    path = Path(sweep_dir) / SWEEP_FILE
    return yaml.safe_load(path.read_text()) if path.exists() else None


def recorded_sweep(sweep_dir: str | Path) -> Optional[dict[str, Any]]:
    """The W&B sweep recorded in ``<sweep_dir>/wandb_sweep.json`` (id, entity, project), or None."""
    path = Path(sweep_dir) / SWEEP_ID_FILE
    return json.loads(path.read_text()) if path.exists() else None


def sweep_id_for(sweep_dir: str | Path, cfg_tracking: Any) -> Optional[str]:
    """The recorded W&B sweep's id when it lives in ``cfg_tracking``'s entity and project, else None."""
    recorded = recorded_sweep(sweep_dir)
    if recorded and (recorded["entity"], recorded["project"]) == (cfg_tracking.entity or "", cfg_tracking.project):
        return recorded["id"]
    return None


def record_sweep(sweep_dir: str | Path, sweep_id: str, entity: str, project: str) -> dict[str, Any]:
    entry = {"id": sweep_id, "entity": entity, "project": project}
    (Path(sweep_dir) / SWEEP_ID_FILE).write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def trial_runs(sweep_dir: str | Path) -> dict[str, dict[str, list[Path]]]:
    """``{run id: {"offline": [dirs], "online": [dirs]}}`` for every trial under ``<sweep_dir>/trials``.

    Read from each trial's W&B writer record (``wandb_run.json``: a trial's run id is its trial
    id); a resumed trial has several offline directories, listed in order of their start. Online
    directories hold runs that W&B already has; directories without a run file are skipped.
    """

    found: dict[str, dict[str, list[Path]]] = {}
    for record_file in sorted(Path(sweep_dir).glob(f"trials/*/{RunWriter.RECORD}")):
        try:
            run_id = json.loads(record_file.read_text())["run_id"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("W&B: skipping %s (%s)", record_file, exc)
            continue
        for run_dir in run_dirs(record_file.parent):
            if not run_dir.is_dir() or not any(f.stat().st_size > 0 for f in run_dir.glob("run-*.wandb")):
                continue
            kind = "offline" if run_dir.name.startswith("offline-run-") else "online"
            found.setdefault(run_id, {"offline": [], "online": []})[kind].append(run_dir)
    return dict(sorted(found.items()))


def sync_command(run_dirs: list[Path], entity: str, project: str) -> list[str]:
    """The ``wandb sync`` command that uploads ``run_dirs`` to ``entity``/``project``
    (runs already synced are skipped by wandb itself)."""
    # the wandb of this interpreter, whatever PATH holds
    cmd = [sys.executable, "-m", "wandb", "sync", "--project", project]
    if entity:
        cmd += ["--entity", entity]
    return cmd + [str(d) for d in run_dirs]


# -- talking to W&B --------------------------------------------------------------------------------

def create_sweep(config: dict[str, Any], entity: str, project: str, prior_runs: list[str]) -> str:
    """Create the W&B sweep (``wandb.sweep``) with ``prior_runs`` attached; returns its id."""
    import wandb

    return wandb.sweep(config, entity=entity or None, project=project, prior_runs=prior_runs or None)


def find_sweep(config: dict[str, Any], entity: str, project: str) -> Optional[str]:
    """The id of a sweep of ``entity``/``project`` created from this same config (same name and
    description; the description holds the Tune sweep's start time), or None."""
    import wandb

    api = wandb.Api()
    for sweep in api.project(project, entity=entity or None).sweeps():
        theirs = sweep.config
        if theirs.get("name") == config.get("name") and theirs.get("description") == config.get("description"):
            return sweep.id
    return None


def sweep_command(*args: str, entity: str, project: str) -> list[str]:
    """``wandb sweep`` of this interpreter's wandb (whatever PATH holds) in ``entity``/``project``."""
    cmd = [sys.executable, "-m", "wandb", "sweep", "--project", project]
    if entity:
        cmd += ["--entity", entity]
    return cmd + list(args)


def attach_command(sweep_id: str, entity: str, project: str, run_ids: list[str], config_file: Path) -> list[str]:
    """The ``wandb sweep --update`` command that attaches ``run_ids`` to the sweep ``sweep_id``
    (its config re-sent from ``config_file``)."""
    prior = [arg for run_id in run_ids for arg in ("--prior_run", run_id)]
    return sweep_command("--update", sweep_id, *prior, str(config_file), entity=entity, project=project)


def stop_command(sweep_id: str, entity: str, project: str) -> list[str]:
    """The ``wandb sweep --stop`` command that marks the sweep finished."""
    return sweep_command("--stop", sweep_id, entity=entity, project=project)


def run_wandb_command(cmd: list[str], out: Callable[[str], None]) -> None:
    """Run a wandb CLI command, showing it and its output; RuntimeError when it failed.

    ``wandb sweep`` reports some failures (a sweep it cannot find, no entity) as a ``wandb: ERROR``
    line with exit status 0, so both count.
    """
    out("+ " + shlex.join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    text = (done.stdout + done.stderr).strip()
    for line in text.splitlines():
        out("  " + line)
    if done.returncode != 0 or "wandb: ERROR" in text:
        raise RuntimeError(f"`{shlex.join(cmd[1:])}` failed (exit status {done.returncode})")


def default_entity() -> str:
    """The logged-in user's default W&B entity (``wandb sweep --update`` needs one)."""
    import wandb

    return wandb.Api().default_entity or ""


def sweep_state(sweep_id: str, entity: str, project: str) -> str:
    """The W&B sweep's state (``RUNNING``, ``FINISHED``, ...), through the public API."""
    import wandb

    path = "/".join(p for p in (entity, project, sweep_id) if p)
    return str(wandb.Api().sweep(path).state).upper()


def start_online_sweep(cfg: Any, sweep_dir: str | Path, config: dict[str, Any],
                       timeout_s: float = CREATE_TIMEOUT_S) -> Optional[str]:
    """For an online Tune sweep: create the W&B sweep now so that trials' runs join it live.

    Returns the sweep id (recorded in ``wandb_sweep.json``; an id recorded by an earlier start of
    the same sweep, i.e. ``--resume``, is reused), or None after a warning when W&B cannot be
    reached within ``timeout_s``: the sweep then runs without it, and ``publish`` attaches the
    runs later.
    """
    entity, project = cfg.tracking.entity or "", cfg.tracking.project
    recorded = recorded_sweep(sweep_dir)
    if recorded and (recorded["entity"], recorded["project"]) == (entity, project):
        return recorded["id"]
    result: dict[str, Any] = {}

    def create() -> None:
        try:
            result["id"] = create_sweep(config, entity, project, [])
        except BaseException as exc:  # noqa: BLE001 - reported below, never raised into the sweep
            result["error"] = exc

    worker = threading.Thread(target=create, name="wandb-sweep-create", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if "id" not in result:
        why = result.get("error")
        reason = f"{type(why).__name__}: {why}" if why else f"no answer within {timeout_s:.0f} s"
        log.warning("W&B: could not create the sweep (%s); the trials log without it. Attach them "
                    "later with `python -m reckoning_ray.tune publish %s`.", reason, sweep_dir)
        print(f"W&B: could not create the sweep ({reason}); publish later with "
              f"python -m reckoning_ray.tune publish {sweep_dir}")
        return None
    record_sweep(sweep_dir, result["id"], entity, project)
    return result["id"]


# -- publish ---------------------------------------------------------------------------------------

@dataclass
class Publication:
    """What :func:`publish` sends for a sweep directory, read from its files (no network)."""

    sweep_dir: Path
    store: Any  # the sweep's object store, or None
    entity: str
    project: str
    config: dict[str, Any]  # the W&B sweep config
    config_file: Path  # the same, as a file (what `wandb sweep --update` reads)
    run_ids: list[str]  # the trials' run ids
    sync: Optional[list[str]]  # the `wandb sync` command of the offline runs, None when there is none
    recorded: Optional[dict[str, Any]]  # the W&B sweep recorded for this entity and project
    finished: bool  # the Tune sweep has finished (sweep_summary.json)
    checked: str  # a comment line: whether W&B's validator checked the config

    @property
    def where(self) -> str:
        return f"{self.entity + '/' if self.entity else ''}{self.project}"


def publish(sweep_dir: str | Path, dry_run: bool = False, out: Callable[[str], None] = print) -> int:
    """Upload a Ray Tune sweep's offline runs and show them as one W&B sweep; returns an exit code.

    1. ``wandb sync`` of every trial's offline run directories (already synced ones are skipped);
    2. the W&B sweep: the one recorded in ``wandb_sweep.json`` (or found by name), with the trial
       runs attached (``wandb sweep --update ID --prior_run ...``), else a new one
       (``wandb.sweep(config, prior_runs=trial ids)``), recorded;
    3. the sweep marked finished (``wandb sweep --stop``) when the Tune sweep has finished
       (``sweep_summary.json``).
    Only wandb's public API and command line are used.
    ``dry_run``: print the commands and the config (with every trial id) and touch no network.
    """

    sweep_dir, store = open_sweep(sweep_dir, log=lambda m: out("# " + m))
    plan = read_publication(sweep_dir, store, out)
    if plan is None:
        return 2
    if dry_run:
        show_publication(plan, out)
        return 0
    return send_publication(plan, out)


def read_publication(sweep_dir: Path, store: Any, out: Callable[[str], None]) -> Optional[Publication]:
    """What publishing ``sweep_dir`` sends; None after an error line when it is no sweep directory or
    its W&B sweep config is invalid."""
    saved = sweep_dir / "sweep_config.yaml"
    if not saved.is_file():
        out(f"error: {sweep_dir} is not a sweep directory (no sweep_config.yaml); pass "
            "<tune.storage_path>/<tune.name>")
        return None
    cfg = load_config(str(saved))
    entity, project = cfg.tracking.entity or "", cfg.tracking.project
    config = read_sweep_file(sweep_dir)
    if config is None:  # a sweep started before wandb_sweep.yaml existed
        config = sweep_config_of(cfg, load_space(cfg.tune.space, cfg))
    runs = trial_runs(sweep_dir)
    offline_dirs = [d for entry in runs.values() for d in entry["offline"]]
    recorded = recorded_sweep(sweep_dir)
    if recorded and (recorded["entity"], recorded["project"]) != (entity, project):
        recorded = None
    try:
        problems = violations(config)
        checked = "# the config passes W&B's sweep-config validator (the sweeps package)"
    except ImportError:
        problems = []
        checked = "# W&B's sweep-config validator is not installed (pip install wandb[sweeps]): the server checks"
    if problems:
        out(f"error: {sweep_dir / SWEEP_FILE} is not a valid W&B sweep config: " + "; ".join(problems))
        return None
    return Publication(sweep_dir, store, entity, project, config, sweep_dir / SWEEP_FILE, list(runs),
                       sync_command(offline_dirs, entity, project) if offline_dirs else None, recorded,
                       (sweep_dir / "sweep_summary.json").exists(), checked)


def show_publication(plan: Publication, out: Callable[[str], None]) -> None:
    """``publish --dry-run``: the commands and the config, nothing sent."""
    out(f"# publish {plan.sweep_dir} to W&B project {plan.where} (dry run: nothing is sent)")
    out(f"# {len(plan.run_ids)} trial run(s): {', '.join(plan.run_ids) or '-'}")
    out(plan.checked)
    out("# 1. upload the trials' offline runs:")
    out(shlex.join(plan.sync) if plan.sync else "#    (no offline run to upload)")
    if plan.recorded:
        out(f"# 2. add the trial runs to the recorded W&B sweep {plan.recorded['id']} (its config: "
            f"{plan.config_file}, shown below):")
        out(shlex.join(attach_command(plan.recorded["id"], plan.entity, plan.project, plan.run_ids,
                                      plan.config_file)))
    else:
        out("# 2. create the W&B sweep, wandb.sweep(config, entity=, project=, prior_runs=), with the values "
            "below (or add the runs to a sweep the project already has from this same config, as for a "
            f"recorded sweep), and record its id in {plan.sweep_dir / SWEEP_ID_FILE}")
    if plan.finished:
        out("# 3. the Tune sweep has finished: mark the W&B sweep finished")
        out(shlex.join(stop_command(plan.recorded["id"] if plan.recorded else "<sweep id>", plan.entity,
                                    plan.project)))
    out("---")
    out(yaml.safe_dump({"entity": plan.entity or None, "project": plan.project, "prior_runs": plan.run_ids,
                        "config": plan.config}, sort_keys=False).rstrip())


def send_publication(plan: Publication, out: Callable[[str], None]) -> int:
    """Upload the offline runs, attach them to the W&B sweep (found or created, then recorded) and
    mark it finished with the Tune sweep; returns an exit code."""
    entity, project, run_ids = plan.entity, plan.project, plan.run_ids
    if plan.sync:
        out("+ " + shlex.join(plan.sync))
        done = subprocess.run(plan.sync)
        if done.returncode != 0:
            out(f"error: wandb sync exited with {done.returncode}; nothing else was sent")
            return 1
    try:
        sweep_id = plan.recorded["id"] if plan.recorded else find_sweep(plan.config, entity, project)
        if sweep_id:
            if not plan.config_file.exists():  # a sweep started before wandb_sweep.yaml existed
                plan.config_file.write_text(yaml.safe_dump(plan.config, sort_keys=False))
            # `wandb sweep --update` looks the sweep up in an entity: name the user's default one
            run_wandb_command(attach_command(sweep_id, entity or default_entity(), project, run_ids,
                                             plan.config_file), out)
            out(f"added {len(run_ids)} run(s) to W&B sweep {sweep_id}")
        else:
            sweep_id = create_sweep(plan.config, entity, project, run_ids)
            out(f"created W&B sweep {sweep_id} with {len(run_ids)} run(s)")
        record_sweep(plan.sweep_dir, sweep_id, entity, project)
        if plan.store is not None:
            plan.store.push_sweep()
        if plan.finished and sweep_state(sweep_id, entity, project) in ("RUNNING", "PAUSED", "PENDING"):
            run_wandb_command(stop_command(sweep_id, entity, project), out)
    except Exception as exc:  # no key, no network, server errors: say so, keep the files
        out(f"error: W&B sweep not published ({type(exc).__name__}: {exc}); the runs' files stay in "
            f"{plan.sweep_dir}/trials; run the command again once W&B can be reached")
        return 1
    out(f"W&B sweep: {plan.where}/sweeps/{sweep_id}")
    return 0


def sweep_description(name: str) -> str:
    """Description that tells one start of a Tune sweep from another of the same name."""
    return f"Ray Tune sweep {name} (reckoning-ray), started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
