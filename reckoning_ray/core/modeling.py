"""The causal language model and its tokenizer.

Three ways to get them, chosen by ``model.name_or_path``:

- ``"embedded"``: a small randomly initialised GPT-2 (shape from the model config) with a
  word-level tokenizer built from the texts the model will see. Runs offline on a CPU.
- a local directory written by :func:`save_model_and_tokenizer` (or any ``save_pretrained``
  directory of a causal LM): loaded with ``local_files_only=True``.
- a Hugging Face hub id such as ``gpt2`` (the paper's model): the local cache first, then the
  hub. Without network (``HF_HUB_OFFLINE=1`` or the hub unreachable) this fails within seconds
  with a :class:`ModelLoadError` that says to pass a local directory.

``model.dropout`` sets the dropout of every one of them (:func:`dropout_overrides`): GPT-2's
``resid_pdrop``, ``embd_pdrop`` and ``attn_pdrop``; for other architectures whichever of the common
dropout attributes their config has. The methods decide when it is active (train() / eval()).

Second-order RECKONING differentiates through the gradient of the inner loss; PyTorch's fused
scaled-dot-product attention has no double backward on CPU, so
:func:`set_attention_for_second_order` switches the model to the eager attention path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from reckoning_ray.core.errors import InputError
from reckoning_ray.core.hub import endpoint as hub_endpoint
from reckoning_ray.core.hub import hub_offline, hub_reachable, looks_like_hub_id

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
# Special tokens take the first ids: <pad>=0, <eos>=1 (also bos), <unk>=2.
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# Config attributes that model.dropout sets: GPT-2's three, then the names other causal LMs use
# (e.g. OPT / Llama / GPT-Neo); only those a config has are set.
GPT2_DROPOUT_ATTRS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
DROPOUT_ATTRS = GPT2_DROPOUT_ATTRS + ("dropout", "attention_dropout", "hidden_dropout", "resid_dropout",
                                      "embed_dropout")

_attention_logged = False


class ModelLoadError(InputError, RuntimeError):
    """The model or tokenizer cannot be loaded; the message names model.name_or_path and the fix."""


# --------------------------------------------------------------------------------------------
# Embedded model
# --------------------------------------------------------------------------------------------


def build_tokenizer(corpus: Iterable[str], model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose vocabulary is every word and punctuation run of ``corpus``.

    The pre-tokenizer splits on whitespace and between words and punctuation (``\\w+|[^\\w\\s]+``),
    so "bob isnt red ." is four tokens and "fact_0:" is "fact_0" + ":". Ids: the special tokens
    first (<pad>=0, <eos>=1, <unk>=2), then words by decreasing count, ties broken by the word,
    so the same corpus always gives the same ids, whatever its order. Decoding joins tokens
    with single spaces.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # vocab_size is a cap (default 30,000): set it high so no corpus word becomes <unk>.
    trainer = trainers.WordLevelTrainer(
        vocab_size=2**31 - 1, min_frequency=0, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _dropout_value(model_cfg: Any) -> float:
    # Configs built before model.dropout existed (no key) mean no dropout.
    value = float(getattr(model_cfg, "dropout", 0.0) or 0.0)
    if not 0.0 <= value < 1.0:
        raise ModelLoadError(f"model.dropout={value!r} is invalid: must be in [0, 1)")
    return value


def dropout_overrides(config: Any, dropout: float) -> dict[str, float]:
    """``{attribute: dropout}`` for each of :data:`DROPOUT_ATTRS` that ``config`` has."""
    return {name: dropout for name in DROPOUT_ATTRS if isinstance(getattr(config, name, None), (int, float))}


def build_embedded_model(model_cfg: Any, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> GPT2LMHeadModel:
    """Randomly initialised GPT-2 of the configured shape with the tokenizer's vocabulary.

    Dropout (resid/embd/attn) is ``model_cfg.dropout``. The global torch RNG is seeded with
    ``seed`` inside a forked RNG state, so the weights depend on ``seed`` only and the caller's
    RNG stream is left as it was.
    """
    dropout = _dropout_value(model_cfg)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=int(model_cfg.n_positions),
        n_embd=int(model_cfg.n_embd),
        n_layer=int(model_cfg.n_layer),
        n_head=int(model_cfg.n_head),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{name: dropout for name in GPT2_DROPOUT_ATTRS},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _dtype(model_cfg: Any) -> torch.dtype:
    name = str(getattr(model_cfg, "dtype", "float32"))
    if name not in DTYPES:
        raise ModelLoadError(f"model.dtype={name!r} is invalid: choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _from_pretrained(name: str, local_files_only: bool, dropout: float) -> tuple[PreTrainedModel, Any]:
    # The dtype is applied afterwards by .to(): from_pretrained's dtype keyword changed name
    # across transformers releases (torch_dtype -> dtype). Dropout goes into the config before
    # the model is built: the modules read it once, at construction.
    config = AutoConfig.from_pretrained(name, local_files_only=local_files_only)
    for attribute, value in dropout_overrides(config, dropout).items():
        setattr(config, attribute, value)
    model = AutoModelForCausalLM.from_pretrained(name, config=config, local_files_only=local_files_only)
    # Weights read from safetensors sit at the file's offsets, not at the allocator's alignment,
    # and CPU kernels then sum in another order: the same weights give gradients that differ in
    # the last bit from a model built in memory. Copies in fresh storage make a resumed run
    # continue exactly (and release the file).
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    return model, tokenizer


def pretrained_source(name: str) -> tuple[str, bool]:
    """Where ``model.name_or_path=name`` loads from, checked in seconds without loading weights:
    ``(path or hub id, local_files_only)``. Raises ModelLoadError naming the key and the fix for a
    missing directory, a directory without a model, or a hub id neither cached nor reachable."""
    offline_fix = (
        "pass a local directory instead (model.name_or_path=/path/to/dir, written by "
        "save_pretrained or reckoning_ray.core.modeling.save_model_and_tokenizer), or use "
        "model.name_or_path=embedded"
    )
    if not looks_like_hub_id(name) or os.path.exists(os.path.expanduser(name)):
        path = Path(os.path.expanduser(name))
        if not path.is_dir():
            raise ModelLoadError(
                f"model.name_or_path={name!r}: no such directory ({path.resolve()}); pass a directory "
                "written by save_pretrained (config.json, model.safetensors and tokenizer files), a hub "
                "id such as 'gpt2', or 'embedded'"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model.name_or_path={name!r}: {path.resolve()} has no config.json; pass a directory "
                "written by save_pretrained (config.json, model.safetensors and tokenizer files)"
            )
        return str(path), True
    # A hub id: the local Hugging Face cache first, the network only when it is there.
    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return name, True
    except OSError as cache_exc:
        if hub_offline():
            raise ModelLoadError(
                f"model.name_or_path={name!r} is a hub id that is not in the local Hugging Face cache, "
                f"and HF_HUB_OFFLINE is set; {offline_fix}"
            ) from cache_exc
        if not hub_reachable():
            raise ModelLoadError(
                f"model.name_or_path={name!r} is a hub id that is not in the local Hugging Face cache, "
                f"and the hub ({hub_endpoint()}) cannot be reached; {offline_fix}"
            ) from cache_exc
    return name, False


def _load_pretrained(name: str, dropout: float) -> tuple[PreTrainedModel, Any]:
    source, local_only = pretrained_source(name)
    try:
        return _from_pretrained(source, local_files_only=local_only, dropout=dropout)
    except (OSError, ValueError) as exc:
        where = "the hub" if not local_only else source
        raise ModelLoadError(f"model.name_or_path={name!r}: cannot load from {where}: {exc}") from exc


def load_model_and_tokenizer(
    model_cfg: Any, corpus: Optional[Iterable[str]] = None, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build or load the causal LM and its tokenizer (see the module docstring).

    Args:
        model_cfg: the ``model`` group of the config (name_or_path, n_layer, n_embd, n_head,
            n_positions, dtype, dropout).
        corpus: every text the embedded model will see (``Encoder.corpus(records)``); required
            for ``"embedded"``, ignored otherwise.
        seed: initialisation seed of the embedded model.

    Returns:
        (model, tokenizer): the model in ``model_cfg.dtype`` with ``model_cfg.dropout`` in its
        config, in eval mode (the caller switches to train());
        the tokenizer with pad, eos and bos ids set (pad = eos for GPT-2).

    Raises:
        ModelLoadError naming model.name_or_path and the fix.
    """
    name = str(model_cfg.name_or_path)
    dtype = _dtype(model_cfg)
    if name == EMBEDDED:
        if corpus is None:
            raise ModelLoadError(
                "model.name_or_path='embedded' builds its tokenizer from the data: pass "
                "corpus=Encoder(...).corpus(records) with the texts of every split"
            )
        tokenizer = build_tokenizer(corpus, model_max_length=int(model_cfg.n_positions))
        model = build_embedded_model(model_cfg, tokenizer, seed=seed)
    else:
        model, tokenizer = _load_pretrained(name, _dropout_value(model_cfg))
        if tokenizer.pad_token is None:
            # GPT-2 ships without a pad token; padded positions are masked out of attention
            # and loss, so reusing eos is safe.
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(
                f"model.name_or_path={name!r}: the tokenizer has no eos token; targets end with eos, "
                "so use a causal LM tokenizer that defines one"
            )
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.config.eos_token_id is None:
            model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model = model.to(dtype)
    model.eval()
    return model, tokenizer


def save_model_and_tokenizer(model: PreTrainedModel, tokenizer: Any, directory: str | os.PathLike) -> Path:
    """``save_pretrained`` the model (safetensors) and the tokenizer into ``directory``.

    ``load_model_and_tokenizer`` with ``model.name_or_path=<directory>`` loads them back.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------
# Attention path
# --------------------------------------------------------------------------------------------


def attention_implementation(model: PreTrainedModel) -> str:
    """Name of the attention path the model runs ("eager", "sdpa", ...)."""
    return str(model.config._attn_implementation)


def set_attention_for_second_order(model: PreTrainedModel, second_order: bool) -> str:
    """Use eager attention when second-order gradients are needed; returns the path in use.

    SDPA kernels have no double backward on CPU, so second-order RECKONING switches to the
    eager path (logged once per process). With ``second_order=False`` the model is left as it
    is (SDPA where available: faster for first-order and in-context training).
    """
    global _attention_logged
    if second_order and attention_implementation(model) != "eager":
        before = attention_implementation(model)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:  # transformers releases before set_attn_implementation read the config attribute
            model.config._attn_implementation = "eager"
        if not _attention_logged:
            logger.info(
                "second-order inner loop: attention switched from %s to eager (SDPA has no double "
                "backward on CPU)",
                before,
            )
            _attention_logged = True
    return attention_implementation(model)
