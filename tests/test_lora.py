"""inner.params=[lora]: the inner loop adapts low-rank adapters (reckoning_ray/core/bilevel/adapted.py).
The functional adapters equal peft's LoRA layers; the fused engine equals the reference with every
memory option; the meta-gradient matches finite differences; a run trains, and its checkpoint
answers, with the adapters it learned."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from test_architectures import save_tiny
from test_bilevel import assert_finite_differences_agree, assert_same_step_and_evaluation, build, make_cfg, make_records

from reckoning_ray.core.bilevel.adapted import LoRA
from reckoning_ray.core.bilevel.lm import BilevelError, causal_lm_logits
from reckoning_ray.core.config import load_config
from reckoning_ray.core.data.encode import Encoder
from reckoning_ray.core.errors import ConfigError
from reckoning_ray.core.predict import ReckoningModel
from reckoning_ray.predict import main as predict_main
from reckoning_ray.train import main as train_main

LORA = ["inner.params=[lora]", "inner.lora.r=2", "inner.lora.alpha=4", "outer.params=[inner]"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def randomize(method, seed: int = 7) -> None:
    """B away from zero, so that the adapters change the model and every gradient is checked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in method.adapted.tensors.items():
            tensor.copy_(torch.randn(tensor.shape, dtype=tensor.dtype, generator=g) * 0.3)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_the_adapters_are_peft_lora_layers(architecture, tmp_path):
    from peft import LoraConfig, get_peft_model

    records = make_records()
    corpus = list(Encoder(None, "reckoning", True, 64).corpus(records))
    cfg = make_cfg(f"model.name_or_path={save_tiny(architecture, corpus, tmp_path / architecture)}", *LORA)
    method, batch = build(cfg, records)
    randomize(method)
    adapted = method.adapted
    targets = sorted({name.rsplit(".", 1)[-1] for name, *_ in ((m[0].removesuffix(".weight"),) for m in adapted.modules)})
    peft_model = get_peft_model(copy.deepcopy(method.model), LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=architecture == "gpt2"))
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                base = name.removeprefix("base_model.model.")
                module.lora_A["default"].weight.copy_(adapted.tensors[f"{base}.lora_A"])
                module.lora_B["default"].weight.copy_(adapted.tensors[f"{base}.lora_B"])
    s = batch.sequence
    ours = causal_lm_logits(method.model, adapted.weights(dict(zip(adapted.names, adapted.initial()))),
                            s.input_ids, s.attention_mask)
    theirs = causal_lm_logits(peft_model, None, s.input_ids, s.attention_mask)
    base = causal_lm_logits(method.model, None, s.input_ids, s.attention_mask)
    real = s.attention_mask.bool()
    assert torch.allclose(ours[real], theirs[real], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(ours[real], base[real])  # the adapters do change the model
    assert targets == (["c_attn"] if architecture == "gpt2" else ["q_proj", "v_proj"])  # peft's defaults


@pytest.mark.parametrize("options", [[], ["inner.checkpoint=true"], ["inner.tasks_per_pass=1"], ["inner.first_order=true"],
                                     ["inner.checkpoint=true", "inner.tasks_per_pass=1"]],
                         ids=lambda v: "+".join(o.split(".")[1] for o in v) or "batched")
def test_lora_inner_loop_equals_the_reference(options):
    base = ["inner.optimizer=adamw", "inner.lr_init=0.05", *LORA, "outer.params=[inner,transformer.wte.*]"]
    order = [o for o in options if o.startswith("inner.first_order")]
    reference, batch = build(make_cfg(*base, *order), engine="reference")
    fused, _ = build(make_cfg(*base, *options), engine="fused")
    for method in (reference, fused):
        randomize(method)
        names = method.param_names()
        assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
        assert method.inner_lrs.shape == (3, len(names))
        # the outer loop trains the adapters' initial values, the embedding and the rates; the rest is frozen
        assert [n for n, p in method.model.named_parameters() if p.requires_grad] == ["transformer.wte.weight"]
        assert len(method.meta_parameters()) == 1 + len(names) + 1
    assert_same_step_and_evaluation(reference, fused, batch, loss_scale=0.5)


def test_lora_meta_gradient_matches_finite_differences():
    cfg = make_cfg("inner.optimizer=adamw", "inner.eps=1e-2", "inner.lr_init=0.05", "eval.max_new_tokens=1", *LORA,
                   "outer.params=[inner,transformer.wte.*]", "inner.checkpoint=true")
    method, batch = build(cfg, records=make_records(3))
    randomize(method)
    assert_finite_differences_agree(method, batch, seed=11)


@pytest.mark.parametrize("params", [LORA, ["inner.params=[transformer.h.0.mlp.*,transformer.ln_f.*]"]], ids=["lora", "subset"])
def test_bf16_autocast_stays_within_its_tolerance_with_lora_and_a_subset(params):
    # the documented tolerance (inner.autocast): bf16 forward passes stay close to float32 with an SGD
    # inner loop (second-order AdamW does not, with or without adapters; BENCHMARKS.md)
    options = ["model.dtype=float32", "inner.optimizer=sgd", "inner.lr_init=0.5", *params]
    reference, batch = build(make_cfg(*options))
    method, _ = build(make_cfg(*options, "inner.autocast=bf16"))
    for m in (reference, method):
        if m.adapted.parameters():
            randomize(m)
    g = []
    for m in (reference, method):
        m.forward_backward(batch)
        g.append(torch.cat([p.grad.flatten() for p in m.meta_parameters()]))
    error = float((g[0] - g[1]).norm() / g[0].norm())
    assert 1e-5 < error < 0.05, error  # bf16 did run, and the meta-gradient stays close


def test_lora_settings_are_checked_before_any_work():
    with pytest.raises(ConfigError, match="inner.lora.dropout"):
        load_config("embedded", ["inner.params=[lora]", "inner.lora.dropout=0.1"])
    with pytest.raises(ConfigError, match="'lora' stands alone"):
        load_config("embedded", ["inner.params=[lora,transformer.h.0.*]"])
    with pytest.raises(BilevelError, match="target_modules.*matches no linear layer"):
        build(make_cfg(*LORA, "inner.lora.target_modules=[nothing_here]"))
    assert LoRA is not None


def test_a_lora_run_trains_and_its_checkpoint_answers_with_its_adapters(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "runs" / "lora"
    code = train_main(["embedded", *LORA, "outer.params=[inner,transformer.wte.*]", "resources.num_workers=0",
                       "train.max_steps=3", "train.validations_per_epoch=8", "data.num_train=64",
                       "data.num_validation=16", "data.num_test=16", "eval.max_tasks=16", "train.batch_size=16",
                       "tracking.mode=disabled", f"train.output_dir={tmp_path / 'runs'}", "train.run_name=lora"])
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["train/loss"]) for r in rows)
    model = ReckoningModel.from_pretrained(run)
    adapted = model.method.adapted
    # the adapters it learned came back from the checkpoint (B left zero otherwise)
    assert any(float(t.abs().sum()) > 0 for n, t in adapted.tensors.items() if n.endswith("lora_B"))
    assert model.method.inner_lrs.shape[1] == len(adapted.names)
    encoded = model.encode(["bob is red .", "if someone is red then they are big ."])
    assert set(encoded.weights) == {m[0] for m in adapted.modules}  # the merged target weights
    assert model.answer(question="bob is big .", knowledge=encoded).text is not None
    # and through the command line
    facts = tmp_path / "facts.txt"
    facts.write_text("bob is red .\nif someone is red then they are big .\n")
    assert predict_main([str(run), "--knowledge", str(facts), "--question", "bob is big .", "--json"]) in (0, 3)


@pytest.mark.parametrize("preset,config", [
    ("paper-xl-lora", dict(n_layer=48, n_embd=8, n_head=2, n_positions=64)),
    ("llama-lora", dict(hidden_size=8, intermediate_size=16, num_hidden_layers=16, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)),
])
def test_the_lora_presets_name_what_their_models_have(preset, config, tmp_path):
    # a tiny model of the preset's architecture and depth stands in for GPT-2-XL / Llama-3.2-1B
    from conftest import SHARED_DATA
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from reckoning_ray.core.bilevel.method import ReckoningMethod
    from reckoning_ray.core.config import group
    from reckoning_ray.core.modeling import build_tokenizer, load_model_and_tokenizer, save_model_and_tokenizer

    tokenizer = build_tokenizer(["bob is red ."], model_max_length=64)
    kind = GPT2Config if preset.startswith("paper") else LlamaConfig
    model = AutoModelForCausalLM.from_config(kind(vocab_size=len(tokenizer), **config))
    save_model_and_tokenizer(model, tokenizer, tmp_path / "model")
    cfg = load_config(preset, [f"model.name_or_path={tmp_path / 'model'}", "model.dtype=float32",
                               f"data.path={SHARED_DATA / 'proofwriter-owa-natlang-dev.jsonl'}"])
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    encoder = Encoder(tokenizer, "reckoning", True, 64)
    method = ReckoningMethod(model, tokenizer, encoder, group(cfg, "inner"), group(cfg, "outer"), group(cfg, "eval"))
    trained = {n.split(".")[:3 if ".h." in n or ".layers." in n else 2][-1] for n, p in model.named_parameters()
               if p.requires_grad}
    adapted = method.param_names()
    if preset == "paper-xl-lora":
        assert {n.rsplit(".", 2)[-2] for n in adapted} == {"c_attn"} and len(adapted) == 2 * 48
        assert trained == {"wte", "47", "ln_f"}
    else:
        assert {n.rsplit(".", 2)[-2] for n in adapted} == {"q_proj", "v_proj"} and len(adapted) == 2 * 2 * 16
        assert trained == {"embed_tokens", "15", "norm"}
        as_shipped = load_config(preset, [f"data.path={SHARED_DATA / 'proofwriter-owa-natlang-dev.jsonl'}"])
        assert as_shipped.model.dtype == "bfloat16" and as_shipped.model.name_or_path == "meta-llama/Llama-3.2-1B"
        assert (cfg.inner.steps, cfg.inner.lr_init, cfg.train.batch_size) == (4, 5e-5, 1)
    assert (cfg.inner.lora.r, cfg.inner.lora.alpha) == (16, 32.0)
