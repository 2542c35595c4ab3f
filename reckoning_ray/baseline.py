"""Fine-tuned in-context reasoning (FT-ICR), the paper's baseline, and ``build_method``.

The knowledge is in the prompt instead of the weights: ``TaskBatch.sequence`` holds the
in-context prompt (knowledge sentences, then the question; built by the Encoder for the methods
``icr``, ``icr_no_facts``, ``icr_random_facts``) followed by the target, and training is plain
fine-tuning on the target tokens. Same interface as :class:`reckoning_ray.bilevel.ReckoningMethod`
(no inner loop, no learned inner rates), so the training loop runs either.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torch import Tensor

from .bilevel import (
    BilevelError,
    ReckoningMethod,
    _encoder_for,
    causal_lm_logits,
    generation_records,
    greedy_generate,
    max_positions,
    row_mean_losses,
)
from .data.encode import TaskBatch

__all__ = ["InContextMethod", "build_method"]


class InContextMethod:
    """FT-ICR: fine-tune the model on in-context prompts (knowledge + question) -> target.

    Dropout is ``model.dropout`` (set in the model's config by the loader), as for RECKONING:
    active in training (``train()``, the default, puts the module in training mode, and
    ``forward_backward`` runs in the module's current mode), off in evaluation (``evaluate`` runs in
    eval mode and restores the previous mode).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: DictConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.encoder = _encoder_for(cfg, tokenizer)
        self.training = True
        self.model.train()

    def _weights(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """One group for ``torch.optim.AdamW``: the weights (outer.lr, outer.weight_decay)."""
        outer = self.cfg.outer
        return [{"params": self._weights(), "lr": float(outer.lr), "weight_decay": float(outer.weight_decay),
                 "name": "weights"}]

    def meta_parameters(self) -> list[Tensor]:
        return self._weights()

    def lr_stats(self) -> dict[str, float]:
        return {}

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
                int(self.cfg.eval.max_new_tokens), int(self.tokenizer.eos_token_id),
                int(self.tokenizer.pad_token_id), max_positions(self.model),
            )
        finally:
            self.model.train(was_training)
        return generation_records(self.encoder, self.tokenizer, batch, tokens, losses.tolist())


def build_method(cfg: DictConfig, model: torch.nn.Module, tokenizer: Any, engine: str = "batched"):
    """The method of ``cfg.train.method``: :class:`ReckoningMethod` for "reckoning" (``engine``
    "batched" or "looped"), :class:`InContextMethod` for the in-context methods."""
    method = str(cfg.train.method)
    if method == "reckoning":
        return ReckoningMethod(model, tokenizer, cfg, engine=engine)
    if method in ("icr", "icr_no_facts", "icr_random_facts"):
        return InContextMethod(model, tokenizer, cfg)
    raise BilevelError(
        f"train.method={method!r} is invalid: choose reckoning, icr, icr_no_facts or icr_random_facts"
    )
