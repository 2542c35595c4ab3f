"""The ``fused`` engine (``inner.engine=fused``, the default): the reference inner loop
(:mod:`.reference`) computed faster and in less memory, with the same numbers.

What it changes, and what stays exact
    Inner optimizer step
        Each AdamW / SGD step is ONE autograd node (:class:`FusedStep`) whose backward is written
        out (:class:`InnerUpdate`; both in :mod:`.fused_step`): it keeps only its inputs instead of
        a dozen op-by-op nodes and four weight-sized intermediates per tensor. Same update as
        :func:`.reference.adamw_step` (smooth denominator) and :func:`.reference.sgd_step`, same
        derivatives.
    Tasks batched under vmap
        All tasks of a pass with the same number of inner steps at once: every fast weight gets a
        leading task dimension T and the model runs under ``torch.func.vmap`` (weights and inputs
        mapped over T). The tasks' fast weights are independent, so the gradient of the SUM of the
        task losses with respect to the stacked ``[T, ...]`` weights is each task's own gradient.
        Several times faster than task by task for small models on a CPU (one pass of larger
        operations instead of T passes of small ones); the model gets a 4D attention mask and
        explicit position ids, so no data-dependent mask construction runs under ``vmap``. vmap
        needs eager attention (no batching rule for the CPU SDPA kernels). A pass of one task runs
        unbatched, as the reference does.

Memory options (``inner`` config group; ``bench/memory_modes.py`` measures them)
    ``tasks_per_pass`` bounds how many tasks' inner graphs live at once (1: task by task);
    ``checkpoint`` keeps only the inner gradients and rebuilds each step's graph in the backward
    pass (:class:`_RecomputedInnerLoop`, same meta-gradient); ``autocast: bf16`` runs the forward
    passes in bfloat16 (a different, approximate meta-gradient); ``first_order`` drops the
    second-order terms altogether.

Dropout under vmap draws a mask per task (``randomness="different"``); ``checkpoint`` replays each
step's random-number state, so the recomputed steps see the forward pass's masks.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils.checkpoint import get_device_states, set_device_states

from reckoning_ray.core.bilevel.adapted import Weights
from reckoning_ray.core.bilevel.fused_step import FusedStep, InnerUpdate
from reckoning_ray.core.bilevel.lm import causal_lm_logits, token_mean_loss, trainable
from reckoning_ray.core.schema import InnerConfig
from reckoning_ray.core.data.encode import TaskBatch
from reckoning_ray.core.modeling import set_attention_for_second_order

logger = logging.getLogger(__name__)


class FastWeights(NamedTuple):
    """The fast weights of one pass: ``[T, ...]`` per weight (``stacked``, run under vmap) or the
    one task's own weights."""

    params: dict[str, Tensor]
    stacked: bool


class FusedEngine:
    """The fused engine for :class:`~reckoning_ray.core.bilevel.method.ReckoningMethod`: passes of
    tasks, their inner loops, and the model calls with their fast weights."""

    def __init__(self, model: torch.nn.Module, inner: InnerConfig, adapted: Any = None) -> None:
        self.model, self.inner = model, inner
        # what the inner loop adapts (default: every trainable weight); the weights it leaves enter
        # the model calls as the module's own parameters, unbatched
        self.adapted = adapted if adapted is not None else Weights(model)
        self.names = list(self.adapted.names)
        self.update = InnerUpdate(inner.optimizer == "adamw", float(inner.beta1), float(inner.beta2),
                                   float(inner.eps), float(inner.weight_decay))
        before = set_attention_for_second_order(model, not inner.first_order)
        if before != "eager":
            model.set_attn_implementation("eager")
            logger.info("fused engine: attention switched from %s to eager (vmap over tasks)", before)
        self.attention = "eager"
        if inner.autocast == "bf16" and inner.optimizer == "adamw" and not inner.first_order:
            logger.warning(
                "inner.autocast=bf16 with second-order AdamW: the meta-gradient is far from float32's "
                "(AdamW's second derivative is ~1/eps where a gradient entry is ~eps; see BENCHMARKS.md, "
                "memory_modes). Use it with inner.first_order=true or inner.optimizer=sgd."
            )

    def passes(self, steps: list[int]) -> list[tuple[int, list[int]]]:
        """(inner steps, task indices) per pass: the tasks of each inner-step count together, in
        order of first appearance, at most ``inner.tasks_per_pass`` of them per pass (0: no limit)."""
        groups: dict[int, list[int]] = {}
        for t, n in enumerate(steps):
            groups.setdefault(n, []).append(t)
        cap = int(self.inner.tasks_per_pass) or len(steps)
        return [(n, index[i : i + cap]) for n, index in groups.items() for i in range(0, len(index), cap)]

    def adapt(self, tasks: TaskBatch, steps: int, lrs: Tensor, graph: bool) -> tuple[FastWeights, list[float]]:
        """Fast weights of ``tasks`` (all with ``steps`` inner steps) and the summed knowledge loss
        before each step. ``lrs``: the effective rates ``[max steps, tensors]``; ``graph=False``
        (evaluation): gradients, no graph."""
        names, base = self.names, self.adapted.initial()
        k = tasks.knowledge
        if len(tasks) == 1:
            def knowledge_loss(weights: list[Tensor]) -> Tensor:
                return self.task_loss(dict(zip(names, weights)), k.input_ids[0], k.attention_mask[0], k.labels[0])

            weights = list(base)
        else:
            task_losses = self._vmap(self.task_loss)

            def knowledge_loss(weights: list[Tensor]) -> Tensor:
                return task_losses(dict(zip(names, weights)), k.input_ids, k.attention_mask, k.labels).sum()

            weights = [p.unsqueeze(0).expand(len(tasks), *p.shape) for p in base]
        fast, losses = self.inner_loop(knowledge_loss, weights, lrs, steps, graph)
        return FastWeights(dict(zip(names, fast)), len(tasks) > 1), losses

    def inner_loop(self, knowledge_loss: Callable[[list[Tensor]], Tensor], weights: list[Tensor], lrs: Tensor,
                   steps: int, graph: bool) -> tuple[list[Tensor], list[float]]:
        """:func:`.reference.inner_loop` with one :class:`FusedStep` node per step; with
        ``inner.checkpoint`` (second order) the whole loop is one :class:`_RecomputedInnerLoop`,
        which keeps only the inner gradients and rebuilds each step when the outer backward
        reaches it. ``weights`` per task, or stacked with a leading task dimension."""
        second_order = graph and not self.inner.first_order
        n = len(weights)
        if self.inner.checkpoint and second_order and torch.is_grad_enabled():
            # In train mode (dropout) the recomputation must redraw the forward pass's masks. The
            # trained weights the inner loop does not adapt go in too: the inner gradients depend on
            # them, and the recomputed steps' share of their gradient comes back through the node.
            adapted = set(self.adapted.model_names)
            others = [p for name, p in zip(*trainable(self.model)) if name not in adapted]
            *fast, losses = _RecomputedInnerLoop.apply(knowledge_loss, self.update, steps, n, self.model.training,
                                                       *weights, lrs, *others)
            return list(fast), [float(x) for x in losses]
        if not graph:
            lrs = lrs.detach()
            weights = [w.detach() for w in weights]
        state: list[Tensor] = []  # AdamW's exp_avg then exp_avg_sq (empty before the first step)
        losses = []
        for k in range(steps):
            loss, grads = _inner_gradient(knowledge_loss, weights, create_graph=second_order)
            with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
                out = FusedStep.apply(self.update, k + 1, n, *weights, *grads, *state, lrs[k])
            weights, state = list(out[:n]), list(out[n:])
            losses.append(float(loss.detach()))
        return weights, losses

    def task_loss(self, params: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Scalar mean token loss of one task's rows ``[B, L]`` under ``params``.

        ``inner.autocast=bf16``: the forward pass runs on bfloat16 copies of ``params`` (a
        differentiable cast: gradients come back in the weights' dtype) under ``torch.autocast``.
        The explicit cast is needed because under ``vmap`` autocast alone leaves GPT-2's
        ``addmm`` layers in float32. The loss is computed in the weights' dtype.
        """
        params = self.adapted.weights(params)
        dtype = next(iter(params.values())).dtype
        if self.inner.autocast == "bf16":
            params = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in params.items()}
            with torch.autocast(device_type=input_ids.device.type, dtype=torch.bfloat16):
                logits = causal_lm_logits(self.model, params, input_ids, attention_mask)
        else:
            logits = causal_lm_logits(self.model, params, input_ids, attention_mask)
        return token_mean_loss(logits.to(dtype), labels)

    def task_losses(self, fast: FastWeights, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Per-task mean losses ``[T]`` of rows ``[T, B, L]``."""
        if fast.stacked:
            return self._vmap(self.task_loss)(fast.params, input_ids, attention_mask, labels)
        return torch.stack([self.task_loss(fast.params, i, m, l) for i, m, l in zip(input_ids, attention_mask, labels)])

    def last_logits(self, fast: FastWeights, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``[T, V]`` after the last position of each task's row ``[T, L]`` (generation)."""
        weights = self.adapted.weights
        if fast.stacked:
            logits = self._vmap(lambda p, ids, mask: causal_lm_logits(self.model, weights(p), ids, mask))
            return logits(fast.params, input_ids[:, None], attention_mask[:, None])[:, 0, -1]
        return causal_lm_logits(self.model, weights(fast.params), input_ids, attention_mask)[:, -1]

    def task_weights(self, fast: FastWeights, j: int) -> dict[str, Tensor]:
        """Task ``j``'s weights as the model is called with them (e.g. LoRA's merged into the base)."""
        return self.adapted.weights({name: w[j] for name, w in fast.params.items()} if fast.stacked else fast.params)

    def _vmap(self, fn: Callable) -> Callable:
        """``vmap`` over tasks. In train mode (dropout) each task draws its own masks
        (``randomness="different"``); in eval mode vmap's default, which refuses random ops."""
        return vmap(fn, randomness="different") if self.model.training else vmap(fn)


# ------------------------------------------------------------------------------------------------
# The recomputed inner loop
# ------------------------------------------------------------------------------------------------


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

    ``apply(loss_fn, update, steps, n, random, *weights, lrs, *others)`` -> ``(*fast weights, losses)``
    with ``lrs`` the ``[max steps, n]`` learned rates, ``losses`` the knowledge loss before each step
    (no gradient) and ``others`` the trained tensors ``loss_fn`` reads besides ``weights`` (the
    weights ``inner.params`` leaves out): their gradient through the inner gradients is returned too. The forward pass runs the loop without a graph and keeps the inner gradients of
    steps 1 .. N-1 (detached). The backward pass walks the steps in reverse: it rebuilds the
    weights and optimizer state before step k by replaying the optimizer arithmetic from the
    initial weights and the kept gradients (no model passes), recomputes step k's inner gradient
    with ``create_graph``, applies :meth:`InnerUpdate.adjoint` and back-propagates the gradient's
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
    def forward(ctx: Any, loss_fn: Callable, update: InnerUpdate, steps: int, n: int, random: bool,
                *inputs: Tensor) -> tuple[Tensor, ...]:
        weights, lrs = list(inputs[:n]), inputs[n]
        ctx.others = list(inputs[n + 1:])
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
        ctx.save_for_backward(*inputs[: n + 1])
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
        d_lrs = torch.zeros_like(lrs) if ctx.needs_input_grad[5 + n] else None
        others, ctx.others = ctx.others, None
        d_others: list[Optional[Tensor]] = [None] * len(others)
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
            hvp = list(torch.autograd.grad([g for g, _ in pairs], probes + others, [dg for _, dg in pairs],
                                           allow_unused=True) if pairs else [None] * (n + len(others)))
            for i, d in enumerate(hvp[n:]):
                if d is not None:
                    d_others[i] = d if d_others[i] is None else d_others[i] + d
            hvp = hvp[:n]
            del grads, pairs, d_g, probes
            for i, (a, b) in enumerate(zip(d_direct, hvp)):
                d_direct[i] = a if b is None else (b if a is None else a + b)
                hvp[i] = None
            del a, b
            d_w = d_direct
        ctx.rng = None
        wants = ctx.needs_input_grad[5 : 5 + n]
        return (None, None, None, None, None, *[d if want else None for d, want in zip(d_w, wants)], d_lrs,
                *d_others)
