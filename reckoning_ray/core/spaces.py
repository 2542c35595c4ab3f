"""Search spaces: YAML files of ``config.key: {distribution: args}`` (``tune_spaces/``), read and
checked against the config they will be applied to, before any trial starts. Used by the Tune
driver and by the W&B sweep translation alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from reckoning_ray.core.config import validate
from reckoning_ray.core.errors import ConfigError

# The search spaces: the top-level tune_spaces/ directory ships in the wheel as the package data
# reckoning_ray/tune_spaces/ (pyproject.toml); a source checkout or an editable install (whose
# finder does not map that data-only package) reads the top-level directory itself.
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # reckoning_ray/


SPACES_DIR = (_PACKAGE_DIR / "tune_spaces" if (_PACKAGE_DIR / "tune_spaces").is_dir()
              else _PACKAGE_DIR.parent / "tune_spaces")


# Distribution name -> (argument form, builder). Arguments come as a list in the YAML.
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint", "qloguniform")


# -- search spaces ---------------------------------------------------------------------------------

def space_path(space: str) -> Path:
    """The file of a search space: ``space`` is a YAML path or the name of one in SPACES_DIR."""
    path = Path(space)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"tune.space={space!r}: file not found")
        return path
    candidate = SPACES_DIR / f"{space}.yaml"
    if not candidate.is_file():
        names = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise ConfigError(f"tune.space={space!r} is not a search space: choose one of {names} "
                          f"(the files of {SPACES_DIR}) or a YAML path")
    return candidate


def load_space(space: str, cfg: DictConfig) -> dict[str, tuple[str, list]]:
    """Read and check a space file: ``{config key: (distribution, args)}``.

    Every key must exist in the config, every distribution be known, its arguments well formed, and
    each value the distribution can produce must pass the config's validation.
    """
    path = space_path(space)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"search space {path}: expected a mapping of config keys to distributions")
    out: dict[str, tuple[str, list]] = {}
    for key, spec in raw.items():
        where = f"search space {path}, key {key!r}"
        if OmegaConf.select(cfg, str(key), default="__missing__") == "__missing__":
            raise ConfigError(f"{where}: not a config key (e.g. inner.steps, inner.lr_init, outer.lr)")
        if not (isinstance(spec, dict) and len(spec) == 1):
            raise ConfigError(f"{where}: expected one distribution, e.g. {{loguniform: [1.0e-5, 1.0e-4]}}; "
                              f"allowed: {list(DISTRIBUTIONS)}")
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution {dist!r}; allowed: {list(DISTRIBUTIONS)}")
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {dist} needs a non-empty list of arguments")
        if dist in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or args[0] >= args[1]:
                raise ConfigError(f"{where}: {dist} needs [low, high] numbers with low < high, got {args}")
            if dist == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {args}")
        if dist == "qloguniform" and (len(args) != 3 or args[0] <= 0 or args[0] >= args[1]):
            raise ConfigError(f"{where}: qloguniform needs [low, high, q] with 0 < low < high, got {args}")
        samples = list(args) if dist in ("choice", "grid") else [args[0], args[1] - (1 if dist == "randint" else 0)]
        for value in samples:
            try:
                trial = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={json.dumps(value)}"]))
                validate(trial)
            except ConfigError as exc:
                raise ConfigError(f"{where}: value {value!r} is not allowed: {exc}") from None
            except Exception as exc:  # type errors from the schema
                raise ConfigError(f"{where}: value {value!r} does not fit the config: {str(exc).splitlines()[0]}") from None
        out[str(key)] = (dist, list(args))
    return out
