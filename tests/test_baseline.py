"""FT-ICR (fine-tuned in-context reasoning): loss, padding, evaluation, dispatch, and an
end-to-end run on generated tasks."""

from __future__ import annotations

import math
import time

import pytest
import torch

from conftest import ONE_FACT
from reckoning_ray.core.baseline import InContextMethod, build_method, build_method_from_settings
from reckoning_ray.core.bilevel.lm import BilevelError
from reckoning_ray.core.bilevel.method import ReckoningMethod, ReckoningRandomFactsMethod
from reckoning_ray.core.checkpoint import load_pretrained, read_fact_pool, read_settings, save_pretrained
from reckoning_ray.core.config import load_config
from reckoning_ray.core.data.encode import Encoder
from reckoning_ray.core.data.schema import make_record
from reckoning_ray.core.metrics import summarize
from reckoning_ray.core.modeling import load_model_and_tokenizer
from reckoning_ray.core.predict import ReckoningModel

RECORDS = [
    make_record(id=f"t{i}", family="proofwriter", source="generated", knowledge=knowledge, facts=knowledge[:1],
                question=question, answer=answer, hops=hops)
    for i, (knowledge, question, answer, hops) in enumerate([
        (["bob is red ."], "bob is red", "yes", 0),
        (["anne isnt big .", "bob is kind ."], "anne is big", "no", 1),
        (["carl is cold .", "if someone is cold then they are blue .", "dave is red ."], "carl is blue", "yes", 1),
        (["dave isnt kind ."], "dave is kind", "no", 0),
    ])
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(method: str = "icr", *overrides: str, records=RECORDS, **encoder_args):
    """(method, batch of ``records``) on a tiny float64 embedded model; ``encoder_args``: the
    Encoder's seed and fact_pool."""
    cfg = load_config("embedded", [f"train.method={method}", "model.n_embd=16", "model.n_head=2",
                                   "model.dtype=float64", "model.max_length=48", "outer.multi_task=true",
                                   "eval.max_new_tokens=5", *overrides])
    args = dict(method=method, multi_task=True, max_length=48, **encoder_args)
    model, tokenizer = load_model_and_tokenizer(cfg.model, corpus=list(Encoder(None, **args).corpus(records)))
    encoder = Encoder(tokenizer, **args)
    return build_method(cfg, model, tokenizer, encoder), encoder.collate(records)


def grads(method) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in method.meta_parameters()]


def test_loss_is_the_mean_target_loss_per_task_summed_over_tasks():
    method, batch = build()
    method.eval()  # no dropout: the comparison below must be exact
    s = batch.sequence
    total = method.forward_backward(batch)["loss"]
    together = grads(method)
    for p in method.meta_parameters():
        p.grad = None
    parts = []
    for t in range(len(batch)):
        parts.append(method.forward_backward(batch.select([t]))["loss"])
        # The model's own forward (2D mask, default positions) on the unpadded row gives the same loss.
        n = int(s.attention_mask[t].sum())
        with torch.no_grad():
            logits = method.model(input_ids=s.input_ids[t : t + 1, :n], use_cache=False).logits
        labels = s.labels[t, 1:n]
        expected = torch.nn.functional.cross_entropy(logits[0, : n - 1], labels, ignore_index=-100)
        assert math.isclose(parts[-1], float(expected), rel_tol=1e-12)
    assert math.isclose(total, sum(parts), rel_tol=1e-12)
    for a, b in zip(together, grads(method)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_training_mode_uses_model_dropout_and_evaluation_restores_the_mode():
    method, batch = build("icr", "model.dropout=0.1")
    assert method.model.config.resid_pdrop == 0.1
    method.train()
    assert method.model.training
    losses = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        losses.append(method.forward_backward(batch)["loss"])
    assert losses[0] == losses[1] != losses[2]  # masks drawn from the seeded generator
    stored = {k: v.clone() for k, v in method.model.state_dict().items()}
    torch.manual_seed(0)
    first = method.evaluate(batch)
    assert method.model.training  # put back as it was
    torch.manual_seed(1)
    second = method.evaluate(batch)
    assert first == second  # no dropout in evaluation
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, stored[k]), k
    # model.dropout=0 (the default): training is deterministic even in train mode.
    plain, _ = build()
    plain.train()
    assert plain.model.training and plain.model.config.attn_pdrop == 0.0
    losses = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        losses.append(plain.forward_backward(batch)["loss"])
    assert losses[0] == losses[1]
    assert plain.evaluate(batch) == first  # same weights; evaluation never used the dropout


def test_generation_of_a_left_padded_prompt_equals_the_prompt_alone():
    method, batch = build()
    together = method.evaluate(batch)
    assert set(together) >= {"answer_loss", "prediction", "label_correct", "recall", "hops"}
    assert together["hops"] == [0, 1, 1, 0]
    for t in range(len(batch)):
        alone = method.evaluate(batch.select([t]))
        assert alone["prediction"] == [together["prediction"][t]]
        assert math.isclose(alone["answer_loss"][0], together["answer_loss"][t], rel_tol=1e-10)


def test_build_method_dispatches_on_train_method():
    for name in ("icr", "icr_no_facts", "icr_random_facts", "icr_no_question"):
        method, batch = build(name)
        assert isinstance(method, InContextMethod) and batch.knowledge is None
        assert method.stats() == {} and method.settings()["method"] == name
        (group,) = method.parameter_groups()
        assert group["lr"] == float(method.outer.lr) and group["params"] == method.meta_parameters()
    reckoning, batch = build("reckoning")
    assert type(reckoning) is ReckoningMethod and batch.knowledge is not None
    random_facts, batch = build("reckoning_random_facts")
    assert type(random_facts) is ReckoningRandomFactsMethod and batch.knowledge is not None
    assert random_facts.settings()["method"] == "reckoning_random_facts"
    assert [g["name"] for g in random_facts.parameter_groups()] == ["weights", "inner_lrs"]
    with pytest.raises(BilevelError, match="reckoning_random_facts needs an Encoder"):
        ReckoningRandomFactsMethod(reckoning.model, reckoning.tokenizer, reckoning.encoder, reckoning.inner,
                                   reckoning.outer, reckoning.eval_config)
    # the schema refuses an unknown method in a config; a saved checkpoint's settings are checked too
    with pytest.raises(BilevelError, match="train.method='rag'"):
        build_method_from_settings(dict(reckoning.settings(), method="rag"), reckoning.model, reckoning.tokenizer)
    method, batch = build()
    with pytest.raises(BilevelError, match="no inner loop"):
        method.evaluate(batch, inner_steps=2)


def test_reckoning_random_facts_is_reckonings_step_on_the_drawn_knowledge():
    """Random-Facts changes the knowledge only: RECKONING's method on the same batch gives the same
    outer loss, gradients and evaluation."""
    random_facts, batch = build("reckoning_random_facts")
    reckoning = ReckoningMethod(random_facts.model, random_facts.tokenizer,
                                Encoder(random_facts.tokenizer, "reckoning", True, 48), random_facts.inner,
                                random_facts.outer, random_facts.eval_config, random_facts.dropout)
    with torch.no_grad():
        reckoning.inner_lrs.copy_(random_facts.inner_lrs)
    own = reckoning.encoder.collate(RECORDS)
    assert torch.equal(batch.sequence.labels, own.sequence.labels)  # same prompt and target
    assert not torch.equal(batch.knowledge.input_ids, own.knowledge.input_ids)  # other knowledge
    results = []
    for method in (random_facts, reckoning):
        for p in method.meta_parameters():
            p.grad = None
        out = method.forward_backward(batch)
        results.append((out["loss"], out["knowledge_loss"], [g.clone() for g in grads(method)]))
    (loss_a, knowledge_a, grads_a), (loss_b, knowledge_b, grads_b) = results
    assert math.isfinite(loss_a) and loss_a == loss_b and knowledge_a == knowledge_b
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)
    assert random_facts.evaluate(batch) == reckoning.evaluate(batch)


@pytest.mark.parametrize("name", ["icr_no_question", "reckoning_random_facts"])
def test_the_paper_controls_train_and_reload_from_a_checkpoint(tmp_path, name):
    pool = sorted({k for r in RECORDS for k in r["knowledge"]})
    method, batch = build(name, seed=7, fact_pool=pool)
    optimizer = torch.optim.AdamW(method.parameter_groups(), lr=1e-2)
    method.train()
    optimizer.zero_grad()
    out = method.forward_backward(batch, loss_scale=1 / len(batch))
    assert math.isfinite(out["loss"]) and out["loss"] > 0 and out["tasks"] == len(RECORDS)
    assert all(torch.isfinite(g).all() for g in grads(method))
    optimizer.step()
    method.eval()
    before = method.evaluate(batch)

    directory = save_pretrained(method, tmp_path / "checkpoint", task={"family": "proofwriter"})
    settings = read_settings(directory)
    assert settings["method"] == name and settings["encoder"]["method"] == name
    loaded = load_pretrained(directory)
    assert type(loaded) is type(method) and loaded.settings() == method.settings()
    if name == "reckoning_random_facts":
        # the checkpoint keeps the seed and the pool: it draws the same knowledge as the run
        assert settings["encoder"]["seed"] == 7 and read_fact_pool(directory) == pool
        assert (loaded.encoder.seed, loaded.encoder.fact_pool) == (7, pool)
        assert torch.allclose(loaded.inner_lrs.double(), method.inner_lrs.double())
    else:
        assert "seed" not in settings["encoder"] and read_fact_pool(directory) is None
    again = loaded.encoder.collate(RECORDS)
    assert torch.equal(again.sequence.input_ids, batch.sequence.input_ids)
    if batch.knowledge is not None:
        assert torch.equal(again.knowledge.input_ids, batch.knowledge.input_ids)
    after = loaded.to("cpu").evaluate(again)
    assert after["prediction"] == before["prediction"]
    assert after["answer_loss"] == pytest.approx(before["answer_loss"], rel=1e-4)

    model = ReckoningModel.from_pretrained(directory)
    assert type(model.method) is type(method)
    knowledge = ["bob is red .", "dave isnt kind ."]
    answer = model.answer(knowledge, "bob is red")
    assert isinstance(answer.label, str) and isinstance(answer.text, str)
    if name == "icr_no_question":  # the question never reaches the model
        assert model.answer(knowledge, "dave is kind").text == answer.text


@pytest.mark.slow
def test_fine_tuned_in_context_reasoning_learns_generated_tasks():
    """Same setting as RECKONING's end-to-end test: FT-ICR reads the fact in its prompt."""
    from reckoning_ray.core.data.generate import generate_splits

    cfg = load_config("embedded", ["train.method=icr", "data.num_train=512", "data.num_validation=128", *ONE_FACT])
    splits = generate_splits(cfg.data)
    args = dict(method="icr", multi_task=bool(cfg.outer.multi_task), max_length=int(cfg.model.max_length))
    corpus = list(Encoder(None, **args).corpus([r for s in splits.values() for r in s]))
    model, tokenizer = load_model_and_tokenizer(cfg.model, corpus=corpus, seed=0)
    encoder = Encoder(tokenizer, **args)
    torch.manual_seed(0)
    method = build_method(cfg, model, tokenizer, encoder)
    optimizer = torch.optim.AdamW(method.parameter_groups())
    order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(0)).tolist()
    steps = 150
    start = time.time()
    for step in range(steps):
        index = [order[(step * 32 + j) % len(order)] for j in range(32)]
        method.train()
        optimizer.zero_grad()
        method.forward_backward(encoder.collate([splits["train"][i] for i in index]), loss_scale=1 / 32)
        torch.nn.utils.clip_grad_norm_(method.meta_parameters(), cfg.outer.clip)
        optimizer.step()
    seconds = time.time() - start
    method.eval()
    result = summarize(method.evaluate(encoder.collate(splits["validation"])))
    labels = [r["answer"] for r in splits["validation"]]
    majority = max(labels.count(x) for x in set(labels)) / len(labels)
    print(f"\nFT-ICR {steps} steps in {seconds:.1f}s: validation label_accuracy {result['label_accuracy']:.3f} "
          f"answer_loss {result['answer_loss']:.4f}; majority {majority:.3f}")
    assert result["label_accuracy"] >= majority + 0.30
    assert seconds < 120
