"""Model and tokenizer: the embedded build, save/load round trip, offline errors, second order."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from reckoning_ray.core import modeling
from reckoning_ray.core.schema import ModelConfig
from reckoning_ray.core.hub import hub_reachable
from reckoning_ray.core.data.encode import Encoder
from reckoning_ray.core.data.schema import make_record
from reckoning_ray.core.modeling import (
    ModelLoadError,
    attention_implementation,
    build_tokenizer,
    load_model_and_tokenizer,
    save_model_and_tokenizer,
    set_attention_for_second_order,
)

RECORDS = [
    make_record(
        id=f"t{i}",
        family="proofwriter",
        source="generated",
        knowledge=[f"{name} is {adj} .", f"{name} isnt big .", "if someone is big then they are red ."],
        facts=[f"{name} is {adj} ."],
        question=f"{name} is {adj} .",
        answer="yes",
        hops=0,
    )
    for i, (name, adj) in enumerate([("bob", "red"), ("anne", "blue"), ("dave", "cold"), ("erin", "red")])
]


def model_cfg(**overrides):
    base = {"name_or_path": "embedded", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}
    base.update(overrides)
    return OmegaConf.structured(ModelConfig(**base))


def corpus() -> list[str]:
    return list(Encoder(None, "reckoning", True, 64).corpus(RECORDS))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------ embedded build


def test_embedded_tokenizer_covers_the_corpus_with_whole_words():
    tok = build_tokenizer(corpus())
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == ("<pad>", "<eos>", "<eos>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 1, 2)
    for text in corpus():
        for token_id in ids(tok, text):
            assert token_id != tok.unk_token_id, text
    assert tok.tokenize("bob isnt red .") == ["bob", "isnt", "red", "."]
    assert tok.tokenize("fact_0: bob") == ["fact_0", ":", "bob"]
    assert tok.tokenize("Based on fact_0 fact_1 fact_2, can we conclude bob is red?") == [
        "Based", "on", "fact_0", "fact_1", "fact_2", ",", "can", "we", "conclude", "bob", "is", "red", "?"
    ]
    # Words never seen map to <unk>.
    assert ids(tok, "zebra") == [tok.unk_token_id]
    # 3 special tokens + every distinct word of the corpus.
    words = {w for text in corpus() for w, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)}
    assert len(tok) == 3 + len(words)


def test_embedded_build_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    model_a, tok_a = load_model_and_tokenizer(model_cfg(), corpus(), seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    # Corpus order does not change the ids (ties are broken by the word).
    model_b, tok_b = load_model_and_tokenizer(model_cfg(), list(reversed(corpus())), seed=7)
    assert tok_a.get_vocab() == tok_b.get_vocab()
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    model_c, _ = load_model_and_tokenizer(model_cfg(), corpus(), seed=8)
    assert not torch.equal(model_c.transformer.wte.weight, model_a.transformer.wte.weight)
    cfg = model_a.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.vocab_size) == (1, 16, 2, 64, len(tok_a))
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (0, 1, 1)
    assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == (0.0, 0.0, 0.0)  # model.dropout's default
    assert model_a.generation_config.pad_token_id == 0 and model_a.generation_config.eos_token_id == 1


def dropout_probabilities(model) -> set[float]:
    return {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}


def test_dropout_key_sets_the_embedded_model_and_a_loaded_directory(tmp_path):
    model, tok = load_model_and_tokenizer(model_cfg(dropout=0.15, dtype="float64"), corpus(), seed=0)
    c = model.config
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.15, 0.15, 0.15)
    assert dropout_probabilities(model) == {0.15}  # embedding, attention, residual and MLP dropout
    assert not model.training  # the methods switch modes
    # Same weights as without dropout: dropout does not change the initialisation.
    plain, _ = load_model_and_tokenizer(model_cfg(dtype="float64"), corpus(), seed=0)
    assert dropout_probabilities(plain) == {0.0}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    # A directory (or hub id) keeps its weights and takes model.dropout, whatever its config.json says;
    # the modules are built with it (they read the probability once, at construction).
    save_model_and_tokenizer(model, tok, tmp_path / "ckpt")
    for value in (0.0, 0.3):
        loaded, _ = load_model_and_tokenizer(model_cfg(name_or_path=str(tmp_path / "ckpt"), dropout=value))
        c = loaded.config
        assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (value, value, value)
        assert dropout_probabilities(loaded) == {value}


def test_dropout_overrides_set_only_the_attributes_a_config_has():
    from transformers import GPT2Config, LlamaConfig

    assert modeling.dropout_overrides(GPT2Config(), 0.1) == {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
    assert modeling.dropout_overrides(LlamaConfig(), 0.1) == {"attention_dropout": 0.1}
    with pytest.raises(ModelLoadError, match=r"model.dropout=1.0.*\[0, 1\)"):
        load_model_and_tokenizer(model_cfg(dropout=1.0), corpus())


def test_tokenizer_ids_follow_counts_then_words():
    # Ids are (decreasing count, then word), never hash-map order, so every process and
    # every worker builds the same vocabulary from the same corpus.
    tok = build_tokenizer(corpus())
    pre_tokenize = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    counts = Counter(word for text in corpus() for word, _ in pre_tokenize(text))
    expected = ["<pad>", "<eos>", "<unk>"] + sorted(counts, key=lambda w: (-counts[w], w))
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == expected
    assert expected[3:8] == [".", "is", ":", "red", "big"]


def test_embedded_without_corpus_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="embedded.*corpus="):
        load_model_and_tokenizer(model_cfg())


@pytest.mark.parametrize("dtype, torch_dtype", [("float64", torch.float64), ("bfloat16", torch.bfloat16)])
def test_dtype_is_applied_and_weights_stay_tied(dtype, torch_dtype):
    model, _ = load_model_and_tokenizer(model_cfg(dtype=dtype), corpus())
    assert {p.dtype for p in model.parameters()} == {torch_dtype}
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


# ------------------------------------------------------------------------------ save / load


def test_save_then_load_gives_the_same_logits_and_tokens(tmp_path):
    model, tok = load_model_and_tokenizer(model_cfg(dtype="float64"), corpus(), seed=3)
    save_model_and_tokenizer(model, tok, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded, loaded_tok = load_model_and_tokenizer(model_cfg(name_or_path=str(tmp_path / "ckpt"), dtype="float64"))
    assert type(loaded) is type(model) and not loaded.training
    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert (loaded_tok.pad_token_id, loaded_tok.eos_token_id, loaded_tok.unk_token_id) == (0, 1, 2)
    for text in corpus() + ["zebra is red ."]:
        assert ids(loaded_tok, text) == ids(tok, text)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    x = torch.tensor([ids(tok, "fact_0 : bob is red . <eos> Based on fact_0 , can we conclude bob is red ?")])
    with torch.no_grad():
        # Equal weights; safetensors leaves tensors at other memory alignments, which may change
        # the BLAS summation order in the last bit (measured: 1e-16 in float64).
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-12)


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"has no config\.json.*save_pretrained"):
        load_model_and_tokenizer(model_cfg(name_or_path=str(tmp_path)))


def test_missing_local_path_is_a_clear_error():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"'\./no/such/dir': no such directory.*save_pretrained"):
        load_model_and_tokenizer(model_cfg(name_or_path="./no/such/dir"))
    assert time.perf_counter() - start < 2.0


# ------------------------------------------------------------------------------ hub ids offline


def test_hub_id_offline_fails_fast_and_says_to_pass_a_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(model_cfg(name_or_path="gpt2"))
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert "'gpt2'" in message and "HF_HUB_OFFLINE" in message and "pass a local directory" in message


def test_hub_id_with_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # A closed local port: the probe fails at once, so the ~25 s of hub retries never start.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert hub_reachable(timeout=2.0) is False
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"'openai-community/gpt2'.*cannot be reached.*pass a local directory"):
        load_model_and_tokenizer(model_cfg(name_or_path="openai-community/gpt2"))
    assert time.perf_counter() - start < 5.0


# ------------------------------------------------------------------------------ second order


def test_eager_attention_gives_a_working_double_backward():
    model, tok = load_model_and_tokenizer(model_cfg(dtype="float64"), corpus(), seed=0)
    x = torch.tensor([ids(tok, "fact_0 : bob is red . <eos>")])
    params = [p for p in model.parameters() if p.requires_grad]

    def lm_loss() -> torch.Tensor:
        # Cross-entropy in the model's dtype: transformers' built-in loss (labels=...) casts the
        # logits to float32, which would blur a float64 finite-difference check.
        logits = model(x).logits[:, :-1]
        assert logits.dtype == torch.float64
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    def double_backward() -> None:
        loss = lm_loss()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        sum((g * g).sum() for g in grads).backward()

    assert attention_implementation(model) == "sdpa"
    # The reason for the switch: SDPA's CPU kernel has no derivative of its backward.
    with pytest.raises(RuntimeError, match="not implemented"):
        double_backward()
    model.zero_grad()
    assert set_attention_for_second_order(model, second_order=False) == "sdpa"
    assert set_attention_for_second_order(model, second_order=True) == "eager"
    assert attention_implementation(model) == "eager"
    double_backward()
    second = model.transformer.h[0].attn.c_attn.weight.grad
    assert second is not None and torch.isfinite(second).all() and second.abs().sum() > 0

    # The second-order gradient is right: d/dw of |grad L|^2 along a direction v equals the
    # finite difference of |grad L|^2 (central, float64).
    w = model.transformer.h[0].attn.c_attn.weight
    v = torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=w.dtype)

    def grad_norm_sq() -> float:
        loss = lm_loss()
        return float(sum((g * g).sum() for g in torch.autograd.grad(loss, params)))

    eps = 1e-5
    with torch.no_grad():
        w += eps * v
    plus = grad_norm_sq()
    with torch.no_grad():
        w -= 2 * eps * v
    minus = grad_norm_sq()
    with torch.no_grad():
        w += eps * v
    numeric = (plus - minus) / (2 * eps)
    analytic = float((second * v).sum())
    assert analytic == pytest.approx(numeric, rel=1e-7)
