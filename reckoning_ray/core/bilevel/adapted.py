"""What the inner loop adapts (``inner.params``) and how the model sees it.

An adapted set (:class:`Weights` or :class:`LoRA`) names the tensors the inner loop takes its steps
on (one learned rate each per step), gives their initial values (meta-parameters the outer loop
trains) and turns a set of their values into the weights the model is called with
(``torch.func.functional_call``):

- :class:`Weights` (``inner.params=[all]`` or name patterns): the model's own parameters, or
  some of them; the call gets them as they are.
- :class:`LoRA` (``inner.params=[lora]``): low-rank adapters (Hu et al., 2021) on the weights of the
  ``inner.lora.target_modules``: the fast weights are the adapter matrices ``A`` (r x in) and
  ``B`` (out x r), and the model is called with ``W + (alpha / r) B A`` in place of each target's
  ``W`` (transposed for GPT-2's ``Conv1D``, whose weight is in x out), as ``peft`` computes a LoRA
  layer without dropout (``tests/test_bilevel.py`` checks the two against each other). ``A`` starts
  as peft's (Kaiming-uniform), ``B`` at zero, so the untrained model is the base model; the outer
  loop trains both initial values, the inner loop adapts them per task. The base weights are
  frozen unless ``outer.params`` names them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from reckoning_ray.core.bilevel.lm import BilevelError, select_params

LORA = "lora"
# The modules LoRA adapts by default, per model type (those peft adapts by default).
LORA_TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
}
# extra-state key of the adapters (meta_parameters.safetensors)
LORA_STATE = "lora/"


class Weights:
    """The model's own parameters, all of them or those ``patterns`` name (``inner.params``)."""

    def __init__(self, model: torch.nn.Module, patterns: Sequence[str] = ("all",)) -> None:
        self.model = model
        self.names = select_params(model, list(patterns), "inner.params")
        self.model_names = list(self.names)  # the model's parameters the inner loop changes
        params = dict(model.named_parameters())
        self._params = [params[n] for n in self.names]  # the same Parameter objects through .to()

    def initial(self) -> list[Tensor]:
        return list(self._params)

    def weights(self, adapted: dict[str, Tensor]) -> dict[str, Tensor]:
        return adapted

    def parameters(self) -> list[Tensor]:
        """Meta-parameters besides the model's own (none)."""
        return []

    def state(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, state: dict[str, Tensor]) -> None:
        pass


class LoRA:
    """Low-rank adapters on ``target_modules`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, r: int, alpha: float, target_modules: Sequence[str],
                 dropout: float = 0.0, seed: int = 0) -> None:
        if r < 1:
            raise BilevelError(f"inner.lora.r={r} is invalid: the adapters' rank must be >= 1")
        if dropout:
            raise BilevelError(f"inner.lora.dropout={dropout} is not supported: the adapters are merged into the "
                               "weights for each call (W + alpha/r B A), where dropout on their input has no place; "
                               "set inner.lora.dropout=0 (model.dropout still applies to the whole model)")
        self.model, self.r, self.scale = model, int(r), float(alpha) / int(r)
        targets = list(target_modules) or LORA_TARGETS.get(getattr(model.config, "model_type", ""), [])
        if not targets:
            raise BilevelError(f"inner.lora.target_modules is empty and there is no default for model type "
                               f"{getattr(model.config, 'model_type', '?')!r}: name the modules to adapt, e.g. "
                               "inner.lora.target_modules=[q_proj,v_proj]")
        self.modules: list[tuple[str, bool, int, int]] = []  # (weight name, transposed, in, out)
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] not in targets:
                continue
            weight = getattr(module, "weight", None)
            if not isinstance(weight, Tensor) or weight.dim() != 2:
                continue
            transposed = type(module).__name__ == "Conv1D"  # GPT-2: weight is [in, out]
            fan_in, fan_out = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
            self.modules.append((f"{name}.weight", transposed, fan_in, fan_out))
        if not self.modules:
            raise BilevelError(f"inner.lora.target_modules={targets} matches no linear layer of the model; its "
                               f"modules are named like {[n for n, _ in model.named_modules()][-4:]}")
        ref = next(model.parameters())
        generator = torch.Generator().manual_seed(seed)
        self.tensors: dict[str, torch.nn.Parameter] = {}
        for weight_name, _, fan_in, fan_out in self.modules:
            base = weight_name.removesuffix(".weight")
            a = torch.empty(self.r, fan_in, dtype=torch.float64)
            # peft's init: A as nn.Linear's default (Kaiming uniform, a=sqrt(5)), B zero
            bound = 1.0 / math.sqrt(fan_in)
            a.uniform_(-bound, bound, generator=generator)
            self.tensors[f"{base}.lora_A"] = torch.nn.Parameter(a.to(ref.dtype).to(ref.device))
            self.tensors[f"{base}.lora_B"] = torch.nn.Parameter(
                torch.zeros(fan_out, self.r, dtype=ref.dtype, device=ref.device))
        self.names = list(self.tensors)
        self.model_names: list[str] = []  # the model's own parameters stay as they are
        # the base weights, looked up once: weights() runs in every forward pass of the inner loop
        # (the Parameter objects stay the same through .to() and load_state_dict)
        params = dict(model.named_parameters())
        self.base = {weight_name: params[weight_name] for weight_name, *_ in self.modules}

    def initial(self) -> list[Tensor]:
        return [self.tensors[n] for n in self.names]

    def weights(self, adapted: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for weight_name, transposed, _, _ in self.modules:
            base = weight_name.removesuffix(".weight")
            delta = adapted[f"{base}.lora_B"] @ adapted[f"{base}.lora_A"]  # [out, in]
            out[weight_name] = self.base[weight_name] + self.scale * (delta.transpose(-1, -2) if transposed else delta)
        return out

    def parameters(self) -> list[Tensor]:
        return [self.tensors[n] for n in self.names]

    def state(self) -> dict[str, Tensor]:
        return {LORA_STATE + n: t.detach().clone() for n, t in self.tensors.items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        missing = [n for n in self.names if LORA_STATE + n not in state]
        if missing:
            raise BilevelError(f"the checkpoint has no LoRA adapters for {missing[:3]}: it was trained with other "
                               "inner.params / inner.lora settings")
        with torch.no_grad():
            for n, t in self.tensors.items():
                t.copy_(state[LORA_STATE + n])

def build_adapted(model: torch.nn.Module, inner: Any, seed: int = 0) -> "Weights | LoRA":
    """What ``inner.params`` adapts: :class:`Weights`, or :class:`LoRA` (``[lora]``, with ``inner.lora``)."""
    params = [str(p) for p in inner.params]
    if LORA in params:
        if params != [LORA]:
            raise BilevelError(f"inner.params={params}: 'lora' stands alone (the adapters replace the weights "
                               "the inner loop would adapt)")
        lora = inner.lora
        return LoRA(model, int(lora.r), float(lora.alpha), list(lora.target_modules), float(lora.dropout), seed)
    return Weights(model, params)

