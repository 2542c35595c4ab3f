"""What the training loop, evaluation and prediction call on a method: RECKONING
(:class:`reckoning_ray.core.bilevel.ReckoningMethod`) or an in-context baseline
(:class:`reckoning_ray.core.baseline.InContextMethod`).

A method owns a causal LM and whatever meta-parameters it trains besides the weights (RECKONING:
the learned inner learning rates). The loop never looks behind this protocol.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from reckoning_ray.core.data.encode import Encoder, TaskBatch


@runtime_checkable
class Method(Protocol):
    model: torch.nn.Module
    tokenizer: Any
    encoder: Encoder

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Groups for the outer ``torch.optim.AdamW`` (each with its lr and weight decay)."""

    def meta_parameters(self) -> list[Tensor]:
        """Every tensor the outer optimizer updates (their ``.grad`` is all-reduced and clipped)."""

    def train(self) -> "Method":
        """Training phase (dropout on where the config asks for it)."""

    def eval(self) -> "Method":
        """Evaluation phase (no dropout)."""

    def forward_backward(self, batch: TaskBatch, loss_scale: float = 1.0) -> dict[str, float]:
        """Summed outer loss of ``batch``, back-propagated as ``loss * loss_scale`` into ``.grad``.
        Returns at least ``{"loss": float, "tasks": float}`` (unscaled)."""

    def evaluate(self, batch: TaskBatch) -> dict[str, list]:
        """Per-task lists: "id", "hops", "answer_loss", "prediction", "predicted_label",
        "label_correct", "recall"."""

    def stats(self) -> dict[str, float]:
        """Scalars to log with each validation besides the metrics (e.g. learned-rate range)."""

    def extra_state(self) -> dict[str, Tensor]:
        """Meta-parameters besides the model's weights, by name (saved as safetensors)."""

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        """Copy tensors written by :meth:`extra_state` into this method, in place."""

    def settings(self) -> dict[str, Any]:
        """JSON-able settings that rebuild this method around a saved model: ``{"method": name,
        "inner": {...}, "outer": {...}, "eval": {...}, "encoder": {...}, "dropout": float}``."""

    def to(self, device: torch.device) -> "Method":
        """Move the model and the extra meta-parameters to ``device``."""
