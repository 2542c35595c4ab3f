"""One inner optimizer step of the ``fused`` engine as a single autograd node, its adjoint written out.

:class:`InnerUpdate` is the inner AdamW step (:func:`.reference.adamw_step` with its smooth
denominator) or SGD step (:func:`.reference.sgd_step`) as arithmetic without a graph, and its
adjoint: the gradients reaching the step's inputs from those of its outputs, by hand (the formulas
are in its docstring). :class:`FusedStep` makes one step one ``torch.autograd.Function`` node that
keeps only its inputs and runs the adjoint in the backward pass, instead of a dozen op-by-op nodes
and four weight-sized intermediates per tensor. :func:`fused_adamw_step` is the same step with
:func:`.reference.adamw_step`'s interface; the tests compare the two (values and derivatives) and
check the adjoint with finite differences and ``gradcheck``.

The engine (:mod:`.fused`) runs these steps: one :class:`FusedStep` node per inner step, or, with
``inner.checkpoint``, the whole loop as one node that replays :meth:`InnerUpdate.apply` and calls
:meth:`InnerUpdate.adjoint` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from reckoning_ray.core.bilevel.reference import AdamWState


@dataclass(frozen=True)
class InnerUpdate:
    """The engine's inner optimizer step (:func:`.reference.adamw_step` with its smooth denominator,
    or :func:`.reference.sgd_step`) as arithmetic without a graph, and its adjoint written out.

    ``state`` is a list of tensors: empty for SGD and before AdamW's first step, AdamW's
    ``[*exp_avg, *exp_avg_sq]`` after it. ``lrs`` is one ``[n]`` tensor (a rate per weight tensor),
    ``step`` counts from 1. Recorded op by op, AdamW keeps four weight-sized tensors per inner step
    for the outer backward (the gradient, the new first moment, ``rsqrt(v_hat + eps^2)`` and the
    update direction) and adds a dozen autograd nodes per weight tensor; through
    :class:`FusedStep` it keeps only its inputs and recomputes the rest.

    AdamW, with ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2``,
    ``r = (v' / c2 + eps^2)^-1/2``, ``w' = w (1 - lr wd) - (lr / c1) m' r`` (``c1``, ``c2`` the
    bias corrections) and ``G_x`` the gradient reaching ``x``::

        G_m' = G_m'(out) - (lr / c1) r G_w'        G_v' = G_v'(out) + (lr / c1) m' r^3 / (2 c2) G_w'
        G_w = (1 - lr wd) G_w'                     G_lr = -sum(G_w' (wd w + m' r / c1))
        G_g = (1 - b1) G_m' + 2 (1 - b2) g G_v'    G_m = b1 G_m',  G_v = b2 G_v'

    SGD (``w' = w - lr g``): ``G_w = G_w'``, ``G_g = -lr G_w'``, ``G_lr = -sum(G_w' g)``.
    """

    adamw: bool
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01

    def _moments(self, g: Tensor, state: Sequence[Tensor], i: int, n: int) -> tuple[Tensor, Tensor]:
        b1, b2 = self.beta1, self.beta2
        if not state:  # first step: zero moments, nothing to multiply
            return g * (1.0 - b1), torch.mul(g, g).mul_(1.0 - b2)
        return torch.lerp(state[i], g, 1.0 - b1), torch.mul(state[n + i], b2).addcmul_(g, g, value=1.0 - b2)

    def apply(self, step: int, weights: Sequence[Tensor], grads: Sequence[Tensor], state: Sequence[Tensor],
              lrs: Tensor, release: bool = False, directions: Optional[list[Tensor]] = None
              ) -> tuple[list[Tensor], list[Tensor]]:
        """New weights and state (no graph is recorded by the arithmetic itself).

        ``release``: ``weights`` and ``state`` are lists owned by the caller; each entry is set to
        None once used, so the old and the new step hold about one tensor's memory together.
        ``directions``: a list to receive each tensor's update direction ``t`` (AdamW: ``m' r``;
        SGD: the gradient), all that :meth:`adjoint_constant` needs.
        """
        n = len(weights)
        if not self.adamw:
            new = []
            for i, (g, lr) in enumerate(zip(grads, lrs.tolist())):
                new.append(torch.add(weights[i], g, alpha=-lr))
                if directions is not None:
                    directions.append(g)
                if release:
                    weights[i] = None  # type: ignore[index]
            return new, []
        # Fewest passes over weight-sized memory (the step is bound by them): with
        # rho = (v' + c2 eps^2)^-1/2, r = sqrt(c2) rho, so w' = w (1 - lr wd) + s m' rho with
        # s = -lr sqrt(c2) / c1 folded into one scalar. Rates as Python numbers: scalar
        # operands of the fused kernels (addcmul's value, add's alpha) instead of 0-dim tensors.
        c1, c2 = 1.0 - self.beta1**step, 1.0 - self.beta2**step
        floor = c2 * self.eps * self.eps
        new_w, new_m, new_v = [], [], []
        for i, (g, lr) in enumerate(zip(grads, lrs.tolist())):
            m, v = self._moments(g, state, i, n)
            rho = torch.add(v, floor).rsqrt_()
            decay = 1.0 - lr * self.weight_decay
            if directions is not None:
                t = rho.mul_(m).mul_(math.sqrt(c2))
                directions.append(t)
                new_w.append(torch.mul(weights[i], decay).add_(t, alpha=-lr / c1))
            else:
                new_w.append(torch.mul(weights[i], decay).addcmul_(m, rho, value=-lr * math.sqrt(c2) / c1))
            del rho
            new_m.append(m)
            new_v.append(v)
            if release:
                _release(weights, state, i, n)
        return new_w, [*new_m, *new_v]

    def adjoint(
        self,
        step: int,
        weights: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: Sequence[Tensor],
        lrs: Tensor,
        d_weights: Sequence[Optional[Tensor]],
        d_state: Sequence[Optional[Tensor]],
        needs: Optional[Sequence[bool]] = None,
        release: bool = False,
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]], list[Optional[Tensor]], Optional[Tensor]]:
        """Gradients reaching (weights, grads, state, lrs) from those of the new weights and state.

        ``d_*`` entries may be None (no gradient); ``d_state`` may be empty. ``needs``: which of
        ``[*weights, *grads, *state, lrs]`` want a gradient (default all). ``release``: as in
        :meth:`apply`, for ``weights``, ``state``, ``d_weights`` and ``d_state``.
        """
        n = len(weights)
        needs = list(needs) if needs is not None else [True] * (2 * n + len(state) + 1)
        d_w: list[Optional[Tensor]] = [None] * n
        d_g: list[Optional[Tensor]] = [None] * n
        d_s: list[Optional[Tensor]] = [None] * len(state)
        d_lr = torch.zeros_like(lrs) if needs[-1] else None
        tensor_adjoint = self._adamw_tensor_adjoint if self.adamw else self._sgd_tensor_adjoint
        for i, lr in enumerate(lrs.tolist()):
            gw = d_weights[i]
            # SGD has no state: its d_state is empty
            gm, gv = (d_state[i], d_state[n + i]) if d_state and self.adamw else (None, None)
            if gw is not None or gm is not None or gv is not None:
                d_w[i], d_g[i], d_m, d_v = tensor_adjoint(step, lr, i, n, weights, grads, state, (gw, gm, gv),
                                                          needs, d_lr)
                if state:
                    d_s[i], d_s[n + i] = d_m, d_v
                del d_m, d_v
            if release:
                del gw, gm, gv
                for items in (weights, state, d_weights, d_state):
                    _release(items, items, i, n)
        return d_w, d_g, d_s, d_lr

    def _sgd_tensor_adjoint(self, step: int, lr: float, i: int, n: int, weights: Sequence[Tensor],
                            grads: Sequence[Tensor], state: Sequence[Tensor],
                            d_out: tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]],
                            needs: Sequence[bool], d_lr: Optional[Tensor]
                            ) -> tuple[Optional[Tensor], Optional[Tensor], None, None]:
        """Tensor ``i``'s ``(G_w, G_g, -, -)`` for ``w' = w - lr g`` (``G_lr`` into ``d_lr[i]``), given
        ``d_out = (G_w', -, -)`` with ``G_w'`` not None."""
        gw = d_out[0]
        d_w = gw if needs[i] else None
        d_g = gw * -lr if needs[n + i] else None
        if d_lr is not None:
            d_lr[i] = -torch.vdot(gw.reshape(-1), grads[i].reshape(-1))
        return d_w, d_g, None, None

    def _adamw_tensor_adjoint(self, step: int, lr: float, i: int, n: int, weights: Sequence[Tensor],
                              grads: Sequence[Tensor], state: Sequence[Tensor],
                              d_out: tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]],
                              needs: Sequence[bool], d_lr: Optional[Tensor]
                              ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """Tensor ``i``'s ``(G_w, G_g, G_m, G_v)`` (``G_lr`` into ``d_lr[i]``) from
        ``d_out = (G_w', G_m'(out), G_v'(out))``; ``G_m``, ``G_v`` are None without a state (the
        first step) or where ``needs`` says no."""
        g = grads[i]
        d_w, dm, dv = self._adamw_moment_adjoints(step, lr, i, n, weights[i], g, state, d_out, needs[i], d_lr)
        d_g = None
        if needs[n + i]:
            d_g = None if dm is None else dm * (1.0 - self.beta1)
            if dv is not None:
                scale = 2.0 * (1.0 - self.beta2)
                d_g = torch.mul(g, dv).mul_(scale) if d_g is None else d_g.addcmul_(g, dv, value=scale)
        if not state:
            return d_w, d_g, None, None
        need_m, need_v = needs[2 * n + i], needs[3 * n + i]
        return (d_w, d_g, dm.mul_(self.beta1) if need_m and dm is not None else None,
                dv.mul_(self.beta2) if need_v and dv is not None else None)

    def _adamw_moment_adjoints(self, step: int, lr: float, i: int, n: int, w: Tensor, g: Tensor,
                               state: Sequence[Tensor],
                               d_out: tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]],
                               need_w: bool, d_lr: Optional[Tensor]
                               ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """``(G_w, G_m', G_v')`` of tensor ``i`` (``G_lr`` into ``d_lr[i]``): the terms through the
        new weights, the moments recomputed from ``g`` and ``state``."""
        gw, gm, gv = d_out
        c1, c2 = 1.0 - self.beta1**step, 1.0 - self.beta2**step
        floor, root = c2 * self.eps * self.eps, math.sqrt(c2)
        # With rho = (v' + c2 eps^2)^-1/2 (so r = sqrt(c2) rho), s = -lr sqrt(c2) / c1 and q = G_w' rho:
        # G_m' = G_m'(out) + s q, G_v' = G_v'(out) - (s / 2) q m' rho^2,
        # G_lr = -wd <G_w', w> - (sqrt(c2) / c1) <q, m'>. Fresh buffers only for m', v' (then rho),
        # q and the outputs.
        m, rho = self._moments(g, state, i, n)
        rho = rho.add_(floor).rsqrt_()
        if gw is None:  # no gradient reaches the new weights: the moments' own gradients only
            return None, None if gm is None else gm.clone(), None if gv is None else gv.clone()
        s = -lr * root / c1
        d_w = gw * (1.0 - lr * self.weight_decay) if need_w else None
        q = gw * rho
        if d_lr is not None:
            d_lr[i] = -(self.weight_decay * torch.vdot(gw.reshape(-1), w.reshape(-1))
                        + (root / c1) * torch.vdot(q.reshape(-1), m.reshape(-1)))
        p = rho.mul_(rho).mul_(m)
        dv = p.mul_(q).mul_(-0.5 * s) if gv is None else torch.addcmul(gv, q, p, value=-0.5 * s)
        dm = q.mul_(s) if gm is None else torch.add(gm, q, alpha=s)
        return d_w, dm, dv

    def adjoint_constant(
        self,
        step: int,
        weights: Sequence[Tensor],
        directions: Sequence[Tensor],
        lrs: Tensor,
        d_weights: Sequence[Optional[Tensor]],
        need_weights: Sequence[bool],
        need_lrs: bool,
    ) -> tuple[list[Optional[Tensor]], Optional[Tensor]]:
        """Gradients reaching (weights, lrs) when the inner gradients and the state are constants
        (first order): ``w' = w (1 - lr wd) - (lr / c1) t`` (AdamW) or ``w' = w - lr g`` (SGD),
        ``t`` the ``directions`` of :meth:`apply`."""
        n = len(weights)
        wd = self.weight_decay if self.adamw else 0.0
        k = 1.0 / (1.0 - self.beta1**step) if self.adamw else 1.0
        decay = (1.0 - lrs * wd).unbind(0)
        d_w: list[Optional[Tensor]] = [None] * n
        d_lr = torch.zeros_like(lrs) if need_lrs else None
        for i, gw in enumerate(d_weights):
            if gw is None:
                continue
            if need_weights[i]:
                d_w[i] = gw * decay[i] if wd else gw
            if d_lr is not None:
                flat = gw.reshape(-1)
                value = k * torch.vdot(flat, directions[i].reshape(-1))
                if wd:
                    value = value + wd * torch.vdot(flat, weights[i].reshape(-1))
                d_lr[i] = -value
        return d_w, d_lr


def _release(first: list, pairs: list, i: int, n: int) -> None:
    """Set entry ``i`` of ``first`` and entries ``i``, ``n + i`` of ``pairs`` (when present) to None."""
    if i < len(first):
        first[i] = None
    for j in (i, n + i):
        if j < len(pairs):
            pairs[j] = None


class FusedStep(torch.autograd.Function):
    """One inner step of :class:`InnerUpdate` as a single autograd node.

    ``apply(update, step, n, *weights, *grads, *state, lrs)`` -> ``(*new weights, *new state)``.
    Keeps its inputs for the backward pass (of which only the inner gradient is new memory: the
    weights and the state are kept by the steps around it) and runs
    :meth:`InnerUpdate.adjoint` there. Its backward pass is not itself differentiable (nothing in
    RECKONING differentiates it).
    """

    @staticmethod
    def forward(ctx: Any, update: InnerUpdate, step: int, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.update, ctx.step, ctx.n = update, step, n
        ctx.set_materialize_grads(False)
        weights, grads, state, lrs = tensors[:n], tensors[n : 2 * n], tensors[2 * n : -1], tensors[-1]
        # First order: the gradients and the state are constants, so the new state is one too and
        # the backward pass needs only the weights and the update directions.
        ctx.constant = not any(ctx.needs_input_grad[3 + n : -1])
        if ctx.constant:
            directions: list[Tensor] = []
            new, state = update.apply(step, weights, grads, state, lrs, directions=directions)
            ctx.n_state = len(tensors) - 2 * n - 1
            ctx.save_for_backward(*weights, *directions, lrs)
            ctx.mark_non_differentiable(*state)
            return (*new, *state)
        ctx.save_for_backward(*tensors)
        new, state = update.apply(step, weights, grads, state, lrs)
        return (*new, *state)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        n, saved = ctx.n, ctx.saved_tensors
        if ctx.constant:
            needs = ctx.needs_input_grad[3:]
            d_w, d_lr = ctx.update.adjoint_constant(ctx.step, saved[:n], saved[n : 2 * n], saved[-1],
                                                    grad_outputs[:n], needs[:n], needs[-1])
            return (None, None, None, *d_w, *[None] * (n + ctx.n_state), d_lr)
        d_w, d_g, d_s, d_lr = ctx.update.adjoint(
            ctx.step, saved[:n], saved[n : 2 * n], saved[2 * n : -1], saved[-1],
            grad_outputs[:n], grad_outputs[n:], ctx.needs_input_grad[3:],
        )
        return (None, None, None, *d_w, *d_g, *d_s, d_lr)


def fused_adamw_step(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    lrs: Tensor,
    state: AdamWState,
    *,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> tuple[list[Tensor], AdamWState]:
    """:func:`.reference.adamw_step` (smooth denominator) as the engine runs it: one :class:`FusedStep`
    node, ``lrs`` one ``[len(weights)]`` tensor. Same values and derivatives, less memory."""
    n, step = len(weights), state.step + 1
    moments = [*state.exp_avg, *state.exp_avg_sq] if state.step else []
    update = InnerUpdate(True, beta1, beta2, eps, weight_decay)
    out = FusedStep.apply(update, step, n, *weights, *grads, *moments, lrs)
    return list(out[:n]), AdamWState(list(out[n : 2 * n]), list(out[2 * n :]), step)
