"""Fine-tuned in-context reasoning (FT-ICR), the paper's baseline, and ``build_method``.

The knowledge is in the prompt instead of the weights: ``TaskBatch.sequence`` holds the
in-context prompt (knowledge sentences, then the question; built by the Encoder for the methods
``icr``, ``icr_no_facts``, ``icr_random_facts``, ``icr_no_question``) followed by the target, and
training is plain fine-tuning on the target tokens.

The paper's controls (Table 1) besides FT-ICR: ``icr_no_facts`` (No-Facts: the question alone),
``icr_no_question`` (No-Question: "a fine-tuned model that performs a forward pass on only the
knowledge without access to the question": the prompt is the task's knowledge sentences alone, the
target the same as FT-ICR's, the answer and, multi-task, the relevant facts; the authors' code,
eric11eca/reckoning-metakg, has it as the ``no_question`` option of its in-context ``baseline``
runs beside ``no_facts`` and ``random_facts``), ``icr_random_facts``, and RECKONING's Random-Facts
(``reckoning_random_facts``, :class:`reckoning_ray.core.bilevel.method.ReckoningRandomFactsMethod`). Same interface as :class:`reckoning_ray.core.bilevel.ReckoningMethod`
(:class:`reckoning_ray.core.method.Method`; no inner loop, no learned inner rates), so the training loop
runs either.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from reckoning_ray.core.bilevel.lm import (
    BilevelError,
    causal_lm_logits,
    generation_records,
    greedy_generate,
    max_positions,
    row_mean_losses,
)
from reckoning_ray.core.bilevel.method import ReckoningMethod, ReckoningRandomFactsMethod, method_settings
from reckoning_ray.core.config import group
from reckoning_ray.core.schema import EvalConfig, InnerConfig, OuterConfig
from reckoning_ray.core.data.encode import IN_CONTEXT_METHODS, METHODS, RECKONING_RANDOM_FACTS, Encoder, TaskBatch

__all__ = ["IN_CONTEXT_METHODS", "InContextMethod", "build_method", "build_method_from_settings"]


class InContextMethod:
    """FT-ICR: fine-tune the model on in-context prompts (knowledge + question) -> target.

    Dropout is ``model.dropout`` (set in the model's config by the loader; ``dropout`` records it
    for :meth:`settings`), as for RECKONING: active in training (``train()``, the default, puts the
    module in training mode, and ``forward_backward`` runs in the module's current mode), off in
    evaluation (``evaluate`` runs in eval mode and restores the previous mode).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, encoder: Encoder, outer: OuterConfig,
                 eval: EvalConfig, dropout: float = 0.0) -> None:
        self.model, self.tokenizer, self.encoder = model, tokenizer, encoder
        self.outer, self.eval_config = outer, eval
        self.dropout = float(dropout)
        self.training = True
        self.model.train()

    def _weights(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """One group for ``torch.optim.AdamW``: the weights (outer.lr, outer.weight_decay)."""
        return [{"params": self._weights(), "lr": float(self.outer.lr),
                 "weight_decay": float(self.outer.weight_decay), "name": "weights"}]

    def meta_parameters(self) -> list[Tensor]:
        return self._weights()

    def stats(self) -> dict[str, float]:
        return {}

    def extra_state(self) -> dict[str, Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        """Nothing besides the weights: ``state`` must be empty."""
        if state:
            raise BilevelError(f"the in-context baseline has no meta-parameters besides the weights: {sorted(state)}")

    def settings(self) -> dict[str, Any]:
        return method_settings(str(self.encoder.method), self.encoder, self.dropout, outer=self.outer,
                               eval=self.eval_config)

    def to(self, device: torch.device | str) -> "InContextMethod":
        self.model.to(device)
        return self

    def train(self) -> "InContextMethod":
        self.training = True
        self.model.train()
        return self

    def eval(self) -> "InContextMethod":
        self.training = False
        self.model.eval()
        return self

    def _answer_losses(self, batch: TaskBatch) -> Tensor:
        s = batch.sequence
        return row_mean_losses(causal_lm_logits(self.model, None, s.input_ids, s.attention_mask), s.labels)

    def forward_backward(self, batch: TaskBatch, loss_scale: float = 1.0) -> dict[str, float]:
        """Target loss summed over the tasks of ``batch`` (each task: mean over its target tokens);
        ``backward(loss * loss_scale)``. Returns ``{"loss": summed loss (unscaled), "tasks": T}``."""
        loss = self._answer_losses(batch).sum()
        (loss * loss_scale).backward()
        return {"loss": float(loss.detach()), "tasks": float(len(batch))}

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch, inner_steps: Optional[int] = None) -> dict[str, list]:
        """Answer loss and greedy generation per task (same lists as ``ReckoningMethod.evaluate``).

        ``inner_steps`` exists for interface compatibility: None or 0 (there is no inner loop).
        Runs the module in eval mode and restores the previous mode afterwards.
        """
        if inner_steps not in (None, 0):
            raise BilevelError(f"inner_steps={inner_steps}: the in-context baseline has no inner loop (use None)")
        was_training = self.model.training
        self.model.eval()
        try:
            losses = self._answer_losses(batch)

            def next_token_logits(ids: Tensor, mask: Tensor) -> Tensor:
                return causal_lm_logits(self.model, None, ids, mask)[:, -1]

            tokens = greedy_generate(
                next_token_logits, batch.prompt.input_ids, batch.prompt.attention_mask,
                int(self.eval_config.max_new_tokens), int(self.tokenizer.eos_token_id),
                int(self.tokenizer.pad_token_id), max_positions(self.model),
            )
        finally:
            self.model.train(was_training)
        return generation_records(self.encoder, self.tokenizer, batch, tokens, losses.tolist())


def build_method(cfg: DictConfig, model: torch.nn.Module, tokenizer: Any, encoder: Encoder):
    """The method of ``cfg.train.method`` from a full config: :class:`ReckoningMethod` for
    "reckoning" (engine ``inner.engine``), :class:`ReckoningRandomFactsMethod` for
    "reckoning_random_facts", :class:`InContextMethod` for the in-context methods."""
    return _build(str(cfg.train.method), model, tokenizer, encoder, lambda name: group(cfg, name),
                  float(cfg.model.dropout))


def build_method_from_settings(settings: dict[str, Any], model: torch.nn.Module, tokenizer: Any,
                               fact_pool: Optional[list[str]] = None):
    """The method that wrote ``settings`` (its ``settings()``, e.g. read back from a checkpoint)
    around ``model`` and ``tokenizer``; the learned rates are fresh (``load_extra_state`` restores
    them). Keys other than the method's own (e.g. a format version) are ignored.

    ``fact_pool``: the sentences the random-facts methods draw from (a checkpoint keeps its run's,
    :func:`reckoning_ray.core.checkpoint.load_pretrained` passes them); None: the other tasks of
    each batch."""
    schemas = {"inner": InnerConfig, "outer": OuterConfig, "eval": EvalConfig}

    def config(name: str) -> Any:
        # Through the schema, so choices come back as their Enum members and types are checked
        # (not merged onto the defaults: a dict such as inner.steps_by_hops replaces the default's);
        # a nested group (inner.lora) is built as its own dataclass first.
        hints = typing.get_type_hints(schemas[name])
        values = {key: hints[key](**value) if dataclasses.is_dataclass(hints.get(key)) and isinstance(value, dict)
                  else value for key, value in settings[name].items()}
        return OmegaConf.to_object(OmegaConf.structured(schemas[name](**values)))

    encoder = Encoder(tokenizer, **settings["encoder"], fact_pool=fact_pool)
    return _build(str(settings["method"]), model, tokenizer, encoder, config, float(settings.get("dropout", 0.0)))


def _build(method: str, model: torch.nn.Module, tokenizer: Any, encoder: Encoder, config: Any, dropout: float):
    if method == "reckoning":
        return ReckoningMethod(model, tokenizer, encoder, config("inner"), config("outer"), config("eval"), dropout)
    if method == RECKONING_RANDOM_FACTS:
        return ReckoningRandomFactsMethod(model, tokenizer, encoder, config("inner"), config("outer"),
                                          config("eval"), dropout)
    if method in IN_CONTEXT_METHODS:
        return InContextMethod(model, tokenizer, encoder, config("outer"), config("eval"), dropout)
    raise BilevelError(f"train.method={method!r} is invalid: choose one of {', '.join(METHODS)}")
