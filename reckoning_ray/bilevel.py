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
    ``checkpoint`` keeps only each inner step's inputs and rebuilds the step's graph in the backward
    pass (:class:`_RecomputedInnerStep`); ``autocast: bf16`` runs the forward passes in bfloat16;
    ``tasks_per_pass`` bounds how many tasks' inner graphs live at once; ``first_order`` drops the
    second-order terms altogether.

Deviations from ``torch.optim.AdamW``, kept on purpose
    The inner AdamW divides by ``sqrt(v_hat + eps**2)`` instead of ``sqrt(v_hat) + eps``.
    Parameter entries that get no gradient from the knowledge (position embeddings past the
    knowledge length; untied embedding rows of tokens absent from it) have ``v = 0``, where
    ``sqrt`` has an infinite derivative: the second-order pass then produces ``0 * inf = NaN``. The smooth form differs from PyTorch's by less than ``eps`` in the
    denominator. ``adamw_step(..., eps_inside_sqrt=False)`` gives PyTorch's exact form.

    The inner SGD is plain ``W - lr * g`` (``inner.weight_decay``, betas and eps are AdamW's).

Dropout is off inside the bilevel step (the model stays in ``eval()`` mode): the inner and outer
passes must see the same function for the second-order gradient to be the derivative of the
outer loss.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor
from torch.func import functional_call, vmap

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


class _RecomputedInnerStep(torch.autograd.Function):
    """One second-order inner step that keeps only its inputs (``inner.checkpoint``).

    ``apply(step_fn, *inputs)`` returns ``(*outputs, loss)`` where ``step_fn(inputs, mode)`` is the
    step (``ReckoningMethod._step_function``). The forward pass computes the outputs without a
    graph (first-order arithmetic, the same values); the backward pass runs ``step_fn`` again with
    ``create_graph`` on the saved inputs and back-propagates the outputs' gradients through that
    rebuilt graph, which is freed before the previous step is rebuilt. Memory: the inputs of every
    step (weights and AdamW moments) instead of every step's activations and double-backward
    graph; time: one more forward and inner gradient per step. The outer gradient is the same as
    without checkpointing (the recomputation repeats the same operations).
    """

    @staticmethod
    def forward(ctx: Any, step_fn: Callable, *inputs: Tensor) -> tuple[Tensor, ...]:
        ctx.step_fn = step_fn
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        outputs, loss = step_fn([x.detach() for x in inputs], FIRST_ORDER)
        return (*[o.detach() for o in outputs], loss.detach())

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        inputs = [x.detach().requires_grad_(needs) for x, needs in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        with torch.enable_grad():
            outputs, _ = ctx.step_fn(inputs, SECOND_ORDER)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs[:-1]) if g is not None and o.requires_grad]
        wanted = [x for x in inputs if x.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if pairs and wanted else [None] * len(wanted))
        return (None, *[next(grads) if x.requires_grad else None for x in inputs])


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
        # The model runs without dropout in both phases (module docstring).
        model.eval()
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
        """Training phase (the module itself stays in eval mode: no dropout in the bilevel step)."""
        self.training = True
        self.model.eval()
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
        With ``inner.checkpoint`` (second order) each step runs as :class:`_RecomputedInnerStep`:
        only its inputs are kept and its graph is rebuilt when the outer backward reaches it.
        """
        inner = self.cfg.inner
        lrs_all = self.learning_rates()
        if mode == NO_GRAPH:
            lrs_all = lrs_all.detach()
            weights = [w.detach() for w in weights]
        adamw = inner.optimizer == "adamw"
        n = len(weights)
        moments: list[Tensor] = []  # AdamW's exp_avg then exp_avg_sq (empty before the first step)
        recompute = bool(inner.checkpoint) and mode == SECOND_ORDER and torch.is_grad_enabled()
        losses: list[float] = []
        for k in range(steps):
            step_fn = self._step_function(knowledge_loss, n, k, adamw)
            if recompute:
                out = _RecomputedInnerStep.apply(step_fn, *weights, *moments, lrs_all[k])
                loss, out = out[-1], list(out[:-1])
            else:
                out, loss = step_fn([*weights, *moments, lrs_all[k]], mode)
            weights, moments = out[:n], out[n:]
            losses.append(float(loss.detach()))
        return weights, losses

    def _step_function(
        self, knowledge_loss: Callable[[list[Tensor]], Tensor], n: int, k: int, adamw: bool
    ) -> Callable[[list[Tensor], str], tuple[list[Tensor], Tensor]]:
        """Inner step ``k`` as a function of ``[*weights, *moments, lrs_k]`` -> (``[*new weights,
        *new moments]``, knowledge loss before the step); ``moments`` is empty at ``k = 0`` (AdamW
        starts from zero moments) and always for SGD."""
        inner = self.cfg.inner

        def step(inputs: list[Tensor], mode: str) -> tuple[list[Tensor], Tensor]:
            weights, moments, lrs_k = inputs[:n], inputs[n:-1], inputs[-1]
            if mode == SECOND_ORDER:
                loss = knowledge_loss(weights)
                grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
            else:
                # First order / evaluation: the inner gradient is a constant of the outer graph, so
                # the inner forward runs on detached copies and its graph is freed at once.
                probes = [w.detach().requires_grad_(True) for w in weights]
                with torch.enable_grad():
                    loss = knowledge_loss(probes)
                    grads = torch.autograd.grad(loss, probes, allow_unused=True)
            grads = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]
            lrs = list(lrs_k.unbind(0))
            with torch.set_grad_enabled(mode != NO_GRAPH and torch.is_grad_enabled()):
                if not adamw:
                    return sgd_step(weights, grads, lrs), loss
                state = (AdamWState(list(moments[:n]), list(moments[n:]), k) if moments
                         else AdamWState.zeros_like(weights))
                new, state = adamw_step(
                    weights, grads, lrs, state, beta1=inner.beta1, beta2=inner.beta2, eps=inner.eps,
                    weight_decay=inner.weight_decay,
                )
            return [*new, *state.exp_avg, *state.exp_avg_sq], loss

        return step

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
        task_losses = vmap(self._task_loss)

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

        Returns ``{"loss": summed outer loss, "tasks": T, "knowledge_loss": summed inner loss before
        the first inner step}`` (unscaled).
        """
        steps = self.inner_steps(batch)
        total, knowledge, T = 0.0, 0.0, len(batch)
        self.model.eval()  # no dropout in the bilevel step, whatever was done to the module meanwhile
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
            (loss * loss_scale).backward()
            total += float(loss.detach())
            knowledge += inner_losses[0] if inner_losses else 0.0
        return {"loss": total, "tasks": float(T), "knowledge_loss": knowledge}

    # -- evaluation -------------------------------------------------------------------------------

    def _fast_weights_for_eval(self, batch: TaskBatch, inner_steps: Optional[int]):
        """Yield (task indices, sub-batch, fast weights, stacked) per group, without graphs.

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
            return vmap(self._task_loss)(fast, input_ids, attention_mask, labels)
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
    "additive_causal_mask",
    "causal_lm_logits",
    "greedy_generate",
    "position_ids_from_mask",
    "row_mean_losses",
    "sgd_step",
    "token_mean_loss",
]
