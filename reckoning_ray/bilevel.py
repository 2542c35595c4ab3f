"""RECKONING's bilevel step: knowledge encoded into fast weights, the question answered with them.

For one task with knowledge K and question q (Chen et al., NeurIPS 2023)::

    inner loop   W_0 = W (the model's weights)
                 W_{k+1} = opt_step(W_k, grad_W L_K(W_k), lr_k)      k = 0 .. N-1
    outer loss   L_q(W_N)   summed over the tasks of the batch

``L_K`` is the causal-LM loss on the knowledge sentences (all facts of a task in one batch, loss on
the fact tokens only), ``L_q`` the loss of the answer target after the question prompt, and
``lr_k`` holds one learned learning rate per parameter tensor per inner step. The outer gradient
reaches W and the learned rates through the unrolled loop (second order) or, with
``inner.first_order``, through the updates with the inner gradients held constant.

Fast weights are plain tensors passed to ``torch.func.functional_call`` over a dict of the model's
parameters; the module itself is never copied or modified. GPT-2's output layer is tied to the
token embedding: ``named_parameters()`` lists the embedding once and ``functional_call``
(``tie_weights=True``) uses the fast embedding for the output layer as well.

Two engines compute the same numbers:

``looped``
    the reference: one task at a time (inner loop, outer loss, backward).
``batched`` (default)
    all tasks with the same number of inner steps at once: every fast weight gets a leading task
    dimension T and the model runs under ``torch.func.vmap`` (weights and inputs mapped over T).
    The tasks' fast weights are independent, so the gradient of the SUM of the task losses with
    respect to the stacked [T, ...] weights is each task's own gradient. Several times faster than
    the looped engine for small models on a CPU (one pass of larger operations instead of T passes
    of small ones); the model gets a 4D attention mask and explicit position ids, so no
    data-dependent mask construction runs under ``vmap``.

Memory options (``inner`` config group; ``bench/memory_modes.py`` measures them)
    ``checkpoint`` keeps only the inner gradients and rebuilds each step's graph in the backward
    pass (:class:`_RecomputedInnerLoop`); ``autocast: bf16`` runs the forward passes in bfloat16;
    ``tasks_per_pass`` bounds how many tasks' inner graphs live at once; ``first_order`` drops the
    second-order terms altogether.

Deviations from ``torch.optim.AdamW``, kept on purpose
    The inner AdamW divides by ``sqrt(v_hat + eps**2)`` instead of ``sqrt(v_hat) + eps``.
    Parameter entries that get no gradient from the knowledge (position embeddings past the
    knowledge length; untied embedding rows of tokens absent from it) have ``v = 0``, where
    ``sqrt`` has an infinite derivative: the second-order pass then produces ``0 * inf = NaN``. The smooth form differs from PyTorch's by less than ``eps`` in the
    denominator. ``adamw_step(..., eps_inside_sqrt=False)`` gives PyTorch's exact form.

    The inner SGD is plain ``W - lr * g`` (``inner.weight_decay``, betas and eps are AdamW's).

Dropout (``model.dropout``, GPT-2's resid/embd/attn dropout) follows the authors' code: while
training, the module is in ``train()`` mode through the inner and the outer loop, and every forward
pass draws its own masks (each inner step, the outer pass, and under ``vmap`` each task:
``randomness="different"``); no mask is shared between passes. The meta-gradient is then the exact
derivative of the outer loss under the sampled masks (the masks are constants of the unrolled
graph): a stochastic meta-gradient, as in the authors' training.
``inner.checkpoint`` recomputes the inner steps in the backward pass with the random-number state
each step had in the forward pass (CPU and accelerator generators, as ``torch.utils.checkpoint``),
so it redraws the same masks and the meta-gradient is the one without checkpointing. Evaluation
(``evaluate``, ``fast_weights``, ``knowledge_losses``) runs in ``eval()`` mode, without dropout.
With ``model.dropout=0`` the module stays in ``eval()`` mode throughout and the step is
deterministic.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor
from torch.func import functional_call, vmap
from torch.utils.checkpoint import get_device_states, set_device_states

from .config import inner_steps_for
from .data.encode import IGNORE_INDEX, Encoder, TaskBatch
from .metrics import fact_recall, normalize_label
from .modeling import set_attention_for_second_order

logger = logging.getLogger(__name__)

ENGINES = ("batched", "looped")
# How the inner loop keeps (or does not keep) its graph.
SECOND_ORDER = "second_order"  # differentiate through the inner gradients
FIRST_ORDER = "first_order"  # inner gradients are constants; the updates stay differentiable
NO_GRAPH = "no_graph"  # evaluation: gradients computed, no graph kept


class BilevelError(ValueError):
    """Bad input to the bilevel engine; the message names the field and the fix."""


# ------------------------------------------------------------------------------------------------
# Model calls shared by RECKONING and the in-context baseline
# ------------------------------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip padding: ``cumsum(mask) - 1`` clamped at 0, shape of the mask.

    Right-padded rows get 0, 1, 2, ... on their tokens; left-padded rows start at 0 on their first
    real token, so a padded prompt is computed exactly as the same prompt without padding.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def additive_causal_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``[..., 1, L, L]`` additive mask: 0 where query i may attend key j (j <= i and key j is a
    real token), the dtype's lowest value elsewhere.

    Passing the 4D mask makes transformers use it as it is (no mask construction with data-dependent
    branches inside the model, which ``vmap`` cannot run).
    """
    length = attention_mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool().unsqueeze(-2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(-3)


def causal_lm_logits(
    model: torch.nn.Module, params: Optional[dict[str, Tensor]], input_ids: Tensor, attention_mask: Tensor
) -> Tensor:
    """Logits ``[B, L, V]`` of ``model`` on ``input_ids`` ``[B, L]`` (left or right padded).

    ``params`` (name -> tensor, from ``named_parameters()``) replaces the model's own weights via
    ``functional_call``; tied weights follow the tensor given for their source (``tie_weights``).
    ``None`` runs the module with its stored weights.
    """
    dtype = next(iter(params.values())).dtype if params else model.dtype
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=additive_causal_mask(attention_mask, dtype),
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    if params is None:
        return model(**kwargs).logits
    return functional_call(model, params, (), kwargs, tie_weights=True, strict=False).logits


def token_mean_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the labelled tokens of ALL rows (a scalar).

    ``labels`` ``[..., L]`` are aligned with the inputs (the model at position t predicts
    ``labels[t + 1]``), ``IGNORE_INDEX`` outside the loss mask. Returns 0 when nothing is labelled.
    """
    targets = labels[..., 1:].reshape(-1)
    scores = logits[..., :-1, :].reshape(-1, logits.shape[-1])
    total = F.cross_entropy(scores, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def row_mean_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-row mean next-token cross-entropy ``[B]`` (see :func:`token_mean_loss`)."""
    targets = labels[:, 1:]
    scores = logits[:, :-1, :]
    nll = F.cross_entropy(scores.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return nll.sum(-1) / (targets != IGNORE_INDEX).sum(-1).clamp(min=1)


def max_positions(model: torch.nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


@torch.no_grad()
def greedy_generate(
    next_token_logits: Callable[[Tensor, Tensor], Tensor],
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    limit: Optional[int] = None,
) -> list[list[int]]:
    """Greedy decoding of T left-padded prompts; returns each row's new tokens up to (without) eos.

    Args:
        next_token_logits: ``(ids [T, L], mask [T, L]) -> [T, V]`` logits of the next token.
        input_ids, attention_mask: ``[T, Lp]`` left-padded prompts.
        max_new_tokens: most tokens generated per row (cfg.eval.max_new_tokens).
        limit: the model's position limit; prompts + new tokens must fit.

    The full sequence is recomputed for every new token (no key/value cache): the fast weights are
    per task, and the generated answers are short.
    """
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise BilevelError(
            f"prompt length {input_ids.shape[1]} + eval.max_new_tokens={max_new_tokens} exceeds the "
            f"model's {limit} positions; lower eval.max_new_tokens or model.max_length"
        )
    ids, mask = input_ids, attention_mask
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new: list[Tensor] = []
    for _ in range(max_new_tokens):
        token = next_token_logits(ids, mask).argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        new.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, (~finished).to(mask.dtype)[:, None]], dim=1)
        finished = finished | (token == eos_id)
        if bool(finished.all()):
            break
    out: list[list[int]] = []
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(ids.shape[0])]
    for row in rows:
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


def generation_records(
    encoder: Encoder, tokenizer: Any, batch: TaskBatch, tokens: list[list[int]], answer_loss: Sequence[float]
) -> dict[str, list]:
    """Per-task evaluation lists from generated tokens (see ``ReckoningMethod.evaluate``)."""
    out: dict[str, list] = {k: [] for k in ("id", "hops", "answer_loss", "prediction", "predicted_label",
                                             "label_correct", "recall")}
    for i, row in enumerate(tokens):
        text = tokenizer.decode(row, skip_special_tokens=True)
        label, facts = encoder.parse_generation(text)
        out["id"].append(batch.ids[i])
        out["hops"].append(int(batch.hops[i]))
        out["answer_loss"].append(float(answer_loss[i]))
        out["prediction"].append(text)
        out["predicted_label"].append(label)
        out["label_correct"].append(label == normalize_label(batch.answers[i]))
        out["recall"].append(fact_recall(facts, batch.facts[i]))
    return out


def _require_knowledge(batch: TaskBatch) -> None:
    if batch.knowledge is None:
        raise BilevelError(
            "RECKONING needs the knowledge batch, but TaskBatch.knowledge is None: build the Encoder "
            "with method='reckoning' (train.method=reckoning)"
        )


def _encoder_for(cfg: DictConfig, tokenizer: Any) -> Encoder:
    # Only its parse_generation is used: the one place that defines how a generation is read.
    return Encoder(tokenizer, method=cfg.train.method, multi_task=cfg.outer.multi_task,
                   max_length=max(int(cfg.model.max_length), 2))


# ------------------------------------------------------------------------------------------------
# Differentiable inner optimizers
# ------------------------------------------------------------------------------------------------


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


def adamw_step(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    lrs: Sequence[Tensor | float],
    state: AdamWState,
    *,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    eps_inside_sqrt: bool = True,
) -> tuple[list[Tensor], AdamWState]:
    """One AdamW step (decoupled weight decay, bias correction) built from differentiable ops.

    Same update as ``torch.optim.AdamW`` (amsgrad off)::

        w <- w * (1 - lr * weight_decay)
        m <- beta1 m + (1 - beta1) g ;  v <- beta2 v + (1 - beta2) g^2
        w <- w - lr * (m / (1 - beta1^t)) / denom

    with ``denom = sqrt(v / (1 - beta2^t) + eps^2)`` by default (smooth where v = 0, see the module
    docstring) or PyTorch's ``sqrt(v / (1 - beta2^t)) + eps`` with ``eps_inside_sqrt=False``.
    Returns the new weights and a new state; nothing is modified in place.
    """
    step = state.step + 1
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    fresh = state.step == 0
    new_w, new_m, new_v = [], [], []
    for w, g, lr, m, v in zip(weights, grads, lrs, state.exp_avg, state.exp_avg_sq):
        # Fewer element-wise kernels (and double-backward nodes) than the textbook form: the zero
        # moments of the first step are not multiplied, lerp / addcmul fuse the moment updates.
        if fresh:
            m = (1.0 - beta1) * g
            v = (1.0 - beta2) * (g * g)
        else:
            m = torch.lerp(m, g, 1.0 - beta1)
            v = torch.addcmul(v * beta2, g, g, value=1.0 - beta2)
        if eps_inside_sqrt:
            direction = m * torch.rsqrt(v / bias2 + eps * eps)
        else:
            direction = m / (torch.sqrt(v) / math.sqrt(bias2) + eps)
        new_w.append(w * (1.0 - lr * weight_decay) - (lr / bias1) * direction)
        new_m.append(m)
        new_v.append(v)
    return new_w, AdamWState(new_m, new_v, step)


@dataclass(frozen=True)
class _InnerUpdate:
    """The engine's inner optimizer step (:func:`adamw_step` with its smooth denominator, or
    :func:`sgd_step`) as arithmetic without a graph, and its adjoint written out.

    ``state`` is a list of tensors: empty for SGD and before AdamW's first step, AdamW's
    ``[*exp_avg, *exp_avg_sq]`` after it. ``lrs`` is one ``[n]`` tensor (a rate per weight tensor),
    ``step`` counts from 1. Recorded op by op, AdamW keeps four weight-sized tensors per inner step
    for the outer backward (the gradient, the new first moment, ``rsqrt(v_hat + eps^2)`` and the
    update direction) and adds a dozen autograd nodes per weight tensor; through
    :class:`_FusedStep` it keeps only its inputs and recomputes the rest.

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

    def _rsqrt_(self, v: Tensor, c2: float) -> Tensor:
        """``(v / c2 + eps^2)^-1/2`` in ``v``'s own memory."""
        return v.div_(c2).add_(self.eps * self.eps).rsqrt_()

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
        rates = lrs.unbind(0)
        if not self.adamw:
            new = []
            for i, g in enumerate(grads):
                new.append(torch.mul(g, -rates[i]).add_(weights[i]))
                if directions is not None:
                    directions.append(g)
                if release:
                    weights[i] = None  # type: ignore[index]
            return new, []
        # In-place arithmetic on fresh buffers wherever possible: on a CPU, writing a new buffer
        # costs several times an in-place pass over one in cache.
        c1, c2 = 1.0 - self.beta1**step, 1.0 - self.beta2**step
        decay, size = (1.0 - lrs * self.weight_decay).unbind(0), (lrs / -c1).unbind(0)
        new_w, new_m, new_v = [], [], []
        for i, g in enumerate(grads):
            m, v = self._moments(g, state, i, n)
            t = torch.div(v, c2).add_(self.eps * self.eps).rsqrt_().mul_(m)
            if directions is not None:
                directions.append(t)
                t = t * size[i]
            else:
                t.mul_(size[i])
            new_w.append(t.addcmul_(weights[i], decay[i]))
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
        need_w, need_g, need_s, need_lr = needs[:n], needs[n : 2 * n], needs[2 * n : -1], needs[-1]
        d_w: list[Optional[Tensor]] = [None] * n
        d_g: list[Optional[Tensor]] = [None] * n
        d_s: list[Optional[Tensor]] = [None] * len(state)
        d_lr = torch.zeros_like(lrs) if need_lr else None
        rates = lrs.unbind(0)
        if not self.adamw:
            for i, g in enumerate(grads):
                gw = d_weights[i]
                if gw is not None:
                    d_w[i] = gw if need_w[i] else None
                    d_g[i] = gw * -rates[i] if need_g[i] else None
                    if d_lr is not None:
                        d_lr[i] = -torch.vdot(gw.reshape(-1), g.reshape(-1))
                if release:
                    del gw
                    _release(weights, d_weights, i, n)
            return d_w, d_g, d_s, d_lr
        b1, b2, wd = self.beta1, self.beta2, self.weight_decay
        c1, c2 = 1.0 - b1**step, 1.0 - b2**step
        # With t = m' r: G_m' = -(lr / c1) G_w' r, G_v' = (lr / (2 c1 c2)) G_w' r^2 t. Fresh buffers
        # only for m' (then t), v' (then r), G_w' r and the outputs G_w, G_g.
        decay = (1.0 - lrs * wd).unbind(0)
        size, half = (lrs / -c1).unbind(0), (lrs / (2.0 * c1 * c2)).unbind(0)
        for i in range(n):
            gw = d_weights[i]
            gm, gv = (d_state[i], d_state[n + i]) if d_state else (None, None)
            if gw is None and gm is None and gv is None:
                if release:
                    for items in (weights, state):
                        _release(items, items, i, n)
                continue
            g = grads[i]
            t, r = self._moments(g, state, i, n)
            r = self._rsqrt_(r, c2)
            t = t.mul_(r)
            if gw is None:  # no gradient reaches the new weights: the moments' own gradients only
                dm = None if gm is None else gm.clone()
                dv = None if gv is None else gv.clone()
            else:
                if need_w[i]:
                    d_w[i] = gw * decay[i]
                if d_lr is not None:
                    flat = gw.reshape(-1)
                    d_lr[i] = -(wd * torch.vdot(flat, weights[i].reshape(-1)) + torch.vdot(flat, t.reshape(-1)) / c1)
                dv = t.mul_(half[i]).mul_(gw).mul_(r).mul_(r)
                dm = r.mul_(gw).mul_(size[i])
                if gm is not None:
                    dm.add_(gm)
                if gv is not None:
                    dv.add_(gv)
            del t, r
            if need_g[i]:
                d = None if dm is None else dm * (1.0 - b1)
                if dv is not None:
                    scale = 2.0 * (1.0 - b2)
                    d = torch.mul(g, dv).mul_(scale) if d is None else d.addcmul_(g, dv, value=scale)
                d_g[i] = d
            if state:
                d_s[i] = dm.mul_(b1) if need_s[i] and dm is not None else None
                d_s[n + i] = dv.mul_(b2) if need_s[n + i] and dv is not None else None
            if release:
                del gw, gm, gv, dm, dv
                for items in (weights, state, d_weights, d_state):
                    _release(items, items, i, n)
        return d_w, d_g, d_s, d_lr

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


class _FusedStep(torch.autograd.Function):
    """One inner step of :class:`_InnerUpdate` as a single autograd node.

    ``apply(update, step, n, *weights, *grads, *state, lrs)`` -> ``(*new weights, *new state)``.
    Keeps its inputs for the backward pass (of which only the inner gradient is new memory: the
    weights and the state are kept by the steps around it) and runs
    :meth:`_InnerUpdate.adjoint` there. Its backward pass is not itself differentiable (nothing in
    RECKONING differentiates it).
    """

    @staticmethod
    def forward(ctx: Any, update: _InnerUpdate, step: int, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
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
    """:func:`adamw_step` (smooth denominator) as the engine runs it: one :class:`_FusedStep`
    node, ``lrs`` one ``[len(weights)]`` tensor. Same values and derivatives, less memory."""
    n, step = len(weights), state.step + 1
    moments = [*state.exp_avg, *state.exp_avg_sq] if state.step else []
    update = _InnerUpdate(True, beta1, beta2, eps, weight_decay)
    out = _FusedStep.apply(update, step, n, *weights, *grads, *moments, lrs)
    return list(out[:n]), AdamWState(list(out[n : 2 * n]), list(out[2 * n :]), step)


def _inner_gradient(loss_fn: Callable[[list[Tensor]], Tensor], weights: Sequence[Tensor], create_graph: bool
                    ) -> tuple[Tensor, list[Tensor]]:
    """``(loss, d loss / d weights)``; zeros where a weight gets no gradient.

    ``create_graph`` (second order): the gradient stays a function of ``weights``. Otherwise the
    loss runs on detached copies and its graph is freed at once (the gradient is a constant).
    """
    if create_graph:
        loss = loss_fn(list(weights))
        grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
    else:
        probes = [w.detach().requires_grad_(True) for w in weights]
        with torch.enable_grad():
            loss = loss_fn(probes)
            grads = torch.autograd.grad(loss, probes, allow_unused=True)
    return loss, [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]


def _rng_state(ref: Tensor) -> tuple[Tensor, str, list[int], list[Tensor]]:
    """The CPU generator's state and that of ``ref``'s accelerator (if any), as
    ``torch.utils.checkpoint`` keeps them."""
    devices, states = get_device_states(ref)
    return torch.get_rng_state(), ref.device.type, devices, states


@contextmanager
def _rng_restored(saved: tuple[Tensor, str, list[int], list[Tensor]]):
    """Run the block from the random-number state ``saved`` (:func:`_rng_state`); the generators
    are put back as they were afterwards."""
    cpu, device_type, devices, states = saved
    with torch.random.fork_rng(devices=devices, device_type=device_type if devices else "cuda"):
        torch.set_rng_state(cpu)
        if devices:
            set_device_states(devices, states, device_type=device_type)
        yield


class _RecomputedInnerLoop(torch.autograd.Function):
    """The whole second-order inner loop, keeping only the inner gradients (``inner.checkpoint``).

    ``apply(loss_fn, update, steps, n, random, *weights, lrs)`` -> ``(*fast weights, losses)`` with
    ``lrs`` the ``[max steps, n]`` learned rates and ``losses`` the knowledge loss before each step
    (no gradient). The forward pass runs the loop without a graph and keeps the inner gradients of
    steps 1 .. N-1 (detached). The backward pass walks the steps in reverse: it rebuilds the
    weights and optimizer state before step k by replaying the optimizer arithmetic from the
    initial weights and the kept gradients (no model passes), recomputes step k's inner gradient
    with ``create_graph``, applies :meth:`_InnerUpdate.adjoint` and back-propagates the gradient's
    share through the rebuilt graph (a Hessian-vector product), which is then freed.

    Memory: N - 1 gradient-sized tensors kept, plus one step's graph and one weights-and-state at
    a time, instead of every step's activations and double-backward graph (or, checkpointing step
    by step, every step's weights and AdamW moments). Time: one more forward and inner gradient
    per step, and N (N - 1) / 2 replayed optimizer updates. The outer gradient is the same as
    without checkpointing: the replay and the recomputation repeat the same operations.

    ``random``: ``loss_fn`` draws random numbers (dropout in train mode). The random-number state
    before each step's forward pass (CPU generator and the weights' accelerator, as
    ``torch.utils.checkpoint`` keeps them) is then kept and restored for that step's
    recomputation, so it redraws the same masks; the generators are left as the forward pass left
    them. False (no dropout): nothing is kept.
    """

    @staticmethod
    def forward(ctx: Any, loss_fn: Callable, update: _InnerUpdate, steps: int, n: int, random: bool,
                *inputs: Tensor) -> tuple[Tensor, ...]:
        weights, lrs = list(inputs[:n]), inputs[n]
        state: list[Tensor] = []
        kept: list[Optional[list[Tensor]]] = []  # the inner gradients of steps 1 .. N-1
        ctx.rng = []  # with ``random``: the random-number state before each step's forward pass
        losses = []
        for k in range(steps):
            if random:
                ctx.rng.append(_rng_state(weights[0]))
            loss, grads = _inner_gradient(loss_fn, weights, create_graph=False)
            losses.append(loss.detach())
            if k < steps - 1:
                kept.append([g.detach() for g in grads])
            weights, state = update.apply(k + 1, weights, grads, state, lrs[k])
        ctx.loss_fn, ctx.update, ctx.steps, ctx.n, ctx.kept = loss_fn, update, steps, n, kept
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        out = torch.stack(losses)
        ctx.mark_non_differentiable(out)
        return (*weights, out)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        update, steps, n, kept = ctx.update, ctx.steps, ctx.n, ctx.kept
        ctx.kept = None
        saved = ctx.saved_tensors
        initial, lrs = saved[:n], saved[n]
        d_lrs = torch.zeros_like(lrs) if ctx.needs_input_grad[-1] else None
        d_w: list[Optional[Tensor]] = list(grad_outputs[:n])
        d_s: list[Optional[Tensor]] = []
        for k in reversed(range(steps)):
            # Lists owned here and released entry by entry (``release``), so that old and new
            # weights, states and adjoints never all live at once.
            weights, state = list(initial), []
            for j in range(k):
                weights, state = update.apply(j + 1, weights, kept[j], state, lrs[j], release=True)
            if k:
                kept[k - 1] = None  # the earlier steps' replays stop before it
            with torch.enable_grad():
                probes = [w.detach().requires_grad_(True) for w in weights]
                if ctx.rng:  # dropout: the masks step k drew in the forward pass
                    with _rng_restored(ctx.rng[k]):
                        _, grads = _inner_gradient(ctx.loss_fn, probes, create_graph=True)
                else:
                    _, grads = _inner_gradient(ctx.loss_fn, probes, create_graph=True)
            d_direct, d_g, d_s, d_lr = update.adjoint(k + 1, weights, [g.detach() for g in grads], state, lrs[k],
                                                      d_w, d_s, release=True)
            del weights, state, d_w
            if d_lrs is not None and d_lr is not None:
                d_lrs[k] = d_lr
            pairs = [(g, dg) for g, dg in zip(grads, d_g) if dg is not None and g.requires_grad]
            hvp = list(torch.autograd.grad([g for g, _ in pairs], probes, [dg for _, dg in pairs], allow_unused=True)
                       if pairs else [None] * n)
            del grads, pairs, d_g, probes
            for i, (a, b) in enumerate(zip(d_direct, hvp)):
                d_direct[i] = a if b is None else (b if a is None else a + b)
                hvp[i] = None
            del a, b
            d_w = d_direct
        ctx.rng = None
        wants = ctx.needs_input_grad[5 : 5 + n]
        return (None, None, None, None, None, *[d if want else None for d, want in zip(d_w, wants)], d_lrs)


# ------------------------------------------------------------------------------------------------
# RECKONING
# ------------------------------------------------------------------------------------------------


class ReckoningMethod:
    """RECKONING training and evaluation on :class:`TaskBatch` es (see the module docstring).

    Args:
        model: a causal LM (``PreTrainedModel``); its parameters are the initial weights W.
        tokenizer: its tokenizer (eos / pad ids for generation, decoding).
        cfg: the whole config tree (``inner``, ``outer``, ``eval``, ``model``, ``train`` groups).
        engine: "batched" (all tasks of a step in one vmapped pass, default) or "looped"
            (task by task, the reference).

    Attributes:
        inner_lrs: ``[max inner steps, number of parameter tensors]`` learned inner learning rates
            (their logarithm with ``inner.lr_space=log``), trained by the outer optimizer.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: DictConfig, engine: str = "batched") -> None:
        if engine not in ENGINES:
            raise BilevelError(f"engine={engine!r} is invalid: choose one of {ENGINES}")
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.engine = engine
        self.mode = FIRST_ORDER if cfg.inner.first_order else SECOND_ORDER
        self.attention = set_attention_for_second_order(model, self.mode == SECOND_ORDER)
        if engine == "batched" and self.attention != "eager":
            # vmap has no batching rule for the CPU SDPA kernels (it would loop over the tasks).
            model.set_attn_implementation("eager")
            logger.info("batched engine: attention switched from %s to eager (vmap over tasks)", self.attention)
            self.attention = "eager"
        # model.dropout > 0: dropout in every training pass, inner and outer, as in the authors' code;
        # 0: the module stays in eval mode throughout (module docstring).
        self.dropout = float(getattr(cfg.model, "dropout", 0.0) or 0.0)
        model.train(self.dropout > 0)
        self.training = True
        self.encoder = _encoder_for(cfg, tokenizer)
        names = self.param_names()
        if not names:
            raise BilevelError("the model has no trainable parameters (all requires_grad=False)")
        self.max_inner_steps = self._max_inner_steps()
        if cfg.inner.autocast == "bf16" and cfg.inner.optimizer == "adamw" and self.mode == SECOND_ORDER:
            logger.warning(
                "inner.autocast=bf16 with second-order AdamW: the meta-gradient is far from float32's "
                "(AdamW's second derivative is ~1/eps where a gradient entry is ~eps; see BENCHMARKS.md, "
                "memory_modes). Use it with inner.first_order=true or inner.optimizer=sgd."
            )
        init = math.log(cfg.inner.lr_init) if cfg.inner.lr_space == "log" else float(cfg.inner.lr_init)
        ref = next(iter(model.parameters()))
        self.inner_lrs = torch.nn.Parameter(
            torch.full((self.max_inner_steps, len(names)), init, dtype=ref.dtype, device=ref.device)
        )
        logger.info(
            "RECKONING: %d parameter tensors, up to %d inner %s steps, %s, %s engine, %s attention",
            len(names), self.max_inner_steps, cfg.inner.optimizer, self.mode, engine, self.attention,
        )

    # -- parameters -------------------------------------------------------------------------------

    def param_names(self) -> list[str]:
        """Names of the trainable parameter tensors, in ``named_parameters()`` order (tied once)."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def _weights(self) -> tuple[list[str], list[Tensor]]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return [n for n, _ in named], [p for _, p in named]

    def _max_inner_steps(self) -> int:
        inner = self.cfg.inner
        if inner.steps is not None:
            return int(inner.steps)
        return max(int(v) for v in inner.steps_by_hops.values())

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Groups for ``torch.optim.AdamW``: the weights (outer.lr, outer.weight_decay) and the
        learned inner rates (outer.inner_lr_lr, no weight decay)."""
        outer = self.cfg.outer
        return [
            {"params": self._weights()[1], "lr": float(outer.lr), "weight_decay": float(outer.weight_decay),
             "name": "weights"},
            {"params": [self.inner_lrs], "lr": float(outer.inner_lr_lr), "weight_decay": 0.0, "name": "inner_lrs"},
        ]

    def meta_parameters(self) -> list[Tensor]:
        """Every tensor the outer optimizer updates (weights, then the learned rates)."""
        return self._weights()[1] + [self.inner_lrs]

    def learning_rates(self) -> Tensor:
        """Effective inner learning rates ``[max steps, tensors]`` (exp of the stored values in log space)."""
        return self.inner_lrs.exp() if self.cfg.inner.lr_space == "log" else self.inner_lrs

    def lr_stats(self) -> dict[str, float]:
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

    def train(self) -> "ReckoningMethod":
        """Training phase: the module in train mode when ``model.dropout > 0`` (dropout in the inner
        and outer passes), in eval mode otherwise (no random op in the step at all)."""
        self.training = True
        self.model.train(self.dropout > 0)
        return self

    def eval(self) -> "ReckoningMethod":
        self.training = False
        self.model.eval()
        return self

    # -- steps per task ---------------------------------------------------------------------------

    def inner_steps(self, batch: TaskBatch, inner_steps: Optional[int] = None) -> list[int]:
        """Inner steps per task: ``inner_steps`` if given, else from each task's hop count."""
        if inner_steps is not None:
            if inner_steps < 0 or inner_steps > self.max_inner_steps:
                raise BilevelError(
                    f"inner_steps={inner_steps} is outside 0..{self.max_inner_steps}: the learned rates "
                    f"cover {self.max_inner_steps} steps (inner.steps / inner.steps_by_hops)"
                )
            return [int(inner_steps)] * len(batch)
        return [inner_steps_for(self.cfg, int(h)) for h in batch.hops.tolist()]

    def _groups(self, steps: list[int]) -> list[tuple[int, list[int]]]:
        """Tasks grouped by their number of inner steps, in order of first appearance."""
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(steps):
            groups.setdefault(n, []).append(i)
        return list(groups.items())

    def _vmap(self, fn: Callable) -> Callable:
        """``vmap`` over tasks. In train mode (dropout) each task draws its own masks
        (``randomness="different"``); in eval mode vmap's default, which refuses random ops."""
        return vmap(fn, randomness="different") if self.model.training else vmap(fn)

    def _passes(self, steps: list[int]) -> list[tuple[int, list[int]]]:
        """The passes of one step: (inner steps, task indices) in order.

        Looped engine: one task per pass. Batched engine: the tasks of each inner-step group
        together, at most ``inner.tasks_per_pass`` of them per pass (0: no limit). A pass of one
        task runs unbatched (same numbers, no vmap overhead).
        """
        if self.engine == "looped":
            return [(n, [t]) for t, n in enumerate(steps)]
        cap = int(self.cfg.inner.tasks_per_pass) or len(steps)
        return [(n, index[i : i + cap]) for n, index in self._groups(steps) for i in range(0, len(index), cap)]

    # -- the inner loop ---------------------------------------------------------------------------

    def _inner_loop(
        self, knowledge_loss: Callable[[list[Tensor]], Tensor], weights: list[Tensor], steps: int, mode: str
    ) -> tuple[list[Tensor], list[float]]:
        """Run ``steps`` optimizer steps on ``knowledge_loss``; returns fast weights and the loss
        before each step.

        ``knowledge_loss`` maps the weight list (shapes as ``weights``: per task, or stacked with a
        leading task dimension) to a scalar: one task's loss or the sum of the tasks' losses.
        Each step is one :class:`_FusedStep` node; with ``inner.checkpoint`` (second order) the
        whole loop is one :class:`_RecomputedInnerLoop`, which keeps only the inner gradients and
        rebuilds each step when the outer backward reaches it.
        """
        inner = self.cfg.inner
        lrs_all = self.learning_rates()
        update = _InnerUpdate(inner.optimizer == "adamw", float(inner.beta1), float(inner.beta2), float(inner.eps),
                              float(inner.weight_decay))
        n = len(weights)
        if bool(inner.checkpoint) and mode == SECOND_ORDER and torch.is_grad_enabled():
            # In train mode (dropout) the recomputation must redraw the forward pass's masks.
            *fast, losses = _RecomputedInnerLoop.apply(knowledge_loss, update, steps, n, self.model.training,
                                                       *weights, lrs_all)
            return list(fast), [float(x) for x in losses]
        if mode == NO_GRAPH:
            lrs_all = lrs_all.detach()
            weights = [w.detach() for w in weights]
        state: list[Tensor] = []  # AdamW's exp_avg then exp_avg_sq (empty before the first step)
        losses = []
        for k in range(steps):
            loss, grads = _inner_gradient(knowledge_loss, weights, create_graph=mode == SECOND_ORDER)
            with torch.set_grad_enabled(mode != NO_GRAPH and torch.is_grad_enabled()):
                out = _FusedStep.apply(update, k + 1, n, *weights, *grads, *state, lrs_all[k])
            weights, state = list(out[:n]), list(out[n:])
            losses.append(float(loss.detach()))
        return weights, losses

    def _task_loss(self, params: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Scalar mean token loss of one task's rows ``[B, L]`` under ``params``.

        ``inner.autocast=bf16``: the forward pass runs on bfloat16 copies of ``params`` (a
        differentiable cast: gradients come back in the weights' dtype) under ``torch.autocast``.
        The explicit cast is needed because under ``vmap`` autocast alone leaves GPT-2's
        ``addmm`` layers in float32. The loss is computed in the weights' dtype.
        """
        dtype = next(iter(params.values())).dtype
        if self.cfg.inner.autocast == "bf16":
            params = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in params.items()}
            with torch.autocast(device_type=input_ids.device.type, dtype=torch.bfloat16):
                logits = causal_lm_logits(self.model, params, input_ids, attention_mask)
        else:
            logits = causal_lm_logits(self.model, params, input_ids, attention_mask)
        return token_mean_loss(logits.to(dtype), labels)

    def _adapt(self, batch: TaskBatch, steps: int, mode: str) -> tuple[dict[str, Tensor], list[float]]:
        """Fast weights for the T tasks of ``batch`` (all with ``steps`` inner steps), stacked
        ``[T, ...]`` (batched engine), and the summed knowledge loss before each step."""
        _require_knowledge(batch)
        names, base = self._weights()
        T = len(batch)
        stacked = [p.unsqueeze(0).expand(T, *p.shape) for p in base]
        k = batch.knowledge
        task_losses = self._vmap(self._task_loss)

        def knowledge_loss(weights: list[Tensor]) -> Tensor:
            return task_losses(dict(zip(names, weights)), k.input_ids, k.attention_mask, k.labels).sum()

        fast, losses = self._inner_loop(knowledge_loss, stacked, steps, mode)
        return dict(zip(names, fast)), losses

    def _adapt_one(self, batch: TaskBatch, t: int, steps: int, mode: str) -> tuple[dict[str, Tensor], list[float]]:
        """Fast weights of task ``t`` alone (looped engine)."""
        _require_knowledge(batch)
        names, base = self._weights()
        k = batch.knowledge

        def knowledge_loss(weights: list[Tensor]) -> Tensor:
            return self._task_loss(dict(zip(names, weights)), k.input_ids[t], k.attention_mask[t], k.labels[t])

        fast, losses = self._inner_loop(knowledge_loss, list(base), steps, mode)
        return dict(zip(names, fast)), losses

    # -- training ---------------------------------------------------------------------------------

    def forward_backward(self, batch: TaskBatch, loss_scale: float = 1.0) -> dict[str, float]:
        """Outer loss summed over the tasks of ``batch``; ``backward(loss * loss_scale)``.

        Gradients accumulate into the weights' and ``inner_lrs``' ``.grad``. One backward per pass
        (:meth:`_passes`: the tasks with the same inner-step count, at most ``inner.tasks_per_pass``
        of them, in the batched engine; one task in the looped one), so each inner graph is freed
        as soon as it is used.

        Dropout: in the training phase (:meth:`train`, the default) with ``model.dropout > 0`` the
        module runs in train mode, every forward pass (each inner step, the outer loss) with masks
        of its own; after :meth:`eval`, or with ``model.dropout=0``, in eval mode (deterministic).

        Returns ``{"loss": summed outer loss, "tasks": T, "knowledge_loss": summed inner loss before
        the first inner step}`` (unscaled).
        """
        steps = self.inner_steps(batch)
        total, knowledge, T = 0.0, 0.0, len(batch)
        # Set here, whatever was done to the module meanwhile (evaluation leaves it in eval mode).
        self.model.train(self.training and self.dropout > 0)
        for n, index in self._passes(steps):
            if len(index) == 1:
                t = index[0]
                fast, inner_losses = self._adapt_one(batch, t, n, self.mode)
                s = batch.sequence
                loss = self._task_loss(fast, s.input_ids[t : t + 1], s.attention_mask[t : t + 1], s.labels[t : t + 1])
            else:
                group = batch.select(index) if len(index) < T else batch
                fast, inner_losses = self._adapt(group, n, self.mode)
                s = group.sequence
                loss = self._group_losses(fast, True, s.input_ids, s.attention_mask, s.labels).sum()
            del fast  # the outer graph keeps what it needs, and frees it once its backward has passed
            (loss * loss_scale).backward()
            total += float(loss.detach())
            knowledge += inner_losses[0] if inner_losses else 0.0
        return {"loss": total, "tasks": float(T), "knowledge_loss": knowledge}

    # -- evaluation -------------------------------------------------------------------------------

    def _fast_weights_for_eval(self, batch: TaskBatch, inner_steps: Optional[int]):
        """Yield (task indices, sub-batch, fast weights, stacked) per group, without graphs, with
        the module in eval mode (no dropout; :meth:`forward_backward` sets its own mode again).

        Batched engine: one group per inner-step count, weights stacked ``[T_g, ...]``; looped
        engine: one task per group, weights of the task alone (``stacked=False``).
        """
        steps = self.inner_steps(batch, inner_steps)
        T = len(batch)
        self.model.eval()
        for n, index in self._passes(steps):
            if len(index) == 1:
                fast, _ = self._adapt_one(batch, index[0], n, NO_GRAPH)
                yield index, batch.select(index), fast, False
            else:
                group = batch.select(index) if len(index) < T else batch
                fast, _ = self._adapt(group, n, NO_GRAPH)
                yield index, group, fast, True

    def _group_losses(self, fast: dict[str, Tensor], stacked: bool, input_ids: Tensor, attention_mask: Tensor,
                      labels: Tensor) -> Tensor:
        """Per-task mean losses ``[T]`` of rows ``[T, ...]`` (one row per task, or ``[T, B, L]``)."""
        if input_ids.dim() == 2:
            input_ids, attention_mask, labels = input_ids[:, None], attention_mask[:, None], labels[:, None]
        if stacked:
            return self._vmap(self._task_loss)(fast, input_ids, attention_mask, labels)
        return torch.stack([self._task_loss(fast, i, m, l) for i, m, l in zip(input_ids, attention_mask, labels)])

    def fast_weights(self, batch: TaskBatch, inner_steps: Optional[int] = None) -> list[dict[str, Tensor]]:
        """Each task's fast weights after its inner loop (no graph), keyed like ``named_parameters()``."""
        out: list[dict[str, Tensor]] = [{} for _ in range(len(batch))]
        for index, _, fast, stacked in self._fast_weights_for_eval(batch, inner_steps):
            for j, i in enumerate(index):
                out[i] = {name: w[j] for name, w in fast.items()} if stacked else fast
        return out

    def knowledge_losses(self, batch: TaskBatch, inner_steps: Optional[int] = None) -> list[float]:
        """Per-task knowledge (inner) loss AFTER the inner loop; ``inner_steps=0``: of the initial weights."""
        out = [0.0] * len(batch)
        for index, group, fast, stacked in self._fast_weights_for_eval(batch, inner_steps):
            k = group.knowledge
            with torch.no_grad():
                losses = self._group_losses(fast, stacked, k.input_ids, k.attention_mask, k.labels)
            for i, value in zip(index, losses.tolist()):
                out[i] = value
        return out

    def evaluate(self, batch: TaskBatch, inner_steps: Optional[int] = None) -> dict[str, list]:
        """Inner loop (gradients, no graph), answer loss and greedy generation per task.

        ``inner_steps=None`` uses each task's hop count; ``0`` switches the inner loop off
        (ablation: the knowledge is then not available to the model at all). The stored weights are
        never changed and no ``.grad`` is written.

        Returns per-task lists: "id", "hops", "answer_loss" (mean over target tokens),
        "prediction" (generated text up to eos), "predicted_label", "label_correct" (bool),
        "recall" (share of generated facts found in the gold facts).
        """
        n_tasks = len(batch)
        answer_loss = [0.0] * n_tasks
        tokens: list[list[int]] = [[] for _ in range(n_tasks)]
        eos_id, pad_id = int(self.tokenizer.eos_token_id), int(self.tokenizer.pad_token_id)
        limit = max_positions(self.model)
        task_logits = vmap(lambda p, ids, mask: causal_lm_logits(self.model, p, ids, mask))
        for index, group, fast, stacked in self._fast_weights_for_eval(batch, inner_steps):
            s = group.sequence

            def next_token_logits(ids: Tensor, mask: Tensor) -> Tensor:
                if stacked:
                    return task_logits(fast, ids[:, None], mask[:, None])[:, 0, -1]
                return causal_lm_logits(self.model, fast, ids, mask)[:, -1]

            with torch.no_grad():
                losses = self._group_losses(fast, stacked, s.input_ids, s.attention_mask, s.labels)
                generated = greedy_generate(
                    next_token_logits, group.prompt.input_ids, group.prompt.attention_mask,
                    int(self.cfg.eval.max_new_tokens), eos_id, pad_id, limit,
                )
            for j, i in enumerate(index):
                answer_loss[i] = float(losses[j])
                tokens[i] = generated[j]
        return generation_records(self.encoder, self.tokenizer, batch, tokens, answer_loss)


__all__ = [
    "AdamWState",
    "BilevelError",
    "ENGINES",
    "ReckoningMethod",
    "adamw_step",
    "fused_adamw_step",
    "additive_causal_mask",
    "causal_lm_logits",
    "greedy_generate",
    "position_ids_from_mask",
    "row_mean_losses",
    "sgd_step",
    "token_mean_loss",
]
