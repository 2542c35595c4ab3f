"""RECKONING's inner loop as plain functional code: the definition the fused engine is tested against.

For one task with knowledge K, learned rates ``lr[k, i]`` (step k, parameter tensor i)::

    W_0 = the model's weights
    for k in 0 .. N-1:
        L_k     = causal-LM loss of K under W_k             (torch.func.functional_call)
        G_k     = dL_k / dW_k                               (create_graph: second order)
        W_{k+1} = AdamW or SGD step of W_k with G_k and lr[k, :], op by op

Autograd does the rest: the outer loss of the question under W_N back-propagates through every
step into W_0 and the rates. First order (``inner.first_order``): G_k is taken without a graph, a
constant of the outer graph; the updates stay differentiable. This is the ``reference`` engine
(``inner.engine=reference``), one task at a time; the memory options are the fused engine's
(:mod:`.fused`), so ``inner.checkpoint`` and ``inner.autocast`` are refused here and
``inner.tasks_per_pass`` always holds (one task per pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from reckoning_ray.core.bilevel.adapted import Weights
from reckoning_ray.core.bilevel.lm import (
    BilevelError,
    causal_lm_logits,
    causal_lm_loss,
)
from reckoning_ray.core.schema import InnerConfig
from reckoning_ray.core.data.encode import TaskBatch
from reckoning_ray.core.modeling import set_attention_for_second_order


def inner_loop(knowledge_loss: Callable[[list[Tensor]], Tensor], weights: list[Tensor], lrs: Tensor,
               inner: InnerConfig, steps: int, graph: bool = True) -> tuple[list[Tensor], list[float]]:
    """W_N from W_0 = ``weights`` after ``steps`` steps on ``knowledge_loss`` (W -> scalar loss) with
    the rates ``lrs`` ``[>= steps, len(weights)]``; also the loss before each step.

    ``graph=False`` (evaluation): each step starts from detached weights, so gradients are computed
    and no graph is kept.
    """
    state = AdamWState.zeros_like(weights)
    losses = []
    for k in range(steps):
        if not graph:
            weights = [w.detach().requires_grad_(True) for w in weights]
        loss = knowledge_loss(weights)
        grads = torch.autograd.grad(loss, weights, create_graph=graph and not inner.first_order, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]
        if inner.optimizer == "adamw":
            weights, state = adamw_step(weights, grads, lrs[k], state, beta1=inner.beta1, beta2=inner.beta2,
                                        eps=inner.eps, weight_decay=inner.weight_decay)
        else:
            weights = sgd_step(weights, grads, lrs[k])
        losses.append(float(loss.detach()))
    return (weights if graph else [w.detach() for w in weights]), losses


def sgd_step(weights: Sequence[Tensor], grads: Sequence[Tensor], lrs: Sequence[Tensor | float]) -> list[Tensor]:
    """``w - lr * g`` per tensor; differentiable in w, g and lr."""
    return [w - lr * g for w, g, lr in zip(weights, grads, lrs)]


@dataclass
class AdamWState:
    """First and second moments per tensor and the number of steps taken (fresh for every task)."""

    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    step: int = 0

    @classmethod
    def zeros_like(cls, weights: Sequence[Tensor]) -> "AdamWState":
        return cls([torch.zeros_like(w) for w in weights], [torch.zeros_like(w) for w in weights], 0)


def adamw_step(weights: Sequence[Tensor], grads: Sequence[Tensor], lrs: Sequence[Tensor | float], state: AdamWState,
               *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01,
               eps_inside_sqrt: bool = True) -> tuple[list[Tensor], AdamWState]:
    """One AdamW step (decoupled weight decay, bias correction) from differentiable ops::

        w <- w * (1 - lr * weight_decay)
        m <- beta1 m + (1 - beta1) g ;  v <- beta2 v + (1 - beta2) g^2
        w <- w - lr * (m / (1 - beta1^t)) / denom

    ``denom = sqrt(v / (1 - beta2^t) + eps^2)`` (smooth where v = 0, see the package docstring), or
    ``torch.optim.AdamW``'s ``sqrt(v / (1 - beta2^t)) + eps`` with ``eps_inside_sqrt=False``.
    Returns the new weights and a new state; nothing is modified in place.
    """
    step = state.step + 1
    bias1, bias2 = 1.0 - beta1**step, 1.0 - beta2**step
    new_w, new_m, new_v = [], [], []
    for w, g, lr, m, v in zip(weights, grads, lrs, state.exp_avg, state.exp_avg_sq):
        if state.step == 0:  # zero moments: nothing to multiply (fewer double-backward nodes)
            m, v = (1.0 - beta1) * g, (1.0 - beta2) * (g * g)
        else:
            m, v = torch.lerp(m, g, 1.0 - beta1), torch.addcmul(v * beta2, g, g, value=1.0 - beta2)
        if eps_inside_sqrt:
            direction = m * torch.rsqrt(v / bias2 + eps * eps)
        else:
            direction = m / (torch.sqrt(v) / math.sqrt(bias2) + eps)
        new_w.append(w * (1.0 - lr * weight_decay) - (lr / bias1) * direction)
        new_m.append(m)
        new_v.append(v)
    return new_w, AdamWState(new_m, new_v, step)


class ReferenceEngine:
    """:func:`inner_loop` for :class:`~reckoning_ray.core.bilevel.method.ReckoningMethod`, one task per
    pass. Fast weights are one task's ``{name: tensor}``; rows come as ``[1, ...]``."""

    def __init__(self, model: torch.nn.Module, inner: InnerConfig, adapted: Any = None) -> None:
        for key, value, off in (("checkpoint", inner.checkpoint, False), ("autocast", inner.autocast, "none")):
            if value != off:
                raise BilevelError(f"inner.{key}={str(value).lower()} is a memory option of the fused engine; the "
                                   f"reference engine runs the plain loop: set inner.{key}={str(off).lower()} or "
                                   "inner.engine=fused")
        self.model, self.inner = model, inner
        self.adapted = adapted if adapted is not None else Weights(model)  # what the inner loop adapts
        self.names = list(self.adapted.names)
        self.attention = set_attention_for_second_order(model, not inner.first_order)

    def passes(self, steps: list[int]) -> list[tuple[int, list[int]]]:
        return [(n, [t]) for t, n in enumerate(steps)]

    def adapt(self, task: TaskBatch, steps: int, lrs: Tensor, graph: bool) -> tuple[dict[str, Tensor], list[float]]:
        names, weights = self.names, self.adapted.initial()
        k = task.knowledge

        def knowledge_loss(w: list[Tensor]) -> Tensor:
            return causal_lm_loss(self.model, self.adapted.weights(dict(zip(names, w))), k.input_ids[0],
                                  k.attention_mask[0], k.labels[0])

        with torch.enable_grad():
            fast, losses = inner_loop(knowledge_loss, weights, lrs if graph else lrs.detach(), self.inner, steps, graph)
        return dict(zip(names, fast)), losses

    def task_losses(self, fast: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        return causal_lm_loss(self.model, self.adapted.weights(fast), input_ids[0], attention_mask[0], labels[0])[None]

    def last_logits(self, fast: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return causal_lm_logits(self.model, self.adapted.weights(fast), input_ids, attention_mask)[:, -1]

    def task_weights(self, fast: dict[str, Tensor], j: int) -> dict[str, Tensor]:
        return self.adapted.weights(fast)
