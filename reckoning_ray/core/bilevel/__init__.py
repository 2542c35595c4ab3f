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

Files, in reading order
    ``reference.py``  the inner loop as plain functional code, and the ``reference`` engine
    ``fused.py``      the ``fused`` engine (default): the same numbers from fused optimizer nodes,
                      tasks batched under vmap, and the memory options
    ``fused_step.py`` the fused optimizer node: one inner AdamW / SGD step and its adjoint
    ``lm.py``         model calls, losses and greedy generation (shared with the baseline)
    ``method.py``     :class:`ReckoningMethod`: training step, evaluation, learned rates

Engines (``inner.engine``)
    ``reference``  task by task, op by op; autograd differentiates everything. Refuses
                   ``inner.checkpoint`` and ``inner.autocast`` (memory options of the fused engine);
                   ``inner.tasks_per_pass`` always holds (one task per pass).
    ``fused``      one autograd node per inner step, the tasks of a pass under ``vmap``,
                   ``inner.tasks_per_pass``, ``inner.checkpoint`` and ``inner.autocast``. The tests
                   compare it with the reference (values and meta-gradients, float64).

Deviations from ``torch.optim.AdamW``, kept on purpose
    The inner AdamW divides by ``sqrt(v_hat + eps**2)`` instead of ``sqrt(v_hat) + eps``.
    Parameter entries that get no gradient from the knowledge (position embeddings past the
    knowledge length; untied embedding rows of tokens absent from it) have ``v = 0``, where
    ``sqrt`` has an infinite derivative: the second-order pass then produces ``0 * inf = NaN``.
    The smooth form differs from PyTorch's by less than ``eps`` in the denominator.
    ``adamw_step(..., eps_inside_sqrt=False)`` gives PyTorch's exact form.

    The inner SGD is plain ``W - lr * g`` (``inner.weight_decay``, betas and eps are AdamW's).

Dropout (``model.dropout``, GPT-2's resid/embd/attn dropout) follows the authors' code: while
training, the module is in ``train()`` mode through the inner and the outer loop, and every forward
pass draws its own masks (each inner step, the outer pass, and under ``vmap`` each task:
``randomness="different"``); no mask is shared between passes. The meta-gradient is then the exact
derivative of the outer loss under the sampled masks (the masks are constants of the unrolled
graph): a stochastic meta-gradient, as in the authors' training. Both engines draw the same masks
when they run the same passes (the reference and the fused engine with ``inner.tasks_per_pass=1``).
``inner.checkpoint`` recomputes the inner steps in the backward pass with the random-number state
each step had in the forward pass (CPU and accelerator generators, as ``torch.utils.checkpoint``),
so it redraws the same masks and the meta-gradient is the one without checkpointing. Evaluation
(``evaluate``, ``fast_weights``, ``knowledge_losses``) runs in ``eval()`` mode, without dropout.
With ``model.dropout=0`` the module stays in ``eval()`` mode throughout and the step is
deterministic.
"""

from reckoning_ray.core.bilevel.fused import FusedEngine
from reckoning_ray.core.bilevel.fused_step import fused_adamw_step
from reckoning_ray.core.bilevel.lm import (
    BilevelError,
    additive_causal_mask,
    causal_lm_logits,
    causal_lm_loss,
    generation_records,
    greedy_generate,
    max_positions,
    position_ids_from_mask,
    row_mean_losses,
    token_mean_loss,
    trainable,
)
from reckoning_ray.core.bilevel.method import ReckoningMethod, ReckoningRandomFactsMethod, method_settings
from reckoning_ray.core.bilevel.reference import (
    AdamWState,
    ReferenceEngine,
    adamw_step,
    inner_loop,
    sgd_step,
)
from reckoning_ray.core.schema import ENGINES

__all__ = [
    "AdamWState",
    "BilevelError",
    "ENGINES",
    "FusedEngine",
    "ReckoningMethod",
    "ReckoningRandomFactsMethod",
    "ReferenceEngine",
    "adamw_step",
    "additive_causal_mask",
    "causal_lm_logits",
    "causal_lm_loss",
    "fused_adamw_step",
    "generation_records",
    "greedy_generate",
    "inner_loop",
    "max_positions",
    "method_settings",
    "position_ids_from_mask",
    "row_mean_losses",
    "sgd_step",
    "token_mean_loss",
    "trainable",
]
