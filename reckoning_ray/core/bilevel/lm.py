"""Model calls shared by RECKONING's engines and the in-context baseline: the causal-LM forward
pass with an explicit mask and positions, its losses, and greedy generation.

Nothing here knows about inner loops: ``params`` is any name -> tensor dict that replaces the
model's own weights through ``torch.func.functional_call`` (fast weights of one task, or the
model's weights themselves).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from reckoning_ray.core.errors import InputError
from reckoning_ray.core.data.encode import (
    IGNORE_INDEX,
    Encoder,
    TaskBatch,
    normalize_label,
)
from reckoning_ray.core.metrics import fact_recall


class BilevelError(InputError, ValueError):
    """Bad input to a method or an engine; the message names the field and the fix."""


def trainable(model: torch.nn.Module) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of the trainable parameters, in ``named_parameters()`` order (tied once)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def select_params(model: torch.nn.Module, patterns: Sequence[str], key: str = "inner.params") -> list[str]:
    """Names of the trainable parameters (``named_parameters()`` order, tied once) that match
    ``patterns``: ``["all"]`` is every one; otherwise shell-style patterns (``fnmatch``) of names.
    BilevelError naming ``key`` when a pattern matches nothing."""
    names = trainable(model)[0]
    patterns = [str(p) for p in patterns]
    if not patterns or patterns == ["all"]:
        return names
    if "all" in patterns:
        raise BilevelError(f"{key}={patterns}: 'all' stands alone; give either [all] or name patterns")
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise BilevelError(f"{key}: pattern {pattern!r} matches no trainable parameter of the model; its "
                               f"parameters are named like {names[:3] + names[-2:]} (shell-style patterns, e.g. "
                               f"'{names[-1].rsplit('.', 1)[0]}.*')")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


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

    A padding query also attends to itself: a left-padded row's padding has no real key before it,
    and a query that may attend to nothing gives NaN in attention implementations that mask with
    -inf (Llama, Qwen2, GPT-NeoX, OPT), a NaN that reaches the gradients through the unused
    positions. The real queries' keys are the same either way, so their values do not change.
    """
    length = attention_mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    itself = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    allowed = (causal & attention_mask.bool().unsqueeze(-2)) | itself
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


def causal_lm_loss(model: torch.nn.Module, params: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor,
                   labels: Tensor) -> Tensor:
    """:func:`token_mean_loss` of :func:`causal_lm_logits`: one task's loss on its rows ``[B, L]``."""
    return token_mean_loss(causal_lm_logits(model, params, input_ids, attention_mask), labels)


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
        max_new_tokens: most tokens generated per row (eval.max_new_tokens).
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
