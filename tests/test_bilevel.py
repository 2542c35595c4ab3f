"""The bilevel engines: gradients against finite differences and first-order definitions, the inner
AdamW against torch.optim.AdamW, every fused path (tasks batched, tasks per pass, checkpointing,
first order, dropout) against the reference engine, tied weights, evaluation, settings, and an
end-to-end run showing that the knowledge reaches the answer through the weights."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch
from torch.func import functional_call

from conftest import ONE_FACT
from reckoning_ray.core.baseline import build_method, build_method_from_settings
from reckoning_ray.core.bilevel.reference import AdamWState, adamw_step, sgd_step
from reckoning_ray.core.bilevel.lm import BilevelError, causal_lm_logits, position_ids_from_mask, trainable
from reckoning_ray.core.bilevel.method import ReckoningMethod
from reckoning_ray.core.bilevel.fused_step import fused_adamw_step
from reckoning_ray.core.bilevel.fused import FastWeights
from reckoning_ray.core.config import group, load_config
from reckoning_ray.core.data.encode import Encoder
from reckoning_ray.core.data.schema import make_record
from reckoning_ray.core.metrics import summarize
from reckoning_ray.core.modeling import load_model_and_tokenizer

NAMES = ["bob", "anne", "carl", "dave", "erin"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ADJECTIVES = ["red", "big", "kind", "cold", "blue"]


def make_records(n: int = 6) -> list[dict]:
    """Tasks with 1-3 knowledge sentences and hop counts 0, 1, 2 (mixed in every batch)."""
    records = []
    for i in range(n):
        name, adj = NAMES[i % len(NAMES)], ADJECTIVES[(2 * i + 1) % len(ADJECTIVES)]
        negative = i % 2 == 1
        fact = f"{name} {'isnt' if negative else 'is'} {adj} ."
        others = [f"{NAMES[(i + j) % len(NAMES)]} is {ADJECTIVES[j]} ." for j in range(1, 1 + i % 3)]
        records.append(make_record(
            id=f"t{i}", family="proofwriter", source="generated", knowledge=[fact] + others, facts=[fact],
            question=f"{name} is {adj}", answer="no" if negative else "yes", hops=i % 3,
        ))
    return records


def make_cfg(*overrides: str):
    """A tiny float64 setting: 1 layer x 8, steps 1 / 2 / 3 for hops 0 / 1 / 2."""
    base = [
        "model.n_layer=1", "model.n_embd=8", "model.n_head=2", "model.n_positions=64", "model.max_length=48",
        "model.dtype=float64", "inner.optimizer=adamw", "inner.lr_init=0.05", "outer.multi_task=true",
        "eval.max_new_tokens=6",
    ]
    cfg = load_config("embedded", base + ["inner.steps=null"] + list(overrides))
    if cfg.inner.steps is None:
        cfg.inner.steps_by_hops = {"0": 1, "1": 2, "2": 3}
    return cfg


def build(cfg, records=None, engine=None, seed=0, random_lrs=True):
    """The method of ``cfg`` (``engine`` replaces inner.engine) on a fresh model, and the batch."""
    records = records or make_records()
    corpus = list(Encoder(None, "reckoning", True, 64).corpus(records))
    model, tokenizer = load_model_and_tokenizer(cfg.model, corpus=corpus, seed=seed)
    encoder = Encoder(tokenizer, "reckoning", bool(cfg.outer.multi_task), int(cfg.model.max_length))
    inner = group(cfg, "inner")
    if engine is not None:
        inner = dataclasses.replace(inner, engine=engine)
    method = ReckoningMethod(model, tokenizer, encoder, inner, group(cfg, "outer"), group(cfg, "eval"),
                             float(cfg.model.dropout))
    if random_lrs:
        # Distinct rates per tensor and step, so that each learned rate's gradient is checked.
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            lrs = torch.empty(method.inner_lrs.shape, dtype=torch.float64).uniform_(0.5, 1.5, generator=g)
            if cfg.inner.lr_space == "log":
                method.inner_lrs.add_(torch.log(lrs))
            else:
                method.inner_lrs.mul_(lrs)
    return method, encoder.collate(records)


def grads(method) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in method.meta_parameters()]


def zero_grads(method) -> None:
    for p in method.meta_parameters():
        p.grad = None


def summed_answer_loss(method, batch) -> float:
    return float(sum(method.evaluate(batch)["answer_loss"]))


def unit_direction(params: list[torch.Tensor], generator: torch.Generator, only=None) -> list[torch.Tensor]:
    """A random unit direction over ``params`` (over ``only`` alone when given)."""
    direction = [torch.randn(p.shape, dtype=torch.float64, generator=generator) * (only is None or p is only)
                 for p in params]
    norm = math.sqrt(sum(float((d * d).sum()) for d in direction))
    return [d / norm for d in direction]


def assert_finite_differences_agree(method, batch, seed: int, h: float = 1e-6, tolerance: float = 1e-7) -> None:
    """One outer step's meta-gradient against central differences of the summed answer loss,
    along a random direction over every meta-parameter and one over the learned rates alone."""
    zero_grads(method)
    method.forward_backward(batch)
    analytic, params = grads(method), method.meta_parameters()
    gen = torch.Generator().manual_seed(seed)
    for only_rates in (False, True):
        direction = unit_direction(params, gen, params[-1] if only_rates else None)
        expected = sum(float((g * d).sum()) for g, d in zip(analytic, direction))
        numeric = central_difference(method, batch, direction, h)
        assert abs(numeric - expected) <= tolerance * max(1.0, abs(expected)), (only_rates, numeric, expected)


def central_difference(method, batch, direction: list[torch.Tensor], h: float) -> float:
    """``(L(p + h d) - L(p - h d)) / 2h`` of the summed answer loss along ``direction`` over the
    method's meta-parameters, which are put back afterwards."""
    params = method.meta_parameters()
    values = []
    for step in (h, -h):
        originals = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, o, d in zip(params, originals, direction):
                p.copy_(o + step * d)
        values.append(summed_answer_loss(method, batch))
        with torch.no_grad():
            for p, o in zip(params, originals):
                p.copy_(o)
    return (values[0] - values[1]) / (2 * h)


# ------------------------------------------------------------------------------ inner optimizers


def test_differentiable_adamw_matches_torch_adamw_step_by_step():
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    lrs = [1e-2, 3e-3, 5e-2]
    ref = [torch.randn(s, dtype=torch.float64, generator=gen).requires_grad_(True) for s in shapes]
    opt = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(ref, lrs)],
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    exact = [p.detach().clone() for p in ref]
    smooth = [p.detach().clone() for p in ref]
    state_exact, state_smooth = AdamWState.zeros_like(exact), AdamWState.zeros_like(smooth)
    worst = 0.0
    for step in range(6):
        g = [torch.randn(s, dtype=torch.float64, generator=gen) * 10.0 ** -(step % 3) for s in shapes]
        for p, gi in zip(ref, g):
            p.grad = gi.clone()
        opt.step()
        exact, state_exact = adamw_step(exact, g, lrs, state_exact, eps_inside_sqrt=False)
        smooth, state_smooth = adamw_step(smooth, g, lrs, state_smooth)
        for p, e, s in zip(ref, exact, smooth):
            assert torch.allclose(e, p.detach(), rtol=0, atol=1e-14)
            worst = max(worst, float((s - p.detach()).abs().max()))
    # sqrt(v_hat + eps^2) vs sqrt(v_hat) + eps: the step differs by about lr * eps / sqrt(v_hat).
    assert 0 < worst < 1e-7
    assert state_exact.step == 6


@pytest.mark.parametrize("step,constant", [(0, False), (3, False), (0, True), (3, True)])
def test_fused_adamw_step_equals_the_op_by_op_step_in_values_and_derivatives(step, constant):
    # The engine's AdamW node has a written-out backward: compare it with autograd through
    # adamw_step (values and every input's gradient, float64), then gradcheck it.
    gen = torch.Generator().manual_seed(step)
    shapes = [(3, 4), (5,), (2, 3, 2)]

    def inputs():
        w = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
        g = [torch.randn(s, dtype=torch.float64, generator=gen) * 10.0 ** -i for i, s in enumerate(shapes)]
        m = [torch.randn(s, dtype=torch.float64, generator=gen) * 0.1 for s in shapes] if step else []
        v = [torch.rand(s, dtype=torch.float64, generator=gen) * 0.01 for s in shapes] if step else []
        lrs = torch.tensor([1e-2, 3e-2, 5e-3], dtype=torch.float64)
        # constant: first order, where the gradients and moments are constants of the outer graph
        return [x.requires_grad_(not constant or i < len(w) or x is lrs) for i, x in enumerate((*w, *g, *m, *v, lrs))]

    leaves = inputs()
    n = len(shapes)
    # Upstream gradients for every output except the second tensor's new weights and the last
    # tensor's moments (None reaches the node for those).
    weights_out = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    moments_out = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes[:-1]]

    def outer(new_w, state):
        total = sum((a * b).sum() for i, (a, b) in enumerate(zip(new_w, weights_out)) if i != 1)
        total = total + sum((a * b).sum() for a, b in zip(state.exp_avg[:-1], moments_out))
        return total + sum((a * b * 0.5).sum() for a, b in zip(state.exp_avg_sq[:-1], moments_out))

    def run(fused):
        w, g = leaves[:n], leaves[n : 2 * n]
        m, v, lrs = leaves[2 * n : 3 * n], leaves[3 * n : 4 * n], leaves[-1]
        state = AdamWState(list(m), list(v), step)
        if fused:
            new_w, new_state = fused_adamw_step(w, g, lrs, state)
        else:
            new_w, new_state = adamw_step(w, g, list(lrs.unbind(0)), state if step else AdamWState.zeros_like(w))
        loss = outer(new_w, new_state)
        wanted = [x for x in leaves if x.requires_grad]
        grads = torch.autograd.grad(loss, wanted, allow_unused=True)
        grads = [torch.zeros_like(x) if d is None else d for x, d in zip(wanted, grads)]
        return [x.detach() for x in (*new_w, *new_state.exp_avg, *new_state.exp_avg_sq)], grads

    values, grads = run(fused=True)
    ref_values, ref_grads = run(fused=False)
    # atol 1e-14: at the first step w' ~ w - lr sign(g), so d w' / d g is two terms of size ~1
    # cancelling to ~1e-14; the two computations round them in different orders.
    for a, b in zip(values + list(grads), ref_values + list(ref_grads)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)

    def as_function(*xs):
        w, g, m, v = xs[:n], xs[n : 2 * n], xs[2 * n : 3 * n], xs[3 * n : 4 * n]
        new_w, state = fused_adamw_step(list(w), list(g), xs[-1], AdamWState(list(m), list(v), step))
        return (*new_w, *state.exp_avg, *state.exp_avg_sq)

    if constant:  # the new moments are constants too
        state = fused_adamw_step(leaves[:n], leaves[n : 2 * n], leaves[-1], AdamWState(
            leaves[2 * n : 3 * n], leaves[3 * n : 4 * n], step))[1]
        assert not any(x.requires_grad for x in (*state.exp_avg, *state.exp_avg_sq))
    assert torch.autograd.gradcheck(as_function, tuple(inputs()), eps=1e-7, atol=1e-6)


def test_smooth_adamw_denominator_avoids_nan_second_derivatives():
    # Entries with a zero inner gradient (e.g. position embeddings the knowledge never reaches):
    # sqrt(v) has an infinite derivative at v = 0, so PyTorch's form gives NaN second-order grads.
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    reach = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    g = torch.autograd.grad((0.5 * (w * reach) ** 2).sum(), w, create_graph=True)[0]
    for inside, expect_finite in ((True, True), (False, False)):
        new, _ = adamw_step([w], [g], [0.1], AdamWState.zeros_like([w]), eps_inside_sqrt=inside)
        outer = torch.autograd.grad((new[0] ** 2).sum(), w, retain_graph=True)[0]
        assert bool(torch.isfinite(outer).all()) is expect_finite


def test_sgd_step_is_differentiable_in_the_learning_rate():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    g = torch.tensor([0.5, -1.0], dtype=torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    new = sgd_step([w], [g], [lr])[0]
    assert torch.allclose(new.detach(), torch.tensor([0.95, 2.1], dtype=torch.float64))
    (d_lr,) = torch.autograd.grad(new.sum(), lr)
    assert math.isclose(float(d_lr), 0.5, abs_tol=1e-15)


# ------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("optimizer,lr_space", [("adamw", "linear"), ("sgd", "linear"), ("adamw", "log")])
def test_second_order_gradient_matches_central_finite_differences(optimizer, lr_space):
    # AdamW's first step is close to lr * g / |g|: with eps = 1e-8 the outer loss bends sharply
    # wherever an inner gradient entry is near zero (third derivatives ~ 1/eps^2), too sharply for
    # any usable finite-difference step. eps = 1e-2 keeps the same computation smooth at the step.
    cfg = make_cfg(f"inner.optimizer={optimizer}", f"inner.lr_space={lr_space}", "inner.eps=1e-2",
                   "inner.lr_init=0.05" if optimizer == "adamw" else "inner.lr_init=0.5", "eval.max_new_tokens=1")
    method, batch = build(cfg, records=make_records(3))  # hops 0, 1, 2: 1, 2, 3 inner steps
    zero_grads(method)
    out = method.forward_backward(batch)
    analytic = grads(method)
    params = method.meta_parameters()
    assert math.isclose(out["loss"], summed_answer_loss(method, batch), rel_tol=1e-12)
    errors = []

    def loss_at(direction: list[torch.Tensor], step: float) -> float:
        originals = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, o, d in zip(params, originals, direction):
                p.copy_(o + step * d)
        value = summed_answer_loss(method, batch)
        with torch.no_grad():
            for p, o in zip(params, originals):
                p.copy_(o)
        return value

    def directional(direction: list[torch.Tensor], h: float = 1e-6) -> float:
        """Central difference along a unit direction: truncation ~1e-10 here, round-off ~1e-9."""
        return (loss_at(direction, h) - loss_at(direction, -h)) / (2 * h)

    gen = torch.Generator().manual_seed(3)
    names = method.param_names() + ["inner_lrs"]
    # Random directions over everything, over the tied embedding alone, over the learned rates alone.
    selections = [set(names), {"transformer.wte.weight"}, {"inner_lrs"}]
    for selected in selections:
        direction = [torch.randn(p.shape, dtype=torch.float64, generator=gen) * (n in selected)
                     for n, p in zip(names, params)]
        norm = math.sqrt(sum(float((d * d).sum()) for d in direction))
        direction = [d / norm for d in direction]
        expected = sum(float((g * d).sum()) for g, d in zip(analytic, direction))
        numeric = directional(direction)
        errors.append(abs(numeric - expected) / max(1.0, abs(expected)))
        assert abs(numeric - expected) <= 1e-7 * max(1.0, abs(expected)), (selected, numeric, expected)
    # Every learned rate used by some task, one coordinate at a time.
    lrs_grad = analytic[-1]
    for step in range(method.max_inner_steps):
        for tensor in range(step, lrs_grad.shape[1], 5):
            direction = [torch.zeros_like(p) for p in params]
            direction[-1][step, tensor] = 1.0
            numeric = directional(direction)
            expected = float(lrs_grad[step, tensor])
            errors.append(abs(numeric - expected) / max(1.0, abs(expected)))
            assert abs(numeric - expected) <= 1e-7 * max(1.0, abs(expected)), (step, tensor, numeric, expected)
    print(f"\n{optimizer}/{lr_space}: {len(errors)} finite-difference checks, largest error {max(errors):.1e}")


def hf_loss(model, params, input_ids, attention_mask, labels):
    """Mean next-token loss over the labelled tokens from the model's own mask handling (2D mask,
    default positions), independent of the engine's helpers. (transformers' built-in loss casts
    the logits to float32, too coarse for a float64 comparison.)"""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = functional_call(model, params, (), kwargs, tie_weights=True).logits
    targets = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(targets.numel(), -1), targets, ignore_index=-100)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_first_order_gradient_matches_its_definition(optimizer):
    """First order: W_{k+1} = W_k (1 - lr_k wd) - lr_k c_k with c_k a constant (the inner gradient
    or AdamW's direction from it); dL/dW_0 and dL/dlr_k follow in closed form."""
    # eps = 1e-30 makes sqrt(v_hat + eps^2) and torch's sqrt(v_hat) + eps agree to round-off.
    cfg = make_cfg("inner.first_order=true", f"inner.optimizer={optimizer}", "inner.eps=1e-30",
                   "inner.lr_init=0.3" if optimizer == "sgd" else "inner.lr_init=0.02")
    method, batch = build(cfg)
    t = 5  # hops 2 -> 3 inner steps, 3 knowledge sentences
    task = batch.select([t])
    zero_grads(method)
    method.forward_backward(task)
    got = grads(method)

    model = method.model
    names, base = trainable(model)
    n_facts = len(make_records()[t]["knowledge"])
    k = task.knowledge
    k_ids, k_mask, k_labels = k.input_ids[0, :n_facts], k.attention_mask[0, :n_facts], k.labels[0, :n_facts]
    lrs = method.learning_rates().detach()
    wd = float(cfg.inner.weight_decay) if optimizer == "adamw" else 0.0
    steps = group(cfg, "inner").steps_for(2)
    # Trajectory with constant inner directions (torch.optim.AdamW / plain SGD).
    weights = [p.detach().clone().requires_grad_(True) for p in base]
    opt = None
    if optimizer == "adamw":
        opt = torch.optim.AdamW([{"params": [w], "lr": 1.0} for w in weights], betas=(0.9, 0.999),
                                eps=1e-30, weight_decay=wd)
    trajectory, directions = [], []
    for step in range(steps):
        loss = hf_loss(model, dict(zip(names, weights)), k_ids, k_mask, k_labels)
        g = torch.autograd.grad(loss, weights)
        before = [w.detach().clone() for w in weights]
        with torch.no_grad():
            if opt is None:
                for w, gi, lr in zip(weights, g, lrs[step]):
                    w.sub_(lr * gi)
            else:
                for param_group, w, gi, lr in zip(opt.param_groups, weights, g, lrs[step]):
                    param_group["lr"] = float(lr)
                    w.grad = gi
                opt.step()
        after = [w.detach().clone() for w in weights]
        trajectory.append(before)
        directions.append([(b * (1 - lr * wd) - a) / lr for b, a, lr in zip(before, after, lrs[step])])
    s = task.sequence
    final = [w.detach().clone().requires_grad_(True) for w in weights]
    outer = hf_loss(model, dict(zip(names, final)), s.input_ids, s.attention_mask, s.labels)
    G = torch.autograd.grad(outer, final)
    # Backwards through W_{k+1} = W_k (1 - lr_k wd) - lr_k c_k.
    expected_lrs = torch.zeros_like(lrs)
    carry = list(G)
    for step in reversed(range(steps)):
        for i, (c, w_k, lr) in enumerate(zip(directions[step], trajectory[step], lrs[step])):
            expected_lrs[step, i] = (carry[i] * (-wd * w_k - c)).sum()
            carry[i] = carry[i] * (1 - lr * wd)
    for i, name in enumerate(names):
        assert torch.allclose(got[i], carry[i], rtol=1e-7, atol=1e-10), name
    assert torch.allclose(got[-1], expected_lrs, rtol=1e-6, atol=1e-10)


def assert_same_step_and_evaluation(reference, method, batch, loss_scale: float = 1.0) -> None:
    """One outer step and one evaluation of each: the same losses, meta-gradient and predictions."""
    results = []
    for m in (reference, method):
        zero_grads(m)
        out = m.forward_backward(batch, loss_scale=loss_scale)
        results.append((out, grads(m), m.evaluate(batch)))
    (out_r, g_r, ev_r), (out_m, g_m, ev_m) = results
    assert math.isclose(out_r["loss"], out_m["loss"], rel_tol=1e-12)
    assert math.isclose(out_r["knowledge_loss"], out_m["knowledge_loss"], rel_tol=1e-12)
    for x, y in zip(g_r, g_m):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)
    assert float(g_m[-1].abs().sum()) > 0  # the learned rates did get a gradient
    assert ev_r["prediction"] == ev_m["prediction"]
    assert all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(ev_r["answer_loss"], ev_m["answer_loss"]))


@pytest.mark.parametrize("optimizer,options", [
    ("adamw", []),
    ("sgd", []),
    ("adamw", ["inner.first_order=true"]),
    ("sgd", ["inner.first_order=true"]),
    ("adamw", ["inner.checkpoint=true"]),
    ("sgd", ["inner.checkpoint=true"]),
    ("adamw", ["inner.tasks_per_pass=1"]),
    ("adamw", ["inner.checkpoint=true", "inner.tasks_per_pass=1"]),
], ids=lambda v: "+".join(o.split(".")[1] for o in v) or "batched" if isinstance(v, list) else v)
def test_fused_engine_equals_the_reference_on_a_mixed_hop_batch(optimizer, options):
    # Fused optimizer nodes, tasks batched under vmap, smaller passes and checkpointing compute the
    # reference's numbers: the outer loss, the meta-gradient and the evaluation must not change.
    base = [f"inner.optimizer={optimizer}", "inner.lr_init=0.05" if optimizer == "adamw" else "inner.lr_init=0.5"]
    order = [o for o in options if o.startswith("inner.first_order")]  # the one option that changes the math
    reference, batch = build(make_cfg(*base, *order), engine="reference")
    fused, _ = build(make_cfg(*base, *options), engine="fused")
    assert sorted(set(reference.inner_steps(batch))) == [1, 2, 3]
    assert_same_step_and_evaluation(reference, fused, batch, loss_scale=0.5)


SUBSET = "inner.params=[transformer.h.0.mlp.*,transformer.ln_f.*]"
ADAPTED = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias", "transformer.h.0.mlp.c_proj.weight",
           "transformer.h.0.mlp.c_proj.bias", "transformer.ln_f.weight", "transformer.ln_f.bias"]


@pytest.mark.parametrize("outer", ["outer.params=[all]", "outer.params=[inner,transformer.wte.*]"])
@pytest.mark.parametrize("options", [[], ["inner.checkpoint=true"], ["inner.tasks_per_pass=1"], ["inner.first_order=true"],
                                     ["inner.checkpoint=true", "inner.tasks_per_pass=1"]],
                         ids=lambda v: "+".join(o.split(".")[1] for o in v) or "batched")
def test_an_inner_loop_over_some_tensors_equals_the_reference(outer, options):
    # inner.params: the inner loop adapts the first block's MLP and the final norm only; the other
    # trained weights enter its gradients unadapted, and the meta-gradient reaches them through
    # those gradients too (with inner.checkpoint, through the recomputed steps)
    base = ["inner.optimizer=adamw", "inner.lr_init=0.05", SUBSET, outer]
    order = [o for o in options if o.startswith("inner.first_order")]
    reference, batch = build(make_cfg(*base, *order), engine="reference")
    fused, _ = build(make_cfg(*base, *options), engine="fused")
    for method in (reference, fused):
        assert method.param_names() == ADAPTED and method.inner_lrs.shape == (3, len(ADAPTED))
    trained = [n for n, p in fused.model.named_parameters() if p.requires_grad]
    if outer == "outer.params=[all]":
        assert len(trained) > len(ADAPTED) + 1
    else:  # the adapted tensors and the embedding; everything else frozen
        assert trained == ["transformer.wte.weight"] + ADAPTED[:4] + ADAPTED[4:]
    assert_same_step_and_evaluation(reference, fused, batch, loss_scale=0.5)
    frozen = [p for p in fused.model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_an_inner_loop_over_some_tensors_matches_finite_differences():
    cfg = make_cfg("inner.optimizer=adamw", "inner.eps=1e-2", "inner.lr_init=0.05", "eval.max_new_tokens=1", SUBSET,
                   "outer.params=[inner,transformer.wte.*]", "inner.checkpoint=true")
    method, batch = build(cfg, records=make_records(3))
    assert len(method.meta_parameters()) == 1 + len(ADAPTED) + 1  # the embedding, the adapted tensors, the rates
    assert_finite_differences_agree(method, batch, seed=5)


def test_inner_params_that_match_nothing_name_the_key_and_the_names():
    with pytest.raises(BilevelError, match=r"inner.params: pattern 'transformer.h.7.\*' matches no .*transformer"):
        build(make_cfg("inner.params=[transformer.h.7.*]"))
    with pytest.raises(BilevelError, match="outer.params: pattern 'nothing' matches no"):
        build(make_cfg(SUBSET, "outer.params=[inner,nothing]"))


def test_reference_engine_refuses_the_fused_memory_options():
    for option in ("inner.checkpoint=true", "inner.autocast=bf16"):
        with pytest.raises(BilevelError, match=f"{option}.*inner.engine=fused"):
            build(make_cfg(option), engine="reference")
    method, batch = build(make_cfg("inner.tasks_per_pass=3"), engine="reference")
    assert [index for _, index in method.engine.passes(method.inner_steps(batch))] == [[t] for t in range(6)]


def test_tasks_per_pass_splits_each_inner_step_group():
    method, batch = build(make_cfg("inner.tasks_per_pass=2"), records=make_records(9))
    steps = method.inner_steps(batch)  # hops 0, 1, 2 repeating: three groups of three tasks
    passes = method.engine.passes(steps)
    assert [len(index) for _, index in passes] == [2, 1, 2, 1, 2, 1]
    assert sorted(t for _, index in passes for t in index) == list(range(9))
    assert all(steps[t] == n for n, index in passes for t in index)


@pytest.mark.parametrize("options", [["inner.optimizer=sgd", "inner.lr_init=0.5"], ["inner.first_order=true"]])
def test_bf16_autocast_runs_the_forward_in_bf16_and_stays_close_to_float32(options):
    # Where bf16 is within tolerance: an SGD inner loop, or first order. (Second-order AdamW is not:
    # its derivative of g / sqrt(g^2 + eps^2) is ~1/eps where |g| ~ eps, and bf16 rounding of the
    # inner gradient there moves the meta-gradient by 100%; bench/memory_modes.py shows it.)
    reference, batch = build(make_cfg("model.dtype=float32", *options))
    method, _ = build(make_cfg("model.dtype=float32", "inner.autocast=bf16", *options))
    seen: list[torch.dtype] = []
    hook = method.model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    g = []
    for m in (reference, method):
        zero_grads(m)
        m.forward_backward(batch)
        g.append(torch.cat([x.flatten() for x in grads(m)]))
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    error = float((g[0] - g[1]).norm() / g[0].norm())
    assert 1e-5 < error < 0.05, error  # bf16 did run (not float32-equal) and the gradient stays close
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in method.meta_parameters())


def test_outer_loss_is_summed_over_tasks():
    # Data-parallel workers SUM-all-reduce: a batch's gradient must be the sum of its tasks'.
    method, batch = build(make_cfg())
    zero_grads(method)
    total = method.forward_backward(batch)["loss"]
    together = grads(method)
    zero_grads(method)
    parts = sum(method.forward_backward(batch.select([t]))["loss"] for t in range(len(batch)))
    for a, b in zip(together, grads(method)):  # .grad accumulated over the single-task calls
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert math.isclose(total, parts, rel_tol=1e-12)


# ------------------------------------------------------------------------------ weights and steps


def test_tied_output_layer_uses_the_fast_embedding():
    method, batch = build(make_cfg())
    model = method.model
    assert "lm_head.weight" not in method.param_names()
    assert model.lm_head.weight is model.transformer.wte.weight
    fast = method.fast_weights(batch)[5]
    assert not torch.equal(fast["transformer.wte.weight"], model.transformer.wte.weight)
    s = batch.sequence
    ids, mask = s.input_ids[5:6], s.attention_mask[5:6]
    logits = causal_lm_logits(model, fast, ids, mask)
    body = {k[len("transformer."):]: v for k, v in fast.items()}
    hidden = functional_call(
        model.transformer, body, (),
        dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False),
    ).last_hidden_state
    assert torch.allclose(logits, hidden @ fast["transformer.wte.weight"].T, atol=1e-12)
    assert not torch.allclose(logits, hidden @ model.transformer.wte.weight.T, atol=1e-3)


def test_inner_steps_follow_hop_counts_and_a_fixed_count_wins():
    method, batch = build(make_cfg())
    assert method.inner_steps(batch) == [1, 2, 3, 1, 2, 3]
    assert method.inner_lrs.shape == (3, len(method.param_names()))
    assert method.inner_steps(batch, inner_steps=0) == [0] * 6
    with pytest.raises(BilevelError, match="inner_steps=4"):
        method.inner_steps(batch, inner_steps=4)
    fixed, _ = build(make_cfg("inner.steps=2"))
    assert fixed.inner_steps(batch) == [2] * 6 and fixed.inner_lrs.shape[0] == 2


def test_inner_loop_lowers_the_knowledge_loss():
    method, batch = build(make_cfg())
    before = method.knowledge_losses(batch, inner_steps=0)
    after = method.knowledge_losses(batch)
    assert all(a < b - 0.1 for a, b in zip(after, before)), (before, after)
    assert sum(after) < 0.85 * sum(before)


def test_evaluation_never_changes_the_stored_weights_and_works_under_no_grad():
    method, batch = build(make_cfg())
    stored = {k: v.clone() for k, v in method.model.state_dict().items()}
    lrs = method.inner_lrs.detach().clone()
    zero_grads(method)
    method.eval()
    first = method.evaluate(batch)
    with torch.no_grad():
        second = method.evaluate(batch)
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, stored[k]), k
    assert torch.equal(method.inner_lrs.detach(), lrs)
    assert all(p.grad is None for p in method.meta_parameters())
    assert first["answer_loss"] == second["answer_loss"] and first["prediction"] == second["prediction"]
    assert set(first) >= {"answer_loss", "prediction", "label_correct", "recall", "hops"}
    assert first["hops"] == [0, 1, 2, 0, 1, 2]


def test_left_padded_generation_equals_generation_of_the_task_alone():
    method, batch = build(make_cfg("eval.max_new_tokens=5"))
    together = method.evaluate(batch)
    for t in (0, 5):
        alone = method.evaluate(batch.select([t]))
        assert alone["prediction"] == [together["prediction"][t]]
        assert math.isclose(alone["answer_loss"][0], together["answer_loss"][t], rel_tol=1e-10)


def test_bilevel_step_runs_without_dropout_at_zero_and_with_eager_attention_for_second_order():
    cfg = make_cfg("model.dtype=float32")
    method, batch = build(cfg)
    assert cfg.model.dropout == 0.0 and method.model.config.resid_pdrop == 0.0
    method.model.train()
    method.train()
    assert not method.model.training  # model.dropout=0: eval mode throughout, no random op
    assert method.attention == "eager"
    losses = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        losses.append(method.forward_backward(batch)["loss"])
        assert not method.model.training
    assert losses[0] == losses[1]
    # First order keeps the default path task by task; vmap over tasks needs eager.
    assert build(make_cfg("inner.first_order=true"), engine="reference")[0].attention == "sdpa"
    assert build(make_cfg("inner.first_order=true"), engine="fused")[0].attention == "eager"


# ------------------------------------------------------------------------------ dropout


def seeded_step(method, batch, seed: int) -> tuple[dict, list[torch.Tensor]]:
    """One forward_backward from zero gradients under ``torch.manual_seed(seed)``."""
    zero_grads(method)
    torch.manual_seed(seed)
    out = method.forward_backward(batch)
    return out, grads(method)


@pytest.mark.parametrize("engine,first_order", [("fused", False), ("reference", False), ("fused", True)])
def test_dropout_draws_masks_in_training_per_seed_and_none_in_evaluation(engine, first_order):
    cfg = make_cfg("model.dropout=0.2", f"inner.first_order={str(first_order).lower()}")
    method, batch = build(cfg, engine=engine)
    config = method.model.config
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.2, 0.2, 0.2)
    assert method.model.training  # the training phase is the default
    stored = {k: v.clone() for k, v in method.model.state_dict().items()}

    first, g_first = seeded_step(method, batch, seed=0)
    assert method.model.training
    again, g_again = seeded_step(method, batch, seed=0)
    other, g_other = seeded_step(method, batch, seed=1)
    # Same seed, same masks: the same numbers; another seed, other masks.
    assert first == again
    assert all(torch.equal(a, b) for a, b in zip(g_first, g_again))
    assert first["loss"] != other["loss"] and first["knowledge_loss"] != other["knowledge_loss"]
    assert any(not torch.equal(a, b) for a, b in zip(g_first, g_other))
    for g in g_first + g_other:
        assert torch.isfinite(g).all()
    assert float(g_first[-1].abs().sum()) > 0  # the learned rates get a gradient through the masks

    # Evaluation: eval mode, no dropout. Deterministic whatever the seed, and equal to the same
    # weights built with model.dropout=0 (the initialisation does not depend on the dropout).
    method.eval()
    torch.manual_seed(0)
    ev_a, k_a = method.evaluate(batch), method.knowledge_losses(batch)
    assert not method.model.training
    torch.manual_seed(1)
    ev_b, k_b = method.evaluate(batch), method.knowledge_losses(batch)
    assert ev_a == ev_b and k_a == k_b
    no_dropout, _ = build(make_cfg(f"inner.first_order={str(first_order).lower()}"), engine=engine)
    assert no_dropout.evaluate(batch) == ev_a and no_dropout.knowledge_losses(batch) == k_a
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, stored[k]), k

    # Without dropout (the eval phase) forward_backward is the deterministic step of model.dropout=0;
    # back in the training phase, dropout is on again even though evaluation left eval mode behind.
    off, g_off = seeded_step(method, batch, seed=0)
    ref, g_ref = seeded_step(no_dropout, batch, seed=5)
    assert off == ref and all(torch.equal(a, b) for a, b in zip(g_off, g_ref))
    method.evaluate(batch)
    method.train()
    assert seeded_step(method, batch, seed=0)[0] == first


def test_dropout_under_vmap_gives_each_task_its_own_masks():
    method, batch = build(make_cfg("model.dropout=0.2"))
    s = batch.select([0, 0, 0]).sequence  # the same task three times, the same weights
    names, base = trainable(method.model)
    fast = FastWeights({n: p.detach().unsqueeze(0).expand(3, *p.shape) for n, p in zip(names, base)}, True)
    rows = (s.input_ids[:, None], s.attention_mask[:, None], s.labels[:, None])
    torch.manual_seed(0)
    with torch.no_grad():
        losses = method.engine.task_losses(fast, *rows)
    assert len(set(losses.tolist())) == 3, losses  # randomness="different": a mask per task
    method.model.eval()
    with torch.no_grad():
        losses = method.engine.task_losses(fast, *rows)
    assert len(set(losses.tolist())) == 1


@pytest.mark.parametrize("tasks_per_pass,optimizer", [(0, "adamw"), (1, "adamw"), (0, "sgd")])
def test_checkpoint_with_dropout_redraws_the_forward_masks_and_keeps_the_meta_gradient(tasks_per_pass, optimizer,
                                                                                       monkeypatch):
    # inner.checkpoint recomputes each inner step in the backward pass; it restores the random
    # state the step had, so the recomputed step sees the same dropout masks. Task by task, in the
    # same order (one inner-step count: the fused engine's passes follow the counts), the fused
    # engine draws the reference's masks; batched under vmap, masks of its own.
    lr = "inner.lr_init=0.05" if optimizer == "adamw" else "inner.lr_init=0.5"
    options = ["model.dropout=0.2", f"inner.optimizer={optimizer}", lr, f"inner.tasks_per_pass={tasks_per_pass}"]
    if tasks_per_pass == 1:
        options.append("inner.steps=2")
    reference, batch = build(make_cfg(*options), engine="reference" if tasks_per_pass == 1 else "fused")
    method, _ = build(make_cfg(*options, "inner.checkpoint=true"), engine="fused")
    out_r, g_r = seeded_step(reference, batch, seed=3)
    after_r = torch.rand(4)
    out_m, g_m = seeded_step(method, batch, seed=3)
    after_m = torch.rand(4)
    assert math.isclose(out_r["loss"], out_m["loss"], rel_tol=1e-12)
    assert math.isclose(out_r["knowledge_loss"], out_m["knowledge_loss"], rel_tol=1e-12)
    for x, y in zip(g_r, g_m):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)
    # The recomputation leaves the generator where the forward passes left it.
    assert torch.equal(after_r, after_m)
    # Without the restore the recomputed steps draw other masks: another (wrong) meta-gradient.
    from contextlib import nullcontext

    from reckoning_ray.core.bilevel import fused

    monkeypatch.setattr(fused, "_rng_restored", lambda saved: nullcontext())
    _, g_wrong = seeded_step(method, batch, seed=3)
    assert not all(torch.allclose(x, y, rtol=1e-6, atol=1e-9) for x, y in zip(g_r, g_wrong))


def test_parameter_groups_stats_and_log_space():
    method, _ = build(make_cfg("outer.lr=0.001", "outer.inner_lr_lr=0.01", "outer.weight_decay=0.1"),
                      random_lrs=False)
    weights, rates = method.parameter_groups()
    assert (weights["lr"], weights["weight_decay"]) == (0.001, 0.1)
    assert (rates["lr"], rates["weight_decay"]) == (0.01, 0.0) and rates["params"] == [method.inner_lrs]
    assert method.meta_parameters()[-1] is method.inner_lrs
    assert len(weights["params"]) == len(method.param_names())
    with torch.no_grad():
        method.inner_lrs[0, :4] = -0.5
        method.inner_lrs[2, 0] = 2.0
    stats = method.stats()
    assert stats == {"inner_lr/min": -0.5, "inner_lr/median": 0.05, "inner_lr/max": 2.0, "inner_lr/negative": 4.0}
    log_method, _ = build(make_cfg("inner.lr_space=log"), random_lrs=False)
    assert torch.allclose(log_method.inner_lrs.detach(), torch.full_like(log_method.inner_lrs, math.log(0.05)))
    with torch.no_grad():
        log_method.inner_lrs.fill_(-30.0)
    assert log_method.stats()["inner_lr/min"] > 0 and log_method.stats()["inner_lr/negative"] == 0


def test_reckoning_without_knowledge_batch_says_how_to_fix_it():
    method, _ = build(make_cfg())
    records = make_records(2)
    batch = Encoder(method.tokenizer, "icr", True, 48).collate(records)
    with pytest.raises(BilevelError, match="method='reckoning'"):
        method.forward_backward(batch)
    with pytest.raises(BilevelError, match="inner.engine='fast'"):
        build(make_cfg(), engine="fast")


def test_settings_are_json_and_rebuild_a_method_that_answers_the_same():
    cfg = make_cfg("inner.optimizer=sgd", "inner.lr_init=0.5", "inner.lr_space=log", "eval.max_new_tokens=4")
    method, batch = build(cfg, engine="reference")
    settings = json.loads(json.dumps(method.settings()))
    assert settings == method.settings()  # plain JSON values already (choices as strings)
    assert (settings["method"], settings["inner"]["engine"], settings["inner"]["optimizer"]) == ("reckoning",
                                                                                                "reference", "sgd")
    assert settings["inner"]["steps_by_hops"] == {"0": 1, "1": 2, "2": 3} and settings["eval"]["max_new_tokens"] == 4
    assert settings["encoder"] == {"method": "reckoning", "multi_task": True, "max_length": 48}
    assert settings["dropout"] == 0.0 and settings["outer"]["lr"] == float(cfg.outer.lr)
    rebuilt = build_method_from_settings(dict(settings, format=1), method.model, method.tokenizer)
    assert isinstance(rebuilt, ReckoningMethod) and rebuilt.inner == method.inner and rebuilt.outer == method.outer
    assert rebuilt.inner.optimizer is type(method.inner.optimizer).sgd  # the choice, not its string
    assert not torch.equal(rebuilt.inner_lrs, method.inner_lrs)  # random_lrs: not the initial rates
    rebuilt.load_extra_state(json_free(method.extra_state()))
    assert torch.equal(rebuilt.inner_lrs, method.inner_lrs) and rebuilt.to("cpu") is rebuilt
    assert rebuilt.evaluate(batch) == method.evaluate(batch)
    # The in-context baseline: no inner group, no extra state.
    encoder = Encoder(method.tokenizer, "icr", True, 48)
    icr = build_method(make_cfg("train.method=icr"), method.model, method.tokenizer, encoder)
    assert "inner" not in icr.settings() and icr.extra_state() == {} and icr.stats() == {}
    again = build_method_from_settings(icr.settings(), method.model, method.tokenizer)
    assert type(again) is type(icr) and again.settings() == icr.settings()
    icr_batch = encoder.collate(make_records()[:2])
    assert again.evaluate(icr_batch) == icr.evaluate(icr_batch)


def json_free(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as a checkpoint gives them back: copies, on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


# ------------------------------------------------------------------------------ end to end


def train_briefly(method_name: str, steps: int, seed: int = 0):
    """Embedded preset on generated one-fact yes/no tasks (8 names x 8 adjectives, held-out
    question pairs), outer AdamW 1e-3 (learned rates 1e-2), batch 32, 1 inner SGD step from 0.1."""
    from reckoning_ray.core.data.generate import generate_splits

    cfg = load_config("embedded", [f"train.method={method_name}", "data.num_train=512", "data.num_validation=128",
                                   *ONE_FACT])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.inner.steps, cfg.inner.optimizer) == (1, 64, 1, "sgd")
    assert (cfg.inner.lr_init, cfg.outer.lr, cfg.outer.inner_lr_lr, cfg.train.batch_size) == (0.1, 1e-3, 1e-2, 32)
    splits = generate_splits(cfg.data)
    args = dict(method=method_name, multi_task=bool(cfg.outer.multi_task), max_length=int(cfg.model.max_length))
    corpus = list(Encoder(None, **args).corpus([r for s in splits.values() for r in s]))
    model, tokenizer = load_model_and_tokenizer(cfg.model, corpus=corpus, seed=seed)
    encoder = Encoder(tokenizer, **args)
    torch.manual_seed(seed)
    method = build_method(cfg, model, tokenizer, encoder)
    optimizer = torch.optim.AdamW(method.parameter_groups())
    order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(seed)).tolist()
    start = time.time()
    for step in range(steps):
        index = [order[(step * 32 + j) % len(order)] for j in range(32)]
        batch = encoder.collate([splits["train"][i] for i in index])
        method.train()
        optimizer.zero_grad()
        method.forward_backward(batch, loss_scale=1 / 32)
        torch.nn.utils.clip_grad_norm_(method.meta_parameters(), cfg.outer.clip)
        optimizer.step()
    seconds = time.time() - start
    method.eval()
    validation = encoder.collate(splits["validation"])
    labels = [r["answer"] for r in splits["validation"]]
    majority = max(labels.count(x) for x in set(labels)) / len(labels)
    return method, validation, majority, seconds


@pytest.mark.slow
def test_reckoning_uses_the_knowledge_through_the_weights():
    method, validation, majority, seconds = train_briefly("reckoning", steps=60)
    with_inner = summarize(method.evaluate(validation))
    without = summarize(method.evaluate(validation, inner_steps=0))
    print(f"\nRECKONING 60 steps in {seconds:.1f}s: validation label_accuracy {with_inner['label_accuracy']:.3f} "
          f"answer_loss {with_inner['answer_loss']:.4f}; without the inner loop {without['label_accuracy']:.3f} / "
          f"{without['answer_loss']:.4f}; majority {majority:.3f}")
    assert with_inner["label_accuracy"] >= majority + 0.30
    assert with_inner["answer_loss"] < 0.25 * without["answer_loss"]
    # Without its inner loop the model has not seen the knowledge: it cannot beat guessing by much.
    assert without["label_accuracy"] <= majority + 0.10
    assert seconds < 120
