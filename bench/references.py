"""The RECKONING outer step written with `higher` (0.2.1) and TorchOpt (0.7.3), for comparison.

Each class runs the same math as ``reckoning_ray.core.bilevel.ReckoningMethod.forward_backward``:
for every task, ``inner_steps`` differentiable optimizer steps on the task's knowledge loss with one
learned learning rate per parameter tensor per step, then the answer loss with the fast weights,
then ``backward`` into the initial weights and the learned rates. The inner AdamW is the engine's:
decoupled weight decay, bias correction, denominator ``sqrt(v_hat + eps**2)``; the inner SGD is
``w - lr * g``. First-order mode holds the inner gradients constant and keeps the updates
differentiable, as the engine does.

The model calls and losses come from the engine's module (``causal_lm_logits``-style call with the
4D additive mask and position ids, ``token_mean_loss``): what differs between implementations is
only the machinery of the differentiable inner loop, which is what the benchmark compares.

How the learned rates reach each library
    higher      one optimizer parameter group per parameter tensor; the step's rates are passed as
                ``override={"lr": [lr_0, ..., lr_n]}`` (tensors that require grad). higher has no
                differentiable AdamW, so one with the engine's update is registered with
                ``higher.register_optim`` for a marker subclass of ``torch.optim.AdamW``.
    TorchOpt    the functional ``torchopt.adamw(lr=1.0, eps=0.0, eps_root=eps**2)`` (``eps_root``
                sits inside the square root, after bias correction: the engine's denominator) or
                ``torchopt.sgd(lr=1.0)`` gives the unit-rate update ``u``; each tensor then moves
                by ``lr_i * u``. AdamW's weight decay is inside ``u`` (``-(adam + wd * w)``), so
                ``w + lr_i * u`` is exactly ``w * (1 - lr_i * wd) - lr_i * adam``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from reckoning_ray.core.bilevel.lm import additive_causal_mask, position_ids_from_mask, token_mean_loss
from reckoning_ray.core.data.encode import TaskBatch
from reckoning_ray.core.modeling import set_attention_for_second_order


def trainable(model: torch.nn.Module) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of the trainable parameters, ``named_parameters()`` order (tied once)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def module_logits(module: Any, input_ids: Tensor, attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Logits ``[B, L, V]`` of a (possibly patched) causal LM, called exactly as the engine calls it."""
    return module(
        input_ids=input_ids,
        attention_mask=additive_causal_mask(attention_mask, dtype),
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits


class Reference:
    """Common state: the model, the inner-loop settings and the learned rates ``[steps, tensors]``."""

    name = "reference"

    def __init__(self, model: torch.nn.Module, cfg: Any, lrs: Tensor) -> None:
        self.model = model
        self.cfg = cfg
        self.names, self.params = trainable(model)
        self.dtype = self.params[0].dtype
        self.first_order = bool(cfg.inner.first_order)
        self.steps = int(cfg.inner.steps)
        self.inner_lrs = torch.nn.Parameter(lrs.detach().clone())
        # As the engine does: SDPA has no double backward on CPU, second order needs eager attention.
        set_attention_for_second_order(model, not self.first_order)

    def meta_parameters(self) -> list[Tensor]:
        return self.params + [self.inner_lrs]

    def forward_backward(self, batch: TaskBatch) -> float:
        """Sum over tasks of the answer loss; gradients accumulate into ``.grad``. Returns the loss."""
        total = 0.0
        for t in range(len(batch)):
            loss = self.task_loss(batch, t)
            loss.backward()
            total += float(loss.detach())
        return total

    def task_loss(self, batch: TaskBatch, t: int) -> Tensor:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# higher
# ------------------------------------------------------------------------------------------------


class SmoothAdamW(torch.optim.AdamW):
    """Marker type: ``torch.optim.AdamW`` whose differentiable twin (registered with higher) uses
    the engine's denominator ``sqrt(v_hat + eps**2)``. Only its parameter groups are ever read."""


def _register_higher() -> None:
    import higher
    import higher.optim

    class DifferentiableSmoothAdamW(higher.optim.DifferentiableOptimizer):
        """AdamW as in ``reckoning_ray.core.bilevel.adamw_step``, built from differentiable ops."""

        def _update(self, grouped_grads: Sequence[Sequence[Tensor]], **kwargs: Any) -> None:
            for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
                beta1, beta2 = group["betas"]
                lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
                for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                    if g is None:  # the engine treats an unused tensor's gradient as zero
                        g = torch.zeros_like(p)
                    state = self.state[group_idx][p_idx]
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    bias1 = 1.0 - beta1 ** state["step"]
                    bias2 = 1.0 - beta2 ** state["step"]
                    m = state["exp_avg"] = beta1 * state["exp_avg"] + (1.0 - beta1) * g
                    v = state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * g * g
                    denom = torch.sqrt(v / bias2 + eps * eps)
                    group["params"][p_idx] = p * (1.0 - lr * weight_decay) - lr * (m / bias1) / denom

    higher.register_optim(SmoothAdamW, DifferentiableSmoothAdamW)


def _detach_all(grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    return [None if g is None else g.detach() for g in grads]


class HigherReference(Reference):
    """The outer step with ``higher.innerloop_ctx``, one task at a time (higher has no task batch).

    First order: higher's only switch (``track_higher_grads=False``) also cuts the fast weights
    from the initial ones, which is not the engine's first order; so the inner gradients are
    detached with ``grad_callback`` instead (higher still computes them with ``create_graph=True``,
    part of its cost).
    """

    name = "higher"
    _registered = False

    def __init__(self, model: torch.nn.Module, cfg: Any, lrs: Tensor) -> None:
        super().__init__(model, cfg, lrs)
        if not HigherReference._registered:
            _register_higher()
            HigherReference._registered = True
        inner = cfg.inner
        groups = [{"params": [p]} for p in self.params]  # one group per tensor: one learned lr each
        if inner.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = SmoothAdamW(
                groups, lr=float(inner.lr_init), betas=(float(inner.beta1), float(inner.beta2)),
                eps=float(inner.eps), weight_decay=float(inner.weight_decay),
            )
        else:
            self.optimizer = torch.optim.SGD(groups, lr=float(inner.lr_init))

    def task_loss(self, batch: TaskBatch, t: int) -> Tensor:
        import higher

        k, s = batch.knowledge, batch.sequence
        callback = _detach_all if self.first_order else None
        with higher.innerloop_ctx(self.model, self.optimizer, copy_initial_weights=False,
                                  track_higher_grads=True) as (fmodel, diffopt):
            for step in range(self.steps):
                logits = module_logits(fmodel, k.input_ids[t], k.attention_mask[t], self.dtype)
                inner_loss = token_mean_loss(logits, k.labels[t])
                diffopt.step(inner_loss, override={"lr": list(self.inner_lrs[step].unbind(0))},
                             grad_callback=callback)
            logits = module_logits(fmodel, s.input_ids[t : t + 1], s.attention_mask[t : t + 1], self.dtype)
            return token_mean_loss(logits, s.labels[t : t + 1])


# ------------------------------------------------------------------------------------------------
# TorchOpt
# ------------------------------------------------------------------------------------------------


class TorchOptReference(Reference):
    """The outer step with TorchOpt's functional optimizers and ``torch.func.functional_call``,
    one task at a time."""

    name = "torchopt"

    def __init__(self, model: torch.nn.Module, cfg: Any, lrs: Tensor) -> None:
        import torchopt

        super().__init__(model, cfg, lrs)
        inner = cfg.inner
        if inner.optimizer == "adamw":
            self.transform = torchopt.adamw(
                lr=1.0, betas=(float(inner.beta1), float(inner.beta2)), eps=0.0,
                eps_root=float(inner.eps) ** 2, weight_decay=float(inner.weight_decay),
            )
        else:
            self.transform = torchopt.sgd(lr=1.0)

    def _logits(self, params: Sequence[Tensor], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        from torch.func import functional_call

        mapping = dict(zip(self.names, params))
        return functional_call(self.model, mapping, (), dict(
            input_ids=input_ids,
            attention_mask=additive_causal_mask(attention_mask, self.dtype),
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ), tie_weights=True, strict=False).logits

    def task_loss(self, batch: TaskBatch, t: int) -> Tensor:
        k, s = batch.knowledge, batch.sequence
        fast = tuple(self.params)
        state = self.transform.init(fast)
        for step in range(self.steps):
            if self.first_order:
                probes = tuple(w.detach().requires_grad_(True) for w in fast)
                inner_loss = token_mean_loss(self._logits(probes, k.input_ids[t], k.attention_mask[t]), k.labels[t])
                grads = torch.autograd.grad(inner_loss, probes)
            else:
                inner_loss = token_mean_loss(self._logits(fast, k.input_ids[t], k.attention_mask[t]), k.labels[t])
                grads = torch.autograd.grad(inner_loss, fast, create_graph=True)
            updates, state = self.transform.update(grads, state, params=fast, inplace=False)
            fast = tuple(w + lr * u for w, u, lr in zip(fast, updates, self.inner_lrs[step].unbind(0)))
        logits = self._logits(fast, s.input_ids[t : t + 1], s.attention_mask[t : t + 1])
        return token_mean_loss(logits, s.labels[t : t + 1])


REFERENCES = {"higher": HigherReference, "torchopt": TorchOptReference}
