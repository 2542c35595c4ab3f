"""RECKONING as a :class:`reckoning_ray.core.method.Method`: training steps, evaluation and the learned
inner learning rates, on top of an engine (:mod:`.reference` or :mod:`.fused`) that runs the
inner loops."""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from reckoning_ray.core.bilevel.adapted import build_adapted
from reckoning_ray.core.bilevel.fused import FusedEngine
from reckoning_ray.core.bilevel.lm import (
    BilevelError,
    causal_lm_logits,
    generation_records,
    greedy_generate,
    max_positions,
    row_mean_losses,
    select_params,
    trainable,
)
from reckoning_ray.core.bilevel.reference import ReferenceEngine
from reckoning_ray.core.schema import ENGINES, EvalConfig, InnerConfig, OuterConfig
from reckoning_ray.core.data.encode import RANDOM_FACTS_METHODS, RECKONING_RANDOM_FACTS, Encoder, TaskBatch

logger = logging.getLogger(__name__)


class ReckoningMethod:
    """RECKONING training and evaluation on :class:`TaskBatch` es (see the package docstring).

    Args:
        model: a causal LM (``PreTrainedModel``); its parameters are the initial weights W.
        tokenizer: its tokenizer (eos / pad ids for generation, decoding).
        encoder: the :class:`Encoder` the batches come from (reads the generated answers).
        inner, outer, eval: the config groups (``reckoning_ray.core.config.group(cfg, "inner")``, ...);
            ``inner.engine`` chooses the engine.
        dropout: ``model.dropout`` (already set in the model's config by the loader); > 0 puts the
            module in train mode for the training passes, inner and outer.

    Attributes:
        inner_lrs: ``[max inner steps, number of adapted tensors]`` learned inner learning rates
            (their logarithm with ``inner.lr_space=log``), trained by the outer optimizer; the
            adapted tensors are ``inner.params``' (all by default), the outer optimizer trains
            ``outer.params``' weights (all by default).
    """

    name = "reckoning"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, encoder: Encoder, inner: InnerConfig,
                 outer: OuterConfig, eval: EvalConfig, dropout: float = 0.0) -> None:
        if inner.engine not in ENGINES:
            raise BilevelError(f"inner.engine={inner.engine!r} is invalid: choose one of {ENGINES}")
        self.model, self.tokenizer, self.encoder = model, tokenizer, encoder
        self.inner, self.outer, self.eval_config = inner, outer, eval
        # what the inner loop adapts (inner.params); what the outer loop trains (outer.params) besides
        # them and the learned rates: every other weight is frozen
        self.adapted = build_adapted(model, inner)
        if not self.adapted.names:
            raise BilevelError("the model has no trainable parameters (all requires_grad=False)")
        self._freeze_all_but(self.adapted.model_names)
        names = self.adapted.names
        self.engine = (ReferenceEngine(model, inner, self.adapted) if inner.engine == "reference"
                       else FusedEngine(model, inner, self.adapted))
        self.attention = self.engine.attention
        # dropout > 0: dropout in every training pass, inner and outer, as in the authors' code;
        # 0: the module stays in eval mode throughout (package docstring).
        self.dropout = float(dropout)
        model.train(self.dropout > 0)
        self.training = True
        self.max_inner_steps = inner.max_steps()
        init = math.log(inner.lr_init) if inner.lr_space == "log" else float(inner.lr_init)
        ref = next(iter(model.parameters()))
        self.inner_lrs = torch.nn.Parameter(
            torch.full((self.max_inner_steps, len(names)), init, dtype=ref.dtype, device=ref.device)
        )
        logger.info(
            "RECKONING: %d parameter tensors, up to %d inner %s steps, %s order, %s engine, %s attention",
            len(names), self.max_inner_steps, inner.optimizer, "first" if inner.first_order else "second",
            inner.engine, self.attention,
        )

    # -- training ---------------------------------------------------------------------------------

    def forward_backward(self, batch: TaskBatch, loss_scale: float = 1.0) -> dict[str, float]:
        """Outer loss summed over the tasks of ``batch``; ``backward(loss * loss_scale)``.

        Gradients accumulate into the weights' and ``inner_lrs``' ``.grad``. One backward per pass
        of the engine (fused: the tasks with the same inner-step count, at most
        ``inner.tasks_per_pass`` of them; reference: one task), so each inner graph is freed as
        soon as it is used.

        Dropout: in the training phase (:meth:`train`, the default) with ``dropout > 0`` the module
        runs in train mode, every forward pass (each inner step, the outer loss) with masks of its
        own; after :meth:`eval`, or with ``dropout=0``, in eval mode (deterministic).

        Returns ``{"loss": summed outer loss, "tasks": T, "knowledge_loss": summed inner loss before
        the first inner step}`` (unscaled).
        """
        steps = self.inner_steps(batch)
        total, knowledge = 0.0, 0.0
        # Set here, whatever was done to the module meanwhile (evaluation leaves it in eval mode).
        self.model.train(self.training and self.dropout > 0)
        for n, index in self.engine.passes(steps):
            tasks = _select(batch, index)
            fast, inner_losses = self._adapt(tasks, n, graph=True)
            s = tasks.sequence
            loss = self.engine.task_losses(fast, s.input_ids[:, None], s.attention_mask[:, None],
                                           s.labels[:, None]).sum()
            del fast  # the outer graph keeps what it needs, and frees it once its backward has passed
            (loss * loss_scale).backward()
            total += float(loss.detach())
            knowledge += inner_losses[0] if inner_losses else 0.0
        return {"loss": total, "tasks": float(len(batch)), "knowledge_loss": knowledge}

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(self, batch: TaskBatch, inner_steps: Optional[int] = None) -> dict[str, list]:
        """Inner loop (gradients, no graph), answer loss and greedy generation per task.

        ``inner_steps=None`` uses each task's hop count; ``0`` switches the inner loop off
        (ablation: the knowledge is then not available to the model at all). The stored weights are
        never changed and no ``.grad`` is written.

        Returns per-task lists: "id", "hops", "answer_loss" (mean over target tokens),
        "prediction" (generated text up to eos), "predicted_label", "label_correct" (bool),
        "recall" (share of generated facts found in the gold facts).
        """
        answer_loss = [0.0] * len(batch)
        tokens: list[list[int]] = [[] for _ in range(len(batch))]
        eos_id, pad_id = int(self.tokenizer.eos_token_id), int(self.tokenizer.pad_token_id)
        limit = max_positions(self.model)
        for index, tasks, fast in self._adapted(batch, inner_steps):
            s = tasks.sequence
            with torch.no_grad():
                losses = self.engine.task_losses(fast, s.input_ids[:, None], s.attention_mask[:, None],
                                                 s.labels[:, None])
                generated = greedy_generate(
                    lambda ids, mask: self.engine.last_logits(fast, ids, mask),
                    tasks.prompt.input_ids, tasks.prompt.attention_mask,
                    int(self.eval_config.max_new_tokens), eos_id, pad_id, limit,
                )
            for j, i in enumerate(index):
                answer_loss[i] = float(losses[j])
                tokens[i] = generated[j]
        return generation_records(self.encoder, self.tokenizer, batch, tokens, answer_loss)

    def answer_with(self, batch: TaskBatch, weights: dict[str, Tensor]) -> dict[str, list]:
        """:meth:`evaluate` of every task of ``batch`` with ONE set of fast weights, given instead of
        run: the knowledge encoded once (:meth:`fast_weights` of one task) answers many questions.

        Exact only when every task of ``batch`` carries the knowledge ``weights`` were encoded from
        (the prompt names its ``fact_i``); the answers are then those of :meth:`evaluate`, without
        its inner loops. Same lists as :meth:`evaluate`."""
        self.model.eval()
        s = batch.sequence
        with torch.no_grad():
            losses = row_mean_losses(causal_lm_logits(self.model, weights, s.input_ids, s.attention_mask), s.labels)
            generated = greedy_generate(
                lambda ids, mask: causal_lm_logits(self.model, weights, ids, mask)[:, -1],
                batch.prompt.input_ids, batch.prompt.attention_mask, int(self.eval_config.max_new_tokens),
                int(self.tokenizer.eos_token_id), int(self.tokenizer.pad_token_id), max_positions(self.model),
            )
        return generation_records(self.encoder, self.tokenizer, batch, generated, losses.tolist())

    def fast_weights(self, batch: TaskBatch, inner_steps: Optional[int] = None) -> list[dict[str, Tensor]]:
        """Each task's fast weights after its inner loop (no graph), keyed like ``named_parameters()``."""
        out: list[dict[str, Tensor]] = [{} for _ in range(len(batch))]
        for index, _, fast in self._adapted(batch, inner_steps):
            for j, i in enumerate(index):
                out[i] = self.engine.task_weights(fast, j)
        return out

    def knowledge_losses(self, batch: TaskBatch, inner_steps: Optional[int] = None) -> list[float]:
        """Per-task knowledge (inner) loss AFTER the inner loop; ``inner_steps=0``: of the initial weights."""
        out = [0.0] * len(batch)
        for index, tasks, fast in self._adapted(batch, inner_steps):
            k = tasks.knowledge
            with torch.no_grad():
                losses = self.engine.task_losses(fast, k.input_ids, k.attention_mask, k.labels)
            for i, value in zip(index, losses.tolist()):
                out[i] = value
        return out

    # -- what the entry points call, in order -----------------------------------------------------

    def inner_steps(self, batch: TaskBatch, inner_steps: Optional[int] = None) -> list[int]:
        """Inner steps per task: ``inner_steps`` if given, else from each task's hop count."""
        if inner_steps is not None:
            if inner_steps < 0 or inner_steps > self.max_inner_steps:
                raise BilevelError(
                    f"inner_steps={inner_steps} is outside 0..{self.max_inner_steps}: the learned rates "
                    f"cover {self.max_inner_steps} steps (inner.steps / inner.steps_by_hops)"
                )
            return [int(inner_steps)] * len(batch)
        return [self.inner.steps_for(int(h)) for h in batch.hops.tolist()]

    def _adapt(self, tasks: TaskBatch, steps: int, graph: bool) -> tuple[Any, list[float]]:
        """The engine's fast weights for ``tasks`` (all with ``steps`` inner steps) and the summed
        knowledge loss before each step; ``graph=False``: no graph (evaluation)."""
        if tasks.knowledge is None:
            raise BilevelError(
                "RECKONING needs the knowledge batch, but TaskBatch.knowledge is None: build the Encoder "
                "with method='reckoning' (train.method=reckoning)"
            )
        return self.engine.adapt(tasks, steps, self.learning_rates(), graph)

    def learning_rates(self) -> Tensor:
        """Effective inner learning rates ``[max steps, tensors]`` (exp of the stored values in log space)."""
        return self.inner_lrs.exp() if self.inner.lr_space == "log" else self.inner_lrs

    def _adapted(self, batch: TaskBatch, inner_steps: Optional[int]) -> Iterator[tuple[list[int], TaskBatch, Any]]:
        """(task indices, sub-batch, fast weights) per pass, without graphs, with the module in eval
        mode (no dropout; :meth:`forward_backward` sets its own mode again)."""
        steps = self.inner_steps(batch, inner_steps)
        self.model.eval()
        for n, index in self.engine.passes(steps):
            tasks = _select(batch, index)
            fast, _ = self._adapt(tasks, n, graph=False)
            yield index, tasks, fast

    # -- phases -----------------------------------------------------------------------------------

    def train(self) -> "ReckoningMethod":
        """Training phase: the module in train mode when ``dropout > 0`` (dropout in the inner and
        outer passes), in eval mode otherwise (no random op in the step at all)."""
        self.training = True
        self.model.train(self.dropout > 0)
        return self

    def eval(self) -> "ReckoningMethod":
        self.training = False
        self.model.eval()
        return self

    # -- meta-parameters and state ----------------------------------------------------------------

    def param_names(self) -> list[str]:
        """Names of the parameter tensors the inner loop adapts (``inner.params``), in
        ``named_parameters()`` order (tied once): one learned rate each per step."""
        return list(self.engine.names)

    def _freeze_all_but(self, adapted: list[str]) -> None:
        """``outer.params``: ``["all"]`` trains every weight; otherwise the adapted ones (LoRA's
        adapters, which are not the model's) and those the patterns name (``"inner"``: none more),
        and the rest stop requiring gradients."""
        patterns = [str(p) for p in self.outer.params]
        if patterns == ["all"]:
            return
        extras = [p for p in patterns if p != "inner"]
        keep = set(adapted) | set(select_params(self.model, extras, "outer.params") if extras else [])
        for name, param in self.model.named_parameters():
            if name not in keep:
                param.requires_grad_(False)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Groups for ``torch.optim.AdamW``: the weights (outer.lr, outer.weight_decay) and the
        learned inner rates (outer.inner_lr_lr, no weight decay)."""
        return [
            {"params": trainable(self.model)[1] + self.adapted.parameters(), "lr": float(self.outer.lr),
             "weight_decay": float(self.outer.weight_decay), "name": "weights"},
            {"params": [self.inner_lrs], "lr": float(self.outer.inner_lr_lr), "weight_decay": 0.0,
             "name": "inner_lrs"},
        ]

    def meta_parameters(self) -> list[Tensor]:
        """Every tensor the outer optimizer updates (weights, LoRA's adapters, then the learned rates)."""
        return trainable(self.model)[1] + self.adapted.parameters() + [self.inner_lrs]

    def stats(self) -> dict[str, float]:
        """min / median / max of the effective inner learning rates and how many are negative."""
        lrs = self.learning_rates().detach().flatten()
        if lrs.numel() == 0:
            return {}
        return {
            "inner_lr/min": float(lrs.min()),
            "inner_lr/median": float(lrs.median()),
            "inner_lr/max": float(lrs.max()),
            "inner_lr/negative": float((lrs < 0).sum()),
        }

    def extra_state(self) -> dict[str, Tensor]:
        """Meta-parameters besides the model's weights: the learned rates (and LoRA's adapters)."""
        return {"inner_lrs": self.inner_lrs.detach().clone(), **self.adapted.state()}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if tuple(state["inner_lrs"].shape) != tuple(self.inner_lrs.shape):
            raise BilevelError(f"the checkpoint's learned rates are {tuple(state['inner_lrs'].shape)} (steps x adapted "
                               f"tensors), this method's {tuple(self.inner_lrs.shape)}: it was trained with other "
                               "inner.steps / inner.params settings")
        with torch.no_grad():
            self.inner_lrs.copy_(state["inner_lrs"])
        self.adapted.load_state(state)

    def settings(self) -> dict[str, Any]:
        return method_settings(self.name, self.encoder, self.dropout, inner=self.inner, outer=self.outer,
                               eval=self.eval_config)

    def to(self, device: torch.device | str) -> "ReckoningMethod":
        self.model.to(device)
        self.inner_lrs.data = self.inner_lrs.data.to(device)
        for tensor in self.adapted.parameters():
            tensor.data = tensor.data.to(device)
        return self


def _select(batch: TaskBatch, index: list[int]) -> TaskBatch:
    return batch.select(index) if len(index) < len(batch) else batch


class ReckoningRandomFactsMethod(ReckoningMethod):
    """The paper's Random-Facts control (Table 1, ``train.method=reckoning_random_facts``): RECKONING
    "trained using RECKONING with random knowledge that is not relevant to the questions".

    Everything is RECKONING's (inner loop, learned rates, outer loss, engines, evaluation); only the
    knowledge differs, and the encoder makes it (``Encoder(method="reckoning_random_facts")``): the
    inner loop encodes ``len(task knowledge)`` sentences drawn from the fact pool (the training
    set's knowledge; without one, the other tasks of the batch) minus the task's own sentences,
    seeded per task by ``f"{train.seed}:{task id}"`` so a task gets the same sentences in every
    epoch, in training and evaluation alike. The question prompt names as many facts
    (``Based on fact_0 ... fact_{n-1}``) as RECKONING's.

    The target stays the task's own: its answer, and with ``outer.multi_task`` its own relevant
    facts ("{answer} because {facts}"), and the recall metric compares with those, as in the
    authors' code (eric11eca/reckoning-metakg, option ``random_facts``: its data reader replaces a
    task's inner-loop ``context`` with ``random.choices(all facts of the file, k=len(context))`` and
    leaves the task's question/answer pairs, the multi-task "Based on {the task's facts}" answer
    included, as they are). Unlike that reader, the draw here is reproducible and excludes the task's own sentences
    unless the pool has no other (the paper: knowledge "not relevant to the questions").
    """

    name = RECKONING_RANDOM_FACTS

    def __init__(self, model: torch.nn.Module, tokenizer: Any, encoder: Encoder, inner: InnerConfig,
                 outer: OuterConfig, eval: EvalConfig, dropout: float = 0.0) -> None:
        if encoder.method != RECKONING_RANDOM_FACTS:
            raise BilevelError(
                f"reckoning_random_facts needs an Encoder with method={RECKONING_RANDOM_FACTS!r} (it draws "
                f"the random knowledge), got method={encoder.method!r}"
            )
        super().__init__(model, tokenizer, encoder, inner, outer, eval, dropout)


def method_settings(name: str, encoder: Encoder, dropout: float, **groups: Any) -> dict[str, Any]:
    """:meth:`ReckoningMethod.settings` (also the baseline's): the config groups as JSON values."""
    return {
        "method": name,
        **{key: _plain(dataclasses.asdict(group)) for key, group in groups.items()},
        "encoder": {"method": str(encoder.method), "multi_task": bool(encoder.multi_task),
                    "max_length": int(encoder.max_length),
                    # the random-facts methods draw with the run's seed (a checkpoint keeps its pool:
                    # reckoning_ray.core.checkpoint.FACT_POOL)
                    **({"seed": int(encoder.seed)} if encoder.method in RANDOM_FACTS_METHODS else {})},
        "dropout": float(dropout),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
