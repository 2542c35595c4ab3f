"""The configuration schema: every key of a run, its type, its default and its documentation.

Each key is a dataclass field declared with :func:`doc`: its type, its default and its
documentation (the field's ``metadata["doc"]``), which ``python -m reckoning_ray.train
--help-config [GROUP]`` prints. The choices a key allows are ``Choice`` enums; the metric
directions are :data:`METRIC_MODES`. Loading, merging and checking values is
:mod:`reckoning_ray.core.config`. Nothing here imports torch or Ray.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Dict, List, Optional

from reckoning_ray.core.errors import ConfigError

DEFAULT_PRESET = "embedded"


class Choice(StrEnum):
    """A config key's closed set of values. Members are named as their YAML value, so presets and
    overrides write ``inner.optimizer=sgd``, the schema rejects anything else (naming the key and
    the allowed values) and members compare equal to their strings."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class MethodName(Choice):
    """The names of the training methods (train.method); the interface a method implements is
    :class:`reckoning_ray.core.method.Method`."""

    reckoning = "reckoning"
    icr = "icr"
    icr_no_facts = "icr_no_facts"
    icr_random_facts = "icr_random_facts"
    icr_no_question = "icr_no_question"
    reckoning_random_facts = "reckoning_random_facts"


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
    linear = "linear"
    cosine = "cosine"
    wsd = "wsd"


class TrialScheduler(Choice):
    asha = "asha"
    curve = "curve"
    none = "none"


class Autocast(Choice):
    none = "none"
    bf16 = "bf16"


class Engine(Choice):
    reference = "reference"
    fused = "fused"


class TrackingMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


METHODS = MethodName.values()
SOURCES = Source.values()
SELECTIONS = Selection.values()
FAMILIES = Family.values()
# ProofWriter's open-world answers (true, false, unknown), as the model writes them
PROOFWRITER_LABELS = ("yes", "no", "none")
INNER_OPTIMIZERS = InnerOptimizer.values()
LR_SPACES = LrSpace.values()
AUTOCAST_MODES = Autocast.values()
ENGINES = Engine.values()
TRACKING_MODES = TrackingMode.values()
NODE_TYPES = ("", "auto", "a100", "rtx3090")
# node_type "auto": the paper's placement, RECKONING on A100 nodes and the baselines on RTX 3090s.
AUTO_NODE_TYPE = {"reckoning": "a100", "icr": "rtx3090", "icr_no_facts": "rtx3090", "icr_random_facts": "rtx3090",
                  "icr_no_question": "rtx3090", "reckoning_random_facts": "a100"}
# The validation metrics a run can rank by, each with its direction: "max" when a larger value is
# better, "min" when a smaller one is. The one place that says so: early stopping and the best
# checkpoint (train.metric), the W&B run summaries, and the check that tune.mode agrees with
# tune.metric all read it (through metric_mode).
METRIC_MODES = {"val/label_accuracy": "max", "val/answer_loss": "min"}
METRICS = tuple(METRIC_MODES)


DOC = "doc"  # the metadata key of a schema field's documentation


def doc(default: Any, text: str) -> Any:
    """A schema field: its default and its documentation (``metadata["doc"]``, which
    ``--help-config`` prints). A list, dict or config-group default is copied for every instance."""
    if isinstance(default, (list, dict)) or (dataclasses.is_dataclass(default) and not isinstance(default, type)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={DOC: text})
    return field(default=default, metadata={DOC: text})


_EMBEDDED_ONLY = " (embedded model only; ignored for hub ids and local directories)"


@dataclass
class ModelConfig:
    """The model: the embedded GPT-2 or a pretrained one, dtype, length, dropout."""

    name_or_path: str = doc(
        "embedded",
        '"embedded": a small randomly initialised GPT-2 with a tokenizer built from the data. Anything '
        'else is a hub id (e.g. "gpt2", the paper\'s model) or a local directory written by save_pretrained.')
    n_layer: int = doc(1, "Transformer layers" + _EMBEDDED_ONLY + ".")
    n_embd: int = doc(64, "Hidden size" + _EMBEDDED_ONLY + ".")
    n_head: int = doc(2, "Attention heads, which must divide model.n_embd" + _EMBEDDED_ONLY + ".")
    n_positions: int = doc(256, "Positions the model can embed" + _EMBEDDED_ONLY + ".")
    dtype: str = doc("float32", '"float32", "float64" (for gradient checks) or "bfloat16".')
    max_length: int = doc(
        128, "Longest token sequence fed to the model (knowledge sentence, question + answer).")
    dropout: float = doc(
        0.0,
        "Dropout probability in [0, 1): GPT-2's resid_pdrop, embd_pdrop and attn_pdrop (other "
        "architectures: their config's dropout / attention_dropout / hidden_dropout where present), for "
        "the embedded model and for hub ids / local directories alike. Active while training, in "
        "RECKONING's inner and outer passes and in FT-ICR fine-tuning; off at evaluation. The paper "
        "presets use GPT-2's 0.1 (as the authors' code); the embedded preset and the gradient tests 0.")


@dataclass
class GeneratorConfig:
    """The offline task generator (data.source=generate). With data.family=proofwriter it makes
    entities with attributes and rules and yes/no/none answers; with data.family=clutrr, family
    relation chains."""

    num_entities: int = doc(8, "Entities the ProofWriter-style generator draws from (the people asked about).")
    num_attributes: int = doc(
        8, "Attributes the ProofWriter-style generator draws from; a k-hop question needs k + 1.")
    num_rules: int = doc(4, "Rules per theory for multi-hop ProofWriter-style questions.")
    labels: List[str] = doc(
        ["yes", "no"],
        'Labels the ProofWriter-style generator emits ("none" = open-world unknown). Quote them in an '
        'override, data.generator.labels=\'["yes","no","none"]\': YAML reads a bare yes / no as true / false.')
    holdout_pairs: bool = doc(
        True, "Hold out (entity, attribute) question pairs from training so validation and test ask new pairs.")


_SPLIT_HOPS = ("Hop counts of the {split} split (length generalisation, e.g. data.train_hops=[2,3] "
               "data.test_hops=[2,...,10]); null uses data.hops, empty keeps all. Generated data is "
               "generated with these hop counts.")


class Proofs(Choice):
    """Which proof of a ProofWriter yes / no question gives its facts (data.proofs)."""

    shortest = "shortest"
    merged = "merged"


PROOFS = Proofs.values()


@dataclass
class DataConfig:
    """The tasks: source, hop counts, which questions, how many, how split."""

    source: Source = doc(
        Source.generate,
        "generate (offline generator, data.generator.*) | proofwriter (meta-*.jsonl) | clutrr (the CLUTRR "
        "CSV files, or the CLUTRR-SG text files *_proof_1.k_{train,valid,test}_*.txt[.4000] of "
        "NicolasAG/SGinPG, told apart by name or first line) | hf (a datasets save_to_disk directory or a hub id).")
    family: Family = doc(Family.proofwriter, "Task family of generated data: proofwriter | clutrr.")
    path: Optional[str] = doc(None, "File or directory of the proofwriter / clutrr / hf sources.")
    hops: List[int] = doc(
        [0],
        "Keep only tasks with these hop counts; empty keeps all. For a directory of CLUTRR-SG files it "
        "also picks the files: level 1.k (k hops) is read when k is listed (data.hops=[4]: the authors' "
        "clutrr_4_hop model; train / valid / test files -> train / validation / test; data.<split>_hops "
        "picks one split's levels).")
    train_hops: Optional[List[int]] = doc(None, _SPLIT_HOPS.format(split="training"))
    validation_hops: Optional[List[int]] = doc(None, _SPLIT_HOPS.format(split="validation"))
    test_hops: Optional[List[int]] = doc(None, _SPLIT_HOPS.format(split="test"))
    selection: Selection = doc(
        Selection.qdep,
        "Which ProofWriter questions become tasks (data.source=proofwriter; the other sources have no "
        'selection step, so the key is ignored there and the paper presets can share it). "qdep": every '
        'question; Unknown questions get the entity\'s facts plus the failed rules. "paper": the RECKONING '
        "authors' data: questions whose proof names >= 2 sentences (Unknown: >= 2 rules in the deepest "
        "failure, whose sentences are its facts), True and False resampled per theory (with replacement) "
        "to the theory's Unknown count, and data.distractors drawn with replacement then de-duplicated "
        "(for every file source). hops stays QDep; the paper's \"depth-D\" is the release file data.path "
        "points at.")
    balance: bool = doc(
        True,
        "data.selection=paper: true resamples each theory's True and False questions (with replacement) "
        "to its Unknown count, as the authors did; false keeps every selected question once. No effect "
        "under qdep or on other sources.")
    proofs: Proofs = doc(
        Proofs.shortest,
        "The facts of a ProofWriter True / False question (data.source=proofwriter, either selection): "
        '"shortest", the sentences of one shortest proof (of depth QDep, fewest sentences); "merged", the '
        "sentences of all its alternative proofs merged, as the authors' notebook takes them (selection=paper "
        "then counts the merged sentences for its >= 2 test).")
    distractors: int = doc(
        0,
        "Distractor sentences kept per task: -1 keeps all the source has, 0 none, n at most n "
        "(selection=paper: n draws with replacement, de-duplicated).")
    num_train: int = doc(
        2000, "Training tasks of generated data; a cap for file sources (0 = no cap).")
    num_validation: int = doc(
        256, "Validation tasks of generated data; a cap for file sources (0 = no cap).")
    num_test: int = doc(256, "Test tasks of generated data; a cap for file sources (0 = no cap).")
    validation_fraction: float = doc(
        0.1, "Fraction held out for validation when a source has a single file (and for the generator's "
             "held-out question pairs).")
    test_fraction: float = doc(
        0.1, "Fraction held out for test when a source has a single file (and for the generator's "
             "held-out question pairs).")
    seed: int = doc(0, "Seed of the generator, the splits and the drawn distractors.")
    generator: GeneratorConfig = doc(GeneratorConfig(), "The offline task generator (data.source=generate).")


@dataclass
class LoraConfig:
    """The low-rank adapters the inner loop adapts with inner.params=[lora] (reckoning_ray/core/bilevel/adapted.py)."""

    r: int = doc(16, "Rank of each adapter (the authors' later code: 16).")
    alpha: float = doc(32.0, "Scale numerator: the adapters add alpha / r * B A to each target weight.")
    dropout: float = doc(0.0, "Dropout on the adapters' input: only 0 (the adapters are merged into the weights "
                              "for each call).")
    target_modules: List[str] = doc(
        [], "Names of the linear layers to adapt (last part of the module name, e.g. [q_proj,v_proj]); empty: "
            "the model type's default as peft has it (GPT-2: c_attn; Llama, Qwen2, OPT: q_proj, v_proj; GPT-NeoX: "
            "query_key_value).")


@dataclass
class InnerConfig:
    """The inner loop: optimizer, steps, learned learning rates, memory options. The memory options
    (checkpoint, autocast, tasks_per_pass) are measured by bench/memory_modes.py."""

    optimizer: InnerOptimizer = doc(InnerOptimizer.adamw, 'Inner-loop optimizer: "adamw" (the paper\'s) or "sgd".')
    steps: Optional[int] = doc(None, "Fixed number of inner steps for every task; null uses inner.steps_by_hops.")
    steps_by_hops: Dict[str, int] = doc(
        {"0-4": 4, "5-6": 5},
        'Inner steps per hop-count range "lo-hi" (or a single "k"); paper: 4 for 2-4 hops, 5 for 5-6. A '
        "hop count outside every range uses the nearest range. Override one entry with "
        "inner.steps_by_hops.5-6=6.")
    lr_init: float = doc(
        3e-5, "Initial value of every learned inner learning rate (one per parameter tensor per step).")
    lr_space: LrSpace = doc(
        LrSpace.linear,
        '"linear": the learned rates are used as they are (paper, may turn negative); "log": stored as '
        "log(lr) so they stay positive.")
    beta1: float = doc(0.9, "Inner AdamW's first-moment decay.")
    beta2: float = doc(0.999, "Inner AdamW's second-moment decay.")
    eps: float = doc(1e-8, "Inner AdamW's epsilon.")
    weight_decay: float = doc(0.01, "Weight decay of the inner optimizer.")
    first_order: bool = doc(
        False, "false: second-order (differentiate through the unrolled inner loop); true: first-order.")
    checkpoint: bool = doc(
        False,
        "Keep only the inner gradients; the backward pass replays the optimizer from them and recomputes "
        "each step's forward and gradient (second order; about 1.5x the time).")
    autocast: Autocast = doc(
        Autocast.none,
        '"bf16" runs the model\'s forward passes in bfloat16 (bf16 copies of the weights, under '
        "torch.autocast); the weights, the inner-optimizer arithmetic and the learned rates stay in the "
        'model\'s dtype. "none": off.')
    tasks_per_pass: int = doc(
        0,
        "Most tasks one batched pass holds at once (their inner graphs live together); a larger batch runs "
        "in several passes whose gradients add up. 0: all tasks of a step at once.")
    params: List[str] = doc(
        ["all"],
        'What the inner loop adapts: ["all"] (every trainable weight, the paper\'s), or parameter-name '
        "patterns (shell-style, matched against the model's named_parameters()), e.g. "
        "inner.params=[transformer.h.11.*,transformer.ln_f.*] for GPT-2's last block and final norm, or "
        "[lora]: low-rank adapters on inner.lora.target_modules (inner.lora). One learned rate per adapted "
        "tensor and step; the others take no inner step.")
    lora: LoraConfig = doc(LoraConfig(), "The adapters of inner.params=[lora]: rank, scale, target modules.")
    engine: Engine = doc(
        Engine.fused,
        '"fused" runs each inner step as one fused AdamW/SGD node and all tasks of a pass at once under '
        'vmap (reckoning_ray/core/bilevel/fused.py); "reference" is the plain functional inner loop, task by '
        "task, op by op (reckoning_ray/core/bilevel/reference.py: the definition the fused engine is tested "
        "against; slower).")

    def steps_for(self, hops: int) -> int:
        """Inner steps for a task with ``hops`` reasoning hops (fixed ``steps`` wins, else the
        ``steps_by_hops`` range holding ``hops``, else the nearest range)."""
        if self.steps is not None:
            return int(self.steps)
        best: tuple[int, int] | None = None  # (distance, steps)
        for key, steps in self.steps_by_hops.items():
            lo, hi = parse_hop_range(str(key))
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
    """The outer loop: AdamW on the initial weights and learned inner rates, schedule."""

    lr: float = doc(3e-5, "Learning rate of the outer AdamW on the initial weights.")
    inner_lr_lr: float = doc(
        3e-5, "Outer learning rate of the learned inner learning rates (own group, no weight decay).")
    eps: float = doc(1e-8, "Outer AdamW's epsilon.")
    weight_decay: float = doc(0.0, "Outer AdamW's weight decay on the initial weights.")
    clip: float = doc(1.0, "Gradient-norm clip over all meta-parameters; 0 disables.")
    warmup_ratio: float = doc(
        0.0, "Fraction of optimizer steps spent in linear warmup (kept in steps when a run is extended).")
    schedule: Schedule = doc(
        Schedule.linear,
        "Outer learning-rate schedule after the warmup (reckoning_ray/core/schedules.py): linear decay to 0 "
        "(the paper's), cosine, or wsd: constant, then a linear cooldown to 0 over the last "
        "outer.cooldown_fraction of the steps. A wsd run keeps its checkpoint at the start of the cooldown "
        "and can be extended from it (python -m reckoning_ray.train --resume RUN --extend-to STEPS).")
    cooldown_fraction: float = doc(
        0.2, "Fraction of the optimizer steps spent in the cooldown of outer.schedule=wsd, in (0, 1].")
    multi_task: bool = doc(
        True, 'Multi-task target "<label> because <relevant facts>" (paper) or the label only.')
    params: List[str] = doc(
        ["all"],
        'What the outer loop trains: ["all"] (every weight and the learned rates, the paper\'s), or '
        '["inner", extra patterns...]: the tensors the inner loop adapts (inner.params), the learned rates '
        "and the weights the patterns name (e.g. [inner,transformer.wte.*]); every other weight is frozen.")


@dataclass
class EvalConfig:
    """Evaluation: generation length and how many validation tasks."""

    max_new_tokens: int = doc(48, "Greedy tokens generated after the question prompt at evaluation.")
    max_tasks: int = doc(0, "Cap on validation tasks per validation round (0 = all).")


@dataclass
class TrainConfig:
    """The training run: method, batch, epochs, validation, early stopping, output."""

    method: MethodName = doc(
        MethodName.reckoning,
        "reckoning | icr (fine-tuned in-context reasoning: knowledge and question in one prompt) | "
        "icr_no_facts (the question alone) | icr_random_facts (the question with facts drawn from other "
        "tasks) | icr_no_question (the knowledge alone, no question: the paper's No-Question control) | "
        "reckoning_random_facts (RECKONING whose inner loop encodes as many sentences drawn from other "
        "training tasks instead of the task's own, seeded by train.seed; the target keeps the task's own "
        "facts: the paper's Random-Facts control).")
    batch_size: int = doc(
        2,
        "Tasks per micro-batch, global: an optimizer step consumes train.batch_size x train.grad_accum "
        "tasks whatever resources.num_workers is (the workers split each optimizer step's tasks, evenly or "
        "with one task more for some; each task weighs the same).")
    grad_accum: int = doc(2, "Micro-batches accumulated per optimizer step (global, as train.batch_size).")
    epochs: int = doc(6, "Passes over the training tasks.")
    validations_per_epoch: int = doc(2, "Validation rounds per epoch, evenly spaced (paper: 2, middle and end).")
    patience: int = doc(
        3, "Stop after this many validations without improvement of train.metric (0 = never).")
    metric: str = doc(
        "val/label_accuracy",
        f"Metric for early stopping and the best checkpoint: one of {', '.join(METRICS)} "
        "(its direction is fixed: accuracy up, loss down).")
    max_steps: int = doc(0, "Stop after this many optimizer steps (0 = no limit, run all epochs).")
    seed: int = doc(
        42, "Seed of the embedded model's initial weights, the order of the training tasks, the facts of "
            "icr_random_facts and dropout.")
    output_dir: str = doc(
        "runs", "Where runs are written: <output_dir>/<run_name>/ (config, metrics, checkpoints).")
    run_name: str = doc(
        "", "Run name (the run's directory under train.output_dir: letters, digits, '.', '_' and '-'); "
        "rerunning with the same name resumes. Empty: derived from the preset.")


@dataclass
class TrackingConfig:
    """W&B tracking: project, entity, mode and group of the runs."""

    project: str = doc("reckoning-ray", "W&B project.")
    entity: Optional[str] = doc(None, "W&B entity (user or team); null = your default.")
    mode: TrackingMode = doc(
        TrackingMode.offline,
        "offline (run files that `wandb sync` uploads later) | online (needs WANDB_API_KEY or "
        "`wandb login`) | disabled. The environment variable WANDB_MODE wins.")
    group: str = doc("", "W&B group; empty uses the sweep or run name.")


@dataclass
class ResourcesConfig:
    """Ray Train workers (data-parallel) and what each asks for."""

    num_workers: int = doc(
        1,
        "Ray Train workers (data-parallel). 0: no Ray at all, the same loop in this process (a debugger, "
        "a notebook); resources.use_gpu then picks the first CUDA device.")
    max_workers: int = doc(
        0,
        "Elastic runs: a run (every sweep trial) starts with the workers that are free, at least "
        "resources.num_workers, grows up to resources.max_workers onto workers that stopped or finished "
        "trials free, and shrinks instead of failing when a node is lost. It resizes only right after a "
        "validation's checkpoint, so a resize redoes no step (a lost node: the steps since the last "
        "validation). At most train.batch_size x train.grad_accum. 0: resources.num_workers (fixed).")
    use_gpu: bool = doc(False, "Train on GPUs (each worker asks for resources.gpus_per_worker).")
    cpus_per_worker: float = doc(1.0, "CPUs each worker asks Ray for.")
    gpus_per_worker: float = doc(1.0, "GPUs each worker asks Ray for, with resources.use_gpu=true.")
    node_type: str = doc(
        "",
        'Custom node-type resource the workers ask for: "a100", "rtx3090", "auto" (a100 for RECKONING, '
        'rtx3090 for the in-context baselines, as in the paper) or "" (any node). When the cluster has no '
        "node of that type, the run says so and runs on any node.")
    max_failures: int = doc(
        2, "Ray Train FailureConfig.max_failures (worker restarts from the last checkpoint).")


@dataclass
class TuneConfig:
    """The Ray Tune sweep: search space, trials, early stopping, results. Run by python -m
    reckoning_ray.tune."""

    space: str = doc(
        "default", "Search space: a name under tune_spaces/ (without .yaml) or a path to a YAML file.")
    num_samples: int = doc(
        8, "Samples drawn from the search space (each grid point is repeated this many times).")
    max_concurrent: int = doc(2, "Trials run at once (never more than the cluster can place).")
    metric: str = doc(
        "val/label_accuracy",
        f"Validation metric the scheduler and the final ranking use: one of {', '.join(METRICS)}; one "
        "validation round is one time unit.")
    mode: str = doc(
        "max",
        f"Direction of tune.metric, which must be the metric's own ({', '.join(f'{m}: {d}' for m, d in METRIC_MODES.items())}).")
    grace_period: int = doc(1, "ASHA: validation rounds every trial runs before it can be stopped.")
    reduction_factor: int = doc(2, "ASHA: 1 in reduction_factor trials goes on at each rung.")
    max_rounds: int = doc(12, "Validation rounds at most per trial (the scheduler's time limit).")
    scheduler: TrialScheduler = doc(
        TrialScheduler.asha,
        "Which trials stop early: asha (rungs at tune.grace_period x tune.reduction_factor^k), curve (fits "
        "each trial's validation curve and stops it when it is unlikely to beat the tune.curve_top_k-th "
        "best trial: its chance below 1 - tune.curve_confidence, judged from tune.curve_min_rounds rounds "
        "on), or none (every trial runs its rounds: a full grid or random search).")
    curve_top_k: int = doc(1, "tune.scheduler=curve: a trial must be likely to beat the k-th best trial.")
    curve_confidence: float = doc(
        0.95, "tune.scheduler=curve: stop a trial whose chance to beat the k-th best is below 1 - this.")
    curve_min_rounds: int = doc(
        4, "tune.scheduler=curve: validation rounds before a trial's curve is judged (>= 4).")
    extend: bool = doc(
        False,
        "ASHA promotion beyond the planned rounds (outer.schedule=wsd, tune.scheduler=asha): a trial ASHA "
        "keeps at the end of its planned rounds continues from the start of its cooldown at the constant "
        "rate to the next rung, cools down again there, and so on up to tune.max_rounds.")
    name: str = doc("reckoning-sweep", "Sweep name (also the W&B group; the sweep's directory under "
                                        "tune.storage_path: letters, digits, '.', '_' and '-').")
    storage_path: str = doc(
        "",
        "Where Tune writes results, under <storage_path>/<tune.name>: a local directory or a URI "
        "(s3://bucket/path; multi-node clusters need shared storage). Empty uses the environment "
        "variable RECKONING_STORAGE_PATH (set by cluster/a100.yaml), else runs/tune.")
    storage_wait_s: float = doc(
        600.0,
        "With an object store (tune.storage_path=s3://...): uploads run in the background and are retried "
        "with backoff while the store is unreachable, so training never waits for it; a run's end waits up to "
        "this many seconds for the backlog to go, then finishes from its local files and names what is left "
        "(python -m reckoning_ray.tune sync <sweep dir>, or the next --resume, uploads it).")


@dataclass
class Config:
    """The whole configuration tree: one group per part of a run."""

    preset: str = doc(DEFAULT_PRESET, "Name of the preset this config was built from (informational).")
    model: ModelConfig = doc(ModelConfig(), ModelConfig.__doc__)
    data: DataConfig = doc(DataConfig(), DataConfig.__doc__)
    inner: InnerConfig = doc(InnerConfig(), InnerConfig.__doc__)
    outer: OuterConfig = doc(OuterConfig(), OuterConfig.__doc__)
    eval: EvalConfig = doc(EvalConfig(), EvalConfig.__doc__)
    train: TrainConfig = doc(TrainConfig(), TrainConfig.__doc__)
    tracking: TrackingConfig = doc(TrackingConfig(), TrackingConfig.__doc__)
    resources: ResourcesConfig = doc(ResourcesConfig(), ResourcesConfig.__doc__)
    tune: TuneConfig = doc(TuneConfig(), TuneConfig.__doc__)


GROUPS = {"model": ModelConfig, "data": DataConfig, "inner": InnerConfig, "outer": OuterConfig,
          "eval": EvalConfig, "train": TrainConfig, "tracking": TrackingConfig,
          "resources": ResourcesConfig, "tune": TuneConfig}


def parse_hop_range(key: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", key)
    if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
        raise ConfigError(
            f"inner.steps_by_hops key {key!r} is invalid: use a hop count 'k' or a range 'lo-hi' (e.g. '2-4')"
        )
    lo = int(m.group(1))
    return lo, int(m.group(2)) if m.group(2) is not None else lo
