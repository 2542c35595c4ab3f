"""A run's configuration: the schema's defaults (:mod:`reckoning_ray.core.schema`, one documented
default for every key) with a preset and overrides on top, checked. Presets (``reckoning_ray/conf/<name>.yaml``) and command-line
``key=value`` overrides only override these defaults. ``load_config`` merges them onto the
structured schema, so an unknown key or a wrong type fails at once, then ``validate`` checks values
and names the key, the value and what is allowed. Nothing here imports torch or Ray.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from reckoning_ray.core.errors import ConfigError
from reckoning_ray.core.schema import (
    AUTO_NODE_TYPE,
    DEFAULT_PRESET,
    GROUPS,
    METRIC_MODES,
    METRICS,
    NODE_TYPES,
    PROOFS,
    PROOFWRITER_LABELS,
    Config,
    parse_hop_range,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # reckoning_ray/conf


def metric_mode(metric: str) -> str:
    """``"max"`` when a larger value of the validation metric ``metric`` is better, ``"min"`` when
    a smaller one is (:data:`METRIC_MODES`); ConfigError for a metric that is not one of
    :data:`METRICS`."""
    try:
        return METRIC_MODES[metric]
    except KeyError:
        raise ConfigError(f"{metric!r} is not a validation metric: choose one of {METRICS}") from None


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def _preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = CONF_DIR / f"{preset}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(
        f"preset {preset!r} does not exist: choose one of {available_presets()} "
        f"or pass a path to a YAML config file"
    )


def _merge(base: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(getattr(exc, "msg", None) or exc).splitlines()[0]
        choice = re.fullmatch(r"Invalid value (.*), expected one of \[(.*)\]", reason)
        if choice:  # a Choice key: say it as validate() does
            allowed = tuple(v.strip() for v in choice.group(2).split(","))
            raise ConfigError(f"{origin}: {key}={choice.group(1)} is invalid: choose one of {allowed}") from None
        if "is not a ListConfig" in reason:  # a list key given one value
            raise ConfigError(f"{origin}: {key} is a list: write it in brackets, e.g. {key}=[value] or "
                              f"{key}=[first,second]") from None
        raise ConfigError(f"{origin}: {key} is invalid: {reason}") from None


def load_config(preset: Optional[str] = None, overrides: Optional[List[str]] = None) -> DictConfig:
    """Schema defaults <- preset YAML (name or path) <- ``key=value`` overrides, then validate.

    Raises ConfigError naming the key, the value and what is allowed.
    """
    overrides = list(overrides or [])
    cfg = OmegaConf.structured(Config)
    path = _preset_path(preset or DEFAULT_PRESET)
    chain = _preset_chain(path)
    for link_path, link_cfg in chain:
        cfg = _merge(cfg, link_cfg, f"config file {link_path}")
    preset_cfg = chain[-1][1]
    if preset is not None and "preset" not in preset_cfg:
        cfg.preset = Path(preset).stem
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. train.epochs=2)")
    if overrides:
        for override in overrides:
            key = override.split("=", 1)[0]
            if OmegaConf.select(cfg, key, default="__missing__") == "__missing__" and not _is_dict_entry(cfg, key):
                raise ConfigError(f"unknown config key {key!r} in override {override!r}; {_suggest(cfg, key)}")
        cfg = _merge(cfg, OmegaConf.from_dotlist(overrides), "command-line override")
    validate(cfg)
    return cfg


def _preset_chain(path: Path) -> list[tuple[Path, DictConfig]]:
    """The preset at ``path`` and the presets it ``extends:`` (a preset name or YAML path), base first.

    ``extends: paper`` at the top of a preset loads ``paper`` first, so a variant states only the
    keys it changes (e.g. ``paper-distractors`` = ``paper`` + ``data.distractors: 6``).
    """
    chain: list[tuple[Path, DictConfig]] = []
    seen: list[Path] = []
    while True:
        if path.resolve() in seen:
            raise ConfigError(f"config file {path}: 'extends' loops back ({' -> '.join(map(str, seen))})")
        seen.append(path.resolve())
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax error
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        base = loaded.pop("extends", None) if isinstance(loaded, DictConfig) else None
        chain.append((path, loaded))
        if base is None:
            return chain[::-1]
        try:
            path = _preset_path(str(base))
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: extends={base!r}: {exc}") from None


def _is_dict_entry(cfg: DictConfig, key: str) -> bool:
    parent, _, _ = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else None
    return isinstance(node, DictConfig) and parent.endswith("steps_by_hops")


def _suggest(cfg: DictConfig, key: str) -> str:
    parent, _, _ = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if isinstance(node, DictConfig):
        return f"keys under {parent or 'the top level'!r}: {sorted(str(k) for k in node.keys())}"
    return f"top-level groups: {sorted(str(k) for k in cfg.keys())}"


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def validate(cfg: DictConfig) -> None:
    """Check values (types and choices were checked by the schema), group by group, then the
    keys that depend on each other. Raises ConfigError naming the key."""
    for name, check in GROUP_CHECKS.items():
        check(cfg[name])
    c = cfg
    per_step = c.train.batch_size * c.train.grad_accum
    for key in ("num_workers", "max_workers"):
        _check(c.resources[key] <= per_step, f"resources.{key}", c.resources[key],
               f"is more than the {per_step} tasks of an optimizer step (train.batch_size x train.grad_accum, "
               f"global whatever the worker count): a worker beyond them would have no task; lower it to {per_step}")
    _check(c.resources.max_workers == 0 or c.resources.max_workers >= c.resources.num_workers, "resources.max_workers",
           c.resources.max_workers, f"an elastic run grows from resources.num_workers={c.resources.num_workers} up "
           "to resources.max_workers: make it at least that, or 0 for a fixed worker count")
    if c.tune.extend:
        _check(c.outer.schedule == "wsd", "tune.extend", True,
               f"extends trials from the start of their cooldown, which needs outer.schedule=wsd (it is "
               f"{c.outer.schedule}); set outer.schedule=wsd or tune.extend=false")
        _check(c.tune.scheduler == "asha", "tune.extend", True,
               f"follows ASHA's promotions, which needs tune.scheduler=asha (it is {c.tune.scheduler}); set "
               f"tune.scheduler=asha or tune.extend=false")


def _check_data(d: Any) -> None:
    if d.source in ("proofwriter", "clutrr"):
        _check(d.path is not None, "data.path", d.path, f"data.source={d.source} needs data.path=<file or directory>")
        _check(os.path.exists(os.path.expanduser(d.path)), "data.path", d.path,
               "the path does not exist; pass an existing file or directory")
    if d.source == "hf":
        _check(bool(d.path), "data.path", d.path, "data.source=hf needs data.path=<dir or hub id>")
    for k in ("num_train", "num_validation", "num_test"):
        _check(d[k] >= 0, f"data.{k}", d[k], "must be >= 0")
    _check(d.num_train >= 1 or d.source != "generate", "data.num_train", d.num_train, "must be >= 1")
    _check(all(h >= 0 for h in d.hops), "data.hops", list(d.hops), "hop counts must be >= 0")
    for k in ("train_hops", "validation_hops", "test_hops"):
        if d[k] is not None:
            _check(all(h >= 0 for h in d[k]), f"data.{k}", list(d[k]), "hop counts must be >= 0 (or null to use data.hops)")
    _check(d.distractors >= -1, "data.distractors", d.distractors, "-1 (all), 0 (none) or a count")
    _check(isinstance(d.balance, bool), "data.balance", d.balance, "true (resample True / False per theory to "
           "the Unknown count, selection=paper) or false (keep every selected question)")
    _check(d.proofs in PROOFS, "data.proofs", d.proofs, f"choose one of {PROOFS}: shortest (one shortest proof's "
           f"sentences) or merged (the sentences of all alternative proofs)")
    for k in ("validation_fraction", "test_fraction"):
        _check(0.0 <= d[k] < 1.0, f"data.{k}", d[k], "must be in [0, 1)")
    labels = list(d.generator.labels)
    _check(bool(labels) and set(labels) <= set(PROOFWRITER_LABELS), "data.generator.labels", labels,
           f"labels are some of {list(PROOFWRITER_LABELS)}; quote them on the command line, "
           f"data.generator.labels='[\"yes\",\"no\"]' (YAML reads a bare yes / no as true / false)")


def _check_inner(i: Any) -> None:
    if i.steps is not None:
        _check(i.steps >= 1, "inner.steps", i.steps, "must be >= 1 (or null to use inner.steps_by_hops)")
    else:
        _check(len(i.steps_by_hops) > 0, "inner.steps_by_hops", dict(i.steps_by_hops),
               "needs at least one hops: steps entry, or set inner.steps")
        ranges = []
        for hops, steps in i.steps_by_hops.items():
            _check(steps >= 1, f"inner.steps_by_hops.{hops}", steps, "inner steps must be >= 1")
            ranges.append((*parse_hop_range(str(hops)), str(hops)))
        ranges.sort()
        for (lo1, hi1, k1), (lo2, hi2, k2) in zip(ranges, ranges[1:]):
            _check(lo2 > hi1, "inner.steps_by_hops", dict(i.steps_by_hops),
                   f"ranges {k1!r} and {k2!r} overlap; give every hop count one entry (override an "
                   f"existing range, e.g. inner.steps_by_hops.0-4=3, or write the table in a config file)")
    _check(i.lr_init > 0, "inner.lr_init", i.lr_init, "must be > 0")
    _check(0 <= i.beta1 < 1 and 0 <= i.beta2 < 1, "inner.beta1/beta2", (i.beta1, i.beta2), "must be in [0, 1)")
    _check(i.eps > 0, "inner.eps", i.eps, "must be > 0")
    _check(i.tasks_per_pass >= 0, "inner.tasks_per_pass", i.tasks_per_pass,
           "must be >= 0 (0: all tasks of a step in one pass)")
    params = [str(p) for p in i.params]
    _check(len(params) > 0, "inner.params", params, "must name what the inner loop adapts: [all], [lora] or "
           "parameter-name patterns")
    for word in ("all", "lora"):
        _check(word not in params or params == [word], "inner.params", params, f"'{word}' stands alone: "
               f"inner.params=[{word}], or name patterns without it")
    if params == ["lora"]:
        _check(i.lora.r >= 1, "inner.lora.r", i.lora.r, "must be >= 1")
        _check(i.lora.alpha > 0, "inner.lora.alpha", i.lora.alpha, "must be > 0")
        _check(i.lora.dropout == 0, "inner.lora.dropout", i.lora.dropout, "only 0 is supported: the adapters "
               "are merged into the weights for each call (model.dropout applies to the whole model)")


def _check_outer(o: Any) -> None:
    _check(o.lr > 0, "outer.lr", o.lr, "must be > 0")
    _check(o.inner_lr_lr >= 0, "outer.inner_lr_lr", o.inner_lr_lr, "must be >= 0")
    _check(o.eps > 0, "outer.eps", o.eps, "must be > 0")
    _check(o.clip >= 0, "outer.clip", o.clip, "must be >= 0 (0 disables clipping)")
    _check(0 <= o.warmup_ratio < 1, "outer.warmup_ratio", o.warmup_ratio, "must be in [0, 1)")
    _check(0 < o.cooldown_fraction <= 1, "outer.cooldown_fraction", o.cooldown_fraction, "must be in (0, 1]")


# A name that becomes a file or directory name (a run's directory, a sweep's): letters, digits,
# ".", "_" and "-", never "." or ".." alone, so that it can never point outside its parent.
_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _check_name(key: str, value: Any, empty_ok: bool) -> None:
    text = "" if value is None else str(value)
    if empty_ok and text == "":
        return
    _check(bool(_NAME.fullmatch(text)) and text not in (".", ".."), key, value,
           "a name, not a path: use letters, digits, '.', '_' and '-' only (it names a directory under "
           + ("train.output_dir" if key.startswith("train.") else "tune.storage_path") + ")")


def _check_train(t: Any) -> None:
    _check_name("train.run_name", t.run_name, empty_ok=True)  # empty: a name is made for the run
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be >= 1")
    _check(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _check(t.validations_per_epoch >= 1, "train.validations_per_epoch", t.validations_per_epoch, "must be >= 1")
    _check(t.patience >= 0, "train.patience", t.patience, "must be >= 0 (0 = no early stopping)")
    _check(t.metric in METRICS, "train.metric", t.metric, f"choose one of {METRICS}")
    _check(t.max_steps >= 0, "train.max_steps", t.max_steps, "must be >= 0")


def _check_model(m: Any) -> None:
    _check(m.dtype in ("float32", "float64", "bfloat16"), "model.dtype", m.dtype, "choose float32, float64 or bfloat16")
    for k in ("n_layer", "n_embd", "n_head", "n_positions", "max_length"):
        _check(m[k] >= 1, f"model.{k}", m[k], "must be >= 1")
    _check(m.n_embd % m.n_head == 0, "model.n_head", m.n_head, f"must divide model.n_embd={m.n_embd}")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1) (0 switches dropout off)")


def _check_eval(e: Any) -> None:
    _check(e.max_new_tokens >= 1, "eval.max_new_tokens", e.max_new_tokens, "must be >= 1")


def _check_resources(r: Any) -> None:
    _check(r.num_workers >= 0, "resources.num_workers", r.num_workers,
           "must be >= 1 (Ray Train workers) or 0 (one process without Ray)")
    _check(r.node_type in NODE_TYPES, "resources.node_type", r.node_type, f"choose one of {NODE_TYPES} ('' = any node)")


def _check_tune(t: Any) -> None:
    _check_name("tune.name", t.name, empty_ok=False)
    _check(t.num_samples >= 1, "tune.num_samples", t.num_samples, "must be >= 1")
    _check(t.max_concurrent >= 1, "tune.max_concurrent", t.max_concurrent, "must be >= 1")
    _check(t.metric in METRICS, "tune.metric", t.metric, f"choose one of {METRICS}")
    _check(t.mode in ("min", "max"), "tune.mode", t.mode, "choose min or max")
    if t.metric in METRIC_MODES:
        _check(t.mode == metric_mode(t.metric), "tune.mode", t.mode,
               f"tune.metric={t.metric} is better when {'higher' if metric_mode(t.metric) == 'max' else 'lower'}, "
               f"so tune.mode must be {metric_mode(t.metric)}: set tune.mode={metric_mode(t.metric)} "
               f"(or choose another tune.metric)")
    _check(t.reduction_factor >= 2, "tune.reduction_factor", t.reduction_factor, "must be >= 2")
    _check(1 <= t.grace_period <= t.max_rounds, "tune.grace_period", t.grace_period,
           f"must be between 1 and tune.max_rounds={t.max_rounds}")
    _check(t.curve_top_k >= 1, "tune.curve_top_k", t.curve_top_k, "must be >= 1")
    _check(0.5 <= t.curve_confidence < 1, "tune.curve_confidence", t.curve_confidence, "must be in [0.5, 1)")
    _check(t.curve_min_rounds >= 4, "tune.curve_min_rounds", t.curve_min_rounds,
           "must be >= 4 (a curve of 3 parameters and its uncertainty need 4 points)")
    _check(t.storage_wait_s >= 0, "tune.storage_wait_s", t.storage_wait_s, "must be >= 0 (seconds)")


GROUP_CHECKS = {"model": _check_model, "data": _check_data, "inner": _check_inner, "outer": _check_outer,
                "eval": _check_eval, "train": _check_train, "resources": _check_resources, "tune": _check_tune}


def node_type_for(cfg: DictConfig) -> str:
    """The custom resource name the training workers ask for ("" = none)."""
    if cfg.resources.node_type == "auto":
        return AUTO_NODE_TYPE[cfg.train.method]
    return str(cfg.resources.node_type)


def inner_steps_for(cfg: DictConfig, hops: int) -> int:
    """Inner steps for a task with ``hops`` reasoning hops (:meth:`InnerConfig.steps_for`)."""
    return group(cfg, "inner").steps_for(hops)


def group(cfg: DictConfig, name: str) -> Any:
    """The typed dataclass of config group ``name`` (``InnerConfig``, ``OuterConfig``, ...),
    validated: what the core (methods, loop) takes instead of the whole tree."""
    node = cfg[name]
    if isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict:
        node = OmegaConf.merge(OmegaConf.structured(GROUPS[name]), node)
    if name in GROUP_CHECKS:
        GROUP_CHECKS[name](node)
    return OmegaConf.to_object(node)


def from_container(values: dict[str, Any]) -> DictConfig:
    """A typed config tree from ``OmegaConf.to_container`` output (a config sent to a Ray worker or
    a Tune trial), validated again."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), values)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config is invalid: {exc}") from None
    validate(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (re-loadable with ``--config``). Holds no secrets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """``{"inner.lr_init": 3e-5, ...}``: the resolved config as one flat dict (for W&B / Tune)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return out
