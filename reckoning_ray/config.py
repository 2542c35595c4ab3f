"""The typed configuration tree: one documented default for every key.

Presets (``reckoning_ray/conf/<name>.yaml``) and command-line ``key=value`` overrides only
override these defaults. ``load_config`` merges them onto the structured schema, so an unknown
key or a wrong type fails at once, then ``validate`` checks values and names the key, the value
and what is allowed. Nothing here imports torch or Ray.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).parent / "conf"
DEFAULT_PRESET = "embedded"



class Choice(StrEnum):
    """A config key's closed set of values. Members are named as their YAML value, so presets and
    overrides write ``inner.optimizer=sgd``, the schema rejects anything else (naming the key and
    the allowed values) and members compare equal to their strings."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Method(Choice):
    reckoning = "reckoning"
    icr = "icr"  # fine-tuned in-context reasoning: knowledge and question in one prompt
    icr_no_facts = "icr_no_facts"  # the question alone
    icr_random_facts = "icr_random_facts"  # the question with facts drawn from other tasks


class Source(Choice):
    generate = "generate"
    proofwriter = "proofwriter"
    clutrr = "clutrr"
    hf = "hf"


class Selection(Choice):
    qdep = "qdep"
    paper = "paper"


class Family(Choice):
    proofwriter = "proofwriter"
    clutrr = "clutrr"


class InnerOptimizer(Choice):
    adamw = "adamw"
    sgd = "sgd"


class LrSpace(Choice):
    linear = "linear"
    log = "log"


class Schedule(Choice):
    linear = "linear"  # warmup, then linear decay to 0 (the paper's)
    cosine = "cosine"  # warmup, then half a cosine to 0
    wsd = "wsd"  # warmup, constant, linear cooldown over the last outer.cooldown_fraction (extendable)


class TrialScheduler(Choice):
    asha = "asha"  # asynchronous successive halving (the default)
    curve = "curve"  # learning-curve extrapolation (reckoning_ray/curve.py)
    none = "none"  # every trial runs its rounds (a full grid or random search)


class Autocast(Choice):
    none = "none"
    bf16 = "bf16"


class Engine(Choice):
    reference = "reference"  # the plain functional inner loop, task by task (reckoning_ray/bilevel/reference.py)
    fused = "fused"  # fused AdamW/SGD nodes, tasks batched under vmap (reckoning_ray/bilevel/fused.py)


class TrackingMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


METHODS = Method.values()
SOURCES = Source.values()
SELECTIONS = Selection.values()
FAMILIES = Family.values()
INNER_OPTIMIZERS = InnerOptimizer.values()
LR_SPACES = LrSpace.values()
AUTOCAST_MODES = Autocast.values()
ENGINES = Engine.values()
TRACKING_MODES = TrackingMode.values()
NODE_TYPES = ("", "auto", "a100", "rtx3090")
# node_type "auto": the paper's placement, RECKONING on A100 nodes and the baselines on RTX 3090s.
AUTO_NODE_TYPE = {"reckoning": "a100", "icr": "rtx3090", "icr_no_facts": "rtx3090", "icr_random_facts": "rtx3090"}
METRICS = ("val/label_accuracy", "val/answer_loss")


class InputError(Exception):
    """A problem of a run's input (config, data, model, checkpoint): the same every time the run
    starts, so the run stops at once (exit status 2) and is never retried. The message names the
    key or file and the fix. Subclasses: ConfigError, DataFormatError, EncodeError,
    ModelLoadError, BilevelError, CheckpointError."""


class ConfigError(InputError, ValueError):
    """A configuration problem; the message names the key, the value and what is allowed."""


@dataclass
class ModelConfig:
    # "embedded": a small randomly initialised GPT-2 with a tokenizer built from the data.
    # Anything else is a hub id (e.g. "gpt2", the paper's model) or a local directory
    # written by save_pretrained.
    name_or_path: str = "embedded"
    # Shape of the embedded model (ignored for hub ids / local directories).
    n_layer: int = 1
    n_embd: int = 64
    n_head: int = 2
    n_positions: int = 256
    # "float32" or "float64" (float64 for gradient checks).
    dtype: str = "float32"
    # Longest token sequence fed to the model (knowledge sentence, question + answer).
    max_length: int = 128
    # Dropout probability in [0, 1): GPT-2's resid_pdrop, embd_pdrop and attn_pdrop (other
    # architectures: their config's dropout / attention_dropout / hidden_dropout where present),
    # for the embedded model and for hub ids / local directories alike. Active while training, in
    # RECKONING's inner and outer passes and in FT-ICR fine-tuning; off at evaluation. The paper
    # presets use GPT-2's 0.1 (as the authors' code); the embedded preset and the gradient tests 0.
    dropout: float = 0.0


@dataclass
class GeneratorConfig:
    # Offline task generator (data.source=generate). "proofwriter": entities with attributes
    # and rules, yes/no/none answers; "clutrr": family relation chains.
    num_entities: int = 8
    num_attributes: int = 8
    # Rules per theory for multi-hop ProofWriter-style questions.
    num_rules: int = 4
    # Labels the ProofWriter-style generator emits ("none" = open-world unknown).
    labels: List[str] = field(default_factory=lambda: ["yes", "no"])
    # Hold out (entity, attribute) question pairs from training so validation asks new pairs.
    holdout_pairs: bool = True


@dataclass
class DataConfig:
    # generate | proofwriter (meta-*.jsonl) | clutrr (CSV) | hf (datasets save_to_disk dir or hub id)
    source: Source = Source.generate
    # Task family for generated data: proofwriter | clutrr.
    family: Family = Family.proofwriter
    # File or directory for proofwriter / clutrr / hf sources.
    path: Optional[str] = None
    # Keep only tasks with these hop counts; empty keeps all.
    hops: List[int] = field(default_factory=lambda: [0])
    # Hop counts of one split (length generalisation, e.g. train_hops=[2,3] test_hops=[2,...,10]);
    # null uses data.hops, empty keeps all. Generated data is generated with these hop counts.
    train_hops: Optional[List[int]] = None
    validation_hops: Optional[List[int]] = None
    test_hops: Optional[List[int]] = None
    # Which ProofWriter questions become tasks (data.source=proofwriter; the other sources have no
    # selection step, so the key is ignored there and the paper presets can share it).
    # "qdep": every question; Unknown questions get the entity's facts plus the failed rules.
    # "paper": the RECKONING authors' data: questions whose proof names >= 2 sentences (Unknown:
    # >= 2 rules in the deepest failure, whose sentences are its facts), True and False resampled
    # per theory (with replacement) to the theory's Unknown count, and data.distractors drawn with
    # replacement then de-duplicated (for every file source). hops stays QDep; the paper's
    # "depth-D" is the release file data.path points at.
    selection: Selection = Selection.qdep
    # Distractor sentences kept per task: -1 keeps all the source has, 0 none, n at most n
    # (selection=paper: n draws with replacement, de-duplicated).
    distractors: int = 0
    # Number of tasks per split for generated data; caps for file sources (0 = no cap).
    num_train: int = 2000
    num_validation: int = 256
    num_test: int = 256
    # Fraction held out for validation / test when a source has a single file.
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


@dataclass
class InnerConfig:
    # Inner-loop optimizer: "adamw" (the paper's) or "sgd".
    optimizer: InnerOptimizer = InnerOptimizer.adamw
    # Fixed number of inner steps for every task; null uses steps_by_hops.
    steps: Optional[int] = None
    # Inner steps per hop-count range "lo-hi" (or a single "k"); paper: 4 for 2-4 hops, 5 for
    # 5-6. A hop count outside every range uses the nearest range. Override one entry with
    # inner.steps_by_hops.5-6=6.
    steps_by_hops: Dict[str, int] = field(default_factory=lambda: {"0-4": 4, "5-6": 5})
    # Initial value of every learned inner learning rate (one per parameter tensor per step).
    lr_init: float = 3e-5
    # "linear": the learned rates are used as they are (paper, may turn negative);
    # "log": stored as log(lr) so they stay positive.
    lr_space: LrSpace = LrSpace.linear
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    # false: second-order (differentiate through the unrolled inner loop); true: first-order.
    first_order: bool = False
    # Memory options of the bilevel step (bench/memory_modes.py measures each).
    # checkpoint: keep only the inner gradients; the backward pass replays the optimizer from them
    # and recomputes each step's forward and gradient (second order; about 1.5x the time).
    checkpoint: bool = False
    # autocast: "bf16" runs the model's forward passes in bfloat16 (bf16 copies of the weights,
    # under torch.autocast); the weights, the inner-optimizer arithmetic and the learned rates stay
    # in the model's dtype. "none": off.
    autocast: Autocast = Autocast.none
    # tasks_per_pass: most tasks one batched pass holds at once (their inner graphs live together);
    # a larger batch runs in several passes whose gradients add up. 0: all tasks of a step at once.
    tasks_per_pass: int = 0
    # engine: "fused" (default) runs each inner step as one fused optimizer node and all tasks of a
    # pass at once under vmap; "reference" is the plain functional inner loop, task by task, op by
    # op (the definition the fused engine is tested against; slower).
    engine: Engine = Engine.fused

    def steps_for(self, hops: int) -> int:
        """Inner steps for a task with ``hops`` reasoning hops (fixed ``steps`` wins, else the
        ``steps_by_hops`` range holding ``hops``, else the nearest range)."""
        if self.steps is not None:
            return int(self.steps)
        best: tuple[int, int] | None = None  # (distance, steps)
        for key, steps in self.steps_by_hops.items():
            lo, hi = _parse_hop_range(str(key))
            distance = 0 if lo <= hops <= hi else min(abs(hops - lo), abs(hops - hi))
            if best is None or distance < best[0]:
                best = (distance, int(steps))
        assert best is not None, "validate() guarantees a non-empty inner.steps_by_hops"
        return best[1]

    def max_steps(self) -> int:
        """The most inner steps any task takes (the learned rates cover this many steps)."""
        if self.steps is not None:
            return int(self.steps)
        return max(int(v) for v in self.steps_by_hops.values())


@dataclass
class OuterConfig:
    # Outer AdamW on the initial weights.
    lr: float = 3e-5
    # Outer learning rate of the learned inner learning rates (own group, no weight decay).
    inner_lr_lr: float = 3e-5
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Gradient-norm clip over all meta-parameters; 0 disables.
    clip: float = 1.0
    # Fraction of optimizer steps spent in linear warmup (kept in steps when a run is extended).
    warmup_ratio: float = 0.0
    # Outer learning-rate schedule after the warmup (reckoning_ray/schedules.py): linear decay to
    # 0 (the paper's), cosine, or wsd: constant, then a linear cooldown to 0 over the last
    # cooldown_fraction of the steps. A wsd run keeps its checkpoint at the start of the cooldown
    # and can be extended from it (python -m reckoning_ray.train --resume RUN --extend-to STEPS).
    schedule: Schedule = Schedule.linear
    cooldown_fraction: float = 0.2
    # Multi-task target "<label> because <relevant facts>" (paper) or the label only.
    multi_task: bool = True


@dataclass
class EvalConfig:
    # Greedy tokens generated after the question prompt at evaluation.
    max_new_tokens: int = 48
    # Cap on validation tasks per validation round (0 = all).
    max_tasks: int = 0


@dataclass
class TrainConfig:
    # reckoning | icr (fine-tuned in-context) | icr_no_facts (question only) | icr_random_facts
    method: Method = Method.reckoning
    # Tasks per micro-batch and micro-batches accumulated per optimizer step. Both are global: an
    # optimizer step consumes batch_size x grad_accum tasks whatever resources.num_workers is (the
    # workers split each micro-batch, so num_workers must divide batch_size).
    batch_size: int = 2
    grad_accum: int = 2
    epochs: int = 6
    # Validation rounds per epoch, evenly spaced (paper: 2, middle and end).
    validations_per_epoch: int = 2
    # Stop after this many validations without improvement of the metric (0 = never).
    patience: int = 3
    # Metric for early stopping and the best checkpoint.
    metric: str = "val/label_accuracy"
    # Stop after this many optimizer steps (0 = no limit, run all epochs).
    max_steps: int = 0
    seed: int = 42
    # Where runs are written: <output_dir>/<run_name>/ (config, metrics, checkpoints).
    output_dir: str = "runs"
    # Run name; rerunning with the same name resumes. Empty: derived from the preset.
    run_name: str = ""


@dataclass
class TrackingConfig:
    # W&B project, entity (null = your default) and mode. offline writes run files that
    # `wandb sync` uploads later; online needs WANDB_API_KEY or `wandb login`.
    project: str = "reckoning-ray"
    entity: Optional[str] = None
    mode: TrackingMode = TrackingMode.offline
    # W&B group; empty uses the sweep or run name.
    group: str = ""


@dataclass
class ResourcesConfig:
    # Ray Train workers (data-parallel) and what each asks for. 0: no Ray at all, the same loop
    # in this process (a debugger, a notebook); use_gpu then picks the first CUDA device.
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # Custom node-type resource the workers ask for: "a100", "rtx3090", "auto" (a100 for
    # RECKONING, rtx3090 for the in-context baselines, as in the paper) or "" (any node).
    # When the cluster has no node of that type, the run says so and runs on any node.
    node_type: str = ""
    # Ray Train FailureConfig.max_failures (worker restarts from the last checkpoint).
    max_failures: int = 2


@dataclass
class TuneConfig:
    # Search space: a name under tune_spaces/ (without .yaml) or a path to a YAML file.
    space: str = "default"
    num_samples: int = 8
    # Trials run at once (never more than the cluster can place).
    max_concurrent: int = 2
    # ASHA on this validation metric; one validation round is one time unit.
    metric: str = "val/label_accuracy"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: int = 2
    max_rounds: int = 12
    # Which trials stop early: asha (rungs at grace_period x reduction_factor^k), curve (fits each
    # trial's validation curve and stops it when it is unlikely to beat the curve_top_k-th best
    # trial: its chance below 1 - curve_confidence, judged from curve_min_rounds rounds on), or none.
    scheduler: TrialScheduler = TrialScheduler.asha
    curve_top_k: int = 1
    curve_confidence: float = 0.95
    curve_min_rounds: int = 4
    # ASHA promotion beyond the planned rounds (outer.schedule=wsd, tune.scheduler=asha): a trial
    # ASHA keeps at the end of its planned rounds continues from the start of its cooldown at the
    # constant rate to the next rung, cools down again there, and so on up to tune.max_rounds.
    extend: bool = False
    # Sweep name (also the W&B group) and where Tune writes results: a local dir or a URI
    # (s3://bucket/path; multi-node clusters need shared storage). "" uses the environment
    # variable RECKONING_STORAGE_PATH (set by cluster/a100.yaml), else runs/tune.
    name: str = "reckoning-sweep"
    storage_path: str = ""


@dataclass
class Config:
    # Name of the preset this config was built from (informational).
    preset: str = DEFAULT_PRESET
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


GROUPS = {"model": ModelConfig, "data": DataConfig, "inner": InnerConfig, "outer": OuterConfig,
          "eval": EvalConfig, "train": TrainConfig, "tracking": TrackingConfig,
          "resources": ResourcesConfig, "tune": TuneConfig}


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
    _check(c.train.batch_size % max(c.resources.num_workers, 1) == 0, "train.batch_size", c.train.batch_size,
           f"the batch is global (tasks per optimizer step = train.batch_size x train.grad_accum, whatever "
           f"the number of workers) and resources.num_workers={c.resources.num_workers} workers split each "
           f"micro-batch: choose a batch size divisible by {c.resources.num_workers} or another worker count")
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
    for k in ("validation_fraction", "test_fraction"):
        _check(0.0 <= d[k] < 1.0, f"data.{k}", d[k], "must be in [0, 1)")


def _check_inner(i: Any) -> None:
    if i.steps is not None:
        _check(i.steps >= 1, "inner.steps", i.steps, "must be >= 1 (or null to use inner.steps_by_hops)")
    else:
        _check(len(i.steps_by_hops) > 0, "inner.steps_by_hops", dict(i.steps_by_hops),
               "needs at least one hops: steps entry, or set inner.steps")
        ranges = []
        for hops, steps in i.steps_by_hops.items():
            _check(steps >= 1, f"inner.steps_by_hops.{hops}", steps, "inner steps must be >= 1")
            ranges.append((*_parse_hop_range(str(hops)), str(hops)))
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


def _check_outer(o: Any) -> None:
    _check(o.lr > 0, "outer.lr", o.lr, "must be > 0")
    _check(o.inner_lr_lr >= 0, "outer.inner_lr_lr", o.inner_lr_lr, "must be >= 0")
    _check(o.eps > 0, "outer.eps", o.eps, "must be > 0")
    _check(o.clip >= 0, "outer.clip", o.clip, "must be >= 0 (0 disables clipping)")
    _check(0 <= o.warmup_ratio < 1, "outer.warmup_ratio", o.warmup_ratio, "must be in [0, 1)")
    _check(0 < o.cooldown_fraction <= 1, "outer.cooldown_fraction", o.cooldown_fraction, "must be in (0, 1]")


def _check_train(t: Any) -> None:
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
    _check(t.num_samples >= 1, "tune.num_samples", t.num_samples, "must be >= 1")
    _check(t.max_concurrent >= 1, "tune.max_concurrent", t.max_concurrent, "must be >= 1")
    _check(t.metric in METRICS, "tune.metric", t.metric, f"choose one of {METRICS}")
    _check(t.mode in ("min", "max"), "tune.mode", t.mode, "choose min or max")
    _check(t.reduction_factor >= 2, "tune.reduction_factor", t.reduction_factor, "must be >= 2")
    _check(1 <= t.grace_period <= t.max_rounds, "tune.grace_period", t.grace_period,
           f"must be between 1 and tune.max_rounds={t.max_rounds}")
    _check(t.curve_top_k >= 1, "tune.curve_top_k", t.curve_top_k, "must be >= 1")
    _check(0.5 <= t.curve_confidence < 1, "tune.curve_confidence", t.curve_confidence, "must be in [0.5, 1)")
    _check(t.curve_min_rounds >= 4, "tune.curve_min_rounds", t.curve_min_rounds,
           "must be >= 4 (a curve of 3 parameters and its uncertainty need 4 points)")


GROUP_CHECKS = {"model": _check_model, "data": _check_data, "inner": _check_inner, "outer": _check_outer,
                "eval": _check_eval, "train": _check_train, "resources": _check_resources, "tune": _check_tune}


def _parse_hop_range(key: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", key)
    if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
        raise ConfigError(
            f"inner.steps_by_hops key {key!r} is invalid: use a hop count 'k' or a range 'lo-hi' (e.g. '2-4')"
        )
    lo = int(m.group(1))
    return lo, int(m.group(2)) if m.group(2) is not None else lo


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
