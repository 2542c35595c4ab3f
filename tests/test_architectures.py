"""RECKONING on causal LMs other than GPT-2: Llama, Qwen2, GPT-NeoX and OPT (and GPT-2 loaded the
same way), tiny random configs built offline and saved with ``save_pretrained``, then loaded through
``model.name_or_path=<directory>`` as a user's model is.

Covered: rotary embeddings (Llama, Qwen2, GPT-NeoX with rotary on part of each head), grouped-query
attention (Llama, Qwen2), tied (GPT-2, Qwen2, OPT) and untied (Llama, GPT-NeoX) output layers,
learned positions with an offset (OPT), and tokenizers without a pad token (all but OPT's). Each
architecture: the fused engine equals the reference engine in float64 (losses, meta-gradient,
generated answers), the meta-gradient matches central finite differences, and ``train`` runs a few
steps with finite losses.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_bilevel import (
    assert_same_step_and_evaluation,
    build,
    central_difference,
    grads,
    make_cfg,
    make_records,
    unit_direction,
    zero_grads,
)
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig, Qwen2Config

from reckoning_ray.core.config import load_config
from reckoning_ray.core.data.encode import Encoder
from reckoning_ray.core.data.sources import load_splits
from reckoning_ray.core.modeling import build_tokenizer, save_model_and_tokenizer
from reckoning_ray.core.predict import ReckoningModel
from reckoning_ray.train import main as train_main

SHAPE = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
ARCHITECTURES = {
    # name: (config class, its arguments, the tokenizer keeps its pad token)
    "gpt2": (GPT2Config, dict(n_embd=16, n_layer=2, n_head=4, n_positions=64), False),
    "llama": (LlamaConfig, dict(SHAPE, intermediate_size=32, num_key_value_heads=2, tie_word_embeddings=False), False),
    "qwen2": (Qwen2Config, dict(SHAPE, intermediate_size=32, num_key_value_heads=2, tie_word_embeddings=True), False),
    "gpt_neox": (GPTNeoXConfig, dict(SHAPE, intermediate_size=32, rotary_pct=0.5, tie_word_embeddings=False), False),
    # GELU instead of OPT's ReLU: the inner gradient jumps where a ReLU input crosses zero, so the
    # outer loss is not differentiable there and finite differences of it mean nothing
    "opt": (OPTConfig, dict(SHAPE, ffn_dim=32, word_embed_proj_dim=16, activation_function="gelu"), True),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def save_tiny(name: str, corpus, directory) -> str:
    """A randomly initialised ``name`` model with a word-level tokenizer of ``corpus``, saved as a
    user's model directory."""
    config_class, arguments, keeps_pad = ARCHITECTURES[name]
    tokenizer = build_tokenizer(corpus, model_max_length=64)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if keeps_pad:
        ids["pad_token_id"] = tokenizer.pad_token_id
    else:
        tokenizer.pad_token = None  # as GPT-2's and Llama's own tokenizers come
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config_class(vocab_size=len(tokenizer), **arguments, **ids))
    save_model_and_tokenizer(model, tokenizer, directory)
    return str(directory)


def test_the_set_covers_what_it_claims(tmp_path):
    corpus = list(Encoder(None, "reckoning", True, 64).corpus(make_records()))
    seen = {}
    for name in ARCHITECTURES:
        model = AutoModelForCausalLM.from_pretrained(save_tiny(name, corpus, tmp_path / name))
        config = model.config
        seen[name] = {
            "rotary": any("rotary" in n for n, _ in model.named_modules()),
            "gqa": getattr(config, "num_key_value_heads", config.num_attention_heads) < config.num_attention_heads,
            "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        }
    assert {n for n, s in seen.items() if s["rotary"]} == {"llama", "qwen2", "gpt_neox"}
    assert {n for n, s in seen.items() if s["gqa"]} == {"llama", "qwen2"}
    assert {n for n, s in seen.items() if s["tied"]} == {"gpt2", "qwen2", "opt"}


# Finite-difference steps: these models' eager attention computes its softmax in float32 even for
# float64 weights (GPT-2's does not), so the loss carries float32 round-off (~1e-7 relative), which a
# small step amplifies, while along the learned rates AdamW's step bends the loss enough that a
# large step is off by its truncation error. The central difference must agree at one of these
# steps (measured: 3e-4 relative or better at one of them, for every architecture and direction);
# a wrong term in the meta-gradient is off at all of them.
STEPS = (1e-3, 3e-4, 1e-4)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_fused_engine_equals_the_reference_and_finite_differences(name, tmp_path):
    records = make_records()
    corpus = list(Encoder(None, "reckoning", True, 64).corpus(records))
    directory = save_tiny(name, corpus, tmp_path / name)
    cfg = make_cfg(f"model.name_or_path={directory}")
    reference, batch = build(cfg, records, engine="reference")
    fused, _ = build(cfg, records, engine="fused")
    assert reference.model.dtype == torch.float64 and type(reference.model).__name__.lower().startswith(name.split("_")[0][:4])
    # left-padded prompts, mixed inner-step counts (1, 2, 3), a batch under vmap
    assert_same_step_and_evaluation(reference, fused, batch)

    # the meta-gradient against central differences (AdamW's eps large enough to keep it smooth)
    cfg = make_cfg(f"model.name_or_path={directory}", "inner.eps=1e-2", "eval.max_new_tokens=1")
    method, batch = build(cfg, make_records(3))
    zero_grads(method)
    method.forward_backward(batch)
    analytic, params = grads(method), method.meta_parameters()
    gen = torch.Generator().manual_seed(3)
    for selected in ("everything", "inner_lrs"):
        direction = unit_direction(params, gen, params[-1] if selected == "inner_lrs" else None)
        expected = sum(float((g * d).sum()) for g, d in zip(analytic, direction))
        errors = [abs(central_difference(method, batch, direction, h) - expected) / max(1.0, abs(expected))
                  for h in STEPS]
        print(f"{name} {selected}: finite differences off by {min(errors):.1e} (relative) at best")
        assert min(errors) <= 1e-3, (selected, expected, errors)


@pytest.mark.parametrize("name,adapt", [("llama", []), ("gpt_neox", []),
                                        ("llama", ["inner.params=[model.layers.1.*]", "outer.params=[inner,lm_head.*]"])],
                         ids=["llama", "gpt_neox", "llama-last-block"])
def test_train_runs_a_user_model_of_another_architecture(name, adapt, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    data = ["data.num_train=32", "data.num_validation=8", "data.num_test=8"]
    splits = load_splits(load_config("embedded", data).data)
    records = [r for split in splits.values() for r in split]
    directory = save_tiny(name, list(Encoder(None, "reckoning", True, 64).corpus(records)), tmp_path / name)
    code = train_main(["embedded", f"model.name_or_path={directory}", "resources.num_workers=0", "train.max_steps=2",
                       "train.batch_size=8", "train.validations_per_epoch=2", "eval.max_tasks=8", *data,
                       "tracking.mode=disabled", f"train.output_dir={tmp_path / 'runs'}", "train.run_name=run", *adapt])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["train/loss"]) and math.isfinite(r["val/answer_loss"]) for r in rows)
    summary = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
    assert math.isfinite(summary["test"]["test/answer_loss"])
    # the checkpoint alone rebuilds what the inner loop adapts, and answers
    model = ReckoningModel.from_pretrained(tmp_path / "runs" / "run")
    adapted = model.method.param_names()
    if adapt:
        assert adapted and all(n.startswith("model.layers.1.") for n in adapted)
        assert model.method.inner_lrs.shape[1] == len(adapted)
    else:
        assert len(adapted) == len(list(model.method.model.parameters()))
    assert model.answer(records[0]["knowledge"], records[0]["question"]).text is not None
